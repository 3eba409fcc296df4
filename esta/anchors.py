"""Anchors: pre-trained models seen as embedding -> blocks -> head, the shape that stitching needs.

An `Anchor` is an `nn.Module` that wraps a model and exposes

    embed(x)                         input -> tokens
    blocks                           the blocks, indexable (nn.ModuleList or nn.Sequential)
    block_kwargs(x, tokens, **extra) keyword arguments every block call gets (attention masks, position
                                     embeddings, ...); {} for ViTs. Decoder stacks override it.
    head(tokens, **extra)            tokens -> outputs
    width, depth                     token width and number of blocks
    family, embed_type               anchors are stitchable only when both strings agree: the family says
                                     the blocks speak the same language, the embed type that the token
                                     layouts (count, prefix tokens) line up position by position
    embed_parameters(), head_parameters()   for per-stitch parameter counts
    block_flops(i, tokens_shape), embed_flops(input_shape), head_flops(tokens_shape)
                                     analytic multiply-add counts, or None where the anchor has none (then
                                     `StitchableModel` measures them)

Adapters: `TimmViTAnchor` (timm VisionTransformer of any size) and `SequentialBlocksAnchor` (any model
given as embed / blocks / head modules).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Sequence

from torch import Tensor, nn

__all__ = ["Anchor", "TimmViTAnchor", "SequentialBlocksAnchor", "unique_numel"]


def unique_numel(params) -> int:
    """Number of elements over parameters, each tensor counted once (tied weights are not doubled)."""
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class Anchor(nn.Module):
    """Base class of anchors. Subclasses set `family` and `embed_type` and implement the methods below."""

    family: str = ""
    embed_type: str = ""

    @property
    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def width(self) -> int:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def block_kwargs(self, x: Tensor, tokens: Tensor, **extra) -> Dict[str, object]:
        # Computed once per forward from the raw input, then passed to every block of this anchor.
        return {}

    def head(self, tokens: Tensor, **extra) -> Tensor:
        raise NotImplementedError

    def embed_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def head_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

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
            tokens = block(tokens, **kwargs)
        return self.head(tokens, **extra)


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

    def embed(self, x: Tensor) -> Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def head(self, tokens: Tensor, **extra) -> Tensor:
        return self.model.forward_head(self.model.norm(tokens))

    def _head_modules(self):
        m = self.model
        return [mod for mod in (m.norm, getattr(m, "fc_norm", None), getattr(m, "attn_pool", None), m.head)
                if mod is not None]

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
    """

    def __init__(self, embed: nn.Module, blocks: nn.ModuleList, head: nn.Module, *, family: str,
                 embed_type: str, width: Optional[int] = None) -> None:
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
