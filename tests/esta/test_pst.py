"""PST (esta/pst.py): the conversion of a StitchableModel's attention linears to StitchedLinear, which rows
each member trains, and the trainable-parameter report."""
import pytest
import torch
from torch import nn

from esta import StitchableModel, TimmViTAnchor
from esta.nn import StitchedLinear, StitchingLayer
from esta.pst import default_ranks

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")

from tests.helpers.models import WIDTHS  # noqa: E402
from tests.helpers.models import tiny_images as _images  # noqa: E402
from tests.helpers.models import tiny_model as _model  # noqa: E402


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
