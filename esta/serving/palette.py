"""`Palette`: every served member of a stitchable model from one set of weights, in mixed-stitch batches.

    palette = Palette.from_run("esta-demo")                 # the deployed members of a trained run
    logits = palette(images, members=[7, 2, 7, 14])          # one member id per row, any mix
    route = palette.route(mflops=3.0)                        # the most accurate deployed member within budget

What is stored (built once from a `StitchableModel`, PST-converted or not):
  - per anchor used by a served member: one copy of the anchor whose attention `StitchedLinear`s are
    `RowBiasLinear`s: the shared LoRA merged into the frozen weight once (W + scale * B A, computed in
    float32 as `StitchedLinear.merged` does; the LoRA is stitch-agnostic, so the merge serves every member)
    and the layer's stitch-bias table cut to the rows of the served members. Blocks no served member runs
    are dropped. One copy of each anchor's weights, whatever the number of members served.
  - per stitching layer of a served stitch: one `RowBiasLinear` (LS weight + its LoRA, merged) with the
    stitch-bias rows of the served stitches that share it.
  - per served member: its path (front anchor and last front block, stitching layer, end anchor and
    first end block), FLOPs per example, accuracy when known, whether it is deployed, and its bias row in
    every block and stitching layer it runs.

Mixed-stitch forward. Rows are grouped by member. Anchors run in order (a stitch's front anchor always
precedes its end anchor). Each anchor keeps one token buffer holding every row that runs any of its
blocks, laid out as

    [rows entering from a stitching layer, by entry block descending] [the anchor's own rows]
    [rows leaving through a stitching layer, by exit block descending]

so that the rows running block b are one contiguous slice of the buffer: the entering rows whose entry
block is <= b (a suffix of the first part), the anchor's rows, and the leaving rows whose exit block is
>= b (a prefix of the last part). Every block runs once over its slice, and each row's stitch-bias row is
selected by a per-row id in the fused op (`esta_kernels.stitched_linear` with per-row ids and no LoRA).
After the anchor's last block, the leaving rows of each stitching layer go through it together (per-row
ids again) and are written into their end anchor's buffer; the rows whose path ends at the anchor (its
own and the entering ones, a prefix of the buffer) go through its head. Each row's output equals its
member's `StitchableModel.export(i)` run alone (float32 rounding apart).

Anchors whose blocks take extra inputs (`Anchor.block_kwargs`: decoders' masks, positions and rotary
embeddings) are served for prefill: per-row extra inputs (`attention_mask`, `position_ids` of shape (batch,
...)) are laid out in each anchor's buffer order beside the rows, and every block slice gets the keyword
arguments its anchor builds for exactly the rows in it (a row's attention never reaches another row, so
cutting a batch into slices changes nothing). Decoder inputs are token ids (batch, tokens), every row of a
batch the same length (pad, and give `attention_mask`); the outputs are the logits of every position.
"""
from __future__ import annotations

import contextvars
import copy
import json
import math
import operator
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import esta_kernels
from esta.anchors import Anchor, HFCausalLMAnchor, TimmViTAnchor, run_block
from esta.model import StitchableModel
from esta.nn.stitched_linear import StitchedLinear

__all__ = ["Palette", "PaletteMember", "Route", "RowBiasLinear", "PaletteError", "UnknownMemberError",
           "BudgetError"]


class PaletteError(ValueError):
    """A request the palette cannot serve (the message says why)."""


class UnknownMemberError(PaletteError):
    """A member id the palette does not serve."""


class BudgetError(PaletteError):
    """A budget no deployed member meets (or a budget that is not a positive finite number)."""


# The per-row stitch-bias ids of the block being run; read by its RowBiasLinears. A context variable, so
# that concurrent forwards in different threads never see each other's ids.
_BLOCK_IDS: contextvars.ContextVar = contextvars.ContextVar("esta_palette_block_ids", default=None)


