"""Decoder families (HFCausalLMAnchor): every number checked against Hugging Face's own forward and generate,
on tiny random Llama / Mistral / Qwen2 configs built here (CPU, no downloads)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import esta
import esta.export
from esta import HFCausalLMAnchor, StitchableModel
from esta.generation import _warp, generate_text
from esta.hf import mask_positions
from esta.nn import StitchedLinear, StitchingLayer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)

VOCAB = 61
IMPLS = ("eager", "sdpa")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the models are tiny: on a loaded machine, OpenMP's barriers cost more than the work (sdpa: 0.1 ms on one
    # thread, 20 ms on two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(cls, hidden, layers, heads, kv_heads, impl, vocab=VOCAB, **kw):
    config = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 6, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    config._attn_implementation = impl
    return config


def _llama(hidden=32, layers=2, seed=0, impl="sdpa", heads=4, kv_heads=2, **kw):
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(LlamaConfig, hidden, layers, heads, kv_heads, impl, **kw)).eval()


def _mistral(hidden=32, layers=2, seed=0, impl="sdpa", heads=4, kv_heads=2, window=4):
    torch.manual_seed(seed)
    return MistralForCausalLM(_config(MistralConfig, hidden, layers, heads, kv_heads, impl,
                                      sliding_window=window)).eval()


def _qwen2(hidden=32, layers=2, seed=0, impl="sdpa", heads=4, kv_heads=2):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(_config(Qwen2Config, hidden, layers, heads, kv_heads, impl)).eval()


FAMILIES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2}


def _pair(family="llama", impl="sdpa"):
    """A small (32 wide, 2 blocks, 4 heads / 2 kv) and a large (48 wide, 3 blocks, 6 heads / 2 kv) anchor."""
    make = FAMILIES[family]
    return make(32, 2, 0, impl, 4, 2), make(48, 3, 1, impl, 6, 2)


def _model(family="llama", impl="sdpa"):
    small, large = _pair(family, impl)
    return StitchableModel([HFCausalLMAnchor(large), HFCausalLMAnchor(small)], kernel_size=1, stride=1).eval()


def _ids(batch=3, length=9, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padded(side, batch=3, length=9, seed=0):
    """Token ids and a mask: row 0 full, rows 1.. padded by 2, 4, ... on `side` (pad id 0)."""
    ids = _ids(batch, length, seed)
    mask = torch.ones_like(ids)
    for r in range(1, batch):
        n = min(2 * r, length - 1)
        if side == "left":
            mask[r, :n] = 0
        elif side == "right":
            mask[r, length - n:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _rel(got, ref, mask=None):
    """Max relative error (max |diff| / max |ref|) over the real (unpadded) positions."""
    if mask is not None:
        keep = mask.bool()
        got, ref = got[keep], ref[keep]
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _hf_inputs(side, ids, mask):
    kwargs = {"attention_mask": mask} if side != "none" else {}
    if side == "left-positions":
        kwargs["position_ids"] = mask_positions(mask)
    return kwargs


SIDES = ("none", "right", "left", "left-positions")


def _side_inputs(side):
    return _padded("left" if side.startswith("left") else side)


# ---------------------------------------------------------------- anchors equal HF's own forward

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("side", SIDES)
def test_anchor_members_equal_hf_logits(family, impl, side):
    model = _model(family, impl)
    ids, mask = _side_inputs(side)
    kwargs = _hf_inputs(side, ids, mask)
    with torch.no_grad():
        for a, anchor in enumerate(model.anchors):
            ref = anchor.model(ids, **kwargs).logits
            got = model(ids, stitch=a, **kwargs)
            assert got.shape == (3, 9, VOCAB)
            assert _rel(got, ref, mask if side != "none" else None) <= 1e-6, (family, impl, side, a)


def test_anchor_family_type_and_layout():
    anchor = HFCausalLMAnchor(_llama())
    assert anchor.family == "hf-causal-lm/llama" and anchor.width == 32 and anchor.depth == 2
    assert anchor.vocab_size == VOCAB and "vocabulary 61" in anchor.embed_type
    assert set(anchor.attention_linears(1)) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj"}
    assert list(anchor.classifier_parameters()) == []
    assert anchor.pst_rank == 16
    with pytest.raises(TypeError, match="Llama layout"):
        HFCausalLMAnchor(nn.Linear(3, 3))


# ---------------------------------------------------------------- stitches: the end model with its input replaced

def _front_output(lm, block, ids, kwargs):
    """Output of decoder layer `block` of `lm` in its own HF forward."""
    seen = {}
    handle = lm.model.layers[block].register_forward_hook(
        lambda mod, args, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        lm(ids, **kwargs)
    finally:
        handle.remove()
    return seen["h"]


def _end_with_input(lm, block, replacement, ids, kwargs):
    """The HF forward of `lm` with the input of decoder layer `block` replaced."""
    def pre(mod, args, kw):
        return (replacement,) + tuple(args[1:]), kw

    handle = lm.model.layers[block].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return lm(ids, **kwargs).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("side", SIDES)
def test_stitches_equal_end_model_with_replaced_layer_input(family, impl, side):
    model = _model(family, impl)
    ids, mask = _side_inputs(side)
    kwargs = _hf_inputs(side, ids, mask)
    model.init_stitching_layers({"input_ids": _ids(4, 12, seed=5)})  # a least-squares map, not the identity
    with torch.no_grad():
        for info in model.stitches[len(model.anchors):]:
            front, end = model.anchors[info.front].model, model.anchors[info.end].model
            layer = model.stitching_layer(info.id).merged(info.local_id)
            h = _front_output(front, info.front_block, ids, kwargs)
            ref = _end_with_input(end, info.end_block, layer(h), ids, kwargs)
            got = model(ids, stitch=info.id, **kwargs)
            assert _rel(got, ref, mask if side != "none" else None) <= 1e-5, (family, impl, side, info)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_member_is_causal(impl):
    model = _model("llama", impl)
    ids = _ids(2, 10)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % VOCAB
    with torch.no_grad():
        for i in range(len(model)):
            a, b = model(ids, stitch=i), model(changed, stitch=i)
            assert torch.equal(a[:, :6], b[:, :6]), i
            assert not torch.allclose(a[:, 6:], b[:, 6:]), i


def test_mistral_window_is_in_force():
    # the sliding window changes the logits (so the mask utility is the sliding one) and is reproduced
    ids = _ids(1, 12)
    narrow, wide = _mistral(window=3), _mistral(window=64)
    with torch.no_grad():
        assert not torch.allclose(narrow(ids).logits, wide(ids).logits)
        model = StitchableModel([HFCausalLMAnchor(narrow)])
        assert torch.equal(model(ids), narrow(ids).logits)


def test_mixed_attention_layer_types_are_refused():
    config = _config(Qwen2Config, 32, 4, 4, 2, "sdpa", use_sliding_window=True, sliding_window=4,
                     max_window_layers=2)
    if len(set(getattr(config, "layer_types", None) or ())) < 2:  # transformers < 4.53 has no layer types
        pytest.skip(f"transformers {transformers.__version__} gives this config no mixed layer types")
    with pytest.raises(NotImplementedError, match="mixes attention layer types"):
        HFCausalLMAnchor(Qwen2ForCausalLM(config))


# ---------------------------------------------------------------- stitch space and FLOPs

def test_decoder_stitch_space_kernel_1():
    model = _model()
    assert [(s.front_block, s.end_block, s.layer) for s in model.stitches[2:]] == [(0, 0, 0), (1, 1, 1), (1, 2, 2)]
    assert all(layer.rank == 32 // 4 for group in model.stitching_layers for layer in group)


def _paper_configs():
    base = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)
    return (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, **base),
            LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, **base))


def test_llama_7b_13b_stitch_space_and_flops_from_configs_alone():
    with torch.device("meta"):
        llama7, llama13 = (LlamaForCausalLM(c) for c in _paper_configs())
    model = StitchableModel([HFCausalLMAnchor(llama13), HFCausalLMAnchor(llama7)], kernel_size=1, stride=1)
    assert len(model) == 42 and len(model.stitches) - 2 == 40  # the paper's 40 stitches
    assert sorted(s.end_block for s in model.stitches[2:]) == list(range(40))
    assert model.num_parameters(0) == 6_738_415_616 and model.num_parameters(1) == 13_015_864_320
    assert model.stitching_layer(2).rank == 4096 // 4
    tokens = 512

    def per_block(d, ffn, heads):  # multiply-adds of one block for one sequence of `tokens`
        return tokens * (4 * d * d + 3 * d * ffn) + 2 * heads * tokens * tokens * (d // heads)

    b7, b13 = per_block(4096, 11008, 32), per_block(5120, 13824, 40)
    head7, head13 = tokens * 4096 * 32000, tokens * 5120 * 32000
    table = model.flops_table((1, tokens))
    assert table[0] == 32 * b7 + head7 and table[1] == 40 * b13 + head13
    for info in model.stitches[2:]:
        expected = ((info.front_block + 1) * b7 + tokens * 4096 * 5120 + (40 - info.end_block) * b13 + head13)
        assert table[info.id] == expected
    stitches = table[2:]
    assert stitches == sorted(stitches, reverse=True)  # later stitches run fewer 13B blocks
    assert table[0] < min(stitches) and max(stitches) == table[1] + b7 + tokens * 4096 * 5120  # stitch (0, 0)
    assert 6.5e9 < table[0] / tokens < 7e9 and 12.5e9 < table[1] / tokens < 13.5e9  # ~params per token


def _measured(module, ids):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(ids)
    return counter.get_total_flops() // 2


def test_flops_match_flop_counter_within_2_percent():
    # eager attention: its products are matmuls FlopCounterMode sees (CPU sdpa is not counted by it); the
    # export has the stitching layer as a plain nn.Linear (the fused op is opaque to FlopCounterMode)
    eager = _model("llama", "eager")
    sdpa = _model("llama", "sdpa")
    ids = _ids(2, 13)
    for i in range(len(eager)):
        analytic = eager.flops(i, (2, 13))
        measured = _measured(eager.export(i), ids)
        assert abs(analytic - measured) <= 0.02 * measured, (i, analytic, measured)
        assert sdpa.flops(i, (2, 13)) == analytic
    # grouped-query attention: 6 query heads on 2 kv heads still take 6 heads' products
    anchor = eager.anchors[1]
    assert anchor.model.config.num_key_value_heads == 2
    assert anchor.block_flops(0, (1, 5, 48)) == 5 * (48 * 48 * 2 + 48 * 16 * 2 + 3 * 48 * 102) + 2 * 6 * 25 * 8


# ---------------------------------------------------------------- least-squares init on tokens

def _solutions(model):
    return [torch.cat([l.weight, l.bias[:, None]], 1).clone() for g in model.stitching_layers for l in g]


def test_least_squares_init_leaves_padding_out():
    sequences = [_ids(1, n, seed=n)[0] for n in (9, 5, 7, 3)]
    reference = _model()  # one unpadded sequence per batch
    reference.init_stitching_layers([{"input_ids": s[None]} for s in sequences], num_images=None)
    expected = _solutions(reference)

    def batch(side):
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(sequences):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[r, sl], mask[r, sl] = s, 1
        return ids, mask

    for side in ("right", "left"):
        ids, mask = batch(side)
        model = _model()
        model.init_stitching_layers({"input_ids": ids, "attention_mask": mask}, batch_size=2)
        for got, want in zip(_solutions(model), expected):
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
        # the padded positions would change it: counted as tokens they move the solution
        model = _model()
        model.init_stitching_layers({"input_ids": ids}, batch_size=2)
        assert any(not torch.allclose(g, w, rtol=2e-4, atol=2e-5) for g, w in zip(_solutions(model), expected))


def test_least_squares_init_batches_of_other_lengths_and_errors():
    model = _model()
    reports = model.init_stitching_layers([{"input_ids": _ids(2, 5)}, {"input_ids": _ids(2, 8)}])
    assert sum(r.tokens for r in reports) > 0 and all(r.extra["images"] == 4 for r in reports)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.init_stitching_layers({"input_ids": _ids(2, 5), "attention_mask": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="'input_ids'"):
        model.init_stitching_layers([{"ids": _ids(2, 5)}])
    with pytest.raises(ValueError, match="token id 99"):
        model.init_stitching_layers(torch.full((2, 5), 99))


# ---------------------------------------------------------------- PST

def test_pst_for_decoders():
    model = _model().to_pst()
    assert model.pst.ranks == [16, 16]
    for anchor in model.anchors:
        for block in anchor.blocks:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(block.self_attn, name)
                assert isinstance(lin, StitchedLinear) and lin.rank == 16 and lin.stitch_bias is not None
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert type(getattr(block.mlp, name)) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in ("lora_a", "lora_b", "stitch_bias")) for n in trainable)
    for anchor in model.anchors:
        m = anchor.model
        for p in (m.model.embed_tokens.weight, m.lm_head.weight, m.model.norm.weight):
            assert not p.requires_grad
    report = model.trainable_report()
    lora = sum(16 * (lin.in_features + lin.out_features) for a in model.anchors for b in range(a.depth)
               for lin in a.attention_linears(b).values())
    stitching = sum(l.rank * (l.in_features + l.out_features) for g in model.stitching_layers for l in g)
    assert report["attention LoRA"] == lora and report["stitching-layer LoRA"] == stitching
    assert report["heads"] == 0 and report["other"] == 0
    assert report["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(l.rank == 8 for g in model.stitching_layers for l in g)  # d1 // 4 = 32 // 4
    # a fresh PST model computes what the anchors compute (LoRA B and stitch biases are zero)
    ids = _ids(2, 6)
    plain = _model()
    with torch.no_grad():
        for i in range(len(model)):
            torch.testing.assert_close(model(ids, stitch=i), plain(ids, stitch=i), rtol=1e-5, atol=1e-6)


def test_pst_bf16_frozen_weights_with_float32_lora_trains():
    small, large = _pair()
    model = StitchableModel([HFCausalLMAnchor(large.to(torch.bfloat16)), HFCausalLMAnchor(small.to(torch.bfloat16))],
                            kernel_size=1, stride=1)
    model.init_stitching_layers({"input_ids": _ids(2, 6)})
    model.to_pst()
    q = model.anchors[0].blocks[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_a.dtype == torch.float32
    assert model.stitching_layer(3).weight.dtype == torch.bfloat16
    model.train()
    ids = _ids(2, 7)
    for i in (1, 3):
        logits = model(ids, stitch=i)
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
    grads = [p for p in model.parameters() if p.grad is not None]
    assert grads and all(p.requires_grad for p in grads)
    assert q.lora_b.grad is not None and q.lora_b.grad.abs().sum() > 0


# ---------------------------------------------------------------- merged export

def _trained(family="llama", impl="sdpa"):
    model = _model(family, impl)
    model.init_stitching_layers({"input_ids": _ids(4, 10, seed=3)})
    model.to_pst()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("impl", IMPLS)
def test_export_equals_every_member(family, impl):
    model = _trained(family, impl)
    ids, mask = _padded("left")
    positions = mask_positions(mask)
    for i in range(len(model)):
        net = model.export(i)
        assert not any(type(m).__module__.startswith("esta") for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters()) and not net.training
        with torch.no_grad():
            ref = model(ids, stitch=i, attention_mask=mask, position_ids=positions)
            got = net(ids, attention_mask=mask, position_ids=positions).logits
        assert _rel(got, ref, mask) <= 1e-5, (family, impl, i)
    assert type(model.export(0)).__name__ == type(model.anchors[0].model).__name__
    assert type(model.export(3)).__name__ == "StitchedCausalLM"


def test_export_save_load_round_trip(tmp_path):
    model = _trained("qwen2")  # qwen2: o_proj has no bias in the config, the merged stitch bias gives it one
    ids, mask = _padded("right")
    for i in (1, 2, len(model) - 1):
        net = model.export(i)
        esta.export.save(net, str(tmp_path / f"m{i}"))
        back = esta.export.load(str(tmp_path / f"m{i}"))
        assert back.esta_export_config["kind"] == "hf.causal-lm"
        with torch.no_grad():
            assert _rel(back(ids, attention_mask=mask).logits, model(ids, stitch=i, attention_mask=mask), mask) <= 1e-5


def test_export_tied_embeddings_and_bf16_round_trip(tmp_path):
    lm = _llama(tie_word_embeddings=True)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    model = StitchableModel([HFCausalLMAnchor(lm.to(torch.bfloat16))]).to_pst()
    net = model.export(0)
    assert net.lm_head.weight.dtype == torch.bfloat16
    esta.export.save(net, str(tmp_path / "tied"))
    back = esta.export.load(str(tmp_path / "tied"))
    ids = _ids(2, 5)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, net(ids).logits)


def test_export_runs_without_esta(tmp_path):
    model = _trained()
    ids, mask = _padded("left")
    paths = {}
    for i in (0, 3):
        net = model.export(i)
        paths[i] = str(tmp_path / f"net{i}.pt")
        torch.save(net, paths[i])
        with torch.no_grad():
            torch.save({"y": model(ids, stitch=i, attention_mask=mask)}, tmp_path / f"io{i}.pt")
    greedy = esta.generate(model, ids, stitch=0, attention_mask=mask, max_new_tokens=6)
    torch.save({"x": ids, "mask": mask, "greedy": greedy}, tmp_path / "x.pt")
    script = (
        "import sys; sys.modules['esta'] = None; sys.modules['esta_kernels'] = None\n"
        "import torch\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "for i in (0, 3):\n"
        f"    net = torch.load({str(tmp_path)!r} + f'/net{{i}}.pt', weights_only=False)\n"
        f"    y = torch.load({str(tmp_path)!r} + f'/io{{i}}.pt')['y']\n"
        "    with torch.no_grad(): got = net(x['x'], attention_mask=x['mask']).logits\n"
        "    keep = x['mask'].bool()\n"
        "    assert torch.allclose(got[keep], y[keep], rtol=1e-4, atol=1e-5), (got - y)[keep].abs().max()\n"
        f"net = torch.load({str(tmp_path)!r} + '/net0.pt', weights_only=False)\n"
        "out = net.generate(x['x'], attention_mask=x['mask'], max_new_tokens=6, do_sample=False, pad_token_id=0)\n"
        "assert torch.equal(out, x['greedy']), (out, x['greedy'])\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------------------- generation

def _tokens_hit_eos(model, stitch, ids, mask):
    """An eos id that greedy decoding emits at its third step in row 0 (so eos handling is exercised)."""
    free = esta.generate(model, ids, stitch=stitch, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    return int(free[0, ids.shape[1] + 2])


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_kv_cache_equals_recomputation_for_every_member(family, impl):
    model = _trained(family, impl)
    ids, mask = _padded("left", length=7)
    for i in range(len(model)):
        cached = esta.generate(model, ids, stitch=i, attention_mask=mask, max_new_tokens=10)
        full = esta.generate(model, ids, stitch=i, attention_mask=mask, max_new_tokens=10, use_cache=False)
        assert torch.equal(cached, full), i
        assert cached.shape[1] <= 17 and torch.equal(cached[:, :7], ids)
        exported = esta.generate(model.export(i), ids, attention_mask=mask, max_new_tokens=10)
        assert torch.equal(exported, cached), i


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("impl", IMPLS)
def test_anchor_greedy_and_beam_search_equal_hf_generate(family, impl):
    # pad id 5, not 0: HF's beam search fills finished beams with eos when the pad id is 0 (a falsy tensor)
    model = _trained(family, impl)
    ids, mask = _padded("left", length=7)
    for a in range(len(model.anchors)):
        lm = model.export(a)  # the anchor's HF model with its LoRA and stitch biases merged
        for eos in (2, _tokens_hit_eos(model, a, ids, mask)):
            for beams in (1, 4):
                ours = esta.generate(model, ids, stitch=a, attention_mask=mask, max_new_tokens=9, num_beams=beams,
                                     eos_token_id=eos, pad_token_id=5)
                theirs = lm.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, num_beams=beams,
                                     eos_token_id=eos, pad_token_id=5)
                assert torch.equal(ours, theirs), (a, eos, beams, ours, theirs)


def test_eos_finishes_rows_and_pads():
    # oracle: the free-running greedy rows, each cut after its first eos and padded, as long as the longest row
    model = _trained()
    ids, mask = _padded("left", length=7)
    free = esta.generate(model, ids, stitch=3, attention_mask=mask, max_new_tokens=8, eos_token_id=[])[:, 7:]
    for eos in {int(free[0, 2]), int(free[1, 4])}:
        expected = free.clone()
        ends = []
        for r in range(free.shape[0]):
            hits = (free[r] == eos).nonzero()
            end = int(hits[0]) + 1 if len(hits) else free.shape[1]
            expected[r, end:] = 5
            ends.append(end)
        out = esta.generate(model, ids, stitch=3, attention_mask=mask, max_new_tokens=8, eos_token_id=eos,
                            pad_token_id=5)
        assert torch.equal(out[:, 7:], expected[:, : max(ends)]), (eos, out, expected)


def test_beam_search_and_top_p_sampling_on_stitches():
    model = _trained()
    ids, mask = _padded("left", length=7)
    for i in range(2, len(model)):
        cached = esta.generate(model, ids, stitch=i, attention_mask=mask, max_new_tokens=8, num_beams=4)
        full = esta.generate(model, ids, stitch=i, attention_mask=mask, max_new_tokens=8, num_beams=4,
                             use_cache=False)
        assert torch.equal(cached, full), i
        exported = esta.generate(model.export(i), ids, attention_mask=mask, max_new_tokens=8, num_beams=4)
        assert torch.equal(exported, cached), i
        # beam search finds a sequence at least as likely as greedy's (same length, no eos reached here)
        greedy = esta.generate(model, ids, stitch=i, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
        beam = esta.generate(model, ids, stitch=i, attention_mask=mask, max_new_tokens=8, num_beams=4,
                             eos_token_id=[])

        def logprob(seq):
            with torch.no_grad():
                full_mask = torch.cat([mask, torch.ones(3, 8, dtype=torch.long)], 1)
                lp = model(seq, stitch=i, attention_mask=full_mask, position_ids=mask_positions(full_mask))
                lp = lp.float().log_softmax(-1)[:, 6:-1].gather(-1, seq[:, 7:, None]).squeeze(-1)
            return lp.sum(-1)

        assert (logprob(beam) >= logprob(greedy) - 1e-4).all()
        for beams in (1, 4):
            kw = dict(stitch=i, attention_mask=mask, max_new_tokens=8, do_sample=True, top_p=0.75, num_beams=beams)
            a = esta.generate(model, ids, generator=torch.Generator().manual_seed(3), **kw)
            b = esta.generate(model, ids, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
            assert torch.equal(a, b), (i, beams)
            assert a.shape[0] == 3 and torch.equal(a[:, :7], ids)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.9, 0.05, 0.03, 0.02]]))
    kept = torch.isfinite(_warp(logits, 1.0, None, 0.75))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True], [True, False, False, False]]
    assert torch.isfinite(_warp(logits, 1.0, 2, 1.0)).sum(-1).tolist() == [2, 2, 2]
    # sampled tokens stay inside the nucleus
    model = _trained()
    ids = _ids(1, 5)
    for seed in range(5):
        out = esta.generate(model, ids, stitch=2, max_new_tokens=1, do_sample=True, top_p=0.75,
                            generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            scores = model(ids, stitch=2)[:, -1].float()
        assert torch.isfinite(_warp(scores, 1.0, None, 0.75))[0, out[0, -1]]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + ("the a cat dog sat on mat ran to house big small red blue green "
                                                 "old new tree hill sun moon").split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_generate_text_and_cli(tmp_path, capsys):
    from esta.cli import main

    tokenizer = _tokenizer()
    model = StitchableModel([HFCausalLMAnchor(_llama(48, 3, 1), tokenizer=tokenizer),
                             HFCausalLMAnchor(_llama(32, 2, 0), tokenizer=tokenizer)], kernel_size=1, stride=1)
    texts = generate_text(model, tokenizer, ["the cat", "a big red dog sat"], stitch=3, max_new_tokens=4,
                          eos_token_id=[])
    ids = torch.tensor([[0, 0, 0, 4, 6], tokenizer("a big red dog sat")["input_ids"]])
    mask = (torch.arange(5) >= torch.tensor([[3], [0]])).long()
    direct = esta.generate(model, ids, stitch=3, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    assert texts == [" " + t for t in tokenizer.batch_decode(direct[:, 5:], skip_special_tokens=True)]
    esta.export.save(model.export(3), str(tmp_path / "s3"), tokenizer=tokenizer)
    esta.export.save(model.export(3), str(tmp_path / "bare"))
    assert main(["generate", "--export", str(tmp_path / "s3"), "--prompt", "the cat", "--prompt",
                 "a big red dog sat", "--max-new-tokens", "4", "--num-beams", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    greedy = generate_text(model, tokenizer, ["the cat", "a big red dog sat"], stitch=3, max_new_tokens=4)
    assert printed == [f"the cat{greedy[0]}", f"a big red dog sat{greedy[1]}"]
    assert main(["generate", "--export", str(tmp_path / "s3"), "--prompt", "the sun", "--do-sample",
                 "--top-p", "0.75", "--num-beams", "4", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("the sun")
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    assert main(["generate", "--export", str(tmp_path / "bare"), "--tokenizer", str(tmp_path / "tok"),
                 "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == f"the cat{greedy[0]}"
    for argv, match in [
        (["--export", str(tmp_path / "bare"), "--prompt", "x"], "--tokenizer"),
        (["--export", str(tmp_path / "s3"), "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--export", str(tmp_path / "s3"), "--prompt", "x", "--top-p", "1.5"], "--top-p"),
        (["--export", str(tmp_path / "nothing"), "--prompt", "x"], "--export"),
        (["--export", str(tmp_path / "s3"), "--stitch", "2", "--prompt", "x"], "--stitch"),
        (["--run", str(tmp_path), "--stitch", "2", "--prompt", "x"], "is not a run directory"),
    ]:
        assert main(["generate"] + argv) == 2
        assert match in capsys.readouterr().err


# ---------------------------------------------------------------- bad input

def test_bad_inputs_name_what_is_wrong():
    model = _model()
    ids = _ids(2, 6)
    with pytest.raises(ValueError, match=r"token id 61, outside the vocabulary \[0, 61\)"):
        model(ids.masked_fill(ids == ids[0, 0], VOCAB), stitch=2)
    with pytest.raises(ValueError, match="token id -1"):
        model(ids.masked_fill(ids == ids[0, 0], -1))
    with pytest.raises(TypeError, match="integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, tokens\) = \(2, 6\), got \(2, 5\)"):
        model(ids, stitch=3, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5)[None])
    with pytest.raises(IndexError, match="stitch id 5 is outside"):
        model(ids, stitch=5)
    with pytest.raises(IndexError, match="stitch id 5 is outside"):
        model.export(5)
    small = HFCausalLMAnchor(_llama())
    other_vocab = LlamaForCausalLM(_config(LlamaConfig, 48, 2, 4, 2, "sdpa", vocab=70)).eval()
    with pytest.raises(ValueError, match="vocabulary 61.*vocabulary 70|vocabulary 70.*vocabulary 61"):
        StitchableModel([small, HFCausalLMAnchor(other_vocab)])
    with pytest.raises(ValueError, match="one family.*hf-causal-lm/llama.*hf-causal-lm/mistral"):
        StitchableModel([small, HFCausalLMAnchor(_mistral(48))])
    tokenizer = _tokenizer()
    with pytest.raises(ValueError, match="tokenizer"):
        StitchableModel([HFCausalLMAnchor(_llama(), tokenizer=tokenizer), HFCausalLMAnchor(_llama(48))])


def test_generate_bad_inputs():
    model = _model()
    ids, mask = _padded("left")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        esta.generate(model, ids, attention_mask=mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got -3"):
        esta.generate(model, ids, max_new_tokens=-3)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        esta.generate(model, ids, max_new_tokens=2.0)
    with pytest.raises(ValueError, match=r"token id 61, outside the vocabulary \[0, 61\)"):
        esta.generate(model, ids.masked_fill(ids == ids[0, 0], VOCAB))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        esta.generate(model, ids, attention_mask=mask[:, 1:])
    right_ids, right_mask = _padded("right")
    with pytest.raises(ValueError, match="right-padded"):
        esta.generate(model, right_ids, attention_mask=right_mask)
    with pytest.raises(IndexError, match="stitch id 9 is outside"):
        esta.generate(model, ids, stitch=9)
    with pytest.raises(ValueError, match="top_p must be in"):
        esta.generate(model, ids, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        esta.generate(model, ids, num_beams=0)
    with pytest.raises(ValueError, match="stitch= selects a member"):
        esta.generate(model.export(3), ids, stitch=3)
    with pytest.raises(TypeError, match="expected a StitchableModel of decoder anchors"):
        esta.generate(nn.Linear(2, 2), ids)


def test_forward_with_caches_matches_without():
    # the per-segment caches StitchableModel.forward takes: feeding a sequence in two pieces equals one pass
    model = _trained()
    ids, mask = _padded("left", length=9)
    positions = mask_positions(mask)
    with torch.no_grad():
        for i in range(len(model)):
            whole = model(ids, stitch=i, attention_mask=mask, position_ids=positions)
            caches = model.segment_caches(i)
            first = model(ids[:, :5], stitch=i, attention_mask=mask[:, :5], position_ids=positions[:, :5],
                          caches=caches)
            second = model(ids[:, 5:], stitch=i, attention_mask=mask, position_ids=positions[:, 5:], caches=caches)
            got = torch.cat([first, second], 1)
            assert _rel(got, whole, mask) <= 1e-5, i
            with pytest.raises(ValueError, match="caches must hold"):
                model(ids, stitch=i, caches=caches + [None])
