"""Palette serving, the model part (esta.serving.palette): merged weights held once, mixed-stitch batches
equal to each row's export run alone, budget routing, and clear errors."""
import threading

import pytest
import torch
from torch import nn

from esta import SequentialBlocksAnchor, StitchableModel, TimmViTAnchor
from esta.anchors import Anchor
from esta.nn import StitchedLinear
from esta.serving import BudgetError, Palette, PaletteError, RowBiasLinear, UnknownMemberError
from esta.serving.palette import _Dropped, anchor_own_bytes, module_bytes

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")

from tests.helpers.models import WIDTHS, MLPBlock  # noqa: E402
from tests.helpers.models import tiny_images as _images  # noqa: E402
from tests.helpers.models import tiny_vit as _vit  # noqa: E402

ATOL = 1e-5  # the bound, float32


def _randomize(model, seed=5):
    """Non-zero LoRA, stitch biases and heads everywhere, so every merge and every bias row matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval()


def _vit_model(pst=True, stitch_bias=True, **kw):
    model = StitchableModel([TimmViTAnchor(_vit(d, i)) for i, d in enumerate(WIDTHS)], **kw).eval()
    model.init_stitching_layers(_images(6))
    if pst:
        model.to_pst(stitch_bias=stitch_bias)
    else:
        for p in model.parameters():  # no PST: the stitching layers' LoRA and biases still train
            p.requires_grad_(False)
        for group in model.stitching_layers:
            for layer in group:
                for p in (layer.lora_a, layer.lora_b, layer.stitch_bias):
                    if p is not None:
                        p.requires_grad_(True)
    return _randomize(model)


MODELS = {
    "nearest": lambda: _vit_model(),
    "all-pairs": lambda: _vit_model(nearest=False),
    "kernel-1": lambda: _vit_model(kernel_size=1),
    "no-stitch-bias": lambda: _vit_model(stitch_bias=False),
    "no-pst": lambda: _vit_model(pst=False),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def nearest():
    return MODELS["nearest"]()


def _exports(model, members):
    return {m: model.export(m) for m in set(members)}


def _check_rows(palette, model, x, members, exports=None):
    exports = exports or _exports(model, members)
    y = palette(x, members)
    assert y.shape[0] == len(members) and y.dtype == torch.float32
    for r, m in enumerate(members):
        with torch.no_grad():
            alone = exports[m](x[r:r + 1])
        torch.testing.assert_close(y[r:r + 1], alone, atol=ATOL, rtol=0, msg=f"row {r} (member {m})")


# ---------------------------------------------------------------------------------- equality with exports
def test_mixed_batches_equal_each_rows_export(model):
    """Any mix of members, anchors included, in any order and with repeats, equals each row's export."""
    palette = Palette(model)
    n = len(model)
    exports = _exports(model, range(n))
    g = torch.Generator().manual_seed(1)
    mixes = [
        list(range(n)),                                          # every member once
        torch.randint(0, n, (3 * n,), generator=g).tolist(),     # random with repeats
        list(range(n))[::-1] * 2,                                # reversed, twice
        [0, 1, 2, 2, 1, 0],                                      # anchors only
        [n - 1],                                                 # one row
        [n - 2] * 5,                                             # one member
    ]
    for k, members in enumerate(mixes):
        _check_rows(palette, model, _images(len(members), seed=10 + k), members, exports)


def test_a_palette_of_some_members_equals_their_exports(nearest):
    model = nearest
    served = [1, 4, 9, len(model) - 1]  # an anchor and stitches of both pairs
    palette = Palette(model, served)
    assert palette.served == served
    members = [9, 1, len(model) - 1, 4, 4, 9, 1]
    _check_rows(palette, model, _images(len(members), seed=3), members)
    # a tensor of ids, and one int for every row
    x = _images(4, seed=4)
    torch.testing.assert_close(palette(x, torch.tensor([4, 9, 4, 1])), palette(x, [4, 9, 4, 1]))
    torch.testing.assert_close(palette(x, 9), palette(x, [9] * 4))


def test_generic_anchors_with_2d_and_3d_tokens():

    def anchor(d, tokens):
        torch.manual_seed(d)
        embed = nn.Linear(16, d)
        return SequentialBlocksAnchor(embed, nn.ModuleList(MLPBlock(d) for _ in range(3)), nn.Linear(d, 5),
                                      family="mlp", embed_type=f"linear16/{tokens}", attention_linears=["fc1"])

    for shape in ((4, 16), (16,)):  # (tokens, features) per example, and one feature vector per example
        model = _randomize(StitchableModel([anchor(8, len(shape)), anchor(12, len(shape))]).to_pst())
        palette = Palette(model, example_shape=shape)
        members = list(range(len(model))) * 2
        x = torch.randn((len(members),) + shape, generator=torch.Generator().manual_seed(2))
        _check_rows(palette, model, x, members)


