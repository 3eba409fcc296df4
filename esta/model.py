"""`StitchableModel`: anchors of one family plus the stitches between them (SN-Net's palette).

Palette and ids. Anchors are sorted by parameter count (ties keep the given order); global ids
0..Z-1 are the anchors in that order, then come the stitches of pair (0, 1), then pair (1, 2), ...
(with nearest=False: every pair (a, b), a < b, in lexicographic order), each pair's stitches in
`esta.positions.stitch_positions` order. The smaller anchor of a pair is the front (its early blocks
run first), the larger the end, as SN-Net prescribes.

Each pair owns one `StitchingLayer` per window layer index (front width -> end width, LoRA rank
in // 4, identity init until the least-squares init replaces it); the stitches sharing a layer have
local ids 0..n-1 in it, which select the layer's stitch-specific bias row.

FLOPs convention. One multiply-add counts as one FLOP (fvcore's convention, and the paper's "FLOPs"),
i.e. half of what `torch.utils.flop_counter.FlopCounterMode` reports. Only matrix products and
convolutions are counted (linears, attention's q@k^T and attn@v, the patch convolution); norms,
activations, softmax and additions are not, as in fvcore and FlopCounterMode. A stitching layer is
counted as deployed, i.e. one (in -> out) linear with its LoRA merged. ViT anchors are counted
analytically; any other anchor (or a ViT part the formula does not cover) is measured once per input
shape with FlopCounterMode, part by part. Caveat of measuring: FlopCounterMode does not see ops it has
no formula for (e.g. CPU fused scaled-dot-product attention or custom ops), so such blocks read low.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from esta.anchors import Anchor, run_block, unique_numel
from esta.calibration import init_stitching_layers
from esta.export import export_stitch
from esta.pst import PSTState, format_trainable_report, to_pst, trainable_report
from esta.nn.stitched_linear import StitchedLinear
from esta.nn.stitching import StitchingLayer
from esta.positions import stitch_positions

__all__ = ["StitchableModel", "StitchInfo"]


@dataclass(frozen=True)
class StitchInfo:
    """One member of the palette.

    For an anchor: front == end == its anchor index, pair/layer/local_id/front_block/end_block are None.
    For a stitch: anchors `front` (blocks 0..front_block) -> stitching layer `layer` of pair `pair`
    (stitch-bias row `local_id`) -> anchor `end` (blocks end_block..last, then its head).
    """

    id: int
    front: int
    end: int
    front_block: Optional[int] = None
    end_block: Optional[int] = None
    pair: Optional[int] = None
    layer: Optional[int] = None
    local_id: Optional[int] = None
    params: int = 0

    @property
    def is_anchor(self) -> bool:
        return self.pair is None

    @property
    def path(self) -> Tuple:
        return (self.front, self.front_block, self.end, self.end_block, self.layer)


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"StitchableModel: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"StitchableModel: {name} must be at least 1, got {value}")
    return value


class StitchableModel(nn.Module):
    """Anchors plus the stitches between them; see the module docstring for ids and conventions.

    Choose the member to run with `model(x, stitch=i)`, `model.stitch = i`, or `with model.use_stitch(i):`.
    The default is the largest anchor. Extra keyword arguments of forward go to the anchors'
    `block_kwargs` and `head`.
    """

    def __init__(self, anchors: Sequence[Anchor], kernel_size: int = 2, stride: int = 1, nearest: bool = True) -> None:
        super().__init__()
        _check_positive("kernel_size", kernel_size)
        _check_positive("stride", stride)
        anchors = list(anchors)
        if len(anchors) < 1:
            raise ValueError("StitchableModel: needs at least one anchor")
        for a in anchors:
            if not isinstance(a, Anchor):
                raise TypeError(f"StitchableModel: anchors must be esta.anchors.Anchor, got {type(a).__name__}")
        families = sorted({a.family for a in anchors})
        if len(families) > 1:
            raise ValueError(f"StitchableModel: anchors must be of one family, got {families}")
        embed_types = sorted({a.embed_type for a in anchors})
        if len(embed_types) > 1:
            raise ValueError(f"StitchableModel: anchors must share one embedding type (for decoders: one vocabulary "
                             f"and tokenizer), got {embed_types}")
        order = sorted(range(len(anchors)), key=lambda i: anchors[i].num_parameters())
        self.anchors = nn.ModuleList([anchors[i] for i in order])
        self.kernel_size, self.stride, self.nearest = kernel_size, stride, bool(nearest)

        n = len(self.anchors)
        pairs = [(a, a + 1) for a in range(n - 1)] if nearest else [(a, b) for a in range(n) for b in range(a + 1, n)]
        self.pairs: List[Tuple[int, int]] = pairs
        self.stitching_layers = nn.ModuleList()
        infos = [StitchInfo(id=a, front=a, end=a, params=self.anchors[a].num_parameters()) for a in range(n)]
        for p, (fa, ea) in enumerate(pairs):
            front, end = self.anchors[fa], self.anchors[ea]
            positions = stitch_positions(front.depth, end.depth, kernel_size, stride)
            counts: Dict[int, int] = {}
            for pos in positions:
                counts[pos.layer] = counts.get(pos.layer, 0) + 1
            self.stitching_layers.append(nn.ModuleList(
                StitchingLayer.identity(front.width, end.width, num_stitches=counts[l], backend="auto",
                                        device=end.device, dtype=end.dtype)
                for l in range(len(counts))))
            local = {l: 0 for l in counts}
            for pos in positions:
                infos.append(StitchInfo(
                    id=len(infos), front=fa, end=ea, front_block=pos.front_block, end_block=pos.end_block,
                    pair=p, layer=pos.layer, local_id=local[pos.layer],
                    params=self._stitch_params(fa, pos.front_block, ea, pos.end_block)))
                local[pos.layer] += 1
        self.stitches: List[StitchInfo] = infos
        self._stitch = n - 1
        self._flops_cache: Dict[Tuple, dict] = {}
        self.pst: Optional[PSTState] = None  # set by to_pst(): ranks, stitch_bias, per-block row tables
        self._applied: Optional[int] = None

    # ---- selection ----
    def __len__(self) -> int:
        return len(self.stitches)

    def _check_id(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"StitchableModel: a stitch id must be an int, got {type(i).__name__}")
        if not 0 <= i < len(self.stitches):
            raise IndexError(f"StitchableModel: stitch id {i} is outside [0, {len(self.stitches)})")
        return i

    @property
    def stitch(self) -> int:
        return self._stitch

    @stitch.setter
    def stitch(self, i: int) -> None:
        self._stitch = self._check_id(i)

    @contextlib.contextmanager
    def use_stitch(self, i: int):
        previous = self._stitch
        self.stitch = i
        try:
            yield self
        finally:
            self._stitch = previous

    def stitching_layer(self, i: int) -> Optional[StitchingLayer]:
        info = self.stitches[self._check_id(i)]
        return None if info.is_anchor else self.stitching_layers[info.pair][info.layer]

    # ---- forward ----
    def forward(self, x: Tensor, stitch: Optional[int] = None, *, caches: Optional[Sequence] = None,
                **extra) -> Tensor:
        """Member `stitch` (default: `self.stitch`) on input x. Extra keyword arguments go to the anchors'
        `block_kwargs` and `head` (e.g. attention_mask for decoders). `caches`: one key/value cache per
        segment the member runs (its anchor; or the front, then the end of a stitch, see `segment_caches`),
        given to that segment's `block_kwargs` as `cache=` (`esta.generate` uses it)."""
        info = self.stitches[self._stitch if stitch is None else self._check_id(stitch)]
        self._select_rows(info.id)
        front, end = self.anchors[info.front], self.anchors[info.end]
        if caches is not None:
            caches = list(caches)
            if len(caches) != (1 if info.is_anchor else 2):
                raise ValueError(f"StitchableModel: member {info.id} runs {1 if info.is_anchor else 2} segment(s), "
                                 f"so caches must hold as many, got {len(caches)}")
        front_extra = extra if caches is None else dict(extra, cache=caches[0])
        if info.is_anchor:
            return front(x, **front_extra)
        tokens = front.embed(x)
        kwargs = front.block_kwargs(x, tokens, **front_extra)
        for block in front.blocks[: info.front_block + 1]:
            tokens = run_block(block, tokens, kwargs)
        layer = self.stitching_layers[info.pair][info.layer]
        layer.stitch_ids = info.local_id if layer.num_stitches > 0 else None
        tokens = layer(tokens)
        kwargs = end.block_kwargs(x, tokens, **(extra if caches is None else dict(extra, cache=caches[1])))
        for block in end.blocks[info.end_block:]:
            tokens = run_block(block, tokens, kwargs)
        return end.head(tokens, **extra)

    def segment_caches(self, i: int) -> List:
        """Fresh key/value caches for member i, one per segment it runs (anchors that have `new_cache`):
        [its anchor's] or [front blocks 0..j, end blocks k..last]."""
        info = self.stitches[self._check_id(i)]
        front, end = self.anchors[info.front], self.anchors[info.end]
        for anchor in (front, end):
            if not hasattr(anchor, "new_cache"):
                raise TypeError(f"StitchableModel: {type(anchor).__name__} keeps no key/value cache (decoder "
                                f"anchors such as HFCausalLMAnchor do)")
        if info.is_anchor:
            return [front.new_cache(0)]
        return [front.new_cache(0), end.new_cache(info.end_block)]

    def _select_rows(self, i: int) -> None:
        """Points every PST linear at member i's stitch-bias row (once per switch of member)."""
        if self.pst is None or self._applied == i:
            return
        for a, blocks in enumerate(self.pst.layers):
            for b, linears in enumerate(blocks):
                row = self.pst.row(i, a, b)
                for linear in linears:
                    if linear.num_stitches > 0:
                        linear.stitch_ids = row
        self._applied = i

    def local_stitch_row(self, i: int, anchor: int, block: int) -> int:
        """The stitch-bias row member i uses in block `block` of anchor `anchor` after to_pst (-1: none)."""
        if self.pst is None:
            raise RuntimeError("StitchableModel.local_stitch_row: the model is not converted to PST (call to_pst)")
        return self.pst.row(self._check_id(i), anchor, block)

    def member_parameters(self, i: int) -> List:
        """The trainable parameters member i's forward uses, for its SNIP score (`esta.sampling.snip_score`).

        Every parameter with requires_grad in the embedding of its front anchor, the blocks it runs, its
        stitching layer and its end anchor's head, each tensor once; a stitch-bias table appears as a
        (table, row) pair for the member's own row (skipped where the member has none)."""
        info = self.stitches[self._check_id(i)]
        front, end = self.anchors[info.front], self.anchors[info.end]
        if info.is_anchor:
            path = [(info.front, b) for b in range(front.depth)]
        else:
            path = [(info.front, b) for b in range(info.front_block + 1)]
            path.append(None)  # the stitching layer
            path += [(info.end, b) for b in range(info.end_block, end.depth)]
        out, seen = [], set()

        def add(p):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)

        for p in front.embed_parameters():
            add(p)
        for step in path:
            if step is None:
                module = self.stitching_layers[info.pair][info.layer]
                row_of = lambda sub: info.local_id  # noqa: E731
            else:
                a, b = step
                module = self.anchors[a].blocks[b]
                row = -1 if self.pst is None else self.pst.row(info.id, a, b)
                row_of = lambda sub, row=row: row  # noqa: E731
            tables = set()
            for sub in module.modules():
                if isinstance(sub, StitchedLinear) and sub.stitch_bias is not None:
                    tables.add(id(sub.stitch_bias))
                    row = row_of(sub)
                    if row >= 0 and sub.stitch_bias.requires_grad and id(sub.stitch_bias) not in seen:
                        seen.add(id(sub.stitch_bias))
                        out.append((sub.stitch_bias, row))
            for p in module.parameters():
                if id(p) not in tables:
                    add(p)
        for p in end.head_parameters():
            add(p)
        return out

    # ---- least-squares init, PST, export ----
    def init_stitching_layers(self, data, *, num_images: Optional[int] = 100, batch_size: int = 32,
                              ridge: Optional[float] = None, mode: str = "joint", backend: str = "auto"):
        """Least-squares init of every stitching layer in one pass (see `esta.calibration`)."""
        return init_stitching_layers(self, data, num_images=num_images, batch_size=batch_size, ridge=ridge,
                                     mode=mode, backend=backend)

    def to_pst(self, ranks=None, *, stitch_bias: bool = True, lora_alpha: Optional[float] = None,
               backend: str = "auto") -> "StitchableModel":
        """Converts the model to PST in place (see `esta.pst`) and keeps its PSTState in `self.pst`;
        returns the model."""
        if self.pst is not None:
            raise RuntimeError("to_pst: the model is already converted")
        self.pst = to_pst(self, ranks, stitch_bias=stitch_bias, lora_alpha=lora_alpha, backend=backend)
        self._applied = None
        return self

    def trainable_report(self) -> Dict[str, int]:
        """Trainable parameters by group (see `esta.pst.trainable_report`)."""
        return trainable_report(self)

    def format_trainable_report(self) -> str:
        return format_trainable_report(self)

    def export(self, i: int) -> nn.Module:
        """A standalone module for member i with LoRA and stitch biases merged (see `esta.export`)."""
        return export_stitch(self, self._check_id(i))

    # ---- sizes ----
    def _stitch_params(self, fa: int, j: int, ea: int, k: int) -> int:
        front, end = self.anchors[fa], self.anchors[ea]
        count = unique_numel(front.embed_parameters())
        count += sum(unique_numel(b.parameters()) for b in list(front.blocks)[: j + 1])
        count += front.width * end.width + end.width  # the deployed (merged) stitching linear
        count += sum(unique_numel(b.parameters()) for b in list(end.blocks)[k:])
        return count + unique_numel(end.head_parameters())

    def num_parameters(self, i: int) -> int:
        """Parameters of member i as deployed (stitching layer merged: in*out + out)."""
        return self.stitches[self._check_id(i)].params

    def flops(self, i: int, input_shape, dtype: Optional[torch.dtype] = None) -> int:
        """Multiply-adds of member i for one input of `input_shape` (batch included; see module docstring).

        dtype: of the zero input used where FLOPs are measured (default: the anchor's float dtype; pass
        torch.long for token-id inputs).
        """
        info = self.stitches[self._check_id(i)]
        shape = tuple(int(s) for s in input_shape)
        if info.is_anchor:
            t = self._anchor_flops(info.front, shape, dtype)
            return t["embed"] + sum(t["blocks"]) + t["head"]
        f, e = self._anchor_flops(info.front, shape, dtype), self._anchor_flops(info.end, shape, dtype)
        front, end = self.anchors[info.front], self.anchors[info.end]
        rows = f["rows"][info.front_block]
        total = f["embed"] + sum(f["blocks"][: info.front_block + 1])
        total += rows * front.width * end.width
        return total + sum(e["blocks"][info.end_block:]) + e["head"]

    def flops_table(self, input_shape, dtype: Optional[torch.dtype] = None) -> List[int]:
        return [self.flops(i, input_shape, dtype) for i in range(len(self.stitches))]

    def _anchor_flops(self, a: int, shape: tuple, dtype) -> dict:
        key = (a, shape, dtype)
        if key not in self._flops_cache:
            anchor = self.anchors[a]
            table = None
            if hasattr(anchor, "tokens_shape"):
                tokens_shape = anchor.tokens_shape(shape)
                embed, head = anchor.embed_flops(shape), anchor.head_flops(tokens_shape)
                blocks = [anchor.block_flops(b, tokens_shape) for b in range(anchor.depth)]
                if embed is not None and head is not None and all(b is not None for b in blocks):
                    rows = tokens_shape[0] * tokens_shape[1]
                    table = {"embed": embed, "blocks": blocks, "head": head, "rows": [rows] * anchor.depth}
            self._flops_cache[key] = table if table is not None else _measure(anchor, shape, dtype)
        return self._flops_cache[key]


def _macs(fn):
    # FlopCounterMode counts a multiply-add as 2 FLOPs; we count it once
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops() // 2


@torch.no_grad()
def _measure(anchor: Anchor, shape: tuple, dtype) -> dict:
    """Per-part multiply-adds of one anchor, measured on a zero input of `shape`."""
    dtype = dtype or anchor.dtype or torch.float32
    x = torch.zeros(shape, dtype=dtype, device=anchor.device)
    tokens, embed = _macs(lambda: anchor.embed(x))
    kwargs = anchor.block_kwargs(x, tokens)
    blocks, rows = [], []
    for block in anchor.blocks:
        tokens, count = _macs(lambda: run_block(block, tokens, kwargs))
        blocks.append(count)
        rows.append(tokens.numel() // anchor.width)
    _, head = _macs(lambda: anchor.head(tokens))
    return {"embed": embed, "blocks": blocks, "head": head, "rows": rows}