class RowBiasLinear(nn.Module):
    """y = x @ weight.T + bias + table[ids]: a merged linear that keeps one bias row per served member.

    `ids` is an int (every row the same bias row, -1: none) or a 1-D integer tensor with one id per batch
    row (dim 0 of x), broadcast over x's other leading dimensions. Without a table it is a plain linear."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], table: Optional[Tensor], backend: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.table = None if table is None else nn.Parameter(table, requires_grad=False)
        self.backend = backend

    @classmethod
    @torch.no_grad()
    def from_stitched(cls, layer: StitchedLinear, rows: Sequence[int]) -> "RowBiasLinear":
        """`layer` with its LoRA merged (as `StitchedLinear.merged` merges it) and the stitch-bias rows `rows`
        of its table, in that order (none: no table)."""
        merged = layer.merged(None)
        table = None
        if layer.stitch_bias is not None and len(rows) > 0:
            table = layer.stitch_bias.detach()[torch.as_tensor(list(rows), device=layer.stitch_bias.device)].clone()
        # merged(None) may hand back the layer's own bias tensor: the palette keeps its own copy
        bias = None if merged.bias is None else merged.bias.detach().clone()
        return cls(merged.weight.detach(), bias, table, backend=layer.backend)

    @property
    def num_rows(self) -> int:
        return 0 if self.table is None else self.table.shape[0]

    def forward(self, x: Tensor, ids: Union[int, Tensor, "_RowIds", None] = None) -> Tensor:
        if self.table is None:
            return F.linear(x, self.weight, self.bias)
        if ids is None:
            ids = _BLOCK_IDS.get()
        if ids is None:
            raise RuntimeError("RowBiasLinear: no stitch-bias ids (the Palette sets them for every block it runs)")
        if isinstance(ids, _RowIds):
            ids = ids.value if not isinstance(ids.value, Tensor) else ids.expanded(x)
        elif isinstance(ids, Tensor):
            ids = _RowIds(ids).expanded(x)
        if not isinstance(ids, Tensor):
            # every row takes the same bias row: nothing to select, so it is folded into the bias, as the
            # export folds it, and the layer is a plain linear
            return F.linear(x, self.weight, self._row_bias(ids))
        return esta_kernels.stitched_linear(x, self.weight, self.bias, None, None, self.table, ids,
                                            backend=self.backend)

    def _row_bias(self, row: int) -> Optional[Tensor]:
        """bias + table[row], added in float32 (float64 for float64 weights) as `StitchedLinear.merged` adds
        them for an export."""
        if row < 0:
            return self.bias
        dtype = self.weight.dtype
        if dtype in (torch.float32, torch.float64) and self.table.dtype == dtype:
            return self.table[row] if self.bias is None else self.bias + self.table[row]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        bias = self.table[row].to(acc)
        if self.bias is not None:
            bias = self.bias.to(acc) + bias
        return bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.num_rows}"


class _RowIds:
    """Per-row stitch-bias ids of one block call: an int (all rows alike) or one id per batch row, expanded
    once per activation shape, so the block's linears share one ids tensor (whose flat copy and range
    check the op then makes once)."""

    __slots__ = ("value", "_expanded")

    def __init__(self, value: Union[int, Tensor]) -> None:
        self.value = value
        self._expanded: Dict[Tuple[int, ...], Tensor] = {}

    def expanded(self, x: Tensor) -> Tensor:
        shape = tuple(x.shape[:-1])
        hit = self._expanded.get(shape)
        if hit is None:
            ids = self.value
            if ids.dim() != 1 or x.dim() < 2 or ids.shape[0] != x.shape[0]:
                raise ValueError(f"RowBiasLinear: ids must hold one id per batch row ({x.shape[0]}), got shape "
                                 f"{tuple(ids.shape)}")
            # materialized as a normal (not inference-mode) tensor: the op keeps a memo keyed on the ids
            # tensor's version counter, which inference tensors lack
            with torch.inference_mode(False):
                hit = ids.clone() if x.dim() == 2 else \
                    ids.reshape((-1,) + (1,) * (x.dim() - 2)).expand(shape).contiguous()
            self._expanded[shape] = hit
        return hit


class _Dropped(nn.Module):
    """Stands for a block no served member runs (its weights are not kept)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("Palette: this block was dropped because no served member runs it")