# ---------------------------------------------------------------------------------- what is stored
def test_one_copy_of_each_anchor_whatever_the_number_of_members(nearest):
    model = nearest
    everything = Palette(model)
    some = Palette(model, [2, 5, 12])
    # every anchor a palette uses is one merged copy: the anchor's own bytes (less the blocks no served
    # member runs) plus the served members' bias rows, whatever the number of members
    for palette in (everything, some):
        for a, copied in palette.anchors.items():
            source = model.anchors[int(a)]
            dropped = sum(anchor_own_bytes(source.blocks[b]) for b, block in enumerate(copied.blocks)
                          if isinstance(block, _Dropped))
            tables = sum(m.table.numel() * m.table.element_size() for m in copied.modules()
                         if isinstance(m, RowBiasLinear) and m.table is not None)
            assert module_bytes(copied) == anchor_own_bytes(source) - dropped + tables
    assert everything.used_anchor_bytes == everything.source_anchor_bytes
    # a merged qkv weight per served block, whatever the number of members that run it
    merged = [m for m in everything.anchors.modules() if isinstance(m, RowBiasLinear)]
    assert len(merged) == 2 * sum(a.depth for a in model.anchors)
    # the tables hold one row per served member that runs the block
    for a, anchor in everything.anchors.items():
        for b, block in enumerate(anchor.blocks):
            through = sum(1 for m in range(len(model)) if model.pst.row(m, int(a), b) >= 0)
            assert block.attn.qkv.num_rows == through
    for key, layer in some.stitching.items():
        assert layer.num_rows == sum(1 for m in some.served if not model.stitches[m].is_anchor
                                     and f"{model.stitches[m].pair}_{model.stitches[m].layer}" == key)
    assert some.resident_bytes() < everything.resident_bytes() < sum(
        module_bytes(model.export(m)) for m in range(len(model)))
    # the palette holds copies: the model is unchanged, and no tensor is shared with it
    source = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in source for p in everything.parameters())


def test_blocks_no_served_member_runs_are_dropped(nearest):
    model = nearest
    stitch = next(s for s in model.stitches if not s.is_anchor and s.front == 0 and s.front_block == 0)
    palette = Palette(model, [stitch.id])
    front = palette.anchors[str(stitch.front)]
    assert not isinstance(front.blocks[0], _Dropped)
    assert all(isinstance(b, _Dropped) for b in list(front.blocks)[1:])
    end = palette.anchors[str(stitch.end)]
    assert all(isinstance(b, _Dropped) == (i < stitch.end_block) for i, b in enumerate(end.blocks))
    assert "2" not in palette.anchors  # the largest anchor is not used at all
    assert palette.resident_bytes() < palette.source_anchor_bytes / 2
    _check_rows(palette, model, _images(3, seed=8), [stitch.id] * 3)


def test_the_palette_merges_the_lora_once(nearest):
    model = nearest
    palette = Palette(model, [2])
    qkv = model.anchors[2].blocks[0].attn.qkv
    expected = qkv.merged(None)
    got = palette.anchors["2"].blocks[0].attn.qkv
    torch.testing.assert_close(got.weight, expected.weight, atol=0, rtol=0)
    torch.testing.assert_close(got.table, qkv.stitch_bias[[model.pst.row(2, 2, 0)]], atol=0, rtol=0)
    assert not hasattr(got, "lora_a")


# ---------------------------------------------------------------------------------- concurrency
def test_concurrent_forwards_do_not_mix_their_stitch_ids(nearest):
    """Two threads running different mixes at once each get their own rows' results (the per-row ids of
    a block live in a context variable, not in the modules)."""
    model = nearest
    palette = Palette(model)
    n = len(model)
    mixes = [list(range(n)), list(range(n))[::-1]]
    x = _images(n, seed=12)
    expected = [palette(x, m) for m in mixes]
    errors = []

    def worker(k):
        try:
            for _ in range(15):
                torch.testing.assert_close(palette(x, mixes[k]), expected[k], atol=1e-6, rtol=0)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ---------------------------------------------------------------------------------- errors
