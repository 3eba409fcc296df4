"""The paper's learning-rate selection (Appendix A): a grid of base learning rates scored on a validation
split, then the best retrained on train+val and tested.

    esta sweep --preset vit-vtab --set data.dataset=vtab-1k/dtd --set data.root=D --lrs 1e-4,2e-4,1e-3,2e-3

`sweep(config, lrs, out)`:
  1. for each lr, a run directory `out/lr-<lr>` trains the configuration with that base_lr on the training
     split and evaluates on the validation split (data.train = "train", data.test = "val" by default; the
     names are `splits`);
  2. each lr's score is the mean validation accuracy of its deployed members (the top-score stitch of each
     FLOPs interval). If some run has an interval whose members the sampler never scored (training ended
     before it reached them, so that run has no deployment yet), every lr is scored by the mean validation
     accuracy of the anchors instead, so that all lrs are compared on the same footing; `selected_by` in the
     JSON says which. A run that diverges (a non-finite loss) is recorded and not scored;
  3. the best lr (ties: the first listed) is retrained in `out/final` on train+val and tested on the test
     split;
  4. `out/sweep.json` holds every run's numbers (rewritten after each run).

Everything is checked before anything is written: the configuration, the lrs, both data protocols (train
against val, train+val against test) and the anchors. The sweep directory is locked for the whole sweep
(each run directory by its own run). `resume=True` continues an interrupted sweep: a run directory with a
report is reused, one with a checkpoint resumes, and the sweep's configuration must be the one recorded.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional, Sequence

from esta.config import ConfigError, RunConfig, config_dict, parse_config
from esta.factory import check_anchors, check_data, create_data
from esta.runs import RunError, read_json, run_identity, run_lock, train_run, write_json
from esta.train import NonFiniteLossError

__all__ = ["parse_lrs", "sweep", "SWEEP_FILE"]

SWEEP_FILE = "sweep.json"
FINAL = "final"


def parse_lrs(text: str) -> List[float]:
    """The --lrs list: comma-separated finite numbers > 0, each once."""
    lrs = []
    for part in text.split(","):
        part = part.strip()
        try:
            lr = float(part)
        except ValueError:
            raise ConfigError("--lrs", f"{part!r} is not a number (expected e.g. 1e-4,2e-4,1e-3,2e-3)") from None
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError("--lrs", f"every learning rate must be a finite number > 0, got {part}")
        lrs.append(lr)
    names = [_run_name(lr) for lr in lrs]
    if len(set(names)) != len(names):
        raise ConfigError("--lrs", f"{text!r} lists a learning rate twice")
    return lrs


def _run_name(lr: float) -> str:
    return f"lr-{lr:g}"


def _with(config: RunConfig, lr: float, train: str, test: str) -> RunConfig:
    values = config_dict(config)
    values["train"]["base_lr"] = lr
    values["data"]["train"], values["data"]["test"] = train, test
    return parse_config(values)


def _deployed_rows(report: dict) -> List[dict]:
    return [{"interval": r["interval"], "stitch": r["deployed"], "flops": r["flops"], "score": r["score"],
             "accuracy": r["accuracy"]} for r in report["deployed"]]


def _summary(report: dict) -> dict:
    rows = _deployed_rows(report)
    accs = [r["accuracy"] for r in rows]
    anchors = {int(k): v for k, v in (report.get("anchor_accuracy") or {}).items()}
    return {"deployed": rows,
            "deployed_mean_accuracy": sum(accs) / len(accs) if accs and None not in accs else None,
            "deployment": all(r["score"] is not None for r in rows),
            "anchor_accuracy": anchors,
            "anchor_mean_accuracy": sum(anchors.values()) / len(anchors) if anchors else None}


def sweep(config: RunConfig, lrs: Sequence[float], out: str, *, splits: Sequence[str] = ("train", "val", "test"),
          resume: bool = False, progress: bool = True, log: Callable = print) -> dict:
    """Runs the sweep of the module docstring into `out`; returns what sweep.json holds."""
    if config.data.builtin is not None:
        raise ConfigError("config.data", "esta sweep needs image data with a validation split ('folder' or "
                                         "'dataset'); the builtin tasks have a train and a test split only")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("", "esta sweep runs in one process; under torchrun, run `esta train` per learning rate")
    lrs = list(lrs)
    if not lrs:
        raise ConfigError("--lrs", "give at least one learning rate")
    if len(splits) != 3 or len(set(splits)) != 3:
        raise ConfigError("--splits", f"give three different split names TRAIN,VAL,TEST, got {','.join(splits)}")
    train, val, test = splits
    # everything checked before anything is written: both protocols' data, every derived config, the anchors
    protocols = {"validation": _with(config, lrs[0], train, val), "final": _with(config, lrs[0], f"{train}+{val}", test)}
    for c in protocols.values():
        data = create_data(c)
        check_data(c, data[0])
    check_anchors(config)
    runs = {lr: _with(config, lr, train, val) for lr in lrs}
    path = os.path.join(out, SWEEP_FILE)
    base = config_dict(config)
    with run_lock(out):
        if os.path.exists(path):
            if not resume:
                raise RunError(f"{out} already holds a sweep ({path}); pass --resume to continue it, or choose "
                               f"another directory")
            saved = read_json(path)
            if _identity_of(saved.get("config")) != run_identity(config) or saved.get("lrs") != lrs or \
                    saved.get("splits") != dict(train=train, val=val, test=test):
                raise RunError(f"{path} records another sweep (its configuration, lrs or splits differ); resume "
                               f"it with its own, or choose another directory")
        elif not resume:
            taken = [n for n in [_run_name(lr) for lr in lrs] + [FINAL] if os.path.exists(os.path.join(out, n))]
            if taken:
                raise RunError(f"{out} already holds {', '.join(taken)}; pass --resume to continue, or choose "
                               f"another directory")
        result = {"config": base, "lrs": lrs, "splits": {"train": train, "val": val, "test": test},
                  "runs": [], "selected_by": None, "best_lr": None, "final": None}
        write_json(out, SWEEP_FILE, result)
        for lr in lrs:
            name = _run_name(lr)
            log(f"sweep: base_lr {lr:g} on {train}, validated on {val} ({os.path.join(out, name)})")
            entry = {"lr": lr, "run": name, **_train(runs[lr], os.path.join(out, name), resume, progress, log)}
            result["runs"].append(entry)
            write_json(out, SWEEP_FILE, result)
        done = [r for r in result["runs"] if r["status"] == "done"]
        if not done:
            write_json(out, SWEEP_FILE, result)
            raise NonFiniteLossError(f"every learning rate of the sweep diverged ({', '.join(f'{lr:g}' for lr in lrs)})")
        by_deployed = all(r["deployment"] for r in done)
        key = "deployed_mean_accuracy" if by_deployed else "anchor_mean_accuracy"
        missing = [r["run"] for r in done if r[key] is None]
        if missing:
            raise RunError(f"the reports of {', '.join(missing)} lack the accuracies the sweep scores by ({key})")
        result["selected_by"] = ("mean validation accuracy of the deployed members" if by_deployed else
                                 "mean validation accuracy of the anchors (some run's sampler had not scored "
                                 "every interval: no deployment yet)")
        for r in result["runs"]:
            r["val_score"] = r.get(key)
        best = max(done, key=lambda r: r[key])  # max keeps the first of equal scores
        result["best_lr"] = best["lr"]
        write_json(out, SWEEP_FILE, result)
        log(f"sweep: best base_lr {best['lr']:g} ({result['selected_by']}: {100 * best[key]:.2f}%); retraining on "
            f"{train}+{val}, testing on {test}")
        final = _with(config, best["lr"], f"{train}+{val}", test)
        entry = {"lr": best["lr"], "run": FINAL, **_train(final, os.path.join(out, FINAL), resume, progress, log)}
        result["final"] = entry
        write_json(out, SWEEP_FILE, result)
        if entry["status"] != "done":
            raise NonFiniteLossError(f"the final run with base_lr {best['lr']:g} diverged: {entry['error']}")
        log(f"sweep: test accuracy of the deployed members {_pct(entry['deployed_mean_accuracy'])} (mean), anchors "
            f"{_pct(entry['anchor_mean_accuracy'])}; {path}")
    return result


def _identity_of(values) -> Optional[dict]:
    try:
        return run_identity(parse_config(values))
    except (ConfigError, TypeError):
        return None


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _train(config: RunConfig, run: str, resume: bool, progress: bool, log: Callable) -> Dict[str, object]:
    """One run of the sweep: trained (or reused, or resumed), summarized."""
    report_path = os.path.join(run, "report.json")
    checkpoint = os.path.join(run, "checkpoint.pt")
    if resume and os.path.isfile(report_path):
        log(f"sweep: reusing the finished run {run}")
        if _identity_of(read_json(os.path.join(run, "config.json"))) != run_identity(config):
            raise RunError(f"{run} holds a run of another configuration; resume the sweep with its own")
        return {"status": "done", **_summary(read_json(report_path))}
    again = resume and (os.path.exists(checkpoint) or os.path.exists(checkpoint + ".prev"))
    try:
        result = train_run(config, run, resume=again, progress=progress)
    except NonFiniteLossError as e:
        log(f"sweep: {run} diverged: {e}")
        return {"status": "diverged", "error": str(e)}
    return {"status": "done", **_summary(result["report"])}