@dataclass(frozen=True)
class PaletteMember:
    """One served member: its path, FLOPs (multiply-adds per example), accuracy and deployment flag."""

    id: int
    front: int
    end: int
    front_block: Optional[int]
    end_block: Optional[int]
    pair: Optional[int]
    layer: Optional[int]
    flops: Optional[float]
    accuracy: Optional[float]
    deployed: bool

    @property
    def is_anchor(self) -> bool:
        return self.pair is None

    @property
    def mflops(self) -> Optional[float]:
        return None if self.flops is None else self.flops / 1e6


@dataclass(frozen=True)
class Route:
    """Which member a request runs on and why. `within_budget` is False only for a fallback pick."""

    member: int
    by: str                      # "member", "mflops" or "latency_ms"
    budget: Optional[float]
    cost: Optional[float]        # the member's MFLOPs or measured latency (ms), in the budget's unit
    within_budget: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def _passes(info, a: int, b: int) -> bool:
    """Whether member `info` runs block b of anchor a (the rule of esta.pst)."""
    if info.is_anchor:
        return info.front == a
    return (info.front == a and info.front_block >= b) or (info.end == a and info.end_block <= b)


def _int_list(values, what: str) -> List[int]:
    if isinstance(values, Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"Palette: {what} must be integers, got a {values.dtype} tensor")
        if values.dim() != 1:
            raise ValueError(f"Palette: {what} must be 1-D, got shape {tuple(values.shape)}")
        return [int(v) for v in values.tolist()]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"Palette: {what} must be a sequence of ints, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool):
            raise TypeError(f"Palette: {what} must be ints, got a bool")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"Palette: {what} must be ints, got {type(v).__name__}") from None
    return out


def _param_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() if t.numel() else 0
    return total


def anchor_own_bytes(anchor: Anchor) -> int:
    """Bytes of an anchor's own parameters: its frozen weights, norms, embedding and head, without the PST
    adapters (LoRA factors and stitch-bias tables) that training added."""
    adapters = set()
    for mod in anchor.modules():
        if isinstance(mod, StitchedLinear):
            adapters |= {id(p) for p in (mod.lora_a, mod.lora_b, mod.stitch_bias) if p is not None}
    return _param_bytes(p for p in anchor.parameters() if id(p) not in adapters)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    return _param_bytes(list(module.parameters()) + list(module.buffers()))