def test_bad_members_and_inputs_raise_clear_errors(nearest):
    palette = Palette(nearest, [0, 2, 5])
    x = _images(2)
    with pytest.raises(UnknownMemberError, match=r"member 4 is not served .*\[0, 2, 5\]"):
        palette(x, [0, 4])
    with pytest.raises(ValueError, match="got 3 member ids for 2 input rows"):
        palette(x, [0, 2, 5])
    with pytest.raises(TypeError, match="must be integers"):
        palette(x, torch.tensor([0.0, 2.0]))
    with pytest.raises(TypeError, match="got a bool"):
        palette(x, [True, 0])
    with pytest.raises(TypeError, match="float32"):
        palette(x.double(), [0, 2])
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\)"):
        palette(torch.randn(2, 3, 8, 8), [0, 2])
    with pytest.raises(ValueError, match="at least one row"):
        palette(torch.randn(0, 3, 16, 16), [])
    with pytest.raises(UnknownMemberError, match="outside the model's palette"):
        Palette(nearest, [0, len(nearest)])
    with pytest.raises(ValueError, match="no member"):
        Palette(nearest, [])
    with pytest.raises(TypeError, match="StitchableModel"):
        Palette(nn.Linear(2, 2))


def test_anchors_with_block_inputs_get_them_cut_per_row():
    """An anchor whose blocks take extra inputs (block_kwargs) gets, for every block slice, the keyword
    arguments built from exactly that slice's rows and their per-row extra inputs (here a per-row gain)."""

    class GainBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, x, gain):
            return x + gain[:, None] * self.fc2(torch.relu(self.fc1(x)))

    class GainAnchor(SequentialBlocksAnchor):
        def block_kwargs(self, x, tokens, *, gain=None, **extra):
            if gain is None:  # FLOPs counting
                gain = tokens.new_ones(tokens.shape[0])
            assert x.shape[0] == tokens.shape[0] == gain.shape[0]  # the slice's rows, all three
            return {"gain": gain}

        def head(self, tokens, **extra):
            return super().head(tokens)

    torch.manual_seed(0)
    anchors = [GainAnchor(nn.Linear(16, d), nn.ModuleList(GainBlock(d) for _ in range(3)), nn.Linear(d, 5),
                          family="mlp", embed_type="v", attention_linears=["fc1"]) for d in (8, 12)]
    model = StitchableModel(anchors).eval()
    palette = Palette(model, list(range(len(model))), example_shape=(16,))
    n = 3 * len(model)
    members = [i % len(model) for i in range(n)]
    x, gain = torch.randn(n, 16), torch.rand(n) + 0.5
    got = palette(x, members, gain=gain)
    with torch.no_grad():
        for r, m in enumerate(members):
            ref = model(x[r:r + 1], stitch=m, gain=gain[r:r + 1])
            assert torch.allclose(got[r:r + 1], ref, atol=ATOL, rtol=0), (r, m)


# ---------------------------------------------------------------------------------- routing
def _routed(model):
    # members 0..2 are anchors; 5 and 8 stitches; FLOPs and accuracies chosen by hand
    flops = {0: 1.0e6, 5: 2.0e6, 8: 3.0e6, 1: 4.0e6, 2: 6.0e6}
    accuracy = {0: 0.50, 5: 0.80, 8: 0.78, 1: 0.85, 2: 0.95}
    return Palette(model, sorted(flops), deployed=[0, 5, 8, 1, 2], flops=flops, accuracy=accuracy)


def test_budget_routing_picks_the_most_accurate_member_within_budget(nearest):
    palette = _routed(nearest)
    assert palette.route(mflops=100).member == 2
    assert palette.route(mflops=6.0).member == 2          # the budget is inclusive
    assert palette.route(mflops=5.9).member == 1
    r = palette.route(mflops=3.5)                        # 8 is dearer and less accurate than 5
    assert (r.member, r.by, r.budget, r.cost, r.within_budget) == (5, "mflops", 3.5, 2.0, True)
    assert "most accurate" in r.reason
    assert palette.route(mflops=1.0).member == 0
    assert palette.route(member=8).member == 8 and palette.route(member=8).by == "member"
    with pytest.raises(BudgetError, match=r"below the cheapest deployed member \(#0, 1 MFLOPs\)"):
        palette.route(mflops=0.5)
    r = palette.route(mflops=0.5, fallback="cheapest")
    assert (r.member, r.within_budget) == (0, False) and "cheapest" in r.reason
    for bad in (0, -1, float("nan"), float("inf"), True, "3"):
        with pytest.raises(BudgetError, match="positive finite number"):
            palette.route(mflops=bad)
    with pytest.raises(PaletteError, match="exactly one"):
        palette.route(member=2, mflops=3.0)
    with pytest.raises(PaletteError, match="exactly one"):
        palette.route()
    with pytest.raises(UnknownMemberError):
        palette.route(member=3)
    with pytest.raises(ValueError, match="fallback"):
        palette.route(mflops=3, fallback="largest")


