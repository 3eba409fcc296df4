"""Run directories: training, deployment and export of one run, safely.

    train_run(config, out)              train (or resume) into the run directory `out`, then deploy
    deploy_run(run)                     the top-score stitch per interval, report + plot + exports
    export_member(run, i, directory)    one member as safetensors + JSON
    restore_model(run)                  (config, model) for inference, without opening the data

A run directory holds config.json, checkpoint.pt (and checkpoint.pt.prev, the one before), history.json,
report.json, report.png and export/ (the deployed members). The rules:
  - One run at a time: an exclusive lock (`.lock`, holding the owner's pid) is taken for the whole of a
    training or deployment; a second process gets a clear error naming that pid.
  - Validate first: the configuration, the data (and, on resume, that the checkpoint's configuration and
    data fingerprint are this run's) are checked before anything is written; a refused resume leaves the
    directory as it was. A fresh run refuses a directory that already holds a checkpoint.
  - Files are written to unique temporary names and renamed into place; the previous checkpoint is kept
    until the next one is complete, and a corrupt latest checkpoint falls back to it (`esta.checkpoint`).
  - The history (every step since the start) travels in the checkpoint, so a resumed run's history.json
    is whole.
  - A run whose loss goes non-finite stops (`NonFiniteLossError`) before writing anything more: no report,
    no export.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import time
from typing import Callable, Optional

import torch

from esta.checkpoint import CheckpointError, load_checkpoint
from esta.config import ConfigError, RunConfig, config_dict, load_config, parse_config
from esta.distributed import init_distributed
from esta.factory import (check_anchors, check_data, create_data, create_model, create_task, create_tokenizer,
                          data_fingerprint, describe_fingerprint_change)
from esta.train import Trainer, calibration_images, load_model_state, prepare_model

__all__ = ["RunError", "run_lock", "train_run", "deploy_run", "export_member", "restore_run", "restore_model",
           "resolve_device", "run_identity", "read_json", "write_json"]

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"


class RunError(ConfigError):
    """A run directory that cannot be used as asked (in use, holds another run, not a run)."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)


# ------------------------------------------------------------------------------------------ the lock
@contextlib.contextmanager
def run_lock(directory: str):
    """An exclusive lock on the run directory (created if needed) for the duration of the block."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise RunError(f"{directory} is a file, not a run directory")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunError(f"run directory {directory} is in use by another esta process (pid {holder}); wait "
                           f"for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_json(path: str):
    """A JSON file of a run directory (RunError when it is missing or unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path}: {e}") from None


def write_json(directory: str, name: str, obj) -> str:
    """directory/name written atomically (a unique temporary file renamed into place)."""
    return _write_json(directory, name, obj)


def _write_json(directory: str, name: str, obj) -> str:
    path = os.path.join(directory, name)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --------------------------------------------------------------------------------------- helpers
def resolve_device(config: RunConfig) -> torch.device:
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


def _seeded_model(config: RunConfig, device, tokenizer=None):
    # Seeded, so anchors without pretrained weights (random init) and the new heads are rebuilt identically
    # by `esta deploy` / `esta export` (a checkpoint holds only what training changes).
    torch.manual_seed(config.train.seed)
    return create_model(config, tokenizer).to(device)


def _tokenizer(config: RunConfig):
    """The run's tokenizer (decoder runs), else None."""
    return create_tokenizer(config) if config.task == "causal-lm" else None


