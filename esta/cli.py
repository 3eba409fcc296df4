"""The `esta` command line.

    esta demo [--out DIR]                      the embedded demo (shipped anchors and data, ~minutes on a CPU)
    esta train --config FILE [--out DIR]       ESTA training from a JSON or TOML config (esta.config)
    esta deploy --run DIR [--evaluate]         the top-score stitch per FLOPs interval, report + plot
    esta export --run DIR --stitch I --out D   merged standalone module of one member (safetensors + JSON)
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

from esta.config import ConfigError, load_config, parse_config

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


def _parser() -> argparse.ArgumentParser:
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


def _check_args(args) -> None:
    """Command-line values that no config schema sees."""
    if args.command == "demo":
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
        result = runs.train_run(parse_config(_demo_config(args)), args.out, replace=True,
                                progress=not args.no_progress)
        _demo_summary(result["report"])
        print(f"esta demo: done in {time.time() - t0:.0f} s; report in {args.out}/report.json and report.png")
        return 0
    if args.command == "train":
        runs.train_run(load_config(args.config), args.out, resume=args.resume, progress=not args.no_progress)
        return 0
    if args.command == "deploy":
        runs.deploy_run(args.run, evaluate_all=args.evaluate == "all")
        return 0
    if args.command == "export":
        runs.export_member(args.run, args.stitch, args.out)
        print(f"exported member {args.stitch} to {args.out}")
        return 0
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
