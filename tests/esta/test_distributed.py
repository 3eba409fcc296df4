"""Distributed (DDP) training on CPU with gloo: 2 ranks against each other and against 1 process.

Each rank is a separate Python process (subprocess, so every wait has a timeout and a hung rank is killed):
it builds the same tiny 3-anchor model (same seed), joins a gloo process group (file:// rendezvous, no port
to race for), trains with `Trainer(..., distributed=True)` and saves its trainable parameters, sampled
stitches, sampler scores, losses and the gradients each optimizer step saw. The parent compares the ranks
with each other and with a 1-process run at the same global batch; a run at a different global batch is the
negative control that shows the tolerances can fail.

The command line is smoke-tested under `python -m torch.distributed.run --nproc_per_node=2 -m esta train`.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from esta.train import Trainer, TrainConfig

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")

from tests.helpers.models import record_grads, tiny_model  # noqa: E402

from tests.helpers import ROOT  # noqa: E402
from tests.helpers.ranks import launch_ranks, publish_result  # noqa: E402
WORLD = 2
STEPS = 6
PER_RANK = 4          # batch_size per rank; the global batch is PER_RANK * WORLD = 8
TIMEOUT = 120         # seconds for a whole multi-process run (each takes ~10 s here)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return list(zip(x, y))


def _config(batch_size):
    # 48 samples / global batch 8 = 6 steps per epoch; the sampler leaves its uniform warm-up after 2 steps,
    # so steps 2..5 sample from the (all-reduced) scores. The relative score divides the all-reduced SNIP sum
    # by the stitch's loss as well, so the bitwise rank agreement below also checks that this is the global
    # batch's loss on every rank (a rank's own loss would split the ranks' scores, then their stitches).
    return TrainConfig(epochs=2, batch_size=batch_size, warmup_epochs=0.5, sampler_warmup_epochs=0.34,
                       num_intervals=4, base_lr=0.02, seed=0, score="relative-snip")


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = tiny_model()
    model.init_stitching_layers(torch.stack([x for x, _ in _data(16, seed=9)]))
    return model


def _run(trainer, steps=STEPS):
    """Trains `steps` steps, recording the gradients (of the trainable parameters) each optimizer step saw."""
    grads = record_grads(trainer)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    records = trainer.fit(steps=steps)
    return {
        "initial": initial,
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
        "stitches": [r["stitch"] for r in records],
        "records": records,
        "scores": trainer.sampler.scores.clone(),
        "updates": trainer.sampler.num_updates.clone(),
        "grads": grads,
        "lr": trainer.lr,
        "global_batch": trainer.global_batch,
    }


def _worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank (run in its own process by `_launch`)."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(_fresh(), _data(), _config(PER_RANK), distributed=True)
        # the DDP wrapper uses the buffer-sync flag this torch supports (no deprecation warning)
        assert not [w for w in caught if "broadcast_buffers" in str(w.message)], [str(w.message) for w in caught]
        assert trainer.world == world and trainer.rank == rank
        assert isinstance(trainer.net, torch.nn.parallel.DistributedDataParallel)
        calls = []  # Python-level all-reduces (DDP's gradient buckets go through its C++ reducer, not this)
        all_reduce = dist.all_reduce
        dist.all_reduce = lambda *a, **k: (calls.append(1), all_reduce(*a, **k))[1]
        try:
            result = _run(trainer)
        finally:
            dist.all_reduce = all_reduce
        result["python_all_reduces"] = len(calls)
        publish_result(result, out)
    finally:
        dist.destroy_process_group()


def _launch(tmp_path, world=WORLD):
    """Runs `_worker` on `world` processes; returns each rank's result. Kills every rank on a timeout."""
    return launch_ranks("tests.esta.test_distributed", tmp_path, world, TIMEOUT, "distributed run")[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank run and 1-process runs at the same (8) and at a different (4) global batch."""
    ranks = _launch(tmp_path_factory.mktemp("ddp"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(Trainer(_fresh(), _data(), _config(PER_RANK * WORLD)))
        other = _run(Trainer(_fresh(), _data(), _config(PER_RANK)))  # negative control: global batch 4
    finally:
        torch.set_num_threads(threads)
    return ranks, single, other


def test_ranks_agree_bitwise(runs):
    (r0, r1), _, _ = runs
    assert r0["global_batch"] == r1["global_batch"] == PER_RANK * WORLD
    assert len(r0["stitches"]) == STEPS
    # every rank sampled the same stitch at every step and holds the same (all-reduced) scores
    assert r0["stitches"] == r1["stitches"]
    assert int(r0["updates"].sum()) == STEPS and torch.equal(r0["updates"], r1["updates"])
    # the score and the history's losses travel in one collective per step
    assert r0["python_all_reduces"] == r1["python_all_reduces"] == STEPS
    assert torch.equal(r0["scores"].nan_to_num(-1), r1["scores"].nan_to_num(-1))
    # training happened (the teacher's head and some LoRA moved), and the ranks' parameters are identical
    changed = {n for n in r0["params"] if not torch.equal(r0["params"][n], r0["initial"][n])}
    assert "anchors.2.model.head.weight" in changed and any(".lora_b" in n for n in changed)
    assert r0["params"].keys() == r1["params"].keys()
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    # DDP averaged the gradients: both ranks stepped with the same gradient although their data differed
    for g0, g1 in zip(r0["grads"], r1["grads"]):
        assert g0.keys() == g1.keys()
        for n in g0:
            assert torch.equal(g0[n], g1[n]), n
    # ... and the ranks did see different halves of the global batch (their local losses differ), while the
    # history holds the global batch's loss on both
    assert r0["records"][0]["rank_loss_teacher"] != r1["records"][0]["rank_loss_teacher"]
    for a, b in zip(r0["records"], r1["records"]):
        assert a["loss_teacher"] == b["loss_teacher"] and a["loss_stitch"] == b["loss_stitch"]
        assert a["loss_teacher"] == pytest.approx((a["rank_loss_teacher"] + b["rank_loss_teacher"]) / 2, rel=1e-12)


# Tolerances. The 2-rank gradient is (g_rank0 + g_rank1) / 2 of float32 half-batch means, the 1-process one
# the float32 mean over the whole batch: the same math in another summation order. Measured here: at most
# 2.4e-6 of each tensor's largest entry over the 6 steps. GRAD_RTOL = 1e-4 is 40x that, and the negative
# control (the gradient of half the batch, what a rank would step with if DDP did not average) is off by
# 1.7 = 17000x GRAD_RTOL. Parameters: AdamW's m / sqrt(v) normalization magnifies rounding differences where
# a gradient entry is tiny, so after 6 steps (lr 6.25e-4, the largest parameter moved 3e-3) the measured max
# |diff| is 3.6e-6; PARAM_ATOL = 2e-5 (3% of one step's lr) is 5x that, and the control (global batch 4)
# differs by 3.2e-3 = 160x PARAM_ATOL (a different seed: 0.49).
GRAD_RTOL = 1e-4
PARAM_ATOL = 2e-5


def test_two_ranks_match_one_process_at_the_same_global_batch(runs):
    (r0, r1), single, other = runs
    assert single["global_batch"] == r0["global_batch"] and single["lr"] == r0["lr"]
    assert single["stitches"] == r0["stitches"]
    # the all-reduced SNIP scores are the 1-process (whole-batch) scores
    torch.testing.assert_close(r0["scores"], single["scores"], rtol=1e-4, atol=0, equal_nan=True)
    # the ranks' local losses average to the whole batch's loss: the ranks split the global batch exactly,
    # and the history's (all-reduced) loss is that of the 1-process run
    for a, b, s in zip(r0["records"], r1["records"], single["records"]):
        for key in ("loss_teacher", "loss_stitch"):
            assert (a["rank_" + key] + b["rank_" + key]) / 2 == pytest.approx(s[key], rel=1e-5), (s["step"], key)
            assert a[key] == pytest.approx(s[key], rel=1e-5) and "rank_" + key not in s
    # the gradient every step stepped with (the sharpest check), then the parameters
    assert len(r0["grads"]) == len(single["grads"]) == STEPS
    for step, (gd, gs) in enumerate(zip(r0["grads"], single["grads"])):
        assert gd.keys() == gs.keys() and len(gs) > 0, step
        for n in gs:
            scale = float(gs[n].abs().max())
            err = float((gd[n] - gs[n]).abs().max())
            assert err <= GRAD_RTOL * scale + 1e-10, (step, n, err, scale)
    for n in single["params"]:
        err = float((r0["params"][n] - single["params"][n]).abs().max())
        assert err <= PARAM_ATOL, (n, err)


def test_the_tolerances_detect_a_different_global_batch(runs):
    """Negative control: a 1-process run at global batch 4 (half the data per step) must fail both checks."""
    (r0, _), single, other = runs
    assert other["global_batch"] == PER_RANK
    # step 0: same parameters, same (warm-up) stitch, same epoch permutation; only the batch is half of it
    assert other["stitches"][0] == single["stitches"][0]
    g_other, g_single = other["grads"][0], single["grads"][0]
    assert g_other.keys() == g_single.keys()
    worst = max(float((g_other[n] - g_single[n]).abs().max() / g_single[n].abs().max()) for n in g_single
                if float(g_single[n].abs().max()) > 0)
    assert worst > 100 * GRAD_RTOL, worst
    worst = max(float((other["params"][n] - single["params"][n]).abs().max()) for n in single["params"])
    assert worst > 10 * PARAM_ATOL, worst


# ---------------------------------------------------------------------------------------- command line

def _cli_config():
    if importlib.util.find_spec("esta.demo.anchors") is not None:
        anchors = [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}, {"demo": "vit-demo-b"}]
    else:  # tiny timm ViTs on the 8x8 grayscale digits
        anchors = [{"timm": "vit_tiny_patch16_224",
                    "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": d,
                               "num_heads": 2}} for d in (16, 24, 32)]
    return {
        "anchors": anchors,
        "data": {"builtin": "digits-5to9"},
        "num_classes": 5,
        "stitching": {"kernel_size": 2, "stride": 1},
        "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                  "num_intervals": 4, "base_lr": 0.02, "calibration_images": 32},
        "evaluate": {"all": False, "batch_size": 512},
        "device": "cpu",
    }


def _children(pid):
    """Ids of the live processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _stop_torchrun(proc):
    """Stops a hung torchrun and the ranks it started (they run in sessions of their own, so killing
    torchrun's process group would orphan them): SIGTERM to torchrun (which stops its ranks), then SIGKILL
    to torchrun and to each rank, by id."""
    ranks = _children(proc.pid)
    proc.terminate()
    try:
        proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    for pid in ranks:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_cli_train_under_torchrun(tmp_path):
    pytest.importorskip("sklearn", reason="the builtin digits data needs scikit-learn")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(_cli_config()))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    # --standalone: a local rendezvous on a free port (--master_port=0 hangs: the ranks are told port 0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "esta", "train", "--config", str(config), "--out", str(out), "--no-progress"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        log = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        _stop_torchrun(proc)
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, log[-6000:]
    for name in ("checkpoint.pt", "report.json", "config.json", "history.json"):
        assert (out / name).is_file(), (name, log[-3000:])
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world"] == 2 and state["step"] > 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == state["step"] and all(r["phase"] == "stitch" for r in history)
    report = json.loads((out / "report.json").read_text())
    assert report
    print(f"torchrun 2 ranks: {state['step']} steps in {elapsed:.1f} s")