class Palette(nn.Module):
    """The served members of a `StitchableModel` from one set of weights (see the module docstring).

    Args:
        model: a StitchableModel (PST-converted or not); it is not changed, and not needed afterwards.
        members: global ids to serve (default: `deployed`, or every member when that is None too).
        deployed: the deployed members (the ones budget routing chooses from); default: every served member.
        flops: {id: multiply-adds per example}; default: `model.flops` on one example of `example_shape`.
        accuracy: {id: measured accuracy} where known.
        example_shape: the shape of one input example (default: from timm ViT anchors, (C, H, W)).
    """

    def __init__(self, model: StitchableModel, members: Optional[Sequence[int]] = None, *,
                 deployed: Optional[Sequence[int]] = None, flops: Optional[Dict[int, float]] = None,
                 accuracy: Optional[Dict[int, Optional[float]]] = None,
                 example_shape: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if not isinstance(model, StitchableModel):
            raise TypeError(f"Palette: expected an esta.StitchableModel, got {type(model).__name__}")
        size = len(model)
        deployed_ids = None if deployed is None else sorted(set(_int_list(deployed, "deployed")))
        if members is None:
            members = deployed_ids if deployed_ids is not None else range(size)
        served = sorted(set(_int_list(members, "members")))
        if not served:
            raise ValueError("Palette: no member to serve")
        for m in served + (deployed_ids or []):
            if not 0 <= m < size:
                raise UnknownMemberError(f"Palette: member {m} is outside the model's palette [0, {size})")
        infos = {m: model.stitches[m] for m in served}
        for info in infos.values():
            if not info.is_anchor and info.front >= info.end:
                raise NotImplementedError(f"Palette: stitch {info.id} runs anchor {info.front} before anchor "
                                          f"{info.end}; anchors are run in ascending order")

        # the example shape and FLOPs
        if example_shape is None:
            example_shape = _example_shape(model.anchors[infos[served[0]].front])
        self.example_shape = None if example_shape is None else tuple(int(s) for s in example_shape)
        if flops is None:
            flops = ({} if self.example_shape is None else
                     {m: float(model.flops(m, (1,) + self.example_shape)) for m in served})
        accuracy = dict(accuracy or {})
        deployed_set = set(served) if deployed_ids is None else set(deployed_ids)
        self.members: Dict[int, PaletteMember] = {
            m: PaletteMember(id=m, front=i.front, end=i.end, front_block=i.front_block, end_block=i.end_block,
                             pair=i.pair, layer=i.layer, flops=None if flops.get(m) is None else float(flops[m]),
                             accuracy=None if accuracy.get(m) is None else float(accuracy[m]),
                             deployed=m in deployed_set)
            for m, i in infos.items()}
        self.latency_ms: Dict[int, float] = {}
        self.source_anchor_bytes = sum(anchor_own_bytes(a) for a in model.anchors)

        # anchors: one merged copy each, blocks no served member runs dropped
        used = sorted({i.front for i in infos.values()} | {i.end for i in infos.values()})
        self.used_anchor_bytes = sum(anchor_own_bytes(model.anchors[a]) for a in used)
        self.anchors = nn.ModuleDict()
        self._block_rows: Dict[Tuple[int, int], Dict[int, int]] = {}
        for a in used:
            anchor = _copy_anchor(model.anchors[a])
            for b in range(anchor.depth):
                through = [m for m in served if _passes(infos[m], a, b)]
                if not through:
                    anchor.blocks[b] = _Dropped()
                    continue
                original = {m: (-1 if model.pst is None else model.pst.row(m, a, b)) for m in through}
                kept = sorted({r for r in original.values() if r >= 0})
                self._block_rows[(a, b)] = {m: (kept.index(r) if r >= 0 else -1) for m, r in original.items()}
                anchor.blocks[b] = _merge_block(anchor.blocks[b], kept)
            self.anchors[str(a)] = anchor

        # stitching layers: one merged copy each, with the served stitches' bias rows
        self.stitching = nn.ModuleDict()
        self._stitch_rows: Dict[int, int] = {}
        groups: Dict[Tuple[int, int], List[int]] = {}
        for m, i in infos.items():
            if not i.is_anchor:
                groups.setdefault((i.pair, i.layer), []).append(m)
        for (p, l), ms in sorted(groups.items()):
            layer = model.stitching_layers[p][l]
            if layer.num_stitches > 0:
                kept = sorted({infos[m].local_id for m in ms})
                rows = {m: kept.index(infos[m].local_id) for m in ms}
            else:
                kept, rows = [], {m: -1 for m in ms}
            self.stitching[f"{p}_{l}"] = RowBiasLinear.from_stitched(layer, kept)
            self._stitch_rows.update(rows)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

        # the forward's static plan: per anchor, who enters (by entry block descending) and who leaves
        # (by exit block descending); ties by id, so the layout of a batch is deterministic
        self._order = used
        self._entering = {a: sorted((m for m, i in infos.items() if not i.is_anchor and i.end == a),
                                    key=lambda m: (-infos[m].end_block, m)) for a in used}
        self._leaving = {a: sorted((m for m, i in infos.items() if not i.is_anchor and i.front == a),
                                   key=lambda m: (-infos[m].front_block, m)) for a in used}
        self.dtype = next(self.parameters()).dtype
        # token-id inputs (decoders) or float inputs in the palette's dtype (images)
        self.token_inputs = isinstance(model.anchors[0], HFCausalLMAnchor)

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_run(cls, run: str, members: Union[str, Sequence[int]] = "deployed", *, device=None,
                 log=print) -> "Palette":
        """A palette of a trained run directory: `members` "deployed" (the report's deployed members), "all",
        or a list of ids. FLOPs, accuracy and the deployed flags come from the run's report.json when it has
        one. The training data is not opened (`esta.runs.restore_model`)."""
        from esta.runs import RunError, restore_model

        report = None
        path = os.path.join(run, "report.json")
        if os.path.isfile(path):
            with open(path) as f:
                report = json.load(f)
        if members == "deployed" and report is None:
            raise RunError(f"{run} has no report.json, so no deployed members; deploy it (`esta deploy --run "
                           f"{run}`) or serve every member (members='all')")
        _, model = restore_model(run, device=device, log=log)
        deployed = flops = accuracy = None
        if report is not None:
            deployed = [r["deployed"] for r in report["deployed"]]
            flops = {m["id"]: m["flops"] for m in report["members"]}
            accuracy = {m["id"]: m["accuracy"] for m in report["members"]}
            if len(report["members"]) != len(model):
                raise RunError(f"{path} describes {len(report['members'])} members but the run's model has "
                               f"{len(model)}; deploy the run again")
        if members == "deployed":
            chosen = deployed
        elif members == "all":
            chosen = list(range(len(model)))
        elif isinstance(members, str):
            raise ValueError(f"Palette.from_run: members must be 'deployed', 'all' or a list of ids, got {members!r}")
        else:
            chosen = members
        palette = cls(model, chosen, deployed=deployed, flops=flops, accuracy=accuracy)
        palette.run = run
        return palette

    # ------------------------------------------------------------------------------------ facts
    @property
    def served(self) -> List[int]:
        return sorted(self.members)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def resident_bytes(self) -> int:
        """Bytes of everything the palette holds: merged anchors, stitching layers, bias tables."""
        return module_bytes(self)

    def describe(self) -> List[dict]:
        """One dict per served member (what `esta serve` lists at /palette)."""
        out = []
        for m in self.served:
            info = self.members[m]
            out.append({"id": m, "kind": "anchor" if info.is_anchor else "stitch", "front": info.front,
                        "front_block": info.front_block, "end": info.end, "end_block": info.end_block,
                        "mflops": info.mflops, "accuracy": info.accuracy, "deployed": info.deployed,
                        "latency_ms": self.latency_ms.get(m)})
        return out

    # ------------------------------------------------------------------------------------ checks
    def check_members(self, members, rows: Optional[int] = None) -> List[int]:
        """The member ids as a list of ints (one int stands for every row), each one served."""
        if isinstance(members, int) and not isinstance(members, bool):
            if rows is None:
                raise ValueError("Palette: one int member needs the number of rows")
            members = [members] * rows
        ids = _int_list(members, "members")
        if rows is not None and len(ids) != rows:
            raise ValueError(f"Palette: got {len(ids)} member ids for {rows} input rows (one id per row)")
        for m in ids:
            if m not in self.members:
                raise UnknownMemberError(f"member {m} is not served by this palette (served: {self.served})")
        return ids

    def check_inputs(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"Palette: inputs must be a tensor, got {type(inputs).__name__}")
        if not self.token_inputs and inputs.dtype != self.dtype:
            raise TypeError(f"Palette: inputs must be {self.dtype} (the palette's dtype), got {inputs.dtype}")
        if inputs.device != self.device:
            raise ValueError(f"Palette: inputs are on {inputs.device} but the palette is on {self.device}")
        if inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ValueError(f"Palette: inputs must hold at least one row, got shape {tuple(inputs.shape)}")
        if self.example_shape is not None and tuple(inputs.shape[1:]) != self.example_shape:
            raise ValueError(f"Palette: each input row must have shape {self.example_shape}, got "
                             f"{tuple(inputs.shape[1:])} (inputs {tuple(inputs.shape)})")
        next(iter(self.anchors.values())).check_input(inputs, "Palette")

    # ------------------------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, inputs: Tensor, members, **extra) -> Tensor:
        """Outputs of a mixed batch: row r runs member members[r] (an int: every row). `extra`: the anchors'
        extra inputs (decoders: `attention_mask`, `position_ids`); a tensor whose first dimension is the
        batch is cut per row, anything else is given to every block as it is. Runs under
        `torch.inference_mode`: the outputs are inference tensors (no autograd)."""
        self.check_inputs(inputs)
        ids = self.check_members(members, inputs.shape[0])
        for name, value in extra.items():
            if isinstance(value, Tensor) and value.device != inputs.device:
                raise ValueError(f"Palette: {name} is on {value.device} but the inputs are on {inputs.device}")
        groups: Dict[int, List[int]] = {}
        for r, m in enumerate(ids):
            groups.setdefault(m, []).append(r)
        return self._run(inputs, groups, extra)

    def _run(self, inputs: Tensor, groups: Dict[int, List[int]], extra: Optional[Dict[str, object]] = None) -> Tensor:
        extra = extra or {}
        dev, batch = inputs.device, inputs.shape[0]
        count = {m: len(rows) for m, rows in groups.items()}
        # the layout of every anchor's buffer (see the module docstring)
        plan = {}
        for a in self._order:
            entering = [m for m in self._entering[a] if m in groups]
            own = [a] if a in groups else []
            leaving = [m for m in self._leaving[a] if m in groups]
            if entering or own or leaving:
                offset, n = {}, 0
                for m in entering + own + leaving:
                    offset[m] = n
                    n += count[m]
                plan[a] = (entering, own, leaving, offset, n)
        buffers: Dict[int, Tensor] = {}
        # per-row extra inputs in each anchor's buffer order (rows of `inputs` in the order of its plan)
        per_row = {k: v for k, v in extra.items() if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch}
        shared = {k: v for k, v in extra.items() if k not in per_row}
        out = None
        token = _BLOCK_IDS.set(None)
        try:
            for a, (entering, own, leaving, offset, size) in plan.items():
                anchor = self.anchors[str(a)]
                n_enter = sum(count[m] for m in entering)
                if own or leaving:
                    tokens = anchor.embed(_rows(inputs, [r for m in own + leaving for r in groups[m]], dev))
                    if a not in buffers:
                        buffers[a] = tokens.new_empty((size,) + tuple(tokens.shape[1:]))
                    buffers[a][n_enter:] = tokens
                buf = buffers[a]
                kwargs_of, rows_extra, rows_in = None, {}, None
                if extra or type(anchor).block_kwargs is not Anchor.block_kwargs:
                    # the rows' inputs and per-row extra inputs in this buffer's order
                    order = torch.tensor([r for m in entering + own + leaving for r in groups[m]], device=dev)
                    rows_extra = {k: v.index_select(0, order) for k, v in per_row.items()}
                    rows_in = inputs.index_select(0, order)
                if type(anchor).block_kwargs is not Anchor.block_kwargs:
                    built: Dict[Tuple[int, int], Dict[str, object]] = {}  # one build per distinct slice

                    def kwargs_of(lo, hi, anchor=anchor, rows_extra=rows_extra, rows_in=rows_in, buf=buf, built=built):
                        if (lo, hi) not in built:
                            sliced = {k: v[lo:hi] for k, v in rows_extra.items()}
                            built[(lo, hi)] = anchor.block_kwargs(rows_in[lo:hi], buf[lo:hi], **shared, **sliced)
                        return built[(lo, hi)]
                for b, block in enumerate(anchor.blocks):
                    active = ([m for m in entering if self.members[m].end_block <= b] + own +
                              [m for m in leaving if self.members[m].front_block >= b])
                    if not active:
                        continue
                    lo, hi = offset[active[0]], offset[active[-1]] + count[active[-1]]
                    _BLOCK_IDS.set(_RowIds(_row_ids(self._block_rows[(a, b)], active, count, dev)))
                    if kwargs_of is None:
                        buf[lo:hi] = block(buf[lo:hi])
                    else:
                        buf[lo:hi] = run_block(block, buf[lo:hi], kwargs_of(lo, hi))
                _BLOCK_IDS.set(None)
                # leave through the stitching layers, each layer once over its rows
                layers: Dict[str, List[int]] = {}
                for m in leaving:
                    layers.setdefault(f"{self.members[m].pair}_{self.members[m].layer}", []).append(m)
                for key, ms in layers.items():
                    x = torch.cat([buf[offset[m]: offset[m] + count[m]] for m in ms]) if len(ms) > 1 else \
                        buf[offset[ms[0]]: offset[ms[0]] + count[ms[0]]]
                    y = self.stitching[key](x, _row_ids(self._stitch_rows, ms, count, dev))
                    k = 0
                    for m in ms:
                        end = self.members[m].end
                        if end not in buffers:
                            buffers[end] = y.new_empty((plan[end][4],) + tuple(y.shape[1:]))
                        start = plan[end][3][m]
                        buffers[end][start: start + count[m]] = y[k: k + count[m]]
                        k += count[m]
                # the rows whose path ends here: the entering ones and the anchor's own, a prefix
                n_head = n_enter + (count[a] if own else 0)
                if n_head:
                    logits = anchor.head(buf[:n_head], **shared, **{k: v[:n_head] for k, v in rows_extra.items()})
                    if out is None:
                        out = logits.new_empty((batch,) + tuple(logits.shape[1:]))
                    elif logits.shape[1:] != out.shape[1:]:
                        raise RuntimeError(f"Palette: anchor {a}'s head gives outputs of shape "
                                           f"{tuple(logits.shape[1:])}, another anchor's {tuple(out.shape[1:])}")
                    rows = [r for m in entering + own for r in groups[m]]
                    out.index_copy_(0, torch.tensor(rows, device=dev), logits)
                del buffers[a]
        finally:
            _BLOCK_IDS.reset(token)
        return out

    # ------------------------------------------------------------------------------------ latency
    @torch.no_grad()
    def measure_latency(self, *, repeats: int = 7, warmup: int = 2) -> Dict[int, float]:
        """Measures each served member's latency here: the median wall time of one example alone through
        the palette, in milliseconds (kept in `latency_ms`, used by latency budgets)."""
        if self.example_shape is None:
            raise ValueError("Palette.measure_latency: the palette does not know its example shape (example_shape=)")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"Palette.measure_latency: repeats must be an int >= 1, got {repeats!r}")
        x = torch.zeros((1,) + self.example_shape, dtype=self.dtype, device=self.device)
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        times: Dict[int, List[float]] = {m: [] for m in self.served}
        for i in range(warmup + repeats):  # members take turns, so a passing load hits them alike
            for m in self.served:
                sync()
                t0 = time.perf_counter()
                self(x, [m])
                sync()
                if i >= warmup:
                    times[m].append((time.perf_counter() - t0) * 1e3)
        self.latency_ms = {m: statistics.median(v) for m, v in times.items()}
        return dict(self.latency_ms)

    # ------------------------------------------------------------------------------------ routing
    def route(self, member: Optional[int] = None, *, mflops: Optional[float] = None,
              latency_ms: Optional[float] = None, fallback: str = "error") -> Route:
        """The member a request runs on: `member` itself, or, for a budget (`mflops` per example, or
        `latency_ms` measured by `measure_latency`), the most accurate deployed member within it (ties: the
        cheaper; without measured accuracies: the most expensive within budget, the usual proxy).
        When no deployed member is within the budget, `fallback="error"` raises BudgetError and
        `fallback="cheapest"` picks the cheapest deployed member, saying so (`within_budget=False`)."""
        given = [k for k, v in (("member", member), ("mflops", mflops), ("latency_ms", latency_ms)) if v is not None]
        if len(given) != 1:
            raise PaletteError("give exactly one of member, mflops or latency_ms" +
                               (f" (got {', '.join(given)})" if given else ""))
        if fallback not in ("error", "cheapest"):
            raise ValueError(f"Palette.route: fallback must be 'error' or 'cheapest', got {fallback!r}")
        if member is not None:
            (m,) = self.check_members([member])
            return Route(member=m, by="member", budget=None, cost=None, within_budget=True, reason="requested")
        by = given[0]
        budget = mflops if by == "mflops" else latency_ms
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
            raise BudgetError(f"{by} budget must be a positive finite number, got {budget!r}")
        candidates = [m for m in self.served if self.members[m].deployed]
        if by == "mflops":
            cost = {m: self.members[m].mflops for m in candidates}
            if any(c is None for c in cost.values()):
                raise BudgetError("the palette has no FLOPs for its members, so it cannot route by MFLOPs")
            unit = "MFLOPs"
        else:
            if any(m not in self.latency_ms for m in candidates):
                raise BudgetError("latencies were not measured on this machine (Palette.measure_latency), so "
                                  "the palette cannot route by latency")
            cost = {m: self.latency_ms[m] for m in candidates}
            unit = "ms"
        if not candidates:
            raise BudgetError("no deployed member is served, so there is nothing to route a budget to")
        within = [m for m in candidates if cost[m] <= budget]
        cheapest = min(candidates, key=lambda m: (cost[m], m))
        if not within:
            if fallback == "error":
                raise BudgetError(f"budget {budget:g} {unit} is below the cheapest deployed member (#{cheapest}, "
                                  f"{cost[cheapest]:.4g} {unit})")
            return Route(member=cheapest, by=by, budget=float(budget), cost=cost[cheapest], within_budget=False,
                         reason=f"no deployed member within {budget:g} {unit}; the cheapest deployed member")
        known = [m for m in within if self.members[m].accuracy is not None]
        if known:
            pick = max(known, key=lambda m: (self.members[m].accuracy, -cost[m], -m))
            reason = (f"the most accurate deployed member within {budget:g} {unit} "
                      f"({100 * self.members[pick].accuracy:.2f}%)")
        else:
            pick = max(within, key=lambda m: (cost[m], -m))
            reason = f"no measured accuracies: the most expensive deployed member within {budget:g} {unit}"
        return Route(member=pick, by=by, budget=float(budget), cost=cost[pick], within_budget=True, reason=reason)


