"""Task-specific stitch sampling (ESTA paper, section 4.2 and eq. (3)).

    sampler = TaskSpecificSampler(model.flops_table(shape), warmup_steps=..., seed=0)
    for batch in data:
        i = sampler.sample()                     # the same id on every rank (depends on seed + state only)
        loss = criterion(model(x, stitch=i), y)
        loss.backward()
        total, count = snip_score(params_of_stitch_i)        # from the gradients the step computed anyway
        sampler.update(i, all_reduce_score(total), count)    # EMA of the per-parameter SNIP score
        # or, relative: sampler.update(i, all_reduce_score(total), count, loss=all_reduce_score(loss.item()))
        # (all_reduce_score: esta.distributed; the value itself without torch.distributed)
        optimizer.step(); optimizer.zero_grad()
    deployed = sampler.deploy()                  # the top-score stitch of each FLOPs interval, no evaluation

Schedule. `sample()` counts its calls (`step`). While step < warmup_steps every member of the palette is
drawn uniformly. After that, each call draws one of the non-empty FLOPs intervals uniformly, then a stitch
inside it from the categorical distribution `probabilities(interval)`. `uniform=True` is SN-Net's baseline:
always uniform over all members (scores are still tracked, so `deploy()` works).

Intervals. [min(flops), max(flops)] is split into `num_intervals` intervals of equal width with edges
e_k = min + (max - min) * k / num_intervals (`edges`); interval k holds the members with e_k <= flops < e_{k+1},
the last one is closed on the right (it holds the max). A value on an interior edge belongs to the upper
interval. Intervals with no member are dropped: `intervals` lists the non-empty ones in ascending FLOPs
order, each as its member ids in ascending id order. When all FLOPs are equal there is one interval.

Which parameters count (the SNIP score). The score of a stitch is Q = sum |theta * dL/dtheta| (SNIP) over the
trainable parameters that the stitch's own forward pass uses, read from the `.grad` that the step's backward
left there. `snip_score` sums over exactly the tensors it is given; parameters whose `.grad` is None
(frozen, or not reached by this forward) are skipped. For a PST model (esta.pst) the parameters of stitch i
are: the LoRA matrices of the attention linears in the blocks it runs, the LoRA of its stitching layer, the
classifier of its end anchor's head, and its own rows of the stitch-bias tables. A stitch-bias table holds
one row per member, so pass it as a `(table, row)` pair (`snip_score` then reads `table[row]` and
`table.grad[row]`; for an `esta.nn.StitchedLinear` the row is its `stitch_ids` while stitch i is selected,
-1 meaning the layer is off the stitch's path); passing the whole table would add the other members' rows,
whose gradient is zero, to the element count and make stitches that share a table look less salient per
parameter. Plain tensors are deduplicated by identity; pairs are used as given. A parameter holding a zero
`.grad` (e.g. after `zero_grad(set_to_none=False)`) is counted, so either pass only the stitch's parameters
or let unreached parameters have no `.grad` (`zero_grad()`'s default). Compute the score before anything
else adds into the same `.grad` (e.g. before the backward of the largest-anchor teacher's loss, or before the
next micro-batch of gradient accumulation), otherwise Q mixes in other gradients. Note that LoRA starts with
one factor at zero, so early scores come mostly from the heads and the stitching layers; the warm-up exists
to let the scores settle.

Normalization (how stitches with few and many parameters compare fairly).
  1. Per stitch. A SNIP sum grows with the number of parameters summed, so `update(i, Q, count)` with the
     element count of those parameters (the second value `snip_score` returns) records the mean saliency
     per parameter, s = Q / count. Without a count, s = Q (the raw sum).
     Relative score (optional): `update(i, Q, count, loss=L)` with the loss L whose gradient gave Q also
     divides by L: s = Q / (count * L) = sum |theta * d(log L)/d theta| / count, the SNIP saliency of the
     log-loss, i.e. the relative change of the loss when the parameters are removed. A plain SNIP sum
     scales with the loss itself: a stitch that the training has not fit yet (high loss, large gradients)
     outscores a well-fit one in its interval whatever its parameters are worth, and with a sharp softmax
     one lucky draw of a poor stitch late in training can then take its interval over. Dividing by the loss
     removes that scale (esta.train's `score="relative-snip"`; README: the demo measured with both).
     The first update fixes the mode for the sampler: mixing updates with and without a count, or with
     and without a loss, raises ValueError, as it would compare means with sums or relative with absolute
     saliencies.
  2. EMA (eq. (3)). q_i = momentum * q_i + (1 - momentum) * s on each update of stitch i; the first update of
     a stitch sets q_i = s (no bias toward an arbitrary starting value). `scores` holds q (float64; nan for a
     stitch never updated).
  3. Inside an interval, before the softmax. The scores of the interval's members are divided by the
     interval's largest |q| among its scored members, so they lie in [0, 1] (q >= 0): r_i = q_i / max_j |q_j|.
     A never-scored member gets the interval's largest r (optimism: it gets sampled, and then scored). If
     no member of the interval is scored, or all scored ones are 0, the distribution is uniform.
     probabilities = softmax(r / temperature). Dividing by the max makes the distribution independent of the
     scale of the scores (loss scale, model size, learning stage); the temperature alone sets how strongly
     the best stitch is favoured: a member with the max score is at most exp(1 / temperature) times as likely
     as one scoring 0.

Deployment. `deploy()` returns, for each non-empty interval in order, the member with the highest q; never-
scored members rank last; ties go to fewer FLOPs, then the lower id. Only q's order within an interval
matters, so step 3 does not change it.

Distributed training. `sample()` depends only on the seed and the sampler's state (step, scores, generator),
so every rank draws the same stitch as long as every rank feeds `update()` the same values in the same order.
Pass the score through `esta.distributed.all_reduce_score` (the mean over ranks; with DDP the gradients, hence the scores,
are already equal on all ranks, and the reduction keeps them bitwise identical; with sharded parameters sum
both: `all_reduce_score(total, op="sum")` and `int(all_reduce_score(count, op="sum"))`). `all_reduce_scores`
reduces several numbers (the score and the step's losses, say) in one collective.

Resume. `state_dict()` holds the config, step, scores, update counts, the score mode and the state of the
sampler's private `torch.Generator` (seeded with `seed`, never the global RNG); `load_state_dict` checks that
the config is equal and then continues exactly where the saved sampler was. The dict holds only tensors and
Python scalars/lists, so `torch.load(..., weights_only=True)` reads it.
"""
from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["TaskSpecificSampler", "snip_score", "snip_sum"]

