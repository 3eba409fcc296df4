"""PST (parameter-efficient stitch fine-tuning, paper section 4.1): which parameters a stitchable model trains.

    model.to_pst()                 # in place; returns the model, which keeps the PSTState in model.pst
    print(model.format_trainable_report())

What the conversion does:
  - Every anchor's attention linears (`Anchor.attention_linears`: qkv and proj for timm ViTs, q/k/v/o for
    decoder LMs) become
    `esta.nn.StitchedLinear` wrapping the same frozen weight and bias, with that anchor's LoRA rank and one
    stitch-bias row per palette member whose path runs through the layer. A member runs through block b of
    anchor a when it is anchor a itself, a stitch whose front is a with front_block >= b, or a stitch whose
    end is a with end_block <= b. The rows are numbered in global-id order; the global id -> local row table
    has -1 for the members that never run the layer. `StitchableModel` sets the rows of the chosen member
    when it switches stitches.
  - Stitching layers stay `StitchingLayer`s (LoRA rank in // 4, one bias row per position sharing the layer).
  - Everything else is frozen (embeddings, feed-forward layers, norms, the frozen weights and biases of the
    adapted linears) except the classifier of each anchor's head (`Anchor.classifier_parameters`), which
    is trained (decoder LMs have none: their embeddings, MLPs, norms and lm_head stay frozen).

LoRA ranks: `ranks=None` gives every anchor its family's rank where the anchor names one (`Anchor.pst_rank`:
16 for decoder LMs, the paper's LLaMA setting), else the ViT rule: rank 8 for the largest anchor, doubled for
each smaller anchor (the paper's 32/16/8 for ViT-Ti/S/B); either capped at the anchor's width. Pass an int for
every anchor or a sequence, one per anchor in the model's order (ascending size). `stitch_bias=False` builds the ablation without stitch-specific
biases (anchor linears and stitching layers then have none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

from torch import nn

from esta.nn.stitched_linear import StitchedLinear
from esta.nn.stitching import StitchingLayer

__all__ = ["PSTState", "to_pst", "default_ranks", "trainable_report", "format_trainable_report", "GROUPS"]


@dataclass
class PSTState:
    """What a PST conversion decided, held by the model as `model.pst`.

    ranks:       the attention LoRA rank of each anchor (model order).
    stitch_bias: whether the adapted linears and stitching layers have stitch-specific bias rows.
    tables:      tables[a][b][i] = the stitch-bias row member i uses in block b of anchor a (-1: none).
    layers:      layers[a][b] = the StitchedLinears of block b of anchor a, which share that table.
    """

    ranks: List[int]
    stitch_bias: bool
    tables: List[List[List[int]]]
    layers: List[List[List[StitchedLinear]]]

    def row(self, member: int, anchor: int, block: int) -> int:
        """The stitch-bias row of `member` in block `block` of anchor `anchor` (-1: none)."""
        return self.tables[anchor][block][member]

GROUPS = ("attention LoRA", "attention stitch bias", "stitching-layer LoRA", "stitching-layer stitch bias",
          "heads", "other")


def default_ranks(widths: Sequence[int]) -> List[int]:
    """8 for the largest anchor, doubled for each smaller one, capped at the width (at least 1)."""
    n = len(widths)
    return [max(1, min(int(w), 8 * 2 ** (n - 1 - a))) for a, w in enumerate(widths)]


def _resolve_ranks(ranks, anchors) -> List[int]:
    widths = [a.width for a in anchors]
    if ranks is None:
        family = [getattr(a, "pst_rank", None) for a in anchors]
        if all(r is not None for r in family):
            return [max(1, min(int(w), int(r))) for w, r in zip(widths, family)]
        return default_ranks(widths)
    if isinstance(ranks, bool):
        raise TypeError("to_pst: ranks must be None, an int or a sequence of ints, got bool")
    if isinstance(ranks, int):
        ranks = [ranks] * len(widths)
    ranks = list(ranks)
    if len(ranks) != len(widths):
        raise ValueError(f"to_pst: ranks must give one rank per anchor ({len(widths)}), got {len(ranks)}")
    for a, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"to_pst: ranks[{a}] must be an int >= 1, got {r!r}")
    return ranks


def _members_through(model, a: int, b: int) -> List[int]:
    """Global ids of the palette members that run block b of anchor a, ascending."""
    ids = []
    for info in model.stitches:
        if info.is_anchor:
            runs = info.front == a
        else:
            runs = (info.front == a and info.front_block >= b) or (info.end == a and info.end_block <= b)
        if runs:
            ids.append(info.id)
    return ids


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def to_pst(model, ranks: Union[None, int, Sequence[int]] = None, *, stitch_bias: bool = True,
           lora_alpha: Optional[float] = None, backend: str = "auto") -> PSTState:
    """Converts the modules of `model` (an `esta.StitchableModel`) to PST in place and returns the
    PSTState; `StitchableModel.to_pst` calls this and keeps the state (see the module docstring)."""
    if getattr(model, "pst", None) is not None:
        raise RuntimeError("to_pst: the model is already converted")
    if not isinstance(stitch_bias, bool):
        raise TypeError(f"to_pst: stitch_bias must be a bool, got {type(stitch_bias).__name__}")
    anchors = model.anchors
    ranks = _resolve_ranks(ranks, anchors)
    size = len(model.stitches)
    tables: List[List[List[int]]] = []  # [anchor][block] -> global id -> local row (-1: not through it)
    layers: List[List[List[StitchedLinear]]] = []
    # Check first, then change anything: a failure leaves the model as it was.
    found = []
    for a, anchor in enumerate(anchors):
        per_block = []
        for b in range(anchor.depth):
            linears = anchor.attention_linears(b)
            if not linears:
                raise ValueError(f"to_pst: block {b} of anchor {a} ({type(anchor).__name__}) has no attention "
                                 f"linear to adapt (see Anchor.attention_linears)")
            for name, mod in linears.items():
                if isinstance(mod, StitchedLinear):
                    raise TypeError(f"to_pst: {name} of block {b} of anchor {a} is already a StitchedLinear")
            per_block.append(linears)
        found.append(per_block)

    for a, anchor in enumerate(anchors):
        a_tables, a_layers = [], []
        for b, linears in enumerate(found[a]):
            members = _members_through(model, a, b)
            table = [-1] * size
            for row, gid in enumerate(members):
                table[gid] = row
            converted = []
            for name, linear in linears.items():
                new = StitchedLinear.from_linear(linear, rank=ranks[a], lora_alpha=lora_alpha, backend=backend,
                                                 num_stitches=len(members) if stitch_bias else 0)
                _set_submodule(anchor.blocks[b], name, new)
                converted.append(new)
            a_tables.append(table)
            a_layers.append(converted)
        tables.append(a_tables)
        layers.append(a_layers)

    if not stitch_bias:
        for group in model.stitching_layers:
            for i, layer in enumerate(group):
                replacement = StitchingLayer.from_frozen(layer.weight, layer.bias, num_stitches=0, rank=layer.rank,
                                                         lora_alpha=layer.lora_alpha, backend=layer.backend)
                replacement.lora_a.data.copy_(layer.lora_a.data)
                replacement.lora_b.data.copy_(layer.lora_b.data)
                group[i] = replacement

    # Freeze everything, then open the PST parameters.
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, StitchedLinear):
            for p in (mod.lora_a, mod.lora_b, mod.stitch_bias):
                if p is not None:
                    p.requires_grad_(True)
    for anchor in anchors:
        for p in anchor.classifier_parameters():
            p.requires_grad_(True)
    return PSTState(ranks=list(ranks), stitch_bias=stitch_bias, tables=tables, layers=layers)


def _param_groups(model) -> Dict[int, str]:
    """id(parameter) -> group name, for every PST-specific parameter."""
    groups: Dict[int, str] = {}
    stitching = {id(m) for group in model.stitching_layers for m in group}
    for mod in model.modules():
        if isinstance(mod, StitchedLinear):
            where = "stitching-layer" if id(mod) in stitching else "attention"
            for p in (mod.lora_a, mod.lora_b):
                groups[id(p)] = f"{where} LoRA"
            if mod.stitch_bias is not None:
                groups[id(mod.stitch_bias)] = f"{where} stitch bias"
    for anchor in model.anchors:
        for p in anchor.classifier_parameters():
            groups.setdefault(id(p), "heads")
    return groups


def trainable_report(model) -> Dict[str, int]:
    """Trainable parameters (requires_grad) by group, each tensor counted once, plus "total" and "frozen"."""
    groups = _param_groups(model)
    report = {g: 0 for g in GROUPS}
    frozen, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            report[groups.get(id(p), "other")] += p.numel()
        else:
            frozen += p.numel()
    report["total"] = sum(report[g] for g in GROUPS)
    report["frozen"] = frozen
    return report


def format_trainable_report(model) -> str:
    report = trainable_report(model)
    width = max(len(k) for k in report)
    lines = [f"{'group':<{width}}  {'parameters':>12}  {'M':>8}"]
    for key, value in report.items():
        lines.append(f"{key:<{width}}  {value:>12,}  {value / 1e6:>8.3f}")
    return "\n".join(lines)
