"""Least-squares init of every stitching layer of a `StitchableModel`, in one pass over calibration data.

    report = model.init_stitching_layers(images)                 # 100 images by default, as in SN-Net
    report = model.init_stitching_layers(loader, num_images=500)  # any iterable of batches

What is solved. Position (j, k) of a pair maps the output of front block j to the input of end block k
(for k = 0 the embedding output, which is the input of block 0). SN-Net solves one least-squares problem
per position and averages the solutions of the positions that share a layer. Here a layer shared by the
positions P gets ONE joint problem over all their (input, target) row pairs,

    min over [W, b] of  sum over (j, k) in P of || [H_j, 1] [W, b]^T - T_k ||^2,

whose normal equations are the sums of the positions' Gram and cross matrices: every position's rows
stream into the layer's `esta_kernels.StreamingLstsq`. The joint solution minimizes the very residual that
the averaged one is a feasible point of, so it is never worse on the calibration data (`mode="average"`
gives SN-Net's rule, for comparison).

One pass. Every calibration batch runs each anchor once, from the largest to the smallest (a pair's end
anchor is larger than its front, so ends run first). Forward pre-hooks on the end anchor's blocks keep the
block inputs that are targets; forward hooks on the front anchor's blocks feed each block output, the moment
it is produced, to the accumulators of every position it starts, together with the kept targets. Targets
are dropped as soon as the last front anchor that needs them has run, so nothing outlives its batch; the
state kept across batches is the accumulators, O(in * (in + out)) float64 per layer.

Calibration data: a tensor of inputs (split into batches of `batch_size`), or an iterable of batches, each a
tensor or a tuple/list whose first item is the input tensor (labels are ignored), e.g. a DataLoader. The
first `num_images` samples are used (all of them with num_images=None).

Token batches (decoder anchors). A batch may also be a mapping with "input_ids" and, optionally,
"attention_mask" (what a Hugging Face tokenizer returns; `data` itself may be one such mapping, split into
batches of `batch_size`). The mask goes to the anchors with position ids counted over the real tokens (as
generation does, so left padding does not shift positions), and padded positions are left out of the
statistics: padding never changes the solution. Batches may differ in length.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from esta.hf import mask_positions
from esta_kernels.lstsq import StreamingLstsq

__all__ = ["init_stitching_layers", "LayerInitReport", "calibration_batches"]


@dataclass
class LayerInitReport:
    """What the init did for one stitching layer."""

    pair: int
    layer: int
    positions: List[Tuple[int, int]]
    tokens: int  # rows accumulated (over all positions)
    mode: str
    extra: Dict[str, object] = field(default_factory=dict)


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"init_stitching_layers: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"init_stitching_layers: {name} must be at least {minimum}, got {value}")
    return value


def _token_batch(batch: Mapping, where: str) -> Tuple[Tensor, Optional[Tensor]]:
    if "input_ids" not in batch:
        raise ValueError(f"{where}: a mapping batch needs 'input_ids' (and optionally 'attention_mask'), got keys "
                         f"{sorted(batch)}")
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if not isinstance(ids, Tensor) or (mask is not None and not isinstance(mask, Tensor)):
        raise TypeError(f"{where}: input_ids and attention_mask must be tensors")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"{where}: attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; "
                         f"they must be equal")
    return ids, mask


def calibration_batches(data, num_images: Optional[int], batch_size: int):
    """Yields (index, inputs, attention_mask or None) holding at most `num_images` samples in all (see the
    module docstring)."""
    if isinstance(data, Tensor):
        if data.dim() < 1 or data.shape[0] == 0:
            raise ValueError(f"init_stitching_layers: the calibration tensor holds no sample (shape {tuple(data.shape)})")
        source: Iterable = data.split(batch_size)
    elif isinstance(data, Mapping):
        ids, mask = _token_batch(data, "init_stitching_layers: data")
        if ids.dim() < 1 or ids.shape[0] == 0:
            raise ValueError(f"init_stitching_layers: data['input_ids'] holds no sample (shape {tuple(ids.shape)})")
        source = ({"input_ids": i, "attention_mask": m} for i, m in
                  zip(ids.split(batch_size), mask.split(batch_size) if mask is not None else [None] * len(ids)))
    elif isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"init_stitching_layers: data must be a tensor or an iterable of batches, got {type(data).__name__}")
    else:
        source = data
    seen = 0
    for index, batch in enumerate(source):
        mask = None
        if isinstance(batch, Mapping):
            batch, mask = _token_batch(batch, f"init_stitching_layers: calibration batch {index}")
        elif isinstance(batch, (tuple, list)):
            if len(batch) == 0:
                raise ValueError(f"init_stitching_layers: calibration batch {index} is an empty {type(batch).__name__}")
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"init_stitching_layers: calibration batch {index} must be a tensor, a tuple/list "
                            f"starting with one or a mapping with 'input_ids', got {type(batch).__name__}")
        if batch.dim() < 1:
            raise ValueError(f"init_stitching_layers: calibration batch {index} must have a batch dimension, "
                             f"got a 0-d tensor")
        if num_images is not None:
            batch = batch[: num_images - seen]
            mask = None if mask is None else mask[: batch.shape[0]]
        if batch.shape[0] == 0:
            continue
        yield index, batch, mask
        seen += batch.shape[0]
        if num_images is not None and seen >= num_images:
            return


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def init_stitching_layers(model, data, *, num_images: Optional[int] = 100, batch_size: int = 32,
                          ridge: Optional[float] = None, mode: str = "joint",
                          backend: str = "auto") -> List[LayerInitReport]:
    """Replaces the frozen weight and bias of every stitching layer of `model` by least squares.

    Args:
        model: an `esta.StitchableModel`.
        data: calibration inputs (module docstring).
        num_images: how many samples to use (None: all); 100 by default, as SN-Net does.
        batch_size: batch size when `data` is one tensor.
        ridge: passed to `StreamingLstsq.solve` (None: the rounding-level ridge with minimum-norm fallback).
        mode: "joint" (one least-squares problem per layer over all its positions) or "average" (SN-Net: one
            solution per position, averaged over the positions of a layer).
        backend: of the fused accumulation op.

    Only each layer's frozen `weight` and `bias` change (in place, cast to their dtype); the LoRA and the
    stitch biases are left as they are. Returns one `LayerInitReport` per stitching layer.
    """
    num_images = _check_int("num_images", num_images, 1, allow_none=True)
    batch_size = _check_int("batch_size", batch_size, 1)
    if mode not in ("joint", "average"):
        raise ValueError(f"init_stitching_layers: mode must be 'joint' or 'average', got {mode!r}")
    anchors = model.anchors
    n = len(anchors)
    if not model.pairs:
        return []

    # The accumulators: joint: one per (pair, layer); average: one per (pair, position).
    solvers: Dict[Tuple, StreamingLstsq] = {}
    # front anchor -> block j -> [(end anchor, k, solver key)]
    feeds: Dict[int, Dict[int, List[Tuple[int, int, Tuple]]]] = {a: {} for a in range(n)}
    targets_needed: Dict[int, set] = {a: set() for a in range(n)}  # end anchor -> block ids k
    last_user: Dict[int, int] = {}  # end anchor -> the smallest front anchor that reads its targets
    layer_positions: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for info in model.stitches:
        if info.is_anchor:
            continue
        layer = model.stitching_layers[info.pair][info.layer]
        key = (info.pair, info.layer) if mode == "joint" else (info.pair, info.layer, info.front_block, info.end_block)
        if key not in solvers:
            solvers[key] = StreamingLstsq(layer.in_features, layer.out_features, layer.bias is not None,
                                          backend=backend)
        feeds[info.front].setdefault(info.front_block, []).append((info.end, info.end_block, key))
        targets_needed[info.end].add(info.end_block)
        last_user[info.end] = min(last_user.get(info.end, n), info.front)
        layer_positions.setdefault((info.pair, info.layer), []).append((info.front_block, info.end_block))

    modes = [m.training for m in model.modules()]
    model.eval()  # no dropout, drop-path or batch-norm updates while collecting activations
    try:
        images, reference_shape = _collect(model, data, num_images, batch_size, targets_needed, feeds, last_user,
                                           solvers)
    finally:
        for m, training in zip(model.modules(), modes):
            m.training = training

    reports = []
    for (p, l), positions in layer_positions.items():
        layer = model.stitching_layers[p][l]
        if mode == "joint":
            solver = solvers[(p, l)]
            weight, bias = solver.solve(ridge)
            tokens = solver.num_tokens
        else:
            solutions = [solvers[(p, l, j, k)].solve(ridge) for j, k in positions]
            weight = torch.stack([w for w, _ in solutions]).mean(0)
            bias = None if solutions[0][1] is None else torch.stack([b for _, b in solutions]).mean(0)
            tokens = sum(solvers[(p, l, j, k)].num_tokens for j, k in positions)
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
        reports.append(LayerInitReport(pair=p, layer=l, positions=positions, tokens=tokens, mode=mode,
                                       extra={"images": images}))
    return reports


def _collect(model, data, num_images, batch_size, targets_needed, feeds, last_user, solvers):
    anchors = model.anchors
    n = len(anchors)
    reference_shape = None
    images = 0
    for index, x, mask in calibration_batches(data, num_images, batch_size):
        if reference_shape is None:
            reference_shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != reference_shape and x.dtype.is_floating_point:
            # token batches (integer ids) may differ in length; other inputs must agree
            raise ValueError(f"init_stitching_layers: calibration batch {index} has samples of shape "
                             f"{tuple(x.shape[1:])}, but the first batch's were {reference_shape}")
        for a in range(n):
            anchors[a].check_input(x, where=f"init_stitching_layers: calibration batch {index}")
        kept: Dict[int, Dict[int, Tensor]] = {}
        for a in reversed(range(n)):  # largest first: ends run before their fronts
            model._select_rows(a)  # after PST: each anchor runs with its own stitch-bias rows
            _run_with_hooks(anchors[a], a, x, mask, index, targets_needed[a], feeds[a], kept, solvers)
            for e in [e for e in kept if last_user.get(e) == a]:
                del kept[e]  # every front that reads these targets has run
        images += x.shape[0]
    if reference_shape is None:
        raise ValueError("init_stitching_layers: the calibration data holds no sample")
    return images, reference_shape


def _run_with_hooks(anchor, a: int, x: Tensor, mask: Optional[Tensor], index: int, needed: set, feeds: dict,
                    kept: dict, solvers: dict):
    handles = []
    keep_rows = None if mask is None else mask.to(device=anchor.device).bool()
    if needed:
        kept[a] = {}

        def keep(k):
            def hook(module, args, kwargs):
                tokens = args[0] if args else _first_tensor(next(iter(kwargs.values())))
                kept[a][k] = tokens.detach()
            return hook

        for k in needed:
            handles.append(anchor.blocks[k].register_forward_pre_hook(keep(k), with_kwargs=True))
    if feeds:
        def feed(j):
            def hook(module, args, output):
                h = _first_tensor(output).detach()
                for e, k, key in feeds[j]:
                    target = kept[e][k]
                    if h.shape[:-1] != target.shape[:-1]:
                        raise ValueError(
                            f"init_stitching_layers: calibration batch {index}: block {j} of anchor {a} gives "
                            f"tokens of shape {tuple(h.shape)}, but block {k} of anchor {e} takes "
                            f"{tuple(target.shape)}: the anchors' token layouts do not line up"
                        )
                    if keep_rows is not None:
                        if h.shape[:-1] != keep_rows.shape:
                            raise ValueError(
                                f"init_stitching_layers: calibration batch {index}: the attention mask has shape "
                                f"{tuple(keep_rows.shape)} but block {j} of anchor {a} gives tokens of shape "
                                f"{tuple(h.shape)}")
                        solvers[key].update(h[keep_rows], target[keep_rows])  # padded positions left out
                    else:
                        solvers[key].update(h, target)
            return hook

        for j in feeds:
            handles.append(anchor.blocks[j].register_forward_hook(feed(j)))
    try:
        inputs = x.to(device=anchor.device)
        dtype = anchor.dtype
        if inputs.dtype.is_floating_point and dtype is not None:
            inputs = inputs.to(dtype)
        if mask is None:
            anchor(inputs)
        else:
            mask_here = mask.to(device=anchor.device)
            anchor(inputs, attention_mask=mask_here, position_ids=mask_positions(mask_here))
    finally:
        for h in handles:
            h.remove()