def _to_device(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def run_identity(config: RunConfig) -> dict:
    """The configuration keys that make a run what it is (a resume must match them)."""
    return _identity(config)


def _identity(config: RunConfig) -> dict:
    """The keys that make a run what it is: not where it runs (device), how fast it decodes
    (data.num_workers), how it is evaluated or how its members generate text."""
    values = config_dict(config)
    values.pop("device")
    values.pop("evaluate")
    values.pop("generate")
    values["data"].pop("num_workers")
    return values


def _metadata(config: RunConfig, fingerprint) -> dict:
    return {"run_config": _identity(config), "data": fingerprint}


def _check_resume(state, config: RunConfig, fingerprint, path: str) -> None:
    """The checkpoint belongs to this run: same task, same configuration and same data (ConfigError
    otherwise)."""
    saved_task = state.get("task") if isinstance(state, dict) else None
    if saved_task is not None and saved_task != config.task:
        raise ConfigError("config.task", f"is {config.task!r} but the checkpoint {path} was trained on the task "
                                         f"{saved_task!r}; a run cannot be resumed with another task (start a new "
                                         f"run directory)")
    meta = state.get("metadata", {}) if isinstance(state, dict) else {}
    saved_data = meta.get("data")
    if saved_data is not None and saved_data != fingerprint:
        raise ConfigError("", f"the checkpoint {path} was trained on other data ({describe_fingerprint_change(saved_data, fingerprint)}); "
                              f"resume it with its own data or start a new run directory")
    saved = meta.get("run_config")
    now = _identity(config)
    if saved is not None:
        saved = _current_schema(saved)
    if saved is not None and saved != now:
        diff = _dict_diff(saved, now)
        raise ConfigError("", f"the configuration differs from the run's in {', '.join(diff)}; a resumed run "
                              f"must use the run's configuration ({path})")


def _current_schema(saved: dict) -> dict:
    """A checkpoint's run identity read through today's schema: keys added since it was written take their
    defaults, so a run from before (the demo's, say) still resumes and deploys; unreadable: as saved."""
    try:
        return _identity(parse_config(saved))
    except (ConfigError, TypeError):
        return saved


def _dict_diff(a, b, prefix="config") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [prefix]


# ------------------------------------------------------------------------------------------ train
def train_run(config: RunConfig, out: str, *, resume: bool = False, replace: bool = False, progress: bool = True,
              deploy: bool = True, quiet: bool = False) -> dict:
    """Trains (or, with resume=True, continues) the run `config` describes in the directory `out`, then
    deploys it; see the module docstring for the guarantees. `replace=True` (the demo) removes an earlier
    run's files from `out` once everything is checked, instead of refusing the directory. Returns
    {"trainer", "model", "test", "report"}."""
    device = resolve_device(config)
    distributed = init_distributed(device)
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda *a: None) if (quiet or rank != 0) else print
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} is a file, not a directory")
    checkpoint = os.path.join(out, CHECKPOINT)
    if resume and not (os.path.exists(checkpoint) or os.path.exists(checkpoint + ".prev")):
        raise RunError(f"cannot resume: {out} holds no checkpoint ({checkpoint})")
    if not resume and not replace and os.path.exists(checkpoint):
        raise RunError(f"{out} already holds a run ({checkpoint}); pass --resume to continue it, or choose "
                       f"another directory")
    check_anchors(config)
    tokenizer = _tokenizer(config)
    train, test = create_data(config)
    task = create_task(config, tokenizer)
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    check_data(config, train, world)
    fingerprint = data_fingerprint(config, train, test)
    lock = run_lock(out) if rank == 0 else contextlib.nullcontext()
    with lock:
        state = None
        if resume:
            try:
                state, used = load_checkpoint(checkpoint, map_location="cpu", log=log)
            except CheckpointError as e:
                raise RunError(str(e)) from None
            _check_resume(state, config, fingerprint, used)
        tc = config.train
        model = _seeded_model(config, device, tokenizer)
        calib = tc.calibration_images
        t0 = time.time()
        model.init_stitching_layers(_to_device(calibration_images(train, calib, tc.seed, task), device),
                                    num_images=calib)
        what = "images" if config.task == "classification" else "sequences"
        log(f"least-squares init of {sum(len(g) for g in model.stitching_layers)} stitching layers on "
            f"{min(calib, len(train))} {what}: {time.time() - t0:.1f} s")
        trainer = Trainer(model, train, tc, task=task, device=device, distributed=distributed,
                          num_workers=config.data.num_workers, metadata=_metadata(config, fingerprint))
        log(model.format_trainable_report())
        if state is not None:
            trainer.load_state_dict(state)
            log(f"resumed at step {trainer.step} of {trainer.total_steps}")
        if rank == 0:  # everything is checked: now the run directory may change
            if replace and not resume:
                _remove_run_files(out, log)
            _write_json(out, "config.json", config_dict(config))
        log(f"{len(model)} members ({len(model.anchors)} anchors), {trainer.total_steps} steps of "
            f"{trainer.global_batch} {what}, lr {trainer.lr:.3g}")
        t0 = time.time()
        trainer.fit(progress=progress, checkpoint=checkpoint, checkpoint_every=max(1, trainer.steps_per_epoch))
        log(f"training: {time.time() - t0:.1f} s")
        result = {"trainer": trainer, "model": model, "test": test, "config": config, "tokenizer": tokenizer}
        if rank == 0:
            _write_json(out, "history.json", trainer.history)
            if deploy and trainer.sharded:
                # the sharded model runs only with every rank: deploy a whole copy rebuilt from the checkpoint
                _, model, restored, _ = restore_run(out, log=log)
                result["model"] = model
                result["report"] = _deploy(model, restored.sampler, restored.flops, test, out, config,
                                           progress=progress, log=log, task=task, tokenizer=tokenizer)
            elif deploy:
                result["report"] = _deploy(model, trainer.sampler, trainer.flops, test, out, config,
                                           progress=progress, log=log, task=task, tokenizer=tokenizer)
    return result


