"""Least-squares init of all stitching layers, PST conversion, trainable-parameter report, merged export."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import esta.export
from esta import SequentialBlocksAnchor, StitchableModel, TimmViTAnchor
from esta.nn import StitchedLinear, StitchingLayer
from esta.pst import default_ranks

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")

from tests.helpers.models import WIDTHS, MLPBlock, generic_anchor  # noqa: E402
from tests.helpers.models import tiny_model as _model  # noqa: E402


def _images(n, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _collect_pairs(model, x, positions, pair):
    """Explicit (input, target) rows of the given positions: front block j output, end block k input."""
    fa, ea = model.pairs[pair]

    def states(a):
        anchor = model.anchors[a]
        model._select_rows(a)
        t = anchor.embed(x)
        ins, outs = [], []
        for block in anchor.blocks:
            ins.append(t)
            t = block(t)
            outs.append(t)
        return ins, outs

    with torch.no_grad():
        _, front_out = states(fa)
        end_in, _ = states(ea)
    return [(front_out[j].reshape(-1, front_out[j].shape[-1]).double(),
             end_in[k].reshape(-1, end_in[k].shape[-1]).double()) for j, k in positions]


def _residual(pairs, weight, bias):
    w, b = weight.double(), bias.double()
    return sum(float(((h @ w.T + b - t) ** 2).sum()) for h, t in pairs)


def _layer_groups(model):
    groups = {}
    for s in model.stitches:
        if not s.is_anchor:
            groups.setdefault((s.pair, s.layer), []).append((s.front_block, s.end_block))
    return groups


# ---------------------------------------------------------------- least-squares init

def test_joint_init_is_the_joint_least_squares_solution():
    model = _model()
    x = _images(12)
    reports = model.init_stitching_layers(x, num_images=12, batch_size=5)
    groups = _layer_groups(model)
    assert len(reports) == len(groups) == sum(len(g) for g in model.stitching_layers)
    for r in reports:
        assert r.positions == groups[(r.pair, r.layer)] and r.mode == "joint"
        pairs = _collect_pairs(model, x, r.positions, r.pair)
        assert r.tokens == sum(h.shape[0] for h, _ in pairs) and r.extra["images"] == 12
        h = torch.cat([h for h, _ in pairs]).numpy()
        t = torch.cat([t for _, t in pairs]).numpy()
        sol, *_ = np.linalg.lstsq(np.concatenate([h, np.ones((h.shape[0], 1))], 1), t, rcond=None)
        layer = model.stitching_layers[r.pair][r.layer]
        w_ref, b_ref = torch.from_numpy(sol[:-1].T), torch.from_numpy(sol[-1])
        scale = w_ref.abs().max()
        assert (layer.weight.double() - w_ref).abs().max() <= 1e-4 * scale
        assert (layer.bias.double() - b_ref).abs().max() <= 1e-4 * max(1.0, b_ref.abs().max())


def _linear_anchors(seed=0):
    """Two anchors whose blocks are random linear maps and whose embeddings share one projection: every
    position has an exact linear stitch, but the positions sharing a layer disagree on it."""
    g = torch.Generator().manual_seed(seed)
    embed = nn.Linear(6, 8)
    wide = nn.Linear(6, 12)
    with torch.no_grad():
        wide.weight.copy_(torch.randn(12, 8, generator=g) @ embed.weight)
        wide.bias.zero_()
        embed.bias.zero_()

    def blocks(d):
        mods = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        with torch.no_grad():
            for m in mods:
                m.weight.copy_(torch.eye(d) + 0.4 * torch.randn(d, d, generator=g))
        return mods

    return [SequentialBlocksAnchor(embed, blocks(8), nn.Linear(8, 3), family="lin", embed_type="v", width=8),
            SequentialBlocksAnchor(wide, blocks(12), nn.Linear(12, 3), family="lin", embed_type="v", width=12)]


@pytest.mark.parametrize("kind", ["vit", "linear"])
def test_joint_residual_no_worse_than_sn_net_average(kind):
    if kind == "vit":
        joint, average = _model(), _model()
        x = _images(10, seed=1)
    else:
        joint, average = StitchableModel(_linear_anchors()), StitchableModel(_linear_anchors())
        x = torch.randn(40, 5, 6, generator=torch.Generator().manual_seed(1))
    joint.init_stitching_layers(x)
    average.init_stitching_layers(x, mode="average")
    strictly_better = 0
    for (p, l), positions in _layer_groups(joint).items():
        pairs = _collect_pairs(joint, x, positions, p)
        lj, la = joint.stitching_layers[p][l], average.stitching_layers[p][l]
        rj, ra = _residual(pairs, lj.weight, lj.bias), _residual(pairs, la.weight, la.bias)
        assert rj <= ra * (1 + 1e-6), (p, l, rj, ra)
        if len(positions) > 1 and rj < 0.9 * ra:
            strictly_better += 1
    if kind == "linear":
        assert strictly_better > 0  # where the positions disagree, the joint solve is genuinely better


def test_init_streams_batches_and_respects_num_images():
    x = _images(9, seed=2)
    one, batched = _model(), _model()
    one.init_stitching_layers(x[:7], num_images=None)
    loader = [(x[i:i + 2], torch.zeros(2)) for i in range(0, 9, 2)]  # (input, label) tuples, like a DataLoader
    reports = batched.init_stitching_layers(loader, num_images=7)
    assert reports[0].extra["images"] == 7
    for g1, g2 in zip(one.stitching_layers, batched.stitching_layers):
        for l1, l2 in zip(g1, g2):
            torch.testing.assert_close(l1.weight, l2.weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(l1.bias, l2.bias, rtol=1e-4, atol=1e-5)


def test_init_changes_only_frozen_weights_and_leaves_no_hooks():
    model = _model().train()
    layer = model.stitching_layers[0][0]
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.stitch_bias.normal_()
    lora_b, sbias, weight = layer.lora_b.clone(), layer.stitch_bias.clone(), layer.weight.clone()
    model.init_stitching_layers(_images(4))
    assert torch.equal(layer.lora_b, lora_b) and torch.equal(layer.stitch_bias, sbias)
    assert not torch.equal(layer.weight, weight)
    assert all(m.training for m in model.modules())  # modes restored
    for anchor in model.anchors:
        for block in anchor.blocks:
            assert not block._forward_hooks and not block._forward_pre_hooks


def test_init_generic_anchors():

    model = StitchableModel([generic_anchor(8), generic_anchor(12)], kernel_size=2)
    x = torch.randn(6, 5, 16)
    model.init_stitching_layers(x)
    for (p, l), positions in _layer_groups(model).items():
        pairs = _collect_pairs(model, x, positions, p)
        layer = model.stitching_layers[p][l]
        h = torch.cat([h for h, _ in pairs])
        t = torch.cat([t for _, t in pairs])
        ha = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
        sol = torch.linalg.lstsq(ha, t).solution
        torch.testing.assert_close(layer.weight.double(), sol[:-1].T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("data, error, match", [
    (torch.randn(4, 3, 20, 20), ValueError, r"calibration batch 0.*16x16"),
    (torch.randn(4, 1, 16, 16), ValueError, r"calibration batch 0.*\(batch, 3, height, width\)"),
    (torch.randn(4, 16, 16), ValueError, r"calibration batch 0"),
    ([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)], ValueError, r"calibration batch 1 has samples of shape"),
    (torch.randn(0, 3, 16, 16), ValueError, "no sample"),
    ([], ValueError, "no sample"),
    (["not a tensor"], TypeError, "calibration batch 0 must be a tensor"),
    (3, TypeError, "iterable"),
])
def test_init_bad_calibration_data(data, error, match):
    model = _model()
    before = [l.weight.clone() for g in model.stitching_layers for l in g]
    with pytest.raises(error, match=match):
        model.init_stitching_layers(data)
    after = [l.weight for g in model.stitching_layers for l in g]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing half-written


def test_init_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="num_images"):
        model.init_stitching_layers(_images(2), num_images=0)
    with pytest.raises(ValueError, match="mode"):
        model.init_stitching_layers(_images(2), mode="mean")
    with pytest.raises(TypeError, match="batch_size"):
        model.init_stitching_layers(_images(2), batch_size=2.0)


# ---------------------------------------------------------------- PST

def _runs(model, i, x):
    """(anchor, block) pairs a forward of member i actually runs, and the stitch row each PST linear saw."""
    seen, rows = set(), {}
    handles = []
    for a, anchor in enumerate(model.anchors):
        for b, block in enumerate(anchor.blocks):
            handles.append(block.register_forward_hook(lambda m, i_, o, a=a, b=b: seen.add((a, b))))
            for name, mod in block.named_modules():
                if isinstance(mod, StitchedLinear):
                    handles.append(mod.register_forward_hook(
                        lambda m, i_, o, a=a, b=b, name=name: rows.__setitem__((a, b, name), m.stitch_ids)))
    try:
        with torch.no_grad():
            model(x, stitch=i)
    finally:
        for h in handles:
            h.remove()
    return seen, rows


def test_pst_conversion_structure_and_rows():
    model = _model()
    x = _images(2)
    before = [model(x, stitch=i) for i in range(len(model))]
    model.to_pst()
    ranks = default_ranks(WIDTHS)
    assert ranks == [16, 16, 8] and model.pst.ranks == ranks  # 32 capped at the width 16, then 16, 8
    for a, anchor in enumerate(model.anchors):
        for b, block in enumerate(anchor.blocks):
            assert isinstance(block.attn.qkv, StitchedLinear) and isinstance(block.attn.proj, StitchedLinear)
            assert block.attn.qkv.rank == ranks[a]
            assert type(block.mlp.fc1) is nn.Linear and not block.mlp.fc1.weight.requires_grad
            assert not any(p.requires_grad for p in block.norm1.parameters())
            assert not block.attn.qkv.weight.requires_grad and block.attn.qkv.lora_a.requires_grad
        assert all(p.requires_grad for p in anchor.model.head.parameters())
        assert not any(p.requires_grad for p in anchor.model.norm.parameters())
        assert not anchor.model.patch_embed.proj.weight.requires_grad
    for group in model.stitching_layers:
        for layer in group:
            assert isinstance(layer, StitchingLayer) and layer.rank == layer.in_features // 4
            assert layer.lora_a.requires_grad and layer.stitch_bias.requires_grad
            assert not layer.weight.requires_grad
    # fresh adapters: every member computes what it computed before the conversion
    for i in range(len(model)):
        torch.testing.assert_close(model(x, stitch=i), before[i], rtol=1e-5, atol=1e-5)
    # a member has a row exactly in the blocks it runs, rows are distinct per block, and forward uses them
    for i in range(len(model)):
        seen, rows = _runs(model, i, x)
        for a, anchor in enumerate(model.anchors):
            for b in range(anchor.depth):
                row = model.local_stitch_row(i, a, b)
                assert (row >= 0) == ((a, b) in seen), (i, a, b)
                if row >= 0:
                    assert rows[(a, b, "attn.qkv")] == row and rows[(a, b, "attn.proj")] == row
    for a, anchor in enumerate(model.anchors):
        for b in range(anchor.depth):
            table = model.pst.tables[a][b]
            used = sorted(r for r in table if r >= 0)
            assert used == list(range(len(used))) == list(range(anchor.blocks[b].attn.qkv.num_stitches))


def test_pst_gradients_reach_only_the_members_rows():
    model = _model().to_pst()
    x = _images(2)
    for i in (0, 2, 7, len(model) - 1):
        model.zero_grad(set_to_none=True)
        model(x, stitch=i).square().sum().backward()
        for a, anchor in enumerate(model.anchors):
            for b, block in enumerate(anchor.blocks):
                sb = block.attn.proj.stitch_bias
                row = model.local_stitch_row(i, a, b)
                if row < 0:
                    assert sb.grad is None or not sb.grad.any()
                else:
                    nonzero = sb.grad.abs().sum(1) > 0
                    assert nonzero.tolist() == [r == row for r in range(sb.shape[0])]


def test_pst_without_stitch_bias_and_bad_ranks():
    model = _model().to_pst(ranks=4, stitch_bias=False)
    assert all(m.stitch_bias is None for m in model.modules() if isinstance(m, StitchedLinear))
    report = model.trainable_report()
    assert report["attention stitch bias"] == 0 and report["stitching-layer stitch bias"] == 0
    model(_images(2), stitch=5).sum().backward()
    with pytest.raises(RuntimeError, match="already"):
        model.to_pst()
    with pytest.raises(ValueError, match="one rank per anchor"):
        _model().to_pst(ranks=(8, 8))
    with pytest.raises(ValueError, match=r"ranks\[1\]"):
        _model().to_pst(ranks=(8, 0, 8))
    with pytest.raises(RuntimeError, match="not converted"):
        _model().local_stitch_row(0, 0, 0)


def _members_through(model, a, b):
    n = 0
    for s in model.stitches:
        if s.is_anchor:
            n += s.front == a
        else:
            n += (s.front == a and s.front_block >= b) or (s.end == a and s.end_block <= b)
    return n


def test_trainable_report_vit_ti_s_b_counts():
    # the paper's anchors with random weights on the meta device (no memory), 100 classes
    with torch.device("meta"):
        anchors = [TimmViTAnchor(timm.create_model(name, pretrained=False, num_classes=100))
                   for name in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")]
        model = StitchableModel(anchors).to_pst()
    report = model.trainable_report()
    dims, ranks = (192, 384, 768), (32, 16, 8)
    assert model.pst.ranks == list(ranks)
    # independent count: qkv (d -> 3d) and proj (d -> d) per block
    lora = sum(12 * r * ((d + 3 * d) + (d + d)) for d, r in zip(dims, ranks))
    bias = sum(_members_through(model, a, b) * (3 * d + d) for a, d in enumerate(dims) for b in range(12))
    stitching_lora = sum(l.rank * (l.in_features + l.out_features) for g in model.stitching_layers for l in g)
    stitching_bias = sum(l.num_stitches * l.out_features for g in model.stitching_layers for l in g)
    heads = sum(d * 100 + 100 for d in dims)
    assert report["attention LoRA"] == lora == 1_327_104
    assert report["attention stitch bias"] == bias
    assert report["stitching-layer LoRA"] == stitching_lora
    assert report["stitching-layer stitch bias"] == stitching_bias
    assert report["heads"] == heads and report["other"] == 0
    assert report["total"] == lora + bias + stitching_lora + stitching_bias + heads == 4_613_676
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["total"] == trainable
    assert "attention LoRA" in model.format_trainable_report()


# ---------------------------------------------------------------- merged export

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
