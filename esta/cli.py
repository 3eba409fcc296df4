"""The `esta` command line.

    esta demo [--out DIR]                      the embedded demo (shipped anchors and data, ~minutes on a CPU)
    esta train --config FILE [--out DIR]       ESTA training from a JSON or TOML config (see below)
    esta deploy --run DIR [--evaluate]         the top-score stitch per FLOPs interval, report + plot
    esta export --run DIR --stitch I --out D   merged standalone module of one member (safetensors + JSON)
    esta bench                                 the fused stitched-linear op against F.linear on this machine
    torchrun --nproc_per_node=N -m esta train --config FILE    distributed (DDP) training

Config (JSON, or TOML by the .toml extension); unknown keys are errors:

    {"anchors": [{"timm": "vit_tiny_patch16_224", "pretrained": true}, ...]   # or {"demo": "vit-demo-ti"}
                                                                             # or {"timm": ..., "checkpoint": "file"}
     "data": {"folder": "path", "train": "train", "test": "val", "image_size": 224}   # torchvision ImageFolder
          or {"builtin": "digits-5to9"},                                               # a shipped dataset
     "num_classes": 10,                       # the task's classes: the anchors' heads are re-made for it
                                              # (must match the data; leave it out to keep the anchors' heads)
     "stitching": {"kernel_size": 2, "stride": 1},
     "train": {...esta.train.TrainConfig keys...},
     "evaluate": {"all": true, "batch_size": 256}}

A run directory holds config.json, checkpoint.pt (resumable: `esta train --config ... --out DIR --resume`),
history.json, report.json, report.png and export/ (the deployed members).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

__all__ = ["main", "load_config", "build_model", "build_data"]

_TOP_KEYS = {"anchors", "data", "num_classes", "stitching", "train", "evaluate", "device"}
_ANCHOR_KEYS = {"demo", "timm", "pretrained", "checkpoint", "kwargs"}
_DATA_KEYS = {"builtin", "folder", "train", "test", "image_size"}
_STITCH_KEYS = {"kernel_size", "stride", "calibration_images"}
_EVAL_KEYS = {"all", "batch_size"}


class ConfigError(ValueError):
    """A configuration problem, reported without a traceback by the command line."""


def _check_keys(where: str, values, allowed) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table/object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError("TOML configs need Python 3.11+ or `pip install tomli`; or use JSON") from None
    try:
        if path.endswith(".toml"):
            config = tomllib.loads(raw.decode())
        else:
            config = json.loads(raw)
    except Exception as e:  # the parser's message names the line
        raise ConfigError(f"cannot parse {path}: {e}") from None
    return check_config(config)


def check_config(config: dict) -> dict:
    from esta.train import TrainConfig

    _check_keys("config", config, _TOP_KEYS)
    for key in ("anchors", "data"):
        if key not in config:
            raise ConfigError(f"config: missing key {key!r}")
    if not isinstance(config["anchors"], list) or len(config["anchors"]) < 2:
        raise ConfigError("config: anchors must be a list of at least two anchors")
    for i, spec in enumerate(config["anchors"]):
        _check_keys(f"config.anchors[{i}]", spec, _ANCHOR_KEYS)
        if ("demo" in spec) == ("timm" in spec):
            raise ConfigError(f"config.anchors[{i}]: give exactly one of 'demo' or 'timm'")
    _check_keys("config.data", config["data"], _DATA_KEYS)
    if ("builtin" in config["data"]) == ("folder" in config["data"]):
        raise ConfigError("config.data: give exactly one of 'builtin' or 'folder'")
    _check_keys("config.stitching", config.get("stitching", {}), _STITCH_KEYS)
    _check_keys("config.evaluate", config.get("evaluate", {}), _EVAL_KEYS)
    try:
        TrainConfig.from_dict(config.get("train", {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.train: {e}") from None
    return config


# ---------------------------------------------------------------------------------------- building

def _load_state(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"anchor checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_anchor(spec: dict, num_classes: Optional[int]):
    import esta

    if "demo" in spec:
        from esta.demo.anchors import ANCHOR_NAMES, load_pretrained_anchor

        if spec["demo"] not in ANCHOR_NAMES:
            raise ConfigError(f"unknown demo anchor {spec['demo']!r}; shipped: {', '.join(sorted(ANCHOR_NAMES))}")
        vit = load_pretrained_anchor(spec["demo"])
    else:
        import timm

        name = spec["timm"]
        if not timm.is_model(name):
            raise ConfigError(f"unknown anchor {name!r}: not a timm model name (see timm.list_models())")
        kwargs = dict(spec.get("kwargs", {}))
        vit = timm.create_model(name, pretrained=bool(spec.get("pretrained", False)) and "checkpoint" not in spec,
                                **kwargs)
        if "checkpoint" in spec:
            state = _load_state(spec["checkpoint"])
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            missing, unexpected = vit.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("head.")]:
                raise ConfigError(f"anchor checkpoint {spec['checkpoint']} does not fit {name}: missing "
                                  f"{missing[:4]}, unexpected {unexpected[:4]}")
    if num_classes is not None:
        vit.reset_classifier(num_classes)  # a new task: a new head
    return esta.TimmViTAnchor(vit)


def build_model(config: dict):
    import esta

    anchors = [build_anchor(spec, config.get("num_classes")) for spec in config["anchors"]]
    st = config.get("stitching", {})
    return esta.StitchableModel(anchors, kernel_size=st.get("kernel_size", 2), stride=st.get("stride", 1))


def build_data(config: dict):
    """(train, test) datasets of (input, label) pairs."""
    spec = config["data"]
    if "builtin" in spec:
        from esta.demo.data import NUM_CLASSES, TASKS, load_task

        if spec["builtin"] not in TASKS:
            raise ConfigError(f"unknown builtin dataset {spec['builtin']!r}; shipped: {', '.join(sorted(TASKS))}")
        n = config.get("num_classes")
        if n is not None and n != NUM_CLASSES:
            raise ConfigError(f"config.num_classes is {n} but the builtin dataset {spec['builtin']!r} has "
                              f"{NUM_CLASSES} classes")
        return tuple(torch.utils.data.TensorDataset(*load_task(spec["builtin"], split)) for split in ("train", "test"))
    from torchvision import datasets, transforms

    root = spec["folder"]
    if not os.path.isdir(root):
        raise ConfigError(f"data folder {root} does not exist")
    size = int(spec.get("image_size", 224))
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    out = []
    for split in (spec.get("train", "train"), spec.get("test", "val")):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise ConfigError(f"data folder {path} does not exist (expected ImageFolder layout: "
                              f"{root}/<split>/<class>/<image>)")
        out.append(datasets.ImageFolder(path, transform=tf))
    train, test = out
    # ImageFolder numbers the classes by the sorted folder names of each split separately: a class missing
    # from one split would silently shift every label after it
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise ConfigError(f"the class folders of {train.root} and {test.root} differ ({', '.join(only[:6])}): "
                          f"both splits need the same classes")
    n = config.get("num_classes")
    if n is not None and n != len(train.classes):
        raise ConfigError(f"config.num_classes is {n} but {train.root} has {len(train.classes)} class folders")
    return train, test


# ---------------------------------------------------------------------------------------- commands

def _device(config) -> torch.device:
    name = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


def run_training(config: dict, out: str, *, resume: bool = False, progress: bool = True,
                 deploy: bool = True, quiet: bool = False) -> dict:
    from esta.train import Trainer, TrainConfig, calibration_images, init_distributed

    device = _device(config)
    distributed = init_distributed(device)
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda *a: None) if (quiet or rank != 0) else print
    tc = TrainConfig.from_dict(config.get("train", {}))
    train, test = build_data(config)
    model = _seeded_model(config, tc, device)
    calib = config.get("stitching", {}).get("calibration_images", tc.calibration_images)
    t0 = time.time()
    model.init_stitching_layers(calibration_images(train, calib, tc.seed).to(device), num_images=calib)
    log(f"least-squares init of {sum(len(g) for g in model.stitching_layers)} stitching layers on {calib} "
        f"images: {time.time() - t0:.1f} s")
    trainer = Trainer(model, train, tc, device=device, distributed=distributed)
    log(model.format_trainable_report())
    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, "checkpoint.pt")
    if rank == 0:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    if resume:
        trainer.load(checkpoint)
        log(f"resumed at step {trainer.step} of {trainer.total_steps}")
    log(f"{len(model)} members ({len(model.anchors)} anchors), {trainer.total_steps} steps of {trainer.global_batch} "
        f"images, lr {trainer.lr:.3g}")
    t0 = time.time()
    trainer.fit(progress=progress, checkpoint=checkpoint, checkpoint_every=max(1, trainer.steps_per_epoch))
    log(f"training: {time.time() - t0:.1f} s")
    if rank == 0:
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(trainer.history, f)
    result = {"trainer": trainer, "model": model, "test": test}
    if deploy and rank == 0:
        result["report"] = run_deploy(model, trainer.sampler, trainer.flops, test, out, config,
                                      progress=progress, log=log)
    return result


def run_deploy(model, sampler, flops, test, out, config, *, evaluate_all: Optional[bool] = None,
               progress: bool = True, log=print) -> dict:
    from esta import export as export_mod
    from esta.deploy import build_report, format_table, write_report
    from esta.train import evaluate

    ev = config.get("evaluate", {})
    evaluate_all = ev.get("all", True) if evaluate_all is None else evaluate_all
    deployed = sampler.deploy()
    members = list(range(len(model))) if evaluate_all else deployed
    t0 = time.time()
    accuracy, correct = evaluate(model, test, members, batch_size=ev.get("batch_size", 256), progress=progress,
                                 per_example=True)
    log(f"evaluated {len(members)} members on {len(test)} test images: {time.time() - t0:.1f} s")
    report = build_report(model, sampler, flops, accuracy, correct=correct)
    paths = write_report(report, out)
    for i in deployed:
        export_mod.save(model.export(i), os.path.join(out, "export", f"stitch-{i}"))
    log(format_table(report))
    log(f"report: {', '.join(paths.values())}; deployed members exported to {os.path.join(out, 'export')}")
    return report


def _seeded_model(config, tc, device):
    # Seeded, so anchors without pretrained weights (random init) and the new heads are rebuilt identically
    # by `esta deploy` / `esta export` (a checkpoint holds only what training changes).
    torch.manual_seed(tc.seed)
    return build_model(config).to(device)


def _restore(run: str):
    """The model, trainer and test set of a run directory."""
    from esta.train import Trainer, TrainConfig

    config_path = os.path.join(run, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{run} is not a run directory (no config.json); run `esta train` first")
    config = load_config(config_path)
    tc = TrainConfig.from_dict(config.get("train", {}))
    device = _device(config)
    train, test = build_data(config)
    model = _seeded_model(config, tc, device)
    trainer = Trainer(model, train, tc, device=device)
    trainer.load(os.path.join(run, "checkpoint.pt"))
    return config, model, trainer, test


def _demo_config(args) -> dict:
    return {
        "anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}, {"demo": "vit-demo-b"}],
        "data": {"builtin": "letters-cgoqd"},
        "num_classes": 5,
        "stitching": {"kernel_size": 2, "stride": 1, "calibration_images": 100},
        # temperature 0.1: the sampler concentrates each interval's steps on its top-score member; the relative
        # score (SNIP / loss) keeps an unfit member's large gradients from taking its interval over (README)
        "train": {"epochs": args.epochs, "batch_size": 32, "base_lr": 4e-2, "warmup_epochs": 2,
                  "sampler_warmup_epochs": 3, "num_intervals": 6, "temperature": 0.1, "score": "relative-snip",
                  "seed": args.seed},
        "evaluate": {"all": True, "batch_size": 512},
        "device": "cpu",
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="esta", description="Efficient Stitchable Task Adaptation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="adapt shipped demo anchors to a new task with ESTA, deploy, report")
    p.add_argument("--out", default="esta-demo", help="run directory (default: esta-demo)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("train", help="ESTA training from a config file")
    p.add_argument("--config", required=True)
    p.add_argument("--out", default="esta-run")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("deploy", help="deploy a trained run: top-score stitch per interval, report and plot")
    p.add_argument("--run", required=True)
    p.add_argument("--evaluate", choices=("all", "deployed"), default="all")
    p = sub.add_parser("export", help="export one member of a trained run as safetensors + JSON")
    p.add_argument("--run", required=True)
    p.add_argument("--stitch", type=int, required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("bench", help="time the fused stitched-linear op against F.linear here")
    p.add_argument("--shape", default="vit-s", choices=("vit-s", "vit-b", "llama"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"esta {args.command}: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "demo":
        t0 = time.time()
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        result = run_training(_demo_config(args), args.out, progress=not args.no_progress)
        report = result["report"]
        _demo_summary(report, result["model"])
        print(f"esta demo: done in {time.time() - t0:.0f} s; report in {args.out}/report.json and report.png")
        return 0
    if args.command == "train":
        config = load_config(args.config)
        run_training(config, args.out, resume=args.resume, progress=not args.no_progress)
        return 0
    if args.command == "deploy":
        config, model, trainer, test = _restore(args.run)
        run_deploy(model, trainer.sampler, trainer.flops, test, args.run, config,
                   evaluate_all=args.evaluate == "all")
        return 0
    if args.command == "export":
        from esta import export as export_mod

        config, model, trainer, test = _restore(args.run)
        if not 0 <= args.stitch < len(model):
            raise ConfigError(f"--stitch {args.stitch} is outside [0, {len(model)})")
        export_mod.save(model.export(args.stitch), args.out)
        print(f"exported member {args.stitch} to {args.out}")
        return 0
    if args.command == "bench":
        from esta.benchmark import run_bench

        print(run_bench(args.shape, backend=args.backend, repeats=args.repeats))
        return 0
    raise AssertionError(args.command)


def _demo_summary(report: dict, model) -> None:
    anchors = report.get("anchor_accuracy", {})
    flops = [m["flops"] for m in report["members"]]
    deployed = [r["deployed"] for r in report["deployed"]]
    accs = [r["accuracy"] for r in report["deployed"]]
    print("anchors: " + ", ".join(f"#{a} {100 * v:.1f}%" for a, v in anchors.items()))
    print(f"palette FLOPs span {min(flops) / 1e6:.3f} to {max(flops) / 1e6:.3f} MFLOPs; deployed {deployed} "
          f"with accuracy {min(accs) * 100:.1f}% to {max(accs) * 100:.1f}%")
    share = report.get("share_deployed_on_front")
    if share is not None:
        print(f"{100 * share:.0f}% of the deployed stitches are on the measured Pareto frontier")
    sig = report.get("significance")
    if sig is not None:
        print(f"{100 * sig['share_not_significantly_dominated']:.0f}% are not significantly dominated by a cheaper or "
              f"equal member on these {sig['examples']} test images (exact McNemar, {sig['alpha']:g})")


if __name__ == "__main__":
    sys.exit(main())
