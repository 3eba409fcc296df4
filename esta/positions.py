"""The stitch space of one anchor pair: SN-Net's sliding window over block ids.

A position (j, k) means: run the front anchor's blocks 0..j, a stitching layer, then the end anchor's
blocks k..last. Positions found by one window share one stitching layer (`layer`).

Rule (equal depths D). Windows of `kernel_size` consecutive block ids start at 0, stride, 2*stride, ...;
the last window is the first one that reaches block D-1 (a shorter tail window is used if the stride
jumps past the end, so the last block always gets a window). Each window adds every pair (j, k) with
j and k both in the window that no earlier window added, in row-major order (j, then k); a window that
adds at least one pair gets the next layer index, starting from 0.

Worked example, D = 4, kernel_size = 2, stride = 1 (windows {0,1}, {1,2}, {2,3}):

    window {0,1}: (0,0) (0,1) (1,0) (1,1)   -> layer 0
    window {1,2}: (1,2) (2,1) (2,2)         -> layer 1   ((1,1) was already added)
    window {2,3}: (2,3) (3,2) (3,3)         -> layer 2

so 10 positions on 3 layers; for D = 12 the same rule gives 4 + 3*10 = 34 positions on 11 layers.

Unequal depths. The windows slide over the ids 0..D-1 of the *deeper* anchor (D = max of the depths);
a window's ids are mapped to each anchor by nearest interpolation, i -> round(i * (d - 1) / (D - 1))
with halves rounded up (exact integer arithmetic; identity on the deeper anchor; monotone; first and
last blocks map to first and last). A window then adds every pair (front id, end id) of its mapped ids.
So every block of the deeper anchor is reachable, and kernel_size = stride = 1 over 32 -> 40 blocks
gives 40 positions, one per block of the 40-block anchor (the paper's 40 LLaMA-7B/13B stitches).
With equal depths the mapping is the identity and this is the rule above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

__all__ = ["StitchPosition", "stitch_positions", "nearest_block"]


@dataclass(frozen=True)
class StitchPosition:
    """One stitch position of an anchor pair.

    front_block: the last block run on the front anchor.
    end_block:   the first block run on the end anchor.
    layer:       index of the stitching layer, shared with the other positions of its window.
    """

    front_block: int
    end_block: int
    layer: int


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"stitch_positions: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"stitch_positions: {name} must be at least 1, got {value}")
    return value


def nearest_block(i: int, from_depth: int, to_depth: int) -> int:
    """Map block id i of a `from_depth`-block stack to the nearest id of a `to_depth`-block stack.

    round(i * (to_depth - 1) / (from_depth - 1)), halves rounded up, computed in integers.
    """
    if from_depth == 1 or to_depth == 1:
        return 0
    num, den = i * (to_depth - 1), from_depth - 1
    return (2 * num + den) // (2 * den)


def stitch_positions(front_depth: int, end_depth: int, kernel_size: int = 2, stride: int = 1) -> List[StitchPosition]:
    """The positions of one anchor pair, in window order (see the module docstring for the rule)."""
    _check_positive("front_depth", front_depth)
    _check_positive("end_depth", end_depth)
    _check_positive("kernel_size", kernel_size)
    _check_positive("stride", stride)
    depth = max(front_depth, end_depth)
    seen = set()
    positions: List[StitchPosition] = []
    layer = 0
    start = 0
    while True:
        window = range(start, min(start + kernel_size, depth))
        fronts = sorted({nearest_block(i, depth, front_depth) for i in window})
        ends = sorted({nearest_block(i, depth, end_depth) for i in window})
        added = False
        for j in fronts:
            for k in ends:
                if (j, k) not in seen:
                    seen.add((j, k))
                    positions.append(StitchPosition(j, k, layer))
                    added = True
        if added:
            layer += 1
        if window[-1] >= depth - 1:
            break
        # a stride that would jump past the last block lands on a tail window ending at it instead
        start = min(start + stride, depth - 1)
    return positions
