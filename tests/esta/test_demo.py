"""The embedded demo: its tasks (digits, rendered letters), the shipped anchors, and `esta demo` itself."""
import hashlib
import json
import os

import pytest
import torch

from esta.demo import data

sklearn = pytest.importorskip("sklearn", reason="the digits tasks need scikit-learn")
matplotlib = pytest.importorskip("matplotlib", reason="the letters task renders matplotlib's fonts")


def _levels(x):
    """Pixel values back on the 0..16 grey scale."""
    return (x * data.STD + data.MEAN) * 16


@pytest.mark.parametrize("name", ["digits-0to4", "digits-5to9"])
def test_digits_tasks(name):
    xtr, ytr = data.load_task(name, "train")
    xte, yte = data.load_task(name, "test")
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert len(xtr) == len(ytr) and len(xte) == len(yte)
    assert len(xte) / (len(xtr) + len(xte)) == pytest.approx(data.TEST_FRACTION, abs=0.01)
    assert set(ytr.tolist()) == set(yte.tolist()) == set(range(5))
    levels = _levels(torch.cat([xtr, xte]))
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() > -1e-4 and levels.max() < 16 + 1e-4
    # deterministic, and no image is in both splits
    x2, y2 = data.load_task(name, "train")
    assert torch.equal(x2, xtr) and torch.equal(y2, ytr)
    train_rows = {tuple(r.tolist()) for r in xtr.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in xte.flatten(1)) <= 2  # (the digits set has a few duplicates)


def test_letter_prototypes_fill_outlines_with_holes():
    protos = data.letter_prototypes("CGOQD")
    assert protos.shape == (5, len(data.FONTS), 32, 32) and protos.dtype == torch.float32
    assert 0.0 <= float(protos.min()) and float(protos.max()) <= 1.0
    o = protos[2]  # "O": ink on the ring, none in the hole at the centre (even-odd fill)
    assert float(o[:, 15:17, 15:17].max()) == 0.0
    assert float(o.sum((1, 2)).min()) > 20  # every font drew something
    # different letters differ in every font
    for f in range(len(data.FONTS)):
        assert float((protos[0, f] - protos[2, f]).abs().sum()) > 5


def test_letters_task():
    xtr, ytr = data.load_task("letters-cgoqd", "train")
    xte, yte = data.load_task("letters-cgoqd", "test")
    assert xtr.shape == (data.LETTERS_TRAIN, 1, 8, 8) and xte.shape == (data.LETTERS_TEST, 1, 8, 8)
    assert ytr.dtype == torch.int64 and set(ytr.tolist()) == set(range(5))
    counts = torch.bincount(yte, minlength=5).float() / len(yte)
    assert float((counts - 0.2).abs().max()) < 0.03  # uniform labels
    levels = _levels(xte)
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.min() > -1e-4 and levels.max() < 16 + 1e-4
    assert float(levels.mean()) > 1.0  # ink is there
    x2, y2 = data.load_task("letters-cgoqd", "train")
    assert torch.equal(x2, xtr) and torch.equal(y2, ytr)  # deterministic
    assert not torch.equal(xtr[:100], xte[:100])  # the splits are different draws
    a, _ = data.sample_letters("CGOQD", 50, seed=7)
    b, _ = data.sample_letters("CGOQD", 50, seed=8)
    assert not torch.equal(a, b)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive int"):
            data.sample_letters("CGOQD", bad, seed=0)


def test_task_errors():
    with pytest.raises(ValueError, match="unknown demo task 'letters-xyz'"):
        data.load_task("letters-xyz", "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        data.load_task("letters-cgoqd", "val")


timm = pytest.importorskip("timm", reason="the demo anchors are timm ViTs")


def test_shipped_anchors_match_their_manifest():
    from esta.demo.anchors import ANCHOR_NAMES, CHECKPOINT_DIR, checkpoint_path, load_pretrained_anchor

    with open(os.path.join(CHECKPOINT_DIR, "manifest.json")) as f:
        manifest = json.load(f)
    x, y = data.load_task(manifest["source_task"]["name"], "test")
    assert len(y) == manifest["source_task"]["test_size"]
    for name in ANCHOR_NAMES:
        entry = manifest["anchors"][name]
        with open(checkpoint_path(name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"], name
        model = load_pretrained_anchor(name)
        assert sum(p.numel() for p in model.parameters()) == entry["parameters"]
        with torch.no_grad():
            acc = float((model(x).argmax(-1) == y).float().mean())
        assert acc == pytest.approx(entry["test_accuracy"], abs=6e-4), name  # the manifest rounds to 4 digits
    with pytest.raises(ValueError, match="unknown demo anchor"):
        load_pretrained_anchor("vit-demo-xl")


def test_esta_demo_runs(tmp_path, capsys):
    from esta.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for line in ("deployed on the measured Pareto frontier", "not significantly dominated", "palette FLOPs span",
                 "esta demo: done"):
        assert line in printed, line
    report = json.loads((out / "report.json").read_text())
    assert len(report["members"]) == 23 and all(m["accuracy"] is not None for m in report["members"])
    assert report["significance"]["examples"] == data.LETTERS_TEST
    assert (out / "report.png").is_file()
    # the demo's sampler settings (README): temperature 0.1 and the relative SNIP score, which reached the sampler
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["temperature"] == 0.1 and train["score"] == "relative-snip"
    sampler = torch.load(out / "checkpoint.pt", weights_only=False)["sampler"]
    assert sampler["score_mode"] == "mean/loss" and int(sampler["num_updates"].sum()) > 0
    for r in report["deployed"]:
        assert (out / "export" / f"stitch-{r['deployed']}" / "model.safetensors").is_file()