def _remove_run_files(out: str, log: Callable) -> None:
    import shutil

    names = [CHECKPOINT, CHECKPOINT + ".prev", "config.json", "history.json", "report.json", "report.png"]
    found = [n for n in names if os.path.exists(os.path.join(out, n))]
    if found or os.path.isdir(os.path.join(out, "export")):
        log(f"replacing the earlier run in {out}")
    for n in found:
        os.remove(os.path.join(out, n))
    shutil.rmtree(os.path.join(out, "export"), ignore_errors=True)


# ----------------------------------------------------------------------------------------- deploy
def restore_run(run: str, *, log=print):
    """(config, model, trainer, test) of a trained run directory, the checkpoint checked against the data."""
    config_path = os.path.join(run, "config.json")
    if not os.path.isfile(config_path):
        raise RunError(f"{run} is not a run directory (no config.json); run `esta train` first")
    config = load_config(config_path)
    device = resolve_device(config)
    tokenizer = _tokenizer(config)
    train, test = create_data(config)
    task = create_task(config, tokenizer)
    fingerprint = data_fingerprint(config, train, test)
    try:
        state, used = load_checkpoint(os.path.join(run, CHECKPOINT), map_location="cpu", log=log)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    _check_resume(state, config, fingerprint, used)
    model = _seeded_model(config, device, tokenizer)
    trainer = Trainer(model, train, config.train, task=task, device=device, num_workers=config.data.num_workers,
                      metadata=_metadata(config, fingerprint))
    trainer.load_state_dict(state)
    return config, model, trainer, test


def restore_model(run: str, *, device=None, log=print):
    """(config, model) of a trained run for inference, in eval mode: the seeded model with the checkpoint's
    trained parameters, as `restore_run` rebuilds it, but without opening the data or building a trainer
    (a serving machine need not hold the training data; the data fingerprint is therefore not checked,
    the configuration is). `device` overrides the run's device (a run trained on a GPU can be served on
    a CPU and the other way round)."""
    config_path = os.path.join(run, "config.json")
    if not os.path.isfile(config_path):
        raise RunError(f"{run} is not a run directory (no config.json); run `esta train` first")
    config = load_config(config_path) if device is None else _config_on(config_path, device)
    target = resolve_device(config) if device is None else torch.device(device)
    try:
        state, used = load_checkpoint(os.path.join(run, CHECKPOINT), map_location="cpu", log=log)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    saved = state.get("metadata", {}).get("run_config") if isinstance(state, dict) else None
    if saved is not None:
        saved = _current_schema(saved)
    if saved is not None and saved != _identity(config):
        raise RunError(f"the checkpoint {used} belongs to another configuration than {config_path} "
                       f"({', '.join(_dict_diff(saved, _identity(config)))})")
    model = _seeded_model(config, target)
    torch.manual_seed(config.train.seed)  # as the trainer does before preparing the model
    prepare_model(model, config.train)
    try:
        load_model_state(model, state, f"restore_model: {used}")
    except ValueError as e:
        raise RunError(str(e)) from None
    for p in model.parameters():
        p.requires_grad_(False)
    return config, model.eval()