_NAME = "TaskSpecificSampler"
_STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------- SNIP
def snip_sum(params: Iterable[Any], grads: Optional[Sequence[Optional[torch.Tensor]]] = None
             ) -> Tuple[Optional[torch.Tensor], int]:
    """The SNIP sum |p * g| of a set of parameters as a float64 0-d tensor on their device (no host sync),
    and the number of elements counted; (None, 0) when nothing has a gradient.

    Each item of `params` is a tensor (an `nn.Parameter`) or a pair `(tensor, index)`, which counts only
    `tensor[index]` (e.g. a stitch's row of a stitch-bias table). `grads` gives the gradient of each item
    (already indexed for pairs; None to skip the item); by default it is each tensor's `.grad`, indexed
    like the item. Items without a gradient are skipped; plain tensors listed twice count once (with
    explicit `grads`, items are taken as given). The sum is accumulated in float64 from detached values."""
    if isinstance(params, torch.Tensor):
        raise TypeError("snip_score: params must be an iterable of parameters (e.g. [p] or module.parameters()), "
                        "got a single tensor")
    params = list(params)
    if grads is not None and len(grads) != len(params):
        raise ValueError(f"snip_score: {len(grads)} gradients for {len(params)} parameters")
    parts: List[torch.Tensor] = []
    count = 0
    seen = set()
    with torch.no_grad():
        for k, item in enumerate(params):
            if isinstance(item, torch.Tensor):
                p, index = item, None
                if grads is None:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor):
                p, index = item
            else:
                raise TypeError(f"snip_score: each item of params must be a tensor or a (tensor, index) pair, "
                                f"got {type(item).__name__}")
            value = p.detach() if index is None else p.detach()[index]
            if grads is None:
                grad = p.grad
                if grad is not None:
                    grad = grad.to_dense() if grad.is_sparse else grad
                    grad = grad if index is None else grad[index]
            else:
                grad = grads[k]
            if grad is None:
                continue
            if value.shape != grad.shape:
                raise ValueError(f"snip_score: a parameter of shape {tuple(value.shape)} has a gradient of shape "
                                 f"{tuple(grad.shape)}")
            parts.append((value.to(torch.float64) * grad.detach().to(torch.float64)).abs().sum())
            count += value.numel()
    if not parts:
        return None, 0
    return torch.stack([t.to(parts[0].device) for t in parts]).sum(), count


