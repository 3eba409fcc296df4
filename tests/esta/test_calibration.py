"""The least-squares init of every stitching layer of a StitchableModel (esta/calibration.py): the joint
solution, against SN-Net's per-position average, streaming, generic anchors, bad calibration data."""
import numpy as np
import pytest
import torch
from torch import nn

from esta import SequentialBlocksAnchor, StitchableModel

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")

from tests.helpers.models import generic_anchor  # noqa: E402
from tests.helpers.models import tiny_images as _images  # noqa: E402
from tests.helpers.models import tiny_model as _model  # noqa: E402


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