# ---------------------------------------------------------------------------------------- helpers
def _rows(inputs: Tensor, rows: List[int], dev) -> Tensor:
    if rows == list(range(inputs.shape[0])):
        return inputs
    return inputs.index_select(0, torch.tensor(rows, device=dev))


def _row_ids(table: Dict[int, int], members: List[int], count: Dict[int, int], dev) -> Union[int, Tensor]:
    """The stitch-bias rows of `members`' rows in order: an int when they are all one row."""
    rows = [table[m] for m in members]
    if all(r == rows[0] for r in rows):
        return rows[0]
    return torch.tensor([r for r, m in zip(rows, members) for _ in range(count[m])], dtype=torch.int64, device=dev)


def _example_shape(anchor: Anchor) -> Optional[Tuple[int, ...]]:
    if isinstance(anchor, TimmViTAnchor):
        patch = anchor.model.patch_embed
        proj = getattr(patch, "proj", None)
        size = getattr(patch, "img_size", None)
        if isinstance(proj, nn.Conv2d) and size is not None and not getattr(anchor.model, "dynamic_img_size", False):
            return (proj.in_channels,) + tuple(int(s) for s in size)
    return None


def _copy_anchor(anchor: Anchor) -> Anchor:
    copied = copy.deepcopy(anchor)
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied.eval()


def _merge_block(module: nn.Module, rows: List[int]) -> nn.Module:
    """`module` with every StitchedLinear in it (itself included) replaced by its RowBiasLinear with the
    stitch-bias rows `rows`."""
    if isinstance(module, StitchedLinear):
        return RowBiasLinear.from_stitched(module, rows if module.num_stitches > 0 else [])
    for name, child in list(module.named_children()):
        merged = _merge_block(child, rows)
        if merged is not child:
            setattr(module, name, merged)
    return module
