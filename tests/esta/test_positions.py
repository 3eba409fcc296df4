"""Stitch positions (esta.positions, esta.stitch_positions): which front/end block pairs a stitch space
holds, and on which stitching layer, for equal and unequal depths."""
import math

import pytest

from esta import stitch_positions
from esta.positions import nearest_block


def _triples(positions):
    return [(p.front_block, p.end_block, p.layer) for p in positions]


def test_equal_depths_hand_worked_example():
    # windows {0,1}, {1,2}, {2,3}; each adds its unseen pairs, which share one layer
    assert _triples(stitch_positions(4, 4, kernel_size=2, stride=1)) == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0),
        (1, 2, 1), (2, 1, 1), (2, 2, 1),
        (2, 3, 2), (3, 2, 2), (3, 3, 2),
    ]


def test_equal_depths_vit_setting_counts():
    pos = stitch_positions(12, 12)  # kernel 2, stride 1: 4 + 3 * 10 pairs on 11 layers
    assert len(pos) == 34 and len({p.layer for p in pos}) == 11
    assert len({(p.front_block, p.end_block) for p in pos}) == 34
    # kernel 1: the diagonal, one layer each
    assert _triples(stitch_positions(3, 3, 1, 1)) == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    # stride 2, kernel 2 on 5 blocks: windows {0,1}, {2,3}, then the tail {4}
    assert _triples(stitch_positions(5, 5, 2, 2)) == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0),
        (2, 2, 1), (2, 3, 1), (3, 2, 1), (3, 3, 1),
        (4, 4, 2),
    ]


def test_nearest_block_matches_float_rounding():
    for src, dst in [(40, 32), (32, 40), (12, 24), (7, 3)]:
        for i in range(src):
            expected = math.floor(i * (dst - 1) / (src - 1) + 0.5)
            assert nearest_block(i, src, dst) == expected


@pytest.mark.parametrize("kernel", [1, 2])
def test_unequal_depths_32_to_40(kernel):
    pos = stitch_positions(32, 40, kernel_size=kernel, stride=1)
    assert {p.end_block for p in pos} == set(range(40))  # every end block reachable
    assert {p.front_block for p in pos} == set(range(32))
    assert len(set((p.front_block, p.end_block) for p in pos)) == len(pos)
    assert all(0 <= p.front_block < 32 and 0 <= p.end_block < 40 for p in pos)
    layers = [p.layer for p in pos]
    assert layers == sorted(layers)
    if kernel == 1:
        assert len(pos) == 40  # the paper's 40 LLaMA-7B/13B stitches
        fronts = [p.front_block for p in sorted(pos, key=lambda p: p.end_block)]
        assert fronts == sorted(fronts)  # monotone
    # the reverse direction reaches every block too
    rev = stitch_positions(40, 32, kernel_size=kernel)
    assert {p.front_block for p in rev} == set(range(40)) and {p.end_block for p in rev} == set(range(32))


@pytest.mark.parametrize("kwargs, name", [
    (dict(front_depth=0, end_depth=4), "front_depth"),
    (dict(front_depth=4, end_depth=0), "end_depth"),
    (dict(front_depth=4, end_depth=4, kernel_size=0), "kernel_size"),
    (dict(front_depth=4, end_depth=4, stride=0), "stride"),
])
def test_position_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        stitch_positions(**kwargs)