def _config_on(path: str, device) -> RunConfig:
    """The run's configuration with its device replaced (validated as any configuration is)."""
    with open(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError("", f"cannot parse {path}: {e}") from None
    if isinstance(values, dict):
        values["device"] = str(torch.device(device))
    return parse_config(values)


def _deploy(model, sampler, flops, test, out: str, config: RunConfig, *, evaluate_all: Optional[bool] = None,
            progress: bool = True, log: Callable = print, task=None, tokenizer=None) -> dict:
    from esta import export as export_mod
    from esta.deploy import build_report, format_table, write_report
    from esta.evaluate import evaluate

    ev = config.evaluate
    evaluate_all = ev.all if evaluate_all is None else evaluate_all
    deployed = sampler.deploy()
    # the anchors are always measured too: the reference the deployed members are read against
    anchors = [s.id for s in model.stitches if s.is_anchor]
    members = list(range(len(model))) if evaluate_all else sorted(set(deployed) | set(anchors))
    if config.task == "causal-lm":
        return _deploy_lm(model, sampler, flops, test, out, config, members, progress, log, task, tokenizer)
    t0 = time.time()
    accuracy, correct = evaluate(model, test, members, batch_size=ev.batch_size, progress=progress,
                                 per_example=True, num_workers=config.data.num_workers)
    log(f"evaluated {len(members)} members on {len(test)} test images: {time.time() - t0:.1f} s")
    report = build_report(model, sampler, flops, accuracy, correct=correct)
    paths = write_report(report, out)
    for i in deployed:
        export_mod.save(model.export(i), os.path.join(out, "export", f"stitch-{i}"))
    log(format_table(report))
    log(f"report: {', '.join(paths.values())}; deployed members exported to {os.path.join(out, 'export')}")
    return report


DEFAULT_GENERATE_EXAMPLES = 256
DEFAULT_MAX_NEW_TOKENS = 32


def _deploy_lm(model, sampler, flops, test, out, config, members, progress, log, task, tokenizer) -> dict:
    """The deployment of an instruction-tuning run: held-out loss, perplexity, token accuracy and the exact
    match of greedy generation per member (esta.evaluate.evaluate_lm); the report's quality is the exact match
    (of greedy generation, or of teacher forcing when evaluate.generate_examples = 0), relative quality
    against the smallest anchor; the deployed members are exported with the tokenizer."""
    from esta import export as export_mod
    from esta.deploy import add_lm_metrics, build_report, format_lm_table, format_table, write_report
    from esta.evaluate import evaluate_lm

    ev = config.evaluate
    tokenizer = tokenizer if tokenizer is not None else create_tokenizer(config)
    task = task if task is not None else create_task(config, tokenizer)
    n_gen = ev.generate_examples if ev.generate_examples is not None else DEFAULT_GENERATE_EXAMPLES
    n_gen = min(n_gen, len(test))
    new = ev.max_new_tokens if ev.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    t0 = time.time()
    metrics, exact = evaluate_lm(model, test, members, task=task, tokenizer=tokenizer, batch_size=ev.batch_size,
                                 generate_examples=n_gen, max_new_tokens=new, progress=progress,
                                 num_workers=config.data.num_workers)
    log(f"evaluated {len(members)} members on {len(test)} held-out records ({n_gen} generated): "
        f"{time.time() - t0:.1f} s")
    if n_gen:
        quality = {i: metrics[i]["exact_match"] for i in members}
        name = f"exact match of greedy generation ({n_gen} held-out records, up to {new} new tokens)"
        axis = "exact match of greedy generation (%)"
    else:
        quality = {i: sum(bool(v) for v in exact[i].tolist()) / max(1, len(exact[i])) for i in members}
        name = f"exact match under teacher forcing ({len(test)} held-out records)"
        axis = "exact match, teacher forcing (%)"
    report = build_report(model, sampler, flops, quality, correct=exact,
                          extra={"quality_axis": axis, "flops_tokens": task.flops_length})
    add_lm_metrics(report, metrics, name)
    paths = write_report(report, out, title="ESTA instruction tuning")
    for i in sampler.deploy():
        export_mod.save(model.export(i), os.path.join(out, "export", f"stitch-{i}"), tokenizer=tokenizer)
    log(format_lm_table(report))
    log(format_table(report))
    log(f"report: {', '.join(paths.values())}; deployed members exported to {os.path.join(out, 'export')}")
    return report


def deploy_run(run: str, *, evaluate_all: Optional[bool] = None, progress: bool = True, log: Callable = print) -> dict:
    """Deploys a trained run again (report, plot, exports), under the run directory's lock."""
    if not os.path.isdir(run):
        raise RunError(f"{run} is not a run directory")
    with run_lock(run):
        config, model, trainer, test = restore_run(run, log=log)
        return _deploy(model, trainer.sampler, trainer.flops, test, run, config, evaluate_all=evaluate_all,
                       progress=progress, log=log, task=trainer.task)


def export_member(run: str, stitch: int, directory: str, *, log: Callable = print) -> None:
    """Exports member `stitch` of a trained run to `directory` (safetensors + JSON)."""
    from esta import export as export_mod

    config, model, trainer, test = restore_run(run, log=log)
    if isinstance(stitch, bool) or not isinstance(stitch, int) or not 0 <= stitch < len(model):
        raise ConfigError("--stitch", f"{stitch} is outside [0, {len(model)})")
    export_mod.save(model.export(stitch), directory, tokenizer=_tokenizer(config))
