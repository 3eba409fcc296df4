"""Anchors and StitchableModel (esta.anchors, esta.model): the palette, members equal to their models,
stitches equal to the manual composition, FLOPs counts (CPU, tiny models). Stitch positions: test_positions.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esta import StitchableModel, TimmViTAnchor
from esta.nn import StitchingLayer


# ---------------------------------------------------------------- timm ViT anchors

try:
    import timm
except ImportError:  # the position and generic-anchor tests still run
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install torchvision==0.29.1 timm)")

IMG = (2, 3, 32, 32)


def _vit(dim, seed):
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=dim, depth=4, num_heads=2, num_classes=10).eval()


@pytest.fixture(scope="module")
def vits():
    return [_vit(32, 0), _vit(48, 1), _vit(64, 2)]


@pytest.fixture(scope="module")
def model(vits):
    # given largest-first: the model must sort them by size
    m = StitchableModel([TimmViTAnchor(v) for v in reversed(vits)]).eval()
    torch.manual_seed(3)
    for group in m.stitching_layers:  # make stitching layers non-trivial so compositions are tested
        for layer in group:
            with torch.no_grad():
                layer.weight.normal_(0, 0.2)
                layer.bias.normal_()
                layer.lora_b.normal_()
                layer.stitch_bias.normal_()
    return m


@needs_timm
def test_palette(model, vits):
    assert [a.width for a in model.anchors] == [32, 48, 64]
    assert len(model) == 3 + 2 * 10 and model.pairs == [(0, 1), (1, 2)]
    ids = [s.id for s in model.stitches]
    assert ids == list(range(len(model)))
    for s in model.stitches[3:]:
        layer = model.stitching_layer(s.id)
        assert isinstance(layer, StitchingLayer)
        assert (layer.in_features, layer.out_features) == (model.anchors[s.front].width, model.anchors[s.end].width)
        assert layer.rank == layer.in_features // 4
        sharing = [t for t in model.stitches[3:] if (t.pair, t.layer) == (s.pair, s.layer)]
        assert layer.num_stitches == len(sharing)
        assert sorted(t.local_id for t in sharing) == list(range(len(sharing)))
    for a, vit in enumerate(vits):
        assert model.num_parameters(a) == sum(p.numel() for p in vit.parameters())


@needs_timm
def test_anchors_reproduce_models(model, vits):
    x = torch.randn(IMG)
    with torch.no_grad():
        for a, vit in enumerate(vits):
            assert torch.equal(model(x, stitch=a), vit(x))


def _manual(model, info, x, fused_attn=True, merged=False):
    front, end = model.anchors[info.front].model, model.anchors[info.end].model
    if not fused_attn:
        front, end = copy.deepcopy(front), copy.deepcopy(end)
        for blk in list(front.blocks) + list(end.blocks):
            blk.attn.fused_attn = False
    t = front.norm_pre(front.patch_drop(front._pos_embed(front.patch_embed(x))))
    for blk in front.blocks[: info.front_block + 1]:
        t = blk(t)
    layer = model.stitching_layers[info.pair][info.layer]
    if merged:
        t = layer.merged(info.local_id)(t)
    else:
        lora = layer.scale * F.linear(F.linear(t, layer.lora_a), layer.lora_b)
        t = F.linear(t, layer.weight, layer.bias) + lora + layer.stitch_bias[info.local_id]
    for blk in end.blocks[info.end_block:]:
        t = blk(t)
    return end.forward_head(end.norm(t))


@needs_timm
def test_stitch_equals_manual_composition(model):
    x = torch.randn(IMG)
    with torch.no_grad():
        for i in (3, 5, 12, 13, 22):
            info = model.stitches[i]
            torch.testing.assert_close(model(x, stitch=i), _manual(model, info, x), rtol=1e-5, atol=1e-5)
            with model.use_stitch(i):
                torch.testing.assert_close(model(x), _manual(model, info, x), rtol=1e-5, atol=1e-5)
        assert model.stitch == 2  # restored: the default is the largest anchor
        model.stitch = 4
        torch.testing.assert_close(model(x), _manual(model, model.stitches[4], x), rtol=1e-5, atol=1e-5)
        model.stitch = 2


def _counted_macs(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


@needs_timm
def test_flops_match_flop_counter(model, vits):
    x = torch.randn(IMG)
    with torch.no_grad():
        for a, vit in enumerate(vits):
            ref = copy.deepcopy(vit)
            for blk in ref.blocks:
                blk.attn.fused_attn = False  # explicit q@k^T, attn@v: FlopCounterMode can see them
            assert model.flops(a, IMG) == pytest.approx(_counted_macs(lambda: ref(x)), rel=0.02)
        for i in range(3, len(model)):
            info = model.stitches[i]
            ref = _counted_macs(lambda: _manual(model, info, x, fused_attn=False, merged=True))
            assert model.flops(i, IMG) == pytest.approx(ref, rel=0.02)


@needs_timm
def test_flops_monotone_between_anchors(model):
    anchors = [model.flops(a, IMG) for a in range(3)]
    assert anchors == sorted(anchors) and len(set(anchors)) == 3
    for s in model.stitches[3:]:
        if s.end_block == s.front_block + 1:  # a pure replacement of blocks: strictly between its anchors
            assert anchors[s.front] < model.flops(s.id, IMG) < anchors[s.end]
            assert model.num_parameters(s.front) < model.num_parameters(s.id) < model.num_parameters(s.end)
    assert model.flops(0, (1, 3, 32, 32)) * 2 == model.flops(0, IMG)


@needs_timm
def test_unknown_stitch_id(model):
    x = torch.randn(IMG)
    with pytest.raises(IndexError, match=r"\[0, 23\)"):
        model(x, stitch=23)
    with pytest.raises(IndexError, match="outside"):
        model.stitch = -1
    with pytest.raises(IndexError):
        model.flops(99, IMG)
    with pytest.raises(IndexError):
        with model.use_stitch(23):
            pass
    assert model.stitch == 2


# ---------------------------------------------------------------- generic block anchors

from tests.helpers.models import generic_anchor as _generic  # noqa: E402


def test_generic_anchors_forward_and_measured_flops():
    anchors = [_generic(8), _generic(12), _generic(24)]
    model = StitchableModel(anchors, kernel_size=1)
    assert len(model) == 3 + 3 + 3
    x = torch.randn(4, 7, 16)
    shape = tuple(x.shape)
    rows = 4 * 7
    with torch.no_grad():
        for a, anchor in enumerate(model.anchors):
            d = anchor.width
            assert torch.equal(model(x, stitch=a), anchor.head_module(_run(anchor, x)))
            # independent count: embed 16*d, blocks 4*d*d each, head d*5, per row
            assert model.flops(a, shape) == rows * (16 * d + anchor.depth * 4 * d * d + d * 5)
        for s in model.stitches[3:]:
            front, end = model.anchors[s.front], model.anchors[s.end]
            df, de = front.width, end.width
            expected = rows * (16 * df + (s.front_block + 1) * 4 * df * df + df * de
                               + (end.depth - s.end_block) * 4 * de * de + de * 5)
            assert model.flops(s.id, shape) == expected


def _run(anchor, x):
    t = anchor.embed_module(x)
    for b in anchor.block_list:
        t = b(t)
    return t


def test_mixed_families_and_embed_types_raise():
    with pytest.raises(ValueError, match="family"):
        StitchableModel([_generic(8), _generic(12, family="other")])
    with pytest.raises(ValueError, match="embedding type"):
        StitchableModel([_generic(8), _generic(12, embed_type="conv")])
    if timm is not None:
        with pytest.raises(ValueError, match="embedding type"):
            StitchableModel([_generic(8, family="timm.vit"), TimmViTAnchor(_vit(32, 0))])
    with pytest.raises(ValueError, match="kernel_size"):
        StitchableModel([_generic(8), _generic(12)], kernel_size=0)
    with pytest.raises(ValueError, match="stride"):
        StitchableModel([_generic(8), _generic(12)], stride=0)
    with pytest.raises(TypeError, match="VisionTransformer"):
        TimmViTAnchor(nn.Linear(2, 2))
