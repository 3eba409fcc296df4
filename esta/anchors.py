"""Anchors: pre-trained models seen as embedding -> blocks -> head, the shape that stitching needs.

An `Anchor` is an `nn.Module` that wraps a model and exposes

    embed(x)                         input -> tokens
    blocks                           the blocks, indexable (nn.ModuleList or nn.Sequential)
    block_kwargs(x, tokens, **extra) keyword arguments every block call gets (attention masks, position
                                     embeddings, ...); {} for ViTs. Decoder stacks override it.
    head(tokens, **extra)            tokens -> outputs
    width, depth                     token width and number of blocks
    device, dtype                    where the anchor's parameters live and their floating dtype
    family, embed_type               anchors are stitchable only when both strings agree: the family says
                                     the blocks speak the same language, the embed type that the token
                                     layouts (count, prefix tokens) line up position by position
    embed_parameters(), head_parameters()   for per-stitch parameter counts
    attention_linears(i)             the linears of block i that PST adapts (name inside the block -> module)
    classifier_parameters()          the head parameters PST trains (norms excluded)
    check_input(x, where)            a clear error for a batch the anchor cannot take
    block_flops(i, tokens_shape), embed_flops(input_shape), head_flops(tokens_shape)
                                     analytic multiply-add counts, or None where the anchor has none (then
                                     `StitchableModel` measures them)

    pst_rank                         the attention LoRA rank PST gives this anchor by default (None: the
                                     ViT rule of esta.pst.default_ranks)

Adapters: `TimmViTAnchor` (timm VisionTransformer of any size), `SequentialBlocksAnchor` (any model given as
embed / blocks / head modules) and `HFCausalLMAnchor` (a Hugging Face decoder LM with the Llama layout).
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from esta import hf

__all__ = ["Anchor", "TimmViTAnchor", "SequentialBlocksAnchor", "HFCausalLMAnchor", "unique_numel", "run_block"]


def unique_numel(params) -> int:
    """Number of elements over parameters, each tensor counted once (tied weights are not doubled)."""
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def run_block(block: nn.Module, tokens: Tensor, kwargs: Dict[str, object]) -> Tensor:
    """One block call; blocks that return a tuple (older transformers decoder layers) give its first item."""
    return hf.hidden_states(block(tokens, **kwargs))


class Anchor(nn.Module):
    """Base class of anchors. Subclasses set `family` and `embed_type` and implement the methods below."""

    family: str = ""
    embed_type: str = ""
    pst_rank: Optional[int] = None

    @property
    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def width(self) -> int:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> Optional[torch.device]:
        """The device of the anchor's first parameter (None without parameters)."""
        p = next(self.parameters(), None)
        return None if p is None else p.device

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The dtype of the anchor's first floating parameter (None without one)."""
        return next((p.dtype for p in self.parameters() if p.dtype.is_floating_point), None)

    def embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def check_input(self, x: Tensor, where: str = "") -> None:
        """Raises a ValueError naming `where` when x is not a batch this anchor can take. The base class only
        checks that x is a tensor with a batch dimension; adapters that know their input shape check more."""
        prefix = f"{where}: " if where else ""
        if not isinstance(x, Tensor):
            raise TypeError(f"{prefix}the input must be a tensor, got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"{prefix}the input must have a batch dimension, got a 0-d tensor")

    def block_kwargs(self, x: Tensor, tokens: Tensor, **extra) -> Dict[str, object]:
        # Computed once per forward from the raw input, then passed to every block of this anchor.
        return {}

    def head(self, tokens: Tensor, **extra) -> Tensor:
        raise NotImplementedError

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def head_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def attention_linears(self, i: int) -> Dict[str, nn.Linear]:
        """The attention linears of block i that PST adapts, by name inside the block (e.g. "attn.qkv").
        The base rule: every nn.Linear whose name has a part containing "attn" or "attention"."""
        return {name: mod for name, mod in self.blocks[i].named_modules()
                if isinstance(mod, nn.Linear) and _is_attention_name(name)}

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The head parameters PST trains: the head's, except those of normalization layers."""
        norms = {id(p) for mod in self.modules() if isinstance(mod, _NORM_TYPES) for p in mod.parameters()}
        return (p for p in self.head_parameters() if id(p) not in norms)

    def embed_flops(self, input_shape) -> Optional[int]:
        return None

    def block_flops(self, i: int, tokens_shape) -> Optional[int]:
        return None

    def head_flops(self, tokens_shape) -> Optional[int]:
        return None

    def num_parameters(self) -> int:
        return unique_numel(self.parameters())

    def forward(self, x: Tensor, **extra) -> Tensor:
        tokens = self.embed(x)
        kwargs = self.block_kwargs(x, tokens, **extra)
        for block in self.blocks:
            tokens = run_block(block, tokens, kwargs)
        return self.head(tokens, **extra)


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)