def test_routing_uses_deployed_members_and_falls_back_without_accuracies(nearest):
    flops = {0: 1e6, 5: 2e6, 8: 3e6}
    palette = Palette(nearest, [0, 5, 8], deployed=[0, 8], flops=flops, accuracy={0: 0.5, 5: 0.99, 8: 0.6})
    assert palette.route(mflops=2.5).member == 0          # 5 is served but not deployed
    assert [m["deployed"] for m in palette.describe()] == [True, False, True]
    blind = Palette(nearest, [0, 5, 8], flops=flops)
    r = blind.route(mflops=2.5)
    assert r.member == 5 and "no measured accuracies" in r.reason


def test_latency_budgets_need_measured_latencies(nearest):
    palette = _routed(nearest)
    with pytest.raises(BudgetError, match="measure_latency"):
        palette.route(latency_ms=5.0)
    measured = palette.measure_latency(repeats=2, warmup=1)
    assert set(measured) == set(palette.served) and all(v > 0 for v in measured.values())
    slowest = max(measured.values())
    assert palette.route(latency_ms=slowest * 2).member == 2   # every member fits: the most accurate
    r = palette.route(latency_ms=min(measured.values()) / 10, fallback="cheapest")
    assert not r.within_budget and r.member == min(measured, key=measured.get)
    assert [m["latency_ms"] for m in palette.describe()] == [measured[m] for m in palette.served]
    with pytest.raises(ValueError, match="repeats"):
        palette.measure_latency(repeats=0)


def test_flops_default_to_the_models_count(nearest):
    palette = Palette(nearest, [0, 7])
    for m in (0, 7):
        assert palette.members[m].flops == nearest.flops(m, (1, 3, 16, 16))
    assert palette.example_shape == (3, 16, 16)


# ---------------------------------------------------------------- decoder anchors (prefill)

def _decoder_model(impl):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from esta import HFCausalLMAnchor

    anchors = []
    for seed, (hidden, layers) in enumerate([(32, 2), (48, 3)]):
        config = transformers.LlamaConfig(vocab_size=61, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, pad_token_id=0)
        config._attn_implementation = impl
        torch.manual_seed(seed)
        anchors.append(HFCausalLMAnchor(transformers.LlamaForCausalLM(config).eval()))
    model = StitchableModel(anchors, kernel_size=1, stride=1).eval()
    model.init_stitching_layers(torch.randint(3, 61, (4, 8), generator=torch.Generator().manual_seed(1)))
    model.to_pst()
    return _randomize(model)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_prefill_mixed_batch_equals_each_export(impl, side):
    from esta.hf import mask_positions

    model = _decoder_model(impl)
    palette = Palette(model, list(range(len(model))))
    n = 2 * len(model)
    members = torch.randperm(n, generator=torch.Generator().manual_seed(3)).remainder(len(model)).tolist()
    ids = torch.randint(3, 61, (n, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for r in range(0, n, 3):  # every third row padded by 3 on `side`
        mask[r, :3] = 0 if side == "left" else 1
        mask[r, -3:] = 0 if side == "right" else 1
    ids = ids.masked_fill(mask == 0, 0)
    extra = {"attention_mask": mask}
    if side == "left":
        extra["position_ids"] = mask_positions(mask)
    got = palette(ids, members, **extra)
    assert got.shape == (n, 9, 61)
    worst, nets = 0.0, {m: model.export(m) for m in set(members)}
    for r, m in enumerate(members):
        net = nets[m]
        with torch.no_grad():
            ref = net(ids[r:r + 1], **{k: v[r:r + 1] for k, v in extra.items()}).logits[0]
        keep = mask[r].bool()
        worst = max(worst, (got[r][keep] - ref[keep]).abs().max().item())
    assert worst <= ATOL, worst
    # the rows really mix: stitches and both anchors in one batch
    assert {0, len(model) - 1} <= set(members) and len(set(members)) == len(model)


def test_decoder_palette_refuses_float_inputs_and_bad_token_ids():
    model = _decoder_model("sdpa")
    palette = Palette(model, [0, 1])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        palette(torch.zeros(2, 5), [0, 1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        palette(torch.full((2, 5), 61), [0, 1])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        palette(torch.ones(2, 5, dtype=torch.long), [0, 1], attention_mask=torch.ones(2, 4, dtype=torch.long))
