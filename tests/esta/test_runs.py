"""Run directories and configurations (esta.runs, esta.config, esta.checkpoint): one run per directory,
validation before any write, resumes that cannot mix runs or data, divergence, corrupt checkpoints, and
every configuration key checked with one clear line."""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from esta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from esta.cli import main
from esta.config import ConfigError, parse_config
from esta.train import NonFiniteLossError, Trainer, TrainConfig

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")
pytest.importorskip("sklearn", reason="the builtin digits data needs scikit-learn")

from tests.helpers import ROOT  # noqa: E402
from tests.helpers.config_keys import bad_value_cases, set_key, snapshot as _snapshot, with_overrides  # noqa: E402


def _anchor(d):
    return {"timm": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": d, "num_heads": 2}}


def _config(**over):
    config = {"anchors": [_anchor(8), _anchor(16)], "data": {"builtin": "digits-5to9"}, "num_classes": 5,
              "train": {"epochs": 2, "batch_size": 256, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                        "num_intervals": 3, "calibration_images": 40},
              "evaluate": {"all": True, "batch_size": 512}, "device": "cpu"}
    return with_overrides(config, over)


def _write(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def _train(tmp_path, out, config=None, *extra):
    return main(["train", "--config", _write(tmp_path, config or _config()), "--out", str(out), "--no-progress",
                 *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete 2-epoch run (two checkpoint saves, so a previous checkpoint exists)."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "run"
    assert _train(tmp, out) == 0
    return out


# -------------------------------------------------------------------------------------- resume rules
def test_resume_with_other_data_is_refused_and_changes_nothing(finished_run, tmp_path, capsys):
    before = _snapshot(finished_run)
    code = _train(tmp_path, finished_run, _config(data={"builtin": "digits-0to4"}), "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "trained on other data" in err and "source" in err, err
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(finished_run) == before


def test_a_refused_resume_with_another_config_leaves_the_run_usable(finished_run, tmp_path, capsys):
    before = _snapshot(finished_run)
    code = _train(tmp_path, finished_run, _config(train={"epochs": 3}), "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "config.train.epochs" in err, err
    assert _snapshot(finished_run) == before  # config.json was not overwritten
    assert main(["deploy", "--run", str(finished_run)]) == 0


def test_a_run_written_before_the_image_data_keys_still_deploys(finished_run, tmp_path):
    """A run directory from before data.dataset, root, train_transform and crop_pct existed (data.image_size
    224, train/test "train"/"val" filled in, as config.json held them then) still deploys: its checkpoint's
    identity is read through today's schema."""
    import shutil

    run = tmp_path / "old"
    shutil.copytree(finished_run, run)
    old = json.loads((run / "config.json").read_text())
    for key in ("dataset", "root", "train_transform", "crop_pct"):
        del old["data"][key]
    old["data"].update(train="train", test="val", image_size=224)
    (run / "config.json").write_text(json.dumps(old))
    for name in ("checkpoint.pt", "checkpoint.pt.prev"):
        state = torch.load(run / name, weights_only=False)
        identity = state["metadata"]["run_config"]
        for key in ("dataset", "root", "train_transform", "crop_pct"):
            del identity["data"][key]
        identity["data"].update(train="train", test="val", image_size=224)
        torch.save(state, run / name)
    report = json.loads((finished_run / "report.json").read_text())
    assert main(["deploy", "--run", str(run)]) == 0
    again = json.loads((run / "report.json").read_text())
    assert [m["accuracy"] for m in again["members"]] == [m["accuracy"] for m in report["members"]]
    old["train"]["epochs"] = 9  # a real difference is still refused
    (run / "config.json").write_text(json.dumps(old))
    assert main(["deploy", "--run", str(run)]) == 2


def test_a_fresh_run_refuses_a_directory_holding_a_run(finished_run, tmp_path, capsys):
    before = _snapshot(finished_run)
    assert _train(tmp_path, finished_run) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _snapshot(finished_run) == before


def test_history_survives_an_interruption(tmp_path, monkeypatch, capsys):
    """history.json of an interrupted-then-resumed run holds every step, equal to an uninterrupted run's."""
    straight = tmp_path / "straight"
    assert _train(tmp_path, straight) == 0
    original = Trainer.train_step
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 3:  # after the first epoch's checkpoint (2 steps per epoch)
            raise KeyboardInterrupt
        return original(self)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, out)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert _train(tmp_path, out, None, "--resume") == 0
    got = json.loads((out / "history.json").read_text())
    want = json.loads((straight / "history.json").read_text())
    assert [r["step"] for r in got] == list(range(len(want))) and got == want
    assert "resumed at step 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- the lock
_HOLD = r"""
import sys, time
from esta.runs import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_run_directory_in_use_is_refused_with_the_holders_pid(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _train(tmp_path, out) == 2
        err = capsys.readouterr().err
        assert f"in use by another esta process (pid {holder.pid})" in err, err
        assert not os.path.exists(out / "config.json")
    finally:
        holder.kill()
        holder.wait()


_WRITER = r"""
import sys, torch
from esta.checkpoint import save_checkpoint
for i in range(40):
    save_checkpoint({"writer": sys.argv[2], "i": i, "payload": torch.full((20000,), float(i))}, sys.argv[1])
"""


def test_concurrent_writers_never_expose_a_partial_checkpoint(tmp_path):
    """Two writers on one path (unique temporary names, atomic renames) and a reader: every read loads."""
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"writer": "init", "i": -1, "payload": torch.full((20000,), -1.0)}, path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(w)], env=env) for w in range(2)]
    reads = 0
    try:
        while any(w.poll() is None for w in writers):
            state, used = load_checkpoint(path, log=None)
            assert used == path and state["payload"].shape == (20000,)
            assert torch.equal(state["payload"], torch.full((20000,), float(state["i"])))
            reads += 1
    finally:
        for w in writers:
            w.wait(timeout=120)
    assert all(w.returncode == 0 for w in writers) and reads > 0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------- corrupt checkpoints
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, damage, capsys):
    run = tmp_path / "copy"
    import shutil

    shutil.copytree(finished_run, run)
    ck = run / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    assert main(["deploy", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if "cannot be used" in line]
    assert len(notice) == 1 and "checkpoint.pt.prev" in notice[0], out
    (run / "checkpoint.pt.prev").unlink()
    assert main(["deploy", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "no previous checkpoint" in err and len(err.strip().splitlines()) == 1


def test_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ck.pt")
    save_checkpoint({"i": 1}, path)
    save_checkpoint({"i": 2}, path)
    assert torch.load(path)["i"] == 2 and torch.load(path + ".prev")["i"] == 1
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "none.pt"))


# ------------------------------------------------------------------------------------- divergence
def test_an_infinite_learning_rate_is_a_config_error(tmp_path, capsys):
    path = tmp_path / "inf.json"
    path.write_text(json.dumps(_config(train={"base_lr": float("inf")})))  # json writes Infinity
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config.train.base_lr: must be a finite number > 0, got inf" in err, err
    assert not (tmp_path / "o").exists()


def test_a_diverging_run_stops_and_writes_no_report(tmp_path, capsys):
    out = tmp_path / "diverged"
    code = _train(tmp_path, out, _config(train={"base_lr": 1e9, "epochs": 3}))
    err = capsys.readouterr().err
    assert code == 1, err
    assert re.search(r"training diverged: step \d+: non-finite .* \(member \d+, teacher 1\)", err), err
    for name in ("report.json", "report.png", "history.json", "export"):
        assert not (out / name).exists(), name


def _tiny_trainer(**kw):
    from tests.helpers.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    data = list(zip(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 5, (32,), generator=g)))
    model.init_stitching_layers(torch.stack([x for x, _ in data[:8]]))
    config = TrainConfig(epochs=2, batch_size=8, warmup_epochs=0.5, sampler_warmup_epochs=0.5, num_intervals=3,
                         base_lr=0.02, **kw)
    return model, data, config


def test_non_finite_loss_stops_before_any_update_and_keeps_the_checkpoint(tmp_path):
    model, data, config = _tiny_trainer()
    trainer = Trainer(model, data, config)
    ck = str(tmp_path / "ck.pt")
    trainer.fit(steps=2, checkpoint=ck)
    saved = open(ck, "rb").read()
    with torch.no_grad():  # a poisoned parameter of the teacher: its loss becomes NaN
        trainer.model.anchors[2].model.head.weight[0, 0] = float("nan")
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite loss_teacher = nan.*member \d+, teacher 2"):
        trainer.fit(checkpoint=ck, checkpoint_every=1)
    assert trainer.step == 2
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, params[n]) or (n.endswith("head.weight") and torch.equal(p.isnan(), params[n].isnan()))
    assert open(ck, "rb").read() == saved


def test_nonfinite_skip_skips_only_the_bad_steps():
    model, data, config = _tiny_trainer(nonfinite="skip")
    x, y = data[5]
    data[5] = (torch.full_like(x, float("nan")), y)  # one poisoned sample: the steps that see it are skipped
    trainer = Trainer(model, data, config)
    records = trainer.fit()
    bad = [s for s in range(trainer.total_steps)
           if any(5 in idx for idx in trainer._batch_sampler(s).step_indices(s))]
    assert bad and [r["step"] for r in records if r.get("skipped")] == bad
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)
    assert all(math.isfinite(r["loss_teacher"]) for r in records if not r.get("skipped"))


# ----------------------------------------------------------------------------------- config errors
# (key path, a value of the wrong type, a value out of range / not a choice); None: no such case
_KEYS = [
    ("train.epochs", "2", 0), ("train.batch_size", 8.0, 0), ("train.accum_steps", True, 0),
    ("train.base_lr", "0.01", 0), ("train.weight_decay", "0", -1e-4), ("train.warmup_epochs", [1], -1),
    ("train.distill_weight", "0.5", 1.5), ("train.clip_grad", "1", 0), ("train.bf16", "false", None),
    ("train.sampling", 1, "best"), ("train.sampler_warmup_epochs", None, -2), ("train.num_intervals", 2.5, 0),
    ("train.temperature", "1", 0), ("train.momentum", "0.9", 1.0), ("train.score", 0, "grasp"),
    ("train.method", None, "joint"), ("train.adapt_epochs", "1", -1), ("train.finetune", True, "lora"),
    ("train.stitch_bias", "false", None), ("train.ranks", "8", [8, 0]), ("train.calibration_images", "20", -3),
    ("train.nonfinite", 1, "ignore"), ("train.seed", "0", -1), ("train.parallel", 2, "fsdp2"),
    ("stitching.kernel_size", "2", 0), ("stitching.stride", 1.5, 0),
    ("evaluate.all", "yes", None), ("evaluate.batch_size", "x", 0),
    ("data.image_size", "abc", 0), ("data.num_workers", "2", -1), ("data.train", 3, None), ("data.test", [], None),
    ("data.builtin", 7, None), ("data.folder", True, None), ("data.dataset", 5, "imagenet"), ("data.root", 3, None),
    ("data.train_transform", 1, "random"), ("data.crop_pct", "0.9", 1.5),
    ("num_classes", "5", 0), ("device", 5, "tpu"),
    # instruction data and generation (issue 16; their decoder-run cases: tests/esta/test_instruction_runs.py)
    ("data.instructions", 3, None), ("data.tokenizer", ["x"], None), ("data.max_length", "128", 1),
    ("data.held_out", "0.1", 1.0), ("data.split_seed", 0.5, -1), ("evaluate.generate_examples", "8", -1),
    ("evaluate.max_new_tokens", 2.0, 0), ("task", 1, "regression"),
    ("generate.do_sample", "yes", None), ("generate.top_p", "0.75", 0), ("generate.num_beams", 4.0, 0),
    ("generate.temperature", "1", 0), ("generate.max_new_tokens", "64", 0),
]


@pytest.mark.parametrize("key,value", list(bad_value_cases(_KEYS)))
def test_every_key_with_a_bad_value_is_one_line_and_status_2(tmp_path, capsys, key, value):
    config = set_key(_config(), key, value)
    assert main(["train", "--config", _write(tmp_path, config), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config.{key}" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # nothing was written


def test_the_schema_covers_every_key():
    """Every field of every section has a row above (a new key needs its checks tested)."""
    import dataclasses

    from esta.config import DataSpec, EvaluateSpec, GenerateSpec, RunConfig, StitchingSpec

    tested = {k for k, _, _ in _KEYS}
    sections = {"train": TrainConfig, "stitching": StitchingSpec, "evaluate": EvaluateSpec, "data": DataSpec,
                "generate": GenerateSpec}
    expected = {f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)}
    expected |= {"num_classes", "device", "task"}
    untested = expected - tested
    assert not untested, untested
    assert {f.name for f in dataclasses.fields(RunConfig)} == {"anchors", "data", "num_classes", "stitching", "train",
                                                                 "evaluate", "device", "task", "generate"}


@pytest.mark.parametrize("config, match", [
    ({"anchors": [_anchor(8)], "data": {"builtin": "digits-5to9"}}, "config.anchors: must list at least two"),
    ({"data": {"builtin": "digits-5to9"}}, "config: missing key.*anchors"),
    ({"anchors": "vit", "data": {"builtin": "digits-5to9"}}, "config.anchors: must be a list"),
    ({"anchors": [{"timm": "a", "demo": "b"}, _anchor(8)], "data": {"builtin": "x"}},
     r"config.anchors\[0\]: give exactly one of 'demo', 'timm' or 'hf'"),
    ({"anchors": [_anchor(8), {**_anchor(16), "kwargs": "x"}], "data": {"builtin": "x"}},
     r"config.anchors\[1\].kwargs: must be a table"),
    ({"anchors": [_anchor(8), _anchor(16)], "data": {}}, "config.data: give exactly one of 'builtin', 'folder', 'dataset' or 'instructions'"),
    ({"anchors": [_anchor(8), _anchor(16)], "data": {"builtin": "digits-5to9"}, "stitching": {"calibration_images": 20}},
     "config.stitching: unknown key.*calibration_images"),
    ({"anchors": [_anchor(8), _anchor(16)], "data": {"builtin": "digits-5to9"},
      "train": {"method": "adapt-then-stitch"}}, "config.train.adapt_epochs: must be >= 1 with method"),
    ({"anchors": [_anchor(8), _anchor(16)], "data": {"builtin": "digits-5to9"}, "device": "cuda"},
     "config.device: is 'cuda' but no CUDA GPU is available" if not torch.cuda.is_available() else None),
])
def test_structural_config_errors(config, match):
    if match is None:
        pytest.skip("this machine has a GPU: 'cuda' is a valid device here")
    with pytest.raises(ConfigError, match=match):
        parse_config(config)


def test_errors_that_need_the_data_come_before_any_write(tmp_path, capsys):
    out = tmp_path / "o"
    assert _train(tmp_path, out, _config(train={"batch_size": 5000})) == 2
    err = capsys.readouterr().err
    assert "config.train.batch_size: is 5000" in err and "more than the 672 training samples" in err, err
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("argv, match", [
    (["demo", "--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["demo", "--seed", "-1"], "--seed: must be a non-negative integer, got -1"),
])
def test_demo_argument_errors(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", "--out", str(f)]) == 2
    assert "--out: " in capsys.readouterr().err
    assert main(["train", "--config", _write(tmp_path, _config()), "--out", str(f)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_one_calibration_setting_feeds_both_least_squares_inits(monkeypatch, tmp_path):
    """train.calibration_images sizes the first least-squares init and adapt-then-stitch's re-solve alike
    (they once read two different keys, stitching.calibration_images and train.calibration_images)."""
    from esta import runs
    from esta.model import StitchableModel

    seen = []
    original = StitchableModel.init_stitching_layers

    def spy(self, data, **kw):
        seen.append(len(data))
        return original(self, data, **kw)

    monkeypatch.setattr(StitchableModel, "init_stitching_layers", spy)
    config = parse_config(_config(train={"epochs": 1, "method": "adapt-then-stitch", "adapt_epochs": 1,
                                         "calibration_images": 37}))
    runs.train_run(config, str(tmp_path / "run"), deploy=False, quiet=True, progress=False)
    assert seen == [37, 37]  # the first init, then the re-solve on the adapted anchors
