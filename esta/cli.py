"""The `esta` command line.

    esta demo [--out DIR]                      the embedded demo (shipped anchors and data, ~minutes on a CPU)
    esta demo --family llama [--out DIR]       the instruction-tuning demo: shipped tiny LLaMA decoders on
                                               synthetic instructions (docs/instruction-tuning.md)
    esta train --config FILE [--out DIR]       ESTA training from a JSON or TOML config (esta.config)
    esta train --preset NAME [--config FILE] [--set KEY=VALUE ...]   the paper's recipe, overridden key by key
    esta presets [NAME]                        the presets (configs/) with their values (esta.presets)
    esta sweep --config FILE --lrs 1e-4,2e-4,1e-3,2e-3 [--out DIR]   lr grid on the validation split, then the
                                               best on train+val against test (esta.sweep)
    esta deploy --run DIR [--evaluate]         the top-score stitch per FLOPs interval, report + plot
    esta export --run DIR --stitch I --out D   merged standalone module of one member (safetensors + JSON)
    esta generate --export DIR --prompt TEXT   text from an exported decoder member (esta.generation); the
                                               tokenizer is read from DIR or from --tokenizer PATH
    esta generate --run DIR --stitch I --prompt TEXT [--alpaca]   from member I of an instruction run
                                               (--alpaca: each prompt is an instruction, in the Alpaca template)
    esta report RUN1 RUN2 ... [--out DIR]      several tasks per FLOPs interval and group (esta.multitask)
    esta bench                                 the fused stitched-linear op against F.linear on this machine
    esta serve --run DIR [--host H] [--port P] the deployed members as one palette over HTTP (esta.serving)
    torchrun --nproc_per_node=N -m esta train --config FILE    distributed (DDP) training

A configuration problem (a bad key or value, a run directory in use or holding another run, a refused
resume) prints one line naming it and exits with status 2; a training run that diverges (a non-finite
loss) prints the step and member and exits with status 1, writing no report. Run directories:
esta.runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

from esta.config import ConfigError, parse_config

__all__ = ["main"]


def _demo_config(args) -> dict:
    return {
        "anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}, {"demo": "vit-demo-b"}],
        "data": {"builtin": "letters-cgoqd"},
        "num_classes": 5,
        "stitching": {"kernel_size": 2, "stride": 1},
        # temperature 0.1: the sampler concentrates each interval's steps on its top-score member; the relative
        # score (SNIP / loss) keeps an unfit member's large gradients from taking its interval over (README)
        "train": {"epochs": args.epochs, "batch_size": 32, "base_lr": 4e-2, "warmup_epochs": 2,
                  "sampler_warmup_epochs": 3, "num_intervals": 6, "temperature": 0.1, "score": "relative-snip",
                  "calibration_images": 100, "seed": args.seed},
        "evaluate": {"all": True, "batch_size": 512},
        "device": "cpu",
    }


def _demo_llama_config(args) -> dict:
    return {
        "anchors": [{"demo": "llama-demo-s"}, {"demo": "llama-demo-m"}, {"demo": "llama-demo-l"}],
        "data": {"builtin": "instructions-demo", "max_length": 128},
        "task": "causal-lm",
        "stitching": {"kernel_size": 1, "stride": 1},
        "train": {"epochs": args.epochs, "batch_size": 32, "base_lr": 4e-2, "weight_decay": 0.0, "warmup_epochs": 1,
                  "sampler_warmup_epochs": 1, "num_intervals": 6, "temperature": 0.1, "score": "relative-snip",
                  "calibration_images": 64, "seed": args.seed},
        "evaluate": {"all": True, "batch_size": 300, "generate_examples": 300, "max_new_tokens": 8},
        "device": "cpu",
    }


DEMO_EPOCHS = {"vit": 20, "llama": 4}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esta", description="Efficient Stitchable Task Adaptation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="adapt shipped demo anchors to a new task with ESTA, deploy, report")
    p.add_argument("--out", default="esta-demo", help="run directory (default: esta-demo)")
    p.add_argument("--family", choices=("vit", "llama"), default="vit",
                   help="vit: ViT anchors on rendered letters (default); llama: tiny LLaMA decoders instruction-"
                        "tuned on synthetic instructions")
    p.add_argument("--epochs", type=int, default=None, help=f"default: {DEMO_EPOCHS['vit']} (vit), "
                                                             f"{DEMO_EPOCHS['llama']} (llama)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("train", help="ESTA training from a config file or a preset")
    _config_arguments(p)
    p.add_argument("--out", default="esta-run")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("presets", help="list the presets (the paper's recipes) with their values")
    p.add_argument("name", nargs="?", help="print this preset in full (JSON)")
    p = sub.add_parser("sweep", help="choose base_lr on the validation split, retrain the best on train+val, test")
    _config_arguments(p)
    p.add_argument("--lrs", required=True, help="comma-separated base learning rates, e.g. 1e-4,2e-4,1e-3,2e-3")
    p.add_argument("--splits", default="train,val,test", help="TRAIN,VAL,TEST split names (default: train,val,test)")
    p.add_argument("--out", default="esta-sweep")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in OUT")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("report", help="aggregate runs (tasks) per FLOPs interval and group: JSON + plot")
    p.add_argument("runs", nargs="+", help="run directories (or sweep directories: their final run)")
    p.add_argument("--out", default="esta-report")
    p = sub.add_parser("deploy", help="deploy a trained run: top-score stitch per interval, report and plot")
    p.add_argument("--run", required=True)
    p.add_argument("--evaluate", choices=("all", "deployed"), default="all",
                   help="evaluate every member (default), or the deployed ones and the anchors")
    p = sub.add_parser("export", help="export one member of a trained run as safetensors + JSON")
    p.add_argument("--run", required=True)
    p.add_argument("--stitch", type=int, required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("generate", help="generate text with an exported decoder member")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--export", help="an export directory (esta export / esta.export.save)")
    source.add_argument("--run", help="a decoder training run (with --stitch)")
    p.add_argument("--stitch", type=int, help="the member of --run to generate with")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer directory or name (default: the export's, or "
                                       "the run's)")
    p.add_argument("--alpaca", action="store_true", help="each prompt is an instruction: wrap it in the Alpaca "
                                                          "template the instruction run was trained on")
    # None: the run's [generate] settings with --run, else the values in _GENERATE_DEFAULTS
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64")
    p.add_argument("--do-sample", action="store_true", default=None,
                   help="sample (top-p / top-k / temperature) instead of taking the most likely tokens")
    p.add_argument("--greedy", dest="do_sample", action="store_false", help="do not sample (overrides the run's "
                                                                            "generate.do_sample)")
    p.add_argument("--top-p", type=float, default=None, help="default 1.0")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="default 1.0")
    p.add_argument("--num-beams", type=int, default=None, help="default 1")
    p.add_argument("--seed", type=int, default=0, help="of the sampling generator")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p = sub.add_parser("serve", help="serve a trained run's deployed members from one set of weights over HTTP")
    p.add_argument("--run", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: a free port (printed)")
    p.add_argument("--members", default="deployed", help="'deployed' (default), 'all', or ids like 2,7,14")
    p.add_argument("--device", default=None, help="default: the run's device")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--access-log", action="store_true")
    p = sub.add_parser("bench", help="time the fused stitched-linear op against F.linear here")
    p.add_argument("--shape", default="vit-s", choices=("vit-s", "vit-b", "llama"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    return parser


def _config_arguments(p) -> None:
    p.add_argument("--config", help="a JSON or TOML config file (laid over the preset, when one is given)")
    p.add_argument("--preset", help="start from a preset of configs/ (esta presets lists them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key (e.g. train.base_lr=2e-3, data.root=/data/cub); repeatable")


def _config(args):
    from esta.presets import build_config

    return build_config(preset=args.preset, config_path=args.config, sets=args.set)


def _check_args(args) -> None:
    """Command-line values that no config schema sees."""
    if args.command == "demo":
        if args.epochs is None:
            args.epochs = DEMO_EPOCHS[args.family]
        if args.epochs < 1:
            raise ConfigError("--epochs", f"must be at least 1, got {args.epochs}")
        if args.seed < 0:
            raise ConfigError("--seed", f"must be a non-negative integer, got {args.seed}")
    for name in ("out", "run"):
        path = getattr(args, name, None)
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--{name}", f"{path} is a file, not a directory")
    if args.command == "bench" and args.repeats < 1:
        raise ConfigError("--repeats", f"must be at least 1, got {args.repeats}")
    if args.command == "generate":
        _generation_defaults(args)
        if args.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens", f"must be at least 1, got {args.max_new_tokens}")
        if args.num_beams < 1:
            raise ConfigError("--num-beams", f"must be at least 1, got {args.num_beams}")
        if not 0.0 < args.top_p <= 1.0:
            raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}")
        if args.top_k is not None and args.top_k < 1:
            raise ConfigError("--top-k", f"must be at least 1, got {args.top_k}")
        if not args.temperature > 0.0:
            raise ConfigError("--temperature", f"must be > 0, got {args.temperature}")
        if args.export is not None and args.stitch is not None:
            raise ConfigError("--stitch", "selects a member of --run; an export is one member already")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device", f"is {args.device!r} but no CUDA GPU is available here")
        if args.export is not None and not os.path.isdir(args.export):
            raise ConfigError("--export", f"{args.export} is not a directory")
        if args.run is not None and not os.path.isdir(args.run):
            raise ConfigError("--run", f"{args.run} is not a run directory")
    if args.command == "serve":
        if not 0 <= args.port <= 65535:
            raise ConfigError("--port", f"must be in [0, 65535], got {args.port}")
        if args.max_batch_size < 1:
            raise ConfigError("--max-batch-size", f"must be at least 1, got {args.max_batch_size}")
        if not 0 <= args.max_wait_ms < 1e6:
            raise ConfigError("--max-wait-ms", f"must be in [0, 1e6), got {args.max_wait_ms}")
        if args.max_body_bytes < 1:
            raise ConfigError("--max-body-bytes", f"must be at least 1, got {args.max_body_bytes}")
        if args.members not in ("deployed", "all"):
            try:
                args.members = [int(v) for v in args.members.split(",") if v.strip()]
            except ValueError:
                raise ConfigError("--members", f"must be 'deployed', 'all' or ids like 2,7,14, got "
                                               f"{args.members!r}") from None
        if not os.path.isdir(args.run):
            raise ConfigError("--run", f"{args.run} is not a run directory")


_GENERATE_DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "top_p": 1.0, "temperature": 1.0, "num_beams": 1}


def _generation_defaults(args) -> None:
    """Fills the generation flags not given: from the run's `generate` settings (esta generate --run), else
    _GENERATE_DEFAULTS."""
    defaults = dict(_GENERATE_DEFAULTS)
    if args.run is not None and os.path.isfile(os.path.join(args.run, "config.json")):
        from esta.config import load_config

        config = load_config(os.path.join(args.run, "config.json"))
        defaults.update({k: getattr(config.generate, k) for k in defaults})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from esta.train import NonFiniteLossError

    try:
        _check_args(args)
        return _dispatch(args)
    except ConfigError as e:
        print(f"esta {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"esta {args.command}: training diverged: {e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    from esta import runs

    if args.command == "demo":
        t0 = time.time()
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        config = parse_config(_demo_config(args) if args.family == "vit" else _demo_llama_config(args))
        result = runs.train_run(config, args.out, replace=True, progress=not args.no_progress)
        if args.family == "vit":
            _demo_summary(result["report"])
        else:
            _demo_llama_summary(result)
        print(f"esta demo: done in {time.time() - t0:.0f} s; report in {args.out}/report.json and report.png")
        return 0
    if args.command == "train":
        runs.train_run(_config(args), args.out, resume=args.resume, progress=not args.no_progress)
        return 0
    if args.command == "presets":
        from esta.presets import format_presets

        print(format_presets(args.name))
        return 0
    if args.command == "sweep":
        from esta.sweep import parse_lrs, sweep

        lrs = parse_lrs(args.lrs)
        splits = [s.strip() for s in args.splits.split(",")]
        config = _config(args)
        sweep(config, lrs, args.out, splits=splits, resume=args.resume, progress=not args.no_progress)
        return 0
    if args.command == "report":
        from esta.multitask import aggregate, format_summary, load_run, write_summary

        if os.path.isfile(os.path.join(args.out, "config.json")) or os.path.isfile(os.path.join(args.out, "sweep.json")):
            raise ConfigError("--out", f"{args.out} is a run or sweep directory; write the report elsewhere")
        summary = aggregate([load_run(r) for r in args.runs])
        paths = write_summary(summary, args.out)
        print(format_summary(summary))
        print(f"report: {paths['json']}, {paths['png']}")
        return 0
    if args.command == "deploy":
        runs.deploy_run(args.run, evaluate_all=args.evaluate == "all")
        return 0
    if args.command == "export":
        runs.export_member(args.run, args.stitch, args.out)
        print(f"exported member {args.stitch} to {args.out}")
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        from esta.serving.palette import PaletteError
        from esta.serving.server import serve_run

        try:
            return serve_run(args.run, host=args.host, port=args.port, members=args.members, device=args.device,
                             max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_body_bytes=args.max_body_bytes, access_log=args.access_log)
        except PaletteError as e:
            raise ConfigError("--members", str(e)) from None
    if args.command == "bench":
        from esta.benchmark import run_bench

        print(run_bench(args.shape, backend=args.backend, repeats=args.repeats))
        return 0
    raise AssertionError(args.command)


def _generate(args) -> int:
    from esta import export as export_mod
    from esta.generation import generate_text

    if args.run is not None:
        return _generate_from_run(args)
    config_path = os.path.join(args.export, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError("--export", f"{args.export} holds no export (no config.json)")
    try:
        net = export_mod.load(args.export, map_location=args.device)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError("--export", str(e)) from None
    if net.esta_export_config.get("kind") != "hf.causal-lm":
        raise ConfigError("--export", f"{args.export} holds a {net.esta_export_config.get('kind')} export, not a "
                                      f"decoder LM")
    source = args.tokenizer or args.export
    if args.tokenizer is None and not any(os.path.isfile(os.path.join(args.export, name))
                                          for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError("--tokenizer", f"{args.export} holds no tokenizer; pass --tokenizer PATH (or save the "
                                         f"export with esta.export.save(..., tokenizer=tok))")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError("--tokenizer", f"cannot load a tokenizer from {source}: {e}") from None
    return _print_generations(args, net, tokenizer, None)


def _generate_from_run(args) -> int:
    """esta generate --run DIR --stitch I: member I of a decoder (instruction) run, restored without its data."""
    from esta import runs
    from esta.factory import create_tokenizer

    if args.stitch is None:
        raise ConfigError("--stitch", "is required with --run (the member to generate with; esta deploy lists the "
                                      "deployed ones)")
    config, model = runs.restore_model(args.run, device=args.device, log=lambda *a: None)
    if config.task != "causal-lm":
        raise ConfigError("--run", f"{args.run} is a {config.task} run; generation needs a decoder run (task "
                                   f"'causal-lm')")
    if not 0 <= args.stitch < len(model):
        raise ConfigError("--stitch", f"{args.stitch} is outside [0, {len(model)})")
    if args.tokenizer is not None:
        from esta.instruct import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError("--tokenizer", str(e)) from None
    else:
        tokenizer = create_tokenizer(config)
    return _print_generations(args, model, tokenizer, args.stitch)


def _alpaca_prompts(tokenizer, pairs):
    """The Alpaca prompts of (instruction, input) pairs, with the BOS token training put first when the
    tokenizer does not add it itself."""
    from esta.instruct import alpaca_prompt

    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return [("" if adds_bos or bos is None else bos) + alpaca_prompt(instruction, input) for instruction, input in pairs]


def _print_generations(args, net, tokenizer, stitch) -> int:
    from esta.generation import generate_text

    prompts = _alpaca_prompts(tokenizer, [(p, "") for p in args.prompt]) if args.alpaca else args.prompt
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    texts = generate_text(net, tokenizer, prompts, stitch=stitch, max_new_tokens=args.max_new_tokens,
                          do_sample=args.do_sample, top_p=args.top_p, top_k=args.top_k,
                          temperature=args.temperature, num_beams=args.num_beams, generator=generator)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}\n{text.strip()}" if args.alpaca else f"{prompt}{text}")
    return 0


def _demo_llama_summary(result: dict) -> None:
    """The instruction demo's summary: the deployed members, whether they are on the measured frontier, and
    sample answers of the smallest and largest deployed member (the table of every member was printed by
    the deployment)."""
    from esta.generation import generate_text

    report, model, test = result["report"], result["model"], result["test"]
    deployed = [r["deployed"] for r in report["deployed"]]
    front = set(report.get("pareto_front", []))
    rel = {m["id"]: m.get("relative_quality") for m in report["members"]}
    anchors = report.get("anchor_accuracy", {})
    print("anchors (exact match): " + ", ".join(f"#{a} {100 * v:.1f}%" for a, v in anchors.items()))
    print("deployed: " + ", ".join(
        f"#{i} ({report['members'][i]['flops'] / 1e6:.2f} MFLOPs, exact {100 * report['members'][i]['accuracy']:.1f}%"
        f"{'' if rel[i] is None else f', {rel[i]:.0f}% of the smallest anchor'}"
        f"{', on the frontier' if i in front else ', off the frontier'})" for i in deployed))
    share = report.get("share_deployed_on_front")
    if share is not None:
        print(f"{100 * share:.0f}% of the deployed members are on the measured Pareto frontier")
    tokenizer = result["tokenizer"]
    records = test.records[:4]
    prompts = _alpaca_prompts(tokenizer, [(r["instruction"], r["input"]) for r in records])
    for label, i in (("smallest", min(deployed, key=lambda d: report["members"][d]["flops"])),
                     ("largest", max(deployed, key=lambda d: report["members"][d]["flops"]))):
        texts = generate_text(model, tokenizer, prompts, stitch=i, max_new_tokens=8)
        print(f"sample answers of the {label} deployed member #{i}:")
        for r, t in zip(records, texts):
            print(f"  {r['instruction']} {r['input']!r} -> {t.strip()!r} (reference {r['output']!r})")


def _demo_summary(report: dict) -> None:
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
