"""FSDP2 (`train.parallel = "fsdp"`: `fully_shard` on every anchor decoder layer) on CPU with gloo: 2 ranks
of instruction tuning against each other and against 1 process at the same global batch.

Each rank is its own Python process (as in test_distributed.py: file:// rendezvous, a timeout on every wait):
it builds the same tiny 2-anchor Llama palette (same seed), shards it, trains a few steps of the causal-LM task,
gathers its parameters, and writes a checkpoint (gathered on every rank, written by rank 0). The parent checks
that the parameters really were sharded, that the ranks agree bitwise, that they match a 1-process run at the
same global batch (and that a different global batch does not: the negative control), and that the
checkpoint loads into a plain 1-process trainer.
"""
import os
import subprocess
import sys

import pytest
import torch

from esta.tasks import CausalLMTask
from esta.train import Trainer, TrainConfig

transformers = pytest.importorskip("transformers", reason="decoder anchors need transformers")

from tests.helpers import ROOT  # noqa: E402
from tests.helpers.ranks import launch_ranks, publish_result  # noqa: E402
WORLD = 2
STEPS = 5
PER_RANK = 4
TIMEOUT = 180

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _data(n=40, seed=0, vocab=61):
    """(token ids, response mask) samples of 6..12 tokens, the last 3 of them the response (the same count in
    every sample: the causal-LM loss is a mean over a micro-batch's response tokens, so the mean over ranks
    equals the global batch's only when the ranks hold equally many; prompts and padding still differ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 13, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g)
        resp = 3
        out.append((ids, torch.arange(length) >= length - resp))
    return out


def _fresh(seed=0):
    import esta

    torch.manual_seed(seed)
    anchors = []
    for hidden, layers in ((16, 2), (32, 3)):
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden + 6,
                                          num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config._attn_implementation = "eager"
        anchors.append(esta.HFCausalLMAnchor(transformers.LlamaForCausalLM(config)))
    model = esta.StitchableModel(anchors, kernel_size=1, stride=1)
    task = CausalLMTask(0, flops_length=12)
    model.init_stitching_layers(task.calibration_inputs(_data(12, seed=9)))
    return model


def _config(batch_size, parallel="ddp"):
    return TrainConfig(epochs=1, batch_size=batch_size, warmup_epochs=0.2, sampler_warmup_epochs=0.4,
                       num_intervals=3, base_lr=0.05, weight_decay=0.0, seed=0, score="relative-snip",
                       clip_grad=1.0, parallel=parallel)


def _run(trainer, gather):
    records = trainer.fit(steps=STEPS)
    params = {n: gather(p.detach()).clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"stitches": [r["stitch"] for r in records], "records": records, "params": params,
            "scores": trainer.sampler.scores.clone(), "global_batch": trainer.global_batch}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from esta.distributed import full, is_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        trainer = Trainer(_fresh(), _data(), _config(PER_RANK, "fsdp"), task=CausalLMTask(0, flops_length=12),
                          distributed=True)
        assert trainer.sharded and trainer.world == world and trainer.rank == rank
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        sharded = {"trainable": all(is_sharded(p) for p in trainable),
                   "blocks": all(is_sharded(p) for a in trainer.model.anchors for b in a.blocks for p in b.parameters()),
                   "local_numel": sum(p.to_local().numel() for p in trainable),
                   "numel": sum(p.numel() for p in trainable)}
        result = _run(trainer, full)
        result["sharded"] = sharded
        trainer.save(out + ".ckpt")
        publish_result(result, out)
    finally:
        dist.destroy_process_group()


def _launch(tmp_path, world=WORLD):
    results, outs = launch_ranks("tests.esta.test_instruction_fsdp", tmp_path, world, TIMEOUT, "FSDP run")
    return results, outs[0] + ".ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks, checkpoint = _launch(tmp_path_factory.mktemp("fsdp"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = CausalLMTask(0, flops_length=12)
        single = _run(Trainer(_fresh(), _data(), _config(PER_RANK * WORLD), task=task), lambda t: t)
        other = _run(Trainer(_fresh(), _data(), _config(PER_RANK), task=task), lambda t: t)  # global batch 4
    finally:
        torch.set_num_threads(threads)
    return ranks, single, other, checkpoint


def test_the_parameters_are_sharded(runs):
    (r0, r1), _, _, _ = runs
    for r in (r0, r1):
        assert r["sharded"]["trainable"] and r["sharded"]["blocks"]
        assert r["sharded"]["local_numel"] < r["sharded"]["numel"]  # each rank holds a part
    assert r0["sharded"]["local_numel"] + r1["sharded"]["local_numel"] == r0["sharded"]["numel"]


def test_ranks_agree_bitwise(runs):
    (r0, r1), _, _, _ = runs
    assert r0["global_batch"] == r1["global_batch"] == PER_RANK * WORLD
    assert r0["stitches"] == r1["stitches"] and len(r0["stitches"]) == STEPS
    torch.testing.assert_close(r0["scores"], r1["scores"], rtol=0, atol=0, equal_nan=True)  # nan: never scored
    for a, b in zip(r0["records"], r1["records"]):
        assert a["loss_teacher"] == b["loss_teacher"] and a["loss_stitch"] == b["loss_stitch"]
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n


def _close(a, b):
    if a["stitches"] != b["stitches"]:
        return False
    for x, y in zip(a["records"], b["records"]):
        if abs(x["loss_stitch"] - y["loss_stitch"]) > 1e-4 * max(1.0, abs(y["loss_stitch"])):
            return False
    return all(torch.allclose(a["params"][n], b["params"][n], rtol=1e-3, atol=1e-5) for n in b["params"])


def test_two_sharded_ranks_match_one_process_at_the_same_global_batch(runs):
    (r0, _), single, other, _ = runs
    assert single["global_batch"] == r0["global_batch"]
    assert set(r0["params"]) == set(single["params"])
    assert _close(r0, single), (r0["stitches"], single["stitches"])
    torch.testing.assert_close(r0["scores"], single["scores"], rtol=1e-3, atol=1e-9, equal_nan=True)
    # the tolerances can fail: a run at another global batch does not match
    assert not _close(other, single)


def test_the_gathered_checkpoint_resumes_in_one_process(runs):
    (r0, _), _, _, checkpoint = runs
    state = torch.load(checkpoint, weights_only=False)
    assert state["world"] == WORLD and state["step"] == STEPS
    assert all(type(t) is torch.Tensor for t in state["trainable"].values())  # whole tensors, not shards
    for n, t in state["trainable"].items():
        assert torch.equal(t, r0["params"][n]), n
    # a 2-process checkpoint refuses a 1-process trainer (its global batch would change) ...
    trainer = Trainer(_fresh(), _data(), _config(PER_RANK, "fsdp"), task=CausalLMTask(0, flops_length=12))
    with pytest.raises(ValueError, match="written by 2 process"):
        trainer.load_state_dict(state)
    # ... and its whole tensors load into a plain (unsharded) model, as `esta deploy` and the deployment on
    # rank 0 of a sharded run restore it
    from esta.train import load_model_state, prepare_model

    torch.manual_seed(0)
    model = prepare_model(_fresh(), _config(PER_RANK * WORLD, "fsdp"))
    load_model_state(model, state)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), r0["params"][n]), n


def test_esta_train_under_torchrun_with_fsdp(tmp_path):
    """`torchrun -m esta train` of an instruction run with train.parallel = "fsdp": the ranks train sharded,
    rank 0 deploys a whole copy rebuilt from the gathered checkpoint (report, exports)."""
    import json

    pytest.importorskip("tokenizers")
    from tests.helpers.instructions import lm_config, make_family

    from tests.esta.test_distributed import _stop_torchrun

    family = make_family(str(tmp_path / "family"))
    config = lm_config(family, train={**lm_config(family)["train"], "batch_size": 12, "parallel": "fsdp"})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "esta", "train", "--config", str(path), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        log = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        _stop_torchrun(proc)
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s")
    assert proc.returncode == 0, log[-6000:]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world"] == 2 and state["step"] == 3 and state["config"]["parallel"] == "fsdp"  # 72 // 24
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm" and all(m["metrics"] is not None for m in report["members"])
    for r in report["deployed"]:
        assert (out / "export" / f"stitch-{r['deployed']}" / "model.safetensors").is_file()
