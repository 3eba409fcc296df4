"""The learning-rate schedule of ESTA training: linear warm-up, then cosine to zero, per optimizer step.

With adapt-then-stitch, each anchor's adaptation run is a segment of its own (its own warm-up, the same
share of its length as the stitch phase's), followed by the stitch phase's segment.
"""
from __future__ import annotations

import math
from typing import Tuple

__all__ = ["WarmupCosine"]


class WarmupCosine:
    """lr factor(step) for `adapt_segments` segments of `adapt_length` steps, then one of `length` steps
    with `warmup` warm-up steps."""

    def __init__(self, *, length: int, warmup: int, adapt_segments: int = 0, adapt_length: int = 0,
                 adapt_warmup: int = 0) -> None:
        self.length, self.warmup = length, warmup
        self.adapt_steps = adapt_segments * adapt_length
        self.adapt_length, self.adapt_warmup = adapt_length, adapt_warmup
        self.total = self.adapt_steps + length

    def segment(self, step: int) -> Tuple[int, int, int]:
        """(start, length, warm-up steps) of the segment holding `step`."""
        if step < self.adapt_steps:
            return (step // self.adapt_length) * self.adapt_length, self.adapt_length, self.adapt_warmup
        return self.adapt_steps, self.length, self.warmup

    def factor(self, step: int) -> float:
        start, length, warmup = self.segment(step)
        t = step - start
        if t < warmup:
            return (t + 1) / warmup
        span = max(1, length - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / span)))