def snip_score(params: Iterable[Any]) -> Tuple[float, int]:
    """SNIP importance of a set of parameters from their `.grad`: (sum of |p * p.grad|, number of elements
    counted), as Python numbers (one host sync); see `snip_sum`. Returns (0.0, 0) when nothing has a
    gradient."""
    total, count = snip_sum(params)
    return (0.0 if total is None else float(total)), count


# ------------------------------------------------------------------------------------------ validation
def _check_real(where: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{where}: {name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_int(name: str, value, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_NAME}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{_NAME}: {name} must be at least {minimum}, got {value}")
    return value


def _check_flops(flops) -> Tuple[float, ...]:
    if isinstance(flops, torch.Tensor):
        if flops.dim() != 1:
            raise ValueError(f"{_NAME}: flops must be one-dimensional, got a tensor of shape {tuple(flops.shape)}")
        flops = flops.tolist()
    if isinstance(flops, (str, bytes)) or not isinstance(flops, Iterable):
        raise TypeError(f"{_NAME}: flops must be a sequence of numbers, got {type(flops).__name__}")
    out = []
    for i, f in enumerate(flops):
        if isinstance(f, bool) or not isinstance(f, numbers.Real):
            raise TypeError(f"{_NAME}: flops[{i}] must be a real number, got {type(f).__name__}")
        f = float(f)
        if not math.isfinite(f):
            raise ValueError(f"{_NAME}: flops[{i}] must be finite, got {f}")
        if f < 0:
            raise ValueError(f"{_NAME}: flops[{i}] must be non-negative, got {f}")
        out.append(f)
    if not out:
        raise ValueError(f"{_NAME}: flops must not be empty (one entry per palette member)")
    return tuple(out)


# ---------------------------------------------------------------------------------------------- sampler
class TaskSpecificSampler:
    """ESTA's task-specific stitch sampler; see the module docstring for the exact rules.

    Args:
        flops: FLOPs of each palette member; member (global stitch id) i has flops[i].
        num_intervals: number of equal-width FLOPs intervals (empty ones are skipped). Paper: ~15 (vision).
        warmup_steps: number of initial `sample()` calls that draw uniformly over all members.
        temperature: softmax temperature applied to the normalized scores (> 0).
        momentum: EMA coefficient eta of eq. (3), in [0, 1). Paper: 0.9.
        seed: seed of the sampler's private torch.Generator (0 <= seed < 2**64).
        uniform: SN-Net's baseline, always uniform over all members (scores still tracked for `deploy`).
    """

    def __init__(self, flops: Sequence[float], *, num_intervals: int = 15, warmup_steps: int = 0,
                 temperature: float = 1.0, momentum: float = 0.9, seed: int = 0, uniform: bool = False) -> None:
        self._flops = _check_flops(flops)
        self._num_intervals = _check_int("num_intervals", num_intervals, 1)
        self._warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        temperature = _check_real(_NAME, "temperature", temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"{_NAME}: temperature must be a positive finite number, got {temperature}")
        self._temperature = temperature
        momentum = _check_real(_NAME, "momentum", momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{_NAME}: momentum must be in [0, 1), got {momentum}")
        self._momentum = momentum
        seed = _check_int("seed", seed, 0)
        if seed >= 2**64:
            raise ValueError(f"{_NAME}: seed must be below 2**64, got {seed}")
        self._seed = seed
        if not isinstance(uniform, bool):
            raise TypeError(f"{_NAME}: uniform must be a bool, got {type(uniform).__name__}")
        self._uniform = uniform

        self._edges, self._intervals, self._interval_of = self._build_intervals()
        n = len(self._flops)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self._seed)
        self._step = 0
        self._scores = torch.full((n,), math.nan, dtype=torch.float64)
        self._updates = torch.zeros(n, dtype=torch.int64)
        # "mean" (updates give a count) or "sum", "/loss" appended when updates give a loss; fixed by the first update
        self._score_mode: Optional[str] = None
        self._cdf: Dict[int, List[float]] = {}  # interval -> cumulative probabilities, dropped when its scores change

    def _build_intervals(self):
        lo, hi, k = min(self._flops), max(self._flops), self._num_intervals
        edges = [lo + (hi - lo) * j / k for j in range(k)] + [hi]
        buckets: List[List[int]] = [[] for _ in range(k)]
        for i, f in enumerate(self._flops):
            b = min(bisect_right(edges, f) - 1, k - 1)  # e_b <= f < e_{b+1}; the max lands in the last one
            buckets[b].append(i)
        intervals = [b for b in buckets if b]
        interval_of = [0] * len(self._flops)
        for j, ids in enumerate(intervals):
            for i in ids:
                interval_of[i] = j
        return tuple(edges), intervals, interval_of

    # -------------------------------------------------------------------------------- read-only views
    def __len__(self) -> int:
        return len(self._flops)

    def __repr__(self) -> str:
        return (f"{_NAME}(members={len(self)}, intervals={len(self._intervals)}/{self._num_intervals}, "
                f"warmup_steps={self._warmup_steps}, temperature={self._temperature}, momentum={self._momentum}, "
                f"seed={self._seed}, uniform={self._uniform}, step={self._step})")

    @property
    def flops(self) -> Tuple[float, ...]:
        return self._flops

    @property
    def edges(self) -> Tuple[float, ...]:
        """The num_intervals + 1 interval edges (including the empty intervals)."""
        return self._edges

    @property
    def intervals(self) -> List[List[int]]:
        """Non-empty intervals in ascending FLOPs order, each its member ids in ascending order (a copy)."""
        return [list(ids) for ids in self._intervals]

    @property
    def step(self) -> int:
        """Number of `sample()` calls so far."""
        return self._step

    @property
    def in_warmup(self) -> bool:
        """Whether the next `sample()` is a warm-up (uniform) draw."""
        return self._step < self._warmup_steps

    @property
    def uniform(self) -> bool:
        return self._uniform

    @property
    def scores(self) -> torch.Tensor:
        """EMA of the per-stitch score (per parameter when counts are given), float64, nan if never updated."""
        return self._scores.clone()

    @property
    def num_updates(self) -> torch.Tensor:
        """How many times each stitch was updated (int64)."""
        return self._updates.clone()

    @property
    def config(self) -> Dict[str, Any]:
        return {"flops": list(self._flops), "num_intervals": self._num_intervals,
                "warmup_steps": self._warmup_steps, "temperature": self._temperature,
                "momentum": self._momentum, "seed": self._seed, "uniform": self._uniform}

    def _check_id(self, i, what: str = "stitch") -> int:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{_NAME}: {what} must be an int, got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < len(self._flops):
            raise IndexError(f"{_NAME}: {what} id {i} is outside [0, {len(self._flops)})")
        return i

    def interval_of(self, i: int) -> int:
        """Index into `intervals` of the interval holding member i."""
        return self._interval_of[self._check_id(i)]

    def probabilities(self, interval: int) -> torch.Tensor:
        """The categorical distribution over `intervals[interval]` (same order) used after the warm-up:
        softmax(scores / interval's max |score| / temperature), never-scored members at the max; uniform
        when nothing in the interval is scored (or all scores are 0) and when `uniform=True`. float64."""
        if isinstance(interval, bool) or not isinstance(interval, numbers.Integral):
            raise TypeError(f"{_NAME}: interval must be an int, got {type(interval).__name__}")
        interval = int(interval)
        if not 0 <= interval < len(self._intervals):
            raise IndexError(f"{_NAME}: interval {interval} is outside [0, {len(self._intervals)})")
        ids = self._intervals[interval]
        n = len(ids)
        if self._uniform:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        q = self._scores[ids]
        scored = ~torch.isnan(q)
        if not bool(scored.any()):
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        top = q[scored].abs().max()
        if float(top) == 0.0:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        r = q / top
        r = torch.where(scored, r, r[scored].max())
        return torch.softmax(r / self._temperature, dim=0)

    # ---------------------------------------------------------------------------------- sampling
    def sample(self) -> int:
        """Draws one member id and advances `step` (see the module docstring for the schedule)."""
        g = self._generator
        if self._uniform or self._step < self._warmup_steps:
            i = int(torch.randint(len(self._flops), (1,), generator=g).item())
        else:
            k = int(torch.randint(len(self._intervals), (1,), generator=g).item())
            u = float(torch.rand((1,), generator=g, dtype=torch.float64).item())
            cdf = self._cdf.get(k)
            if cdf is None:
                cdf = self._cdf[k] = torch.cumsum(self.probabilities(k), dim=0).tolist()
            j = min(bisect_right(cdf, u), len(cdf) - 1)  # inverse CDF: the first j with u < cdf[j]
            i = self._intervals[k][j]
        self._step += 1
        return i

    def update(self, stitch: int, score: float, count: Optional[int] = None, *,
               loss: Optional[float] = None) -> None:
        """Feeds the SNIP sum `score` of `stitch` (and the number of elements it summed, `count`, and the
        positive loss whose gradient gave it, `loss`): s = score / count (or score without a count), divided
        by loss when given, then q = momentum * q + (1 - momentum) * s, or q = s on the stitch's first update."""
        stitch = self._check_id(stitch)
        value = _check_real(_NAME, "score", score)
        if not math.isfinite(value):
            raise ValueError(f"{_NAME}: score must be finite, got {value}")
        if value < 0:
            raise ValueError(f"{_NAME}: score must be non-negative (a SNIP sum of absolute values), got {value}")
        if count is not None:
            count = _check_int("count", count, 1)
        if loss is not None:
            loss = _check_real(_NAME, "loss", loss)
            if not (loss > 0 and math.isfinite(loss)):
                raise ValueError(f"{_NAME}: loss must be a positive finite number (the relative score divides by "
                                 f"it), got {loss}")
        mode = ("sum" if count is None else "mean") + ("" if loss is None else "/loss")
        if self._score_mode is not None and mode != self._score_mode:
            counted, relative = self._score_mode.startswith("mean"), self._score_mode.endswith("/loss")
            if counted != (count is not None):
                raise ValueError(f"{_NAME}: update called {'with' if count is not None else 'without'} a count, but "
                                 f"earlier updates were {'with' if counted else 'without'} one; per-parameter means "
                                 f"and raw SNIP sums cannot be mixed (pass count on every update, or on none)")
            raise ValueError(f"{_NAME}: update called {'with' if loss is not None else 'without'} a loss, but "
                             f"earlier updates were {'with' if relative else 'without'} one; relative and absolute "
                             f"SNIP scores cannot be mixed (pass loss on every update, or on none)")
        self._score_mode = mode
        s = value / count if count is not None else value
        if loss is not None:
            s = s / loss
        if self._updates[stitch] == 0:
            q = s
        else:
            q = self._momentum * float(self._scores[stitch]) + (1.0 - self._momentum) * s
        self._scores[stitch] = q
        self._updates[stitch] += 1
        self._cdf.pop(self._interval_of[stitch], None)

    def deploy(self) -> List[int]:
        """The top-score member of each non-empty interval, in interval order (never-scored rank last; ties:
        fewer FLOPs, then the lower id)."""
        out = []
        for ids in self._intervals:
            def key(i):
                q = float(self._scores[i])
                unscored = math.isnan(q)
                return (unscored, 0.0 if unscored else -q, self._flops[i], i)
            out.append(min(ids, key=key))
        return out

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "config": self.config,
            "step": self._step,
            "scores": self._scores.clone(),
            "num_updates": self._updates.clone(),
            "score_mode": self._score_mode,
            "rng_state": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"{_NAME}.load_state_dict: expected a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("version", "config", "step", "scores", "num_updates", "score_mode", "rng_state")
                   if k not in state_dict]
        if missing:
            raise ValueError(f"{_NAME}.load_state_dict: the state dict lacks {', '.join(missing)}")
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(f"{_NAME}.load_state_dict: unsupported state version {state_dict['version']!r} "
                             f"(expected {_STATE_VERSION})")
        saved, mine = state_dict["config"], self.config
        if not isinstance(saved, dict):
            raise ValueError(f"{_NAME}.load_state_dict: config must be a dict, got {type(saved).__name__}")
        differ = sorted(k for k in set(saved) | set(mine) if k not in saved or k not in mine or
                        _normalized(saved[k]) != _normalized(mine[k]))
        if differ:
            detail = "; ".join(f"{k}: saved {_short(saved.get(k, '<missing>'))}, "
                               f"this sampler {_short(mine.get(k, '<missing>'))}" for k in differ)
            raise ValueError(f"{_NAME}.load_state_dict: the saved config differs from this sampler's ({detail})")
        n = len(self._flops)
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{_NAME}.load_state_dict: step must be a non-negative int, got {step!r}")
        scores, updates = state_dict["scores"], state_dict["num_updates"]
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n,):
            raise ValueError(f"{_NAME}.load_state_dict: scores must be a tensor of shape ({n},)")
        if not isinstance(updates, torch.Tensor) or tuple(updates.shape) != (n,):
            raise ValueError(f"{_NAME}.load_state_dict: num_updates must be a tensor of shape ({n},)")
        updates = updates.detach().to(torch.int64).cpu().clone()
        scores = scores.detach().to(torch.float64).cpu().clone()
        if bool((updates < 0).any()) or not torch.equal(torch.isnan(scores), updates == 0):
            raise ValueError(f"{_NAME}.load_state_dict: scores must be nan exactly where num_updates is 0")
        mode = state_dict["score_mode"]
        if mode not in (None, "mean", "sum", "mean/loss", "sum/loss"):
            raise ValueError(f"{_NAME}.load_state_dict: score_mode must be None, 'mean', 'sum', 'mean/loss' or "
                             f"'sum/loss', got {mode!r}")
        generator = torch.Generator(device="cpu")
        try:
            generator.set_state(state_dict["rng_state"])
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{_NAME}.load_state_dict: invalid rng_state ({e})") from None
        self._step = int(step)
        self._scores = scores
        self._updates = updates
        self._score_mode = mode
        self._generator = generator
        self._cdf = {}


def _normalized(value):
    if isinstance(value, (list, tuple)):
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            return list(value)
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
