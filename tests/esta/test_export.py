"""Merged export of palette members (esta/export.py): equal to every member, save/load round trip, runs
without esta installed, generic anchors, copies of a model."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import esta.export
from esta import SequentialBlocksAnchor, StitchableModel
from esta.nn import StitchedLinear

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")

from tests.helpers.models import MLPBlock  # noqa: E402
from tests.helpers.models import tiny_images as _images  # noqa: E402
from tests.helpers.models import tiny_model as _model  # noqa: E402


def _trained_pst_model():
    model = _model()
    model.init_stitching_layers(_images(6))
    model.to_pst()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return _trained_pst_model()


def test_export_matches_every_member(trained):
    x = _images(3, seed=4)
    for i in range(len(trained)):
        net = trained.export(i)
        assert isinstance(net, timm.models.vision_transformer.VisionTransformer)
        assert not any(type(m).__module__.startswith("esta") for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters()) and not net.training
        with torch.no_grad():
            torch.testing.assert_close(net(x), trained(x, stitch=i), rtol=1e-4, atol=2e-5)
    info = trained.stitches[5]
    net = trained.export(5)
    assert len(net.blocks) == (info.front_block + 1) + 1 + (trained.anchors[info.end].depth - info.end_block)
    # the export is a copy: changing it leaves the model alone
    with torch.no_grad():
        net.head.weight.zero_()
    assert trained.anchors[info.end].model.head.weight.abs().sum() > 0


def test_export_save_load_round_trip(trained, tmp_path):
    x = _images(2, seed=6)
    for i in (1, 4, len(trained) - 1):
        net = trained.export(i)
        esta.export.save(net, str(tmp_path / f"m{i}"))
        config = json.loads((tmp_path / f"m{i}" / "config.json").read_text())
        assert config["format"] == "esta-export/1" and config["member"]["id"] == i
        back = esta.export.load(str(tmp_path / f"m{i}"))
        with torch.no_grad():
            torch.testing.assert_close(back(x), trained(x, stitch=i), rtol=1e-4, atol=2e-5)


def test_export_runs_without_esta(trained, tmp_path):
    net = trained.export(6)
    path = tmp_path / "net.pt"
    torch.save(net, path)
    x = _images(2, seed=7)
    with torch.no_grad():
        expected = trained(x, stitch=6)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    script = (
        "import sys; sys.modules['esta'] = None; sys.modules['esta_kernels'] = None\n"
        "import torch\n"
        f"net = torch.load({str(path)!r}, weights_only=False)\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad(): y = net(io['x'])\n"
        "assert torch.allclose(y, io['y'], rtol=1e-4, atol=2e-5), (y - io['y']).abs().max()\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_export_generic_anchors_and_errors(tmp_path):

    def anchor(d):
        torch.manual_seed(d)
        return SequentialBlocksAnchor(nn.Linear(16, d), nn.ModuleList(MLPBlock(d) for _ in range(3)),
                                      nn.Linear(d, 5), family="mlp", embed_type="linear16", attention_linears=["fc1"])

    with pytest.raises(ValueError, match="no attention linear"):
        StitchableModel([SequentialBlocksAnchor(nn.Linear(16, 8), nn.ModuleList([MLPBlock(8)]), nn.Linear(8, 5),
                                                family="mlp", embed_type="linear16")]).to_pst()
    with pytest.raises(ValueError, match="no submodule 'fc9'"):
        SequentialBlocksAnchor(nn.Linear(16, 8), nn.ModuleList([MLPBlock(8)]), nn.Linear(8, 5), family="mlp",
                               embed_type="linear16", attention_linears=["fc9"]).attention_linears(0)
    model = StitchableModel([anchor(8), anchor(12)], kernel_size=2).to_pst()
    assert all(isinstance(a.blocks[0].fc1, StitchedLinear) and type(a.blocks[0].fc2) is nn.Linear
               for a in model.anchors)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randn(3, 4, 16)
    for i in range(len(model)):
        net = model.export(i)
        assert isinstance(net, nn.Sequential)
        with torch.no_grad():
            torch.testing.assert_close(net(x), model(x, stitch=i), rtol=1e-4, atol=1e-5)
    net = model.export(4)
    esta.export.save(net, str(tmp_path / "seq"))
    with pytest.raises(ValueError, match="module="):
        esta.export.load(str(tmp_path / "seq"))
    back = esta.export.load(str(tmp_path / "seq"), module=model.export(4))
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
    with pytest.raises(IndexError, match="outside"):
        model.export(len(model))
    with pytest.raises(FileNotFoundError, match="config.json"):
        esta.export.load(str(tmp_path / "missing"))
    (tmp_path / "seq" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an esta export"):
        esta.export.load(str(tmp_path / "seq"), module=net)
    with pytest.raises(ValueError, match="not made by"):
        esta.export.save(nn.Linear(2, 2), str(tmp_path / "x"))


@pytest.mark.parametrize("kind", ["deepcopy", "torch.save"])
def test_copied_model_runs_the_member_chosen_after_the_copy(kind, tmp_path):
    """A model copied after switching members runs each member as the original does. Copies once reused a
    stitch id cached (per layer) before the copy, when the copy's own switches brought that layer's id
    buffer's version counter back to the cached value before its next forward: so the copy here switches
    k times among members that never run anchor 0's blocks, for every k up to past that value, and then runs
    anchor 0, whose layers last ran (before the copy) with a stitch's rows."""
    import copy

    model = _trained_pst_model()
    x = _images(2, seed=3)
    stitch = next(s.id for s in model.stitches if not s.is_anchor and s.front == 0)
    with torch.no_grad():
        expected = model(x, stitch=0)
        for i in (0, stitch, 1, 2, stitch):
            model(x, stitch=i)
        if kind == "torch.save":
            torch.save(model, tmp_path / "model.pt")
        for k in range(16):
            if kind == "deepcopy":
                clone = copy.deepcopy(model)
            else:
                clone = torch.load(tmp_path / "model.pt", weights_only=False)
            for t in range(k):
                clone(x, stitch=1 + t % 2)  # anchors 1 and 2
            torch.testing.assert_close(clone(x, stitch=0), expected, rtol=1e-5, atol=1e-6,
                                       msg=f"anchor 0 after {k} switches in the copy")