def _is_attention_name(name: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in name.split("."))


def _linear_macs(rows: int, layer: nn.Linear) -> int:
    return rows * layer.in_features * layer.out_features


class TimmViTAnchor(Anchor):
    """A timm `VisionTransformer` as an anchor.

    embed = patch_embed, _pos_embed (class/register tokens and position embedding), patch_drop, norm_pre;
    head = norm, then forward_head (pool, fc_norm, head_drop, head) -- the same ops, in the same order, as
    the model's own forward, so the anchor reproduces it exactly.
    """

    family = "timm.vit"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "forward_head"):
            if not hasattr(model, attr):
                raise TypeError(f"TimmViTAnchor: expected a timm VisionTransformer, but {type(model).__name__} "
                                f"has no attribute {attr!r}")
        self.model = model
        patch = tuple(model.patch_embed.patch_size)
        self.embed_type = (f"patch{patch[0]}x{patch[1]}+{model.num_prefix_tokens}prefix"
                           f"/pool={model.global_pool or 'none'}")

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    @property
    def width(self) -> int:
        return self.model.embed_dim

    def check_input(self, x: Tensor, where: str = "") -> None:
        super().check_input(x, where)
        prefix = f"{where}: " if where else ""
        m = self.model
        channels = m.patch_embed.proj.in_channels if hasattr(m.patch_embed, "proj") else None
        if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
            raise ValueError(f"{prefix}expected images of shape (batch, {channels}, height, width), "
                             f"got {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        img_size = getattr(m.patch_embed, "img_size", None)
        if not getattr(m, "dynamic_img_size", False) and img_size is not None and size != tuple(img_size):
            raise ValueError(f"{prefix}expected images of {img_size[0]}x{img_size[1]} pixels (the anchors' "
                             f"img_size), got {size[0]}x{size[1]} (input shape {tuple(x.shape)})")

    def embed(self, x: Tensor) -> Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def head(self, tokens: Tensor, **extra) -> Tensor:
        return self.model.forward_head(self.model.norm(tokens))

    def _head_modules(self):
        m = self.model
        return [mod for mod in (m.norm, getattr(m, "fc_norm", None), getattr(m, "attn_pool", None), m.head)
                if mod is not None]

    def attention_linears(self, i: int) -> Dict[str, nn.Linear]:
        attn = getattr(self.model.blocks[i], "attn", None)
        found = {f"attn.{name}": getattr(attn, name, None) for name in ("qkv", "proj")}
        if all(isinstance(mod, nn.Linear) for mod in found.values()):
            return found
        return super().attention_linears(i)  # another attention layout: every linear under an "attn" name

    def classifier_parameters(self):
        return self.model.head.parameters()

    def embed_parameters(self):
        # everything that is neither a block nor the head: patch embed, cls/reg tokens, pos embed, norm_pre
        other = {id(p) for p in self.model.blocks.parameters()}
        other |= {id(p) for mod in self._head_modules() for p in mod.parameters()}
        return (p for p in self.model.parameters() if id(p) not in other)

    def head_parameters(self):
        return (p for mod in self._head_modules() for p in mod.parameters())

    # ---- analytic FLOPs (multiply-adds; see esta.model for the convention) ----
    def _num_tokens(self, input_shape) -> tuple:
        batch, _, height, width = _image_shape(input_shape)
        ph, pw = self.model.patch_embed.patch_size
        grid = (height // ph) * (width // pw)
        return batch, grid, grid + self.model.num_prefix_tokens

    def embed_flops(self, input_shape) -> Optional[int]:
        proj = self.model.patch_embed.proj
        if not isinstance(proj, nn.Conv2d):
            return None
        batch, grid, _ = self._num_tokens(input_shape)
        per_patch = proj.in_channels // proj.groups * math.prod(proj.kernel_size) * proj.out_channels
        return batch * grid * per_patch

    def block_flops(self, i: int, tokens_shape) -> Optional[int]:
        block = self.model.blocks[i]
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        needed = (getattr(attn, "qkv", None), getattr(attn, "proj", None),
                  getattr(mlp, "fc1", None), getattr(mlp, "fc2", None))
        if not all(isinstance(layer, nn.Linear) for layer in needed):
            return None  # an unusual block (e.g. gated MLP): let the caller measure it
        qkv, proj, fc1, fc2 = needed
        batch, tokens, width = tokens_shape
        rows = batch * tokens
        linears = sum(_linear_macs(rows, layer) for layer in (qkv, proj, fc1, fc2))
        # q @ k^T and attn @ v: each batch * heads * N * N * head_dim = batch * N * N * (qkv width / 3)
        inner = qkv.out_features // 3
        return linears + 2 * batch * tokens * tokens * inner

    def head_flops(self, tokens_shape) -> Optional[int]:
        m = self.model
        if getattr(m, "attn_pool", None) is not None:
            return None
        batch, tokens, width = tokens_shape
        rows = batch * tokens if m.global_pool in ("", None) else batch
        return _linear_macs(rows, m.head) if isinstance(m.head, nn.Linear) else 0

    def tokens_shape(self, input_shape) -> tuple:
        batch, _, num_tokens = self._num_tokens(input_shape)
        return (batch, num_tokens, self.width)


def _image_shape(input_shape) -> tuple:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise ValueError(f"TimmViTAnchor: input_shape must be (C, H, W) or (B, C, H, W), got {tuple(input_shape)}")
    return shape


class SequentialBlocksAnchor(Anchor):
    """Any block model given as three parts: `embed` (input -> tokens), `blocks`, `head` (tokens -> output).

    width: the token width; inferred from the last dimension of the first parameter-carrying nn.Linear in
    the first block when not given. FLOPs are measured (none are analytic here).
    attention_linears: names (inside a block) of the linears PST adapts; default: every nn.Linear whose name
    has a part containing "attn" or "attention".
    """

    def __init__(self, embed: nn.Module, blocks: nn.ModuleList, head: nn.Module, *, family: str,
                 embed_type: str, width: Optional[int] = None,
                 attention_linears: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise TypeError("SequentialBlocksAnchor: blocks must be a non-empty nn.ModuleList or nn.Sequential")
        if not isinstance(family, str) or not family or not isinstance(embed_type, str) or not embed_type:
            raise ValueError("SequentialBlocksAnchor: family and embed_type must be non-empty strings")
        self.embed_module = embed
        self.block_list = blocks
        self.head_module = head
        self.family = family
        self.embed_type = embed_type
        if width is None:
            first = next((m for m in blocks[0].modules() if isinstance(m, nn.Linear)), None)
            if first is None:
                raise ValueError("SequentialBlocksAnchor: cannot infer width (no nn.Linear in the first block); "
                                 "pass width=")
            width = first.in_features
        self._width = int(width)
        if attention_linears is not None:
            if isinstance(attention_linears, str) or not all(isinstance(n, str) for n in attention_linears):
                raise TypeError("SequentialBlocksAnchor: attention_linears must be a sequence of module names")
            attention_linears = tuple(attention_linears)
        self._attention_names = attention_linears

    def attention_linears(self, i: int) -> Dict[str, nn.Linear]:
        if self._attention_names is None:
            return super().attention_linears(i)
        block = self.blocks[i]
        found = {}
        for name in self._attention_names:
            try:
                mod = block.get_submodule(name)
            except AttributeError:
                raise ValueError(f"SequentialBlocksAnchor: block {i} has no submodule {name!r} "
                                 f"(attention_linears)") from None
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"SequentialBlocksAnchor: {name!r} of block {i} is a {type(mod).__name__}, "
                                f"not an nn.Linear (attention_linears)")
            found[name] = mod
        return found

    @property
    def blocks(self):
        return self.block_list

    @property
    def width(self) -> int:
        return self._width

    def embed(self, x: Tensor) -> Tensor:
        return self.embed_module(x)

    def head(self, tokens: Tensor, **extra) -> Tensor:
        return self.head_module(tokens)

    def embed_parameters(self):
        return self.embed_module.parameters()

    def head_parameters(self):
        return self.head_module.parameters()


def _tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary and special tokens: equal for tokenizers that map text to the
    same ids."""
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"HFCausalLMAnchor: tokenizer must be a Hugging Face tokenizer (with get_vocab()), got "
                        f"{type(tokenizer).__name__}")
    h = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        h.update(f"{index}\t{token}\n".encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        h.update(f"{name}={getattr(tokenizer, name, None)}\n".encode())
    return h.hexdigest()[:12]


_HF_PARTS = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
_HF_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_HF_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class HFCausalLMAnchor(Anchor):
    """A Hugging Face decoder LM with the Llama layout (LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM, ...) as an anchor; the model is kept as `.model`.

    embed = model.model.embed_tokens (input: token ids of shape (batch, tokens));
    block_kwargs = what the model gives its own decoder layers (`esta.hf`): position ids (given, or
        0..T-1 after what the cache holds), rotary embeddings from its rotary_emb, the causal + padding mask
        from transformers' mask utility for the attention implementation it was loaded with, the cache;
    head = model.model.norm, then model.lm_head: logits of shape (batch, tokens, vocabulary).
    Extra inputs of forward: `attention_mask` (batch, past + tokens) of 1 (token) and 0 (padding),
    `position_ids` (batch or 1, tokens), `cache` (an `esta.hf.segment_cache`, used by `esta.generate`).

    Anchors stitch only within one family (the model type) and one vocabulary: `embed_type` names the
    vocabulary size and, with `tokenizer=`, a fingerprint of the tokenizer (else the special token ids of the
    config), so anchors of different vocabularies or tokenizers are refused by `StitchableModel`.
    PST adapts q/k/v/o of every block with LoRA rank 16 by default (`pst_rank`, the paper's LLaMA setting);
    nothing of the head is trained (no classifier).
    FLOPs are analytic (multiply-adds): the seven linears of a block (q, k, v, o and the gated MLP), the
    attention products 2 * batch * heads * T^2 * head_dim (grouped-query attention shares keys and values
    but every query head still takes its products; masked positions count, as they are computed), and
    lm_head; embedding lookups, norms, rotary embeddings, softmax and activations are not counted.
    """

    pst_rank = 16

    def __init__(self, model: nn.Module, *, tokenizer=None) -> None:
        super().__init__()
        for path in _HF_PARTS:
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    raise TypeError(f"HFCausalLMAnchor: expected a Hugging Face decoder LM with the Llama layout "
                                    f"(LlamaForCausalLM and the like), but {type(model).__name__} has no {path}")
        if len(model.model.layers) == 0:
            raise ValueError("HFCausalLMAnchor: the model has no decoder layers")
        self.model = model
        self.decoder_call = hf.decoder_call(model)
        config = model.config
        embed, lm_head = model.model.embed_tokens, model.lm_head
        if not isinstance(lm_head, nn.Linear) or not isinstance(embed, nn.Embedding):
            raise TypeError("HFCausalLMAnchor: expected nn.Embedding embed_tokens and an nn.Linear lm_head")
        if embed.num_embeddings != lm_head.out_features:
            raise ValueError(f"HFCausalLMAnchor: embed_tokens has {embed.num_embeddings} tokens but lm_head "
                             f"{lm_head.out_features} outputs")
        self.vocab_size = int(lm_head.out_features)
        self.tokenizer = tokenizer
        self.family = f"hf-causal-lm/{getattr(config, 'model_type', type(model).__name__)}"
        if tokenizer is not None:
            if len(tokenizer) > self.vocab_size:
                raise ValueError(f"HFCausalLMAnchor: the tokenizer has {len(tokenizer)} tokens, more than the "
                                 f"model's vocabulary of {self.vocab_size}")
            tokens = f"tokenizer {_tokenizer_fingerprint(tokenizer)}"
        else:
            ids = [getattr(config, f"{n}_token_id", None) for n in ("bos", "eos", "pad")]
            tokens = "special tokens bos={} eos={} pad={}".format(*ids)
        self.embed_type = f"token ids, vocabulary {self.vocab_size}, {tokens}"

    # ---- structure ----
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def config(self):
        return self.model.config

    def attention_linears(self, i: int) -> Dict[str, nn.Linear]:
        block = self.blocks[i]
        found = {}
        for name in _HF_ATTENTION:
            try:
                mod = block.get_submodule(name)
            except AttributeError:
                raise ValueError(f"HFCausalLMAnchor: block {i} has no {name}") from None
            found[name] = mod
        return found

    def classifier_parameters(self):
        return iter(())  # the LM head is frozen under PST (paper 5.2: LoRA on self-attention only)

    def embed_parameters(self):
        return self.model.model.embed_tokens.parameters()

    def head_parameters(self):
        return (p for mod in (self.model.model.norm, self.model.lm_head) for p in mod.parameters())

    # ---- inputs ----
    def check_input(self, x: Tensor, where: str = "") -> None:
        super().check_input(x, where)
        prefix = f"{where}: " if where else ""
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{prefix}input_ids must be an integer tensor of token ids, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{prefix}input_ids must have shape (batch, tokens), got {tuple(x.shape)}")
        if x.numel() == 0 or x.device.type == "meta":
            return
        if x.device.type == "cpu":
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= self.vocab_size:
                bad = high if high >= self.vocab_size else low
                raise ValueError(f"{prefix}input_ids holds token id {bad}, outside the vocabulary [0, "
                                 f"{self.vocab_size})")
        else:  # no host sync: a device-side assert
            torch._assert_async(((x >= 0) & (x < self.vocab_size)).all(),
                                f"{prefix}input_ids holds a token id outside the vocabulary [0, {self.vocab_size})")

    def embed(self, x: Tensor) -> Tensor:
        self.check_input(x, "HFCausalLMAnchor")
        return self.model.model.embed_tokens(x)

    def block_kwargs(self, x: Tensor, tokens: Tensor, *, attention_mask: Optional[Tensor] = None,
                     position_ids: Optional[Tensor] = None, cache=None, **extra) -> Dict[str, object]:
        batch, length = tokens.shape[0], tokens.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(f"HFCausalLMAnchor: attention_mask must be a tensor, got "
                                f"{type(attention_mask).__name__}")
            if attention_mask.shape != (batch, past + length):
                what = f"(batch, tokens) = ({batch}, {length})" if past == 0 else \
                    f"(batch, cached + new tokens) = ({batch}, {past + length})"
                raise ValueError(f"HFCausalLMAnchor: attention_mask must have shape {what}, got "
                                 f"{tuple(attention_mask.shape)}")
        if position_ids is not None:
            if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or \
                    position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
                shape = tuple(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
                raise ValueError(f"HFCausalLMAnchor: position_ids must have shape ({batch} or 1, {length}), got "
                                 f"{shape}")
        return hf.block_kwargs(self.model, self.decoder_call, tokens, attention_mask, position_ids, cache)

    def head(self, tokens: Tensor, **extra) -> Tensor:
        return self.model.lm_head(self.model.model.norm(tokens))

    def new_cache(self, first_block: int = 0):
        """An empty key/value cache for blocks first_block.. of this anchor (see esta.hf.segment_cache)."""
        return hf.segment_cache(first_block)

    # ---- analytic FLOPs (multiply-adds; see esta.model for the convention) ----
    def tokens_shape(self, input_shape) -> tuple:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 1:
            shape = (1,) + shape
        if len(shape) != 2:
            raise ValueError(f"HFCausalLMAnchor: input_shape must be (tokens,) or (batch, tokens), got "
                             f"{tuple(input_shape)}")
        return shape + (self.width,)

    def embed_flops(self, input_shape) -> Optional[int]:
        return 0  # a table lookup

    def block_flops(self, i: int, tokens_shape) -> Optional[int]:
        block = self.blocks[i]
        linears = []
        for name in _HF_ATTENTION + _HF_MLP:
            try:
                linears.append(block.get_submodule(name))
            except AttributeError:
                return None  # another block layout: let the caller measure it
        if not all(isinstance(layer, nn.Linear) for layer in linears):
            return None
        batch, tokens, _ = tokens_shape
        rows = batch * tokens
        attn = block.self_attn
        heads = linears[0].out_features // attn.head_dim
        products = 2 * batch * heads * tokens * tokens * attn.head_dim  # q @ k^T and weights @ v, per query head
        return sum(_linear_macs(rows, layer) for layer in linears) + products

    def head_flops(self, tokens_shape) -> Optional[int]:
        batch, tokens, _ = tokens_shape
        return _linear_macs(batch * tokens, self.model.lm_head)
