"""esta.sampling: SNIP scores, the task-specific stitch sampler (paper section 4.2, eq. (3)) and its resume."""
import io
import math
import multiprocessing
from collections import Counter

import pytest
import torch
from torch import nn

from esta.distributed import all_reduce_score, all_reduce_scores
from esta.sampling import TaskSpecificSampler, snip_score


# --------------------------------------------------------------------------------------------- helpers
def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: the 99.9% point)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _chi2(observed, expected_probs, n):
    return sum((o - n * p) ** 2 / (n * p) for o, p in zip(observed, expected_probs))


def _draw(sampler, n):
    return [sampler.sample() for _ in range(n)]


# A palette with uneven FLOPs: 4 intervals of width 10 over [0, 40]; [20, 30) is empty.
FLOPS = [0.0, 3.0, 9.9, 10.0, 15.0, 19.0, 31.0, 35.0, 40.0, 12.0]


# -------------------------------------------------------------------------------------------- snip_score
def _linear_after_backward():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    lin(x).pow(2).sum().backward()
    return lin, x


def test_snip_score_matches_hand_computation():
    lin, x = _linear_after_backward()
    y = x @ lin.weight.detach().T + lin.bias.detach()
    dy = 2 * y  # d/dy sum(y^2)
    grad_w, grad_b = dy.T @ x, dy.sum(0)
    expected = (lin.weight.detach().double() * grad_w.double()).abs().sum() + \
        (lin.bias.detach().double() * grad_b.double()).abs().sum()
    total, count = snip_score(lin.parameters())
    assert isinstance(total, float) and isinstance(count, int)
    assert count == 3 * 2 + 2
    assert total == pytest.approx(float(expected), rel=1e-6)
    # element by element, written out
    manual = sum(abs(float(lin.weight.detach()[o, i]) * float(grad_w[o, i])) for o in range(2) for i in range(3))
    manual += sum(abs(float(lin.bias.detach()[o]) * float(grad_b[o])) for o in range(2))
    assert total == pytest.approx(manual, rel=1e-6)


def test_snip_score_skips_params_without_grad_and_dedupes():
    lin, _ = _linear_after_backward()
    frozen = nn.Parameter(torch.ones(7), requires_grad=False)
    untouched = nn.Parameter(torch.ones(4))  # trainable but never reached by the backward
    full, full_count = snip_score(lin.parameters())
    total, count = snip_score([lin.weight, frozen, lin.bias, untouched, lin.weight])
    assert (total, count) == (full, full_count)
    w_only, w_count = snip_score([lin.weight])
    assert w_count == 6 and 0 < w_only < full
    assert snip_score([]) == (0.0, 0)
    assert snip_score([frozen, untouched]) == (0.0, 0)


def test_snip_score_row_pairs_count_only_that_row():
    table = nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0]]))
    (table[1] * torch.tensor([2.0, -0.5])).sum().backward()  # only row 1 is used
    assert snip_score([(table, 1)]) == (pytest.approx(3 * 2 + 4 * 0.5), 2)
    # the whole table has the same sum but 3x the elements
    assert snip_score([table]) == (pytest.approx(8.0), 6)
    lin, _ = _linear_after_backward()
    total, count = snip_score([lin.weight, (table, 1)])
    assert count == 6 + 2 and total == pytest.approx(snip_score([lin.weight])[0] + 8.0)


def test_snip_score_is_detached_float64_and_leaves_grads_alone():
    p = nn.Parameter(torch.tensor([1e8, 1.0, 1e-8], dtype=torch.float32))
    p.grad = torch.tensor([3.0, 1.0, 1.0])
    before = p.grad.clone()
    total, count = snip_score([p])
    assert count == 3
    assert total == pytest.approx(3e8 + 1.0, abs=1e-3)  # float32 accumulation would lose the 1.0
    assert torch.equal(p.grad, before)
    half = nn.Parameter(torch.tensor([2.0, -3.0], dtype=torch.bfloat16))
    half.grad = torch.tensor([0.5, 0.25], dtype=torch.bfloat16)
    assert snip_score([half]) == (pytest.approx(1.75), 2)


def test_snip_score_bad_inputs():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="iterable of parameters"):
        snip_score(p)
    with pytest.raises(TypeError, match="tensor or a \\(tensor, index\\) pair"):
        snip_score([p, 3])
    with pytest.raises(TypeError, match="tensor or a \\(tensor, index\\) pair"):
        snip_score([(1, 2)])


# -------------------------------------------------------------------------------------------- intervals
def test_intervals_partition_and_skip_empty():
    s = TaskSpecificSampler(FLOPS, num_intervals=4)
    assert s.edges == (0.0, 10.0, 20.0, 30.0, 40.0)
    # [0,10): 0,1,2   [10,20): 3,4,5,9   [20,30): empty, dropped   [30,40]: 6,7,8 (40 closes the last one)
    assert s.intervals == [[0, 1, 2], [3, 4, 5, 9], [6, 7, 8]]
    assert sorted(i for ids in s.intervals for i in ids) == list(range(len(FLOPS)))
    for k, ids in enumerate(s.intervals):
        for i in ids:
            assert s.interval_of(i) == k
    # a value on an interior edge belongs to the upper interval
    assert s.interval_of(3) == 1


def test_intervals_default_fifteen_even_splits():
    flops = [float(f) for f in range(31)]  # 0..30 over 15 intervals of width 2
    s = TaskSpecificSampler(flops)
    assert len(s.edges) == 16
    assert s.intervals[:-1] == [[2 * k, 2 * k + 1] for k in range(14)]
    assert s.intervals[-1] == [28, 29, 30]  # closed on the right


def test_intervals_random_palette_is_a_partition_in_flops_order():
    g = torch.Generator().manual_seed(3)
    flops = (torch.rand(60, generator=g, dtype=torch.float64) * 1e9 + 1e9).tolist()
    s = TaskSpecificSampler(flops, num_intervals=15)
    seen = [i for ids in s.intervals for i in ids]
    assert sorted(seen) == list(range(60)) and len(seen) == 60
    assert all(ids == sorted(ids) and ids for ids in s.intervals)
    for a, b in zip(s.intervals, s.intervals[1:]):
        assert max(flops[i] for i in a) < min(flops[i] for i in b)
    for ids in s.intervals:
        k = next(j for j in range(15) if s.edges[j] <= flops[ids[0]] <= s.edges[j + 1])
        assert all(s.edges[k] <= flops[i] <= s.edges[k + 1] for i in ids)


def test_intervals_degenerate_palettes():
    assert TaskSpecificSampler([5.0]).intervals == [[0]]
    assert TaskSpecificSampler([7, 7, 7], num_intervals=4).intervals == [[0, 1, 2]]
    assert TaskSpecificSampler([1, 2, 3], num_intervals=1).intervals == [[0, 1, 2]]
    s = TaskSpecificSampler(torch.tensor([1.0, 100.0]), num_intervals=3)
    assert s.intervals == [[0], [1]]
    draws = [s.sample() for _ in range(20)]
    assert set(draws) == {0, 1} and all(type(i) is int for i in draws) and len(s) == 2
    assert s.intervals is not s.intervals  # a copy each time
    s.intervals.append([99])
    assert s.intervals == [[0], [1]]


# ---------------------------------------------------------------------------------------------- sampling
def test_warmup_is_uniform_over_all_members_even_with_scores():
    n_draws = 20000
    s = TaskSpecificSampler(FLOPS, num_intervals=4, warmup_steps=n_draws, seed=1)
    s.update(0, 1000.0)  # a dominant score must not matter during the warm-up
    for i in range(1, len(FLOPS)):
        s.update(i, 0.0)
    counts = Counter(_draw(s, n_draws))
    assert set(counts) == set(range(len(FLOPS)))
    obs = [counts[i] for i in range(len(FLOPS))]
    assert _chi2(obs, [1 / len(FLOPS)] * len(FLOPS), n_draws) < _chi2_critical(len(FLOPS) - 1)
    assert s.step == n_draws and not s.in_warmup


def test_warmup_length_switches_to_interval_sampling():
    # warm-up draws come from all members; afterwards the lone member of an interval is drawn ~1/3 of the time
    flops = [0.0] * 9 + [100.0, 50.0]
    s = TaskSpecificSampler(flops, num_intervals=3, warmup_steps=3000, seed=2)
    assert s.intervals == [list(range(9)), [10], [9]]
    assert s.in_warmup
    warm = Counter(_draw(s, 3000))
    after = Counter(_draw(s, 3000))
    assert 3000 / 11 * 0.8 < warm[9] < 3000 / 11 * 1.2
    assert 1000 * 0.9 < after[9] < 1000 * 1.1 and 1000 * 0.9 < after[10] < 1000 * 1.1


def test_after_warmup_intervals_uniform_and_members_follow_probabilities():
    n_draws = 30000
    s = TaskSpecificSampler(FLOPS, num_intervals=4, warmup_steps=5, temperature=0.3, seed=4)
    _draw(s, 5)
    for i, q in {0: 1.0, 1: 3.0, 2: 2.0, 3: 0.5, 4: 4.0, 5: 1.0, 9: 2.0, 6: 1.0, 8: 1.0}.items():
        s.update(i, q)  # 7 never scored
    draws = _draw(s, n_draws)
    per_interval = Counter(s.interval_of(i) for i in draws)
    m = len(s.intervals)
    assert _chi2([per_interval[k] for k in range(m)], [1 / m] * m, n_draws) < _chi2_critical(m - 1)
    counts = Counter(draws)
    for k, ids in enumerate(s.intervals):
        p = s.probabilities(k).tolist()
        assert abs(sum(p) - 1) < 1e-12
        obs = [counts[i] for i in ids]
        assert _chi2(obs, p, sum(obs)) < _chi2_critical(len(ids) - 1)
    # the distributions are genuinely non-uniform here
    assert max(s.probabilities(0)) > 2 * min(s.probabilities(0))


def test_higher_score_is_sampled_more():
    s = TaskSpecificSampler([1.0, 1.0, 1.0, 1.0], num_intervals=1, temperature=0.2, seed=5)
    for i, q in enumerate([1.0, 1.0, 10.0, 1.0]):
        s.update(i, q)
    counts = Counter(_draw(s, 4000))
    assert counts[2] > 3 * max(counts[0], counts[1], counts[3])
    p = s.probabilities(0)
    assert int(p.argmax()) == 2
    assert float(p[2] / p[0]) == pytest.approx(math.exp((1.0 - 0.1) / 0.2))


def test_probabilities_normalization_by_hand():
    s = TaskSpecificSampler([1.0, 2.0, 3.0], num_intervals=1, temperature=0.5)
    assert torch.allclose(s.probabilities(0), torch.full((3,), 1 / 3, dtype=torch.float64))  # nothing scored
    s.update(0, 2.0)
    s.update(1, 4.0)
    # normalized [0.5, 1.0], the never-scored member gets the max (1.0); then / 0.5
    expected = torch.softmax(torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64), 0)
    assert s.probabilities(0).dtype == torch.float64
    assert torch.allclose(s.probabilities(0), expected, atol=1e-15)
    # scale invariance: multiplying all scores by 1000 changes nothing
    t = TaskSpecificSampler([1.0, 2.0, 3.0], num_intervals=1, temperature=0.5)
    t.update(0, 2000.0)
    t.update(1, 4000.0)
    assert torch.allclose(t.probabilities(0), expected, atol=1e-15)
    # all scored members at zero: uniform
    z = TaskSpecificSampler([1.0, 2.0], num_intervals=1)
    z.update(0, 0.0)
    z.update(1, 0.0)
    assert torch.allclose(z.probabilities(0), torch.full((2,), 0.5, dtype=torch.float64))


def test_probabilities_use_per_parameter_means():
    # stitch 0: sum 100 over 100 params (1 per param); stitch 1: sum 20 over 10 params (2 per param)
    s = TaskSpecificSampler([1.0, 1.0], num_intervals=1)
    s.update(0, 100.0, 100)
    s.update(1, 20.0, 10)
    assert s.scores.tolist() == [1.0, 2.0]
    assert torch.allclose(s.probabilities(0), torch.softmax(torch.tensor([0.5, 1.0], dtype=torch.float64), 0))
    assert s.deploy() == [1]


def test_unscored_member_is_optimistic_within_interval_only():
    s = TaskSpecificSampler([0.0, 1.0, 10.0, 11.0], num_intervals=2, temperature=0.1)
    s.update(0, 5.0)
    s.update(1, 1.0)
    s.update(2, 1.0)  # member 3 never scored: gets interval 1's max normalized score (1.0)
    assert torch.allclose(s.probabilities(1), torch.full((2,), 0.5, dtype=torch.float64))
    p0 = s.probabilities(0)
    assert float(p0[0]) > 0.99


def test_same_seed_same_sequence_different_seed_differs():
    def run(seed):
        s = TaskSpecificSampler(FLOPS, num_intervals=4, warmup_steps=20, seed=seed)
        out = []
        for t in range(200):
            i = s.sample()
            out.append(i)
            s.update(i, float((i * 7 + t) % 5) + 0.5, 3 + i)
        return out, s.scores

    a, qa = run(11)
    b, qb = run(11)
    c, _ = run(12)
    assert a == b and torch.equal(qa, qb)
    assert a != c


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    s = TaskSpecificSampler(FLOPS, num_intervals=4, warmup_steps=3)
    _draw(s, 10)
    assert torch.equal(torch.rand(3), expected)


def test_uniform_baseline_ignores_scores():
    n_draws = 20000
    s = TaskSpecificSampler(FLOPS, num_intervals=4, seed=6, uniform=True)
    s.update(4, 100.0)
    for i in (0, 3, 6):
        s.update(i, 1.0)
    counts = Counter(_draw(s, n_draws))
    n = len(FLOPS)
    assert _chi2([counts[i] for i in range(n)], [1 / n] * n, n_draws) < _chi2_critical(n - 1)
    for k, ids in enumerate(s.intervals):
        assert torch.allclose(s.probabilities(k), torch.full((len(ids),), 1 / len(ids), dtype=torch.float64))
    assert s.deploy()[1] == 4  # scores still tracked for deployment
    # the same stream as a sampler that never leaves its warm-up
    u = TaskSpecificSampler(FLOPS, num_intervals=4, seed=6, uniform=True)
    w = TaskSpecificSampler(FLOPS, num_intervals=4, seed=6, warmup_steps=10**9)
    u.update(4, 100.0)
    assert _draw(u, 100) == _draw(w, 100)


# --------------------------------------------------------------------------------------------------- EMA
def test_ema_arithmetic_by_hand():
    s = TaskSpecificSampler([1.0, 2.0, 3.0], num_intervals=1, momentum=0.9)
    assert torch.isnan(s.scores).all() and s.scores.dtype == torch.float64
    s.update(1, 10.0, 2)  # first observation initializes: q = 5
    assert float(s.scores[1]) == 5.0
    s.update(1, 30.0, 3)  # q = 0.9 * 5 + 0.1 * 10 = 5.5
    assert float(s.scores[1]) == pytest.approx(5.5, abs=1e-12)
    s.update(1, 2.0, 1)  # q = 0.9 * 5.5 + 0.1 * 2 = 5.15
    assert float(s.scores[1]) == pytest.approx(5.15, abs=1e-12)
    assert torch.isnan(s.scores[[0, 2]]).all()
    assert s.num_updates.tolist() == [0, 3, 0]
    # scores is a copy
    s.scores[1] = 0.0
    assert float(s.scores[1]) == pytest.approx(5.15)


def test_ema_without_counts_and_momentum_zero():
    s = TaskSpecificSampler([1.0, 2.0], num_intervals=1, momentum=0.5)
    for v in (4.0, 8.0, 0.0):
        s.update(0, v)
    assert float(s.scores[0]) == pytest.approx(0.5 * (0.5 * 4 + 0.5 * 8) + 0.0)
    z = TaskSpecificSampler([1.0, 2.0], num_intervals=1, momentum=0.0)
    for v in (4.0, 8.0, 1.5):
        z.update(0, v)
    assert float(z.scores[0]) == 1.5
    # the eq. (3) recursion over many steps
    m = TaskSpecificSampler([1.0], momentum=0.9)
    vals = [float(v) for v in torch.rand(50, generator=torch.Generator().manual_seed(0))]
    q = vals[0]
    for v in vals[1:]:
        q = 0.9 * q + 0.1 * v
    for v in vals:
        m.update(0, v)
    assert float(m.scores[0]) == pytest.approx(q, rel=1e-12)


def test_mixing_counted_and_raw_updates_raises():
    s = TaskSpecificSampler([1.0, 2.0])
    s.update(0, 1.0, 4)
    with pytest.raises(ValueError, match="count"):
        s.update(1, 1.0)
    r = TaskSpecificSampler([1.0, 2.0])
    r.update(0, 1.0)
    with pytest.raises(ValueError, match="count"):
        r.update(0, 1.0, 3)


def test_relative_score_divides_by_the_loss():
    s = TaskSpecificSampler([1.0, 2.0, 3.0], num_intervals=1, momentum=0.9)
    s.update(1, 12.0, 3, loss=2.0)  # q = 12 / 3 / 2 = 2
    assert float(s.scores[1]) == 2.0
    s.update(1, 3.0, 2, loss=0.25)  # s = 3 / 2 / 0.25 = 6; q = 0.9 * 2 + 0.1 * 6 = 2.4
    assert float(s.scores[1]) == pytest.approx(2.4, abs=1e-12)
    r = TaskSpecificSampler([1.0, 2.0], momentum=0.0)
    r.update(0, 5.0, loss=np_scalar(0.5))  # raw sums can be relative too: 5 / 0.5
    assert float(r.scores[0]) == pytest.approx(10.0)
    # a stitch with twice the loss and twice the gradient (an unfit one) no longer outscores the other
    t = TaskSpecificSampler([1.0, 2.0], num_intervals=1)
    t.update(0, 2.0, 1, loss=1.0)
    t.update(1, 4.0, 1, loss=2.0)
    assert float(t.scores[0]) == float(t.scores[1])
    sd = t.state_dict()
    assert sd["score_mode"] == "mean/loss"
    u = TaskSpecificSampler([1.0, 2.0], num_intervals=1)
    u.load_state_dict(sd)
    with pytest.raises(ValueError, match="without a loss.*relative and absolute"):
        u.update(0, 1.0, 1)  # the mode travels with the state


def np_scalar(v):
    np = pytest.importorskip("numpy")
    return np.float32(v)


def test_mixing_relative_and_absolute_updates_raises():
    s = TaskSpecificSampler([1.0, 2.0])
    s.update(0, 1.0, 4, loss=0.5)
    with pytest.raises(ValueError, match="without a loss.*relative and absolute"):
        s.update(1, 1.0, 4)
    with pytest.raises(ValueError, match="without a count"):
        s.update(1, 1.0, loss=0.5)
    r = TaskSpecificSampler([1.0, 2.0])
    r.update(0, 1.0, 4)
    with pytest.raises(ValueError, match="with a loss.*relative and absolute"):
        r.update(0, 1.0, 4, loss=1.0)
    assert r.num_updates.tolist() == [1, 0] and s.num_updates.tolist() == [1, 0]


# ------------------------------------------------------------------------------------------------ deploy
def test_deploy_top_score_per_interval():
    s = TaskSpecificSampler(FLOPS, num_intervals=4)
    # intervals [[0,1,2],[3,4,5,9],[6,7,8]]
    for i, q in {0: 1.0, 1: 3.0, 2: 2.0, 3: 0.5, 4: 0.1, 9: 0.7, 7: 0.0}.items():
        s.update(i, q)
    assert s.deploy() == [1, 9, 7]  # 6 and 8 never scored rank below 7 (score 0)


def test_deploy_ties_and_unscored():
    flops = [5.0, 3.0, 4.0, 3.0, 10.0, 11.0]
    s = TaskSpecificSampler(flops, num_intervals=2)
    assert s.intervals == [[0, 1, 2, 3], [4, 5]]
    assert s.deploy() == [1, 4]  # nothing scored: fewer FLOPs, then the lower id
    for i in range(4):
        s.update(i, 2.0)
    assert s.deploy() == [1, 4]  # a tie: 1 and 3 have the fewest FLOPs, 1 has the lower id
    s.update(0, 12.0)  # q0 = 0.9 * 2 + 0.1 * 12 = 3
    s.update(5, 0.0)
    assert s.deploy() == [0, 5]


# ------------------------------------------------------------------------------------------------ resume
def _busy_sampler(seed=7):
    s = TaskSpecificSampler(FLOPS, num_intervals=4, warmup_steps=15, temperature=0.5, seed=seed)
    return s


def _train(s, steps, start=0):
    out = []
    for t in range(start, start + steps):
        i = s.sample()
        out.append(i)
        s.update(i, 0.1 + ((i * 13 + t * 5) % 11) * (1.0 + i), 2 + i)
    return out


@pytest.mark.parametrize("cut", [5, 15, 40])  # inside the warm-up, at its end, after it
def test_state_dict_round_trip_continues_exactly(cut):
    ref = _busy_sampler()
    ref_seq = _train(ref, cut + 50)

    a = _busy_sampler()
    assert _train(a, cut) == ref_seq[:cut]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    b = _busy_sampler()
    _draw(b, 3)  # a fresh sampler in some other state
    b.load_state_dict(sd)
    assert b.step == cut
    assert _train(b, 50, start=cut) == ref_seq[cut:]
    assert torch.equal(b.scores.isnan(), ref.scores.isnan())
    assert torch.allclose(b.scores.nan_to_num(-1), ref.scores.nan_to_num(-1), rtol=0, atol=0)
    assert b.deploy() == ref.deploy()


def test_state_dict_is_a_snapshot():
    s = _busy_sampler()
    _train(s, 20)
    sd = s.state_dict()
    saved_scores = sd["scores"].clone()
    nxt = _train(s, 30, start=20)
    assert s.step == 50 and sd["step"] == 20
    assert torch.equal(sd["scores"].nan_to_num(-1), saved_scores.nan_to_num(-1))
    u = _busy_sampler()
    u.load_state_dict(sd)
    sd["scores"].fill_(123.0)  # mutating the dict after loading does not reach the sampler
    assert not torch.equal(u.scores, sd["scores"])
    assert _train(u, 30, start=20) == nxt


@pytest.mark.parametrize("field, value", [
    ("flops", FLOPS[:-1] + [13.0]),
    ("num_intervals", 5),
    ("warmup_steps", 16),
    ("temperature", 0.25),
    ("momentum", 0.8),
    ("seed", 8),
    ("uniform", True),
])
def test_load_state_dict_config_mismatch(field, value):
    sd = _busy_sampler().state_dict()
    kwargs = dict(num_intervals=4, warmup_steps=15, temperature=0.5, seed=7, momentum=0.9, uniform=False)
    flops = FLOPS
    if field == "flops":
        flops = value
    else:
        kwargs[field] = value
    other = TaskSpecificSampler(flops, **kwargs)
    with pytest.raises(ValueError, match=rf"config differs.*{field}: saved"):
        other.load_state_dict(sd)
    assert other.step == 0  # untouched


def test_load_state_dict_bad_dicts():
    s = _busy_sampler()
    _train(s, 3)
    sd = s.state_dict()
    with pytest.raises(TypeError, match="expected a dict"):
        s.load_state_dict([1, 2])
    with pytest.raises(ValueError, match="lacks rng_state"):
        s.load_state_dict({k: v for k, v in sd.items() if k != "rng_state"})
    with pytest.raises(ValueError, match="scores must be a tensor of shape"):
        s.load_state_dict({**sd, "scores": sd["scores"][:-1]})
    with pytest.raises(ValueError, match="step"):
        s.load_state_dict({**sd, "step": -1})
    with pytest.raises(ValueError, match="rng_state"):
        s.load_state_dict({**sd, "rng_state": torch.zeros(3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="version"):
        s.load_state_dict({**sd, "version": 99})
    with pytest.raises(ValueError, match="score_mode must be None, 'mean', 'sum', 'mean/loss' or 'sum/loss'"):
        s.load_state_dict({**sd, "score_mode": "median"})
    with pytest.raises(ValueError, match="config differs.*flops"):
        TaskSpecificSampler(FLOPS + [1.0], num_intervals=4, warmup_steps=15, temperature=0.5,
                            seed=7).load_state_dict(sd)


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(flops=[]), ValueError, "flops must not be empty"),
    (dict(flops=[1.0, float("nan")]), ValueError, r"flops\[1\] must be finite"),
    (dict(flops=[1.0, float("inf")]), ValueError, r"flops\[1\] must be finite"),
    (dict(flops=[1.0, -2.0]), ValueError, r"flops\[1\] must be non-negative"),
    (dict(flops=[1.0, "2"]), TypeError, r"flops\[1\] must be a real number"),
    (dict(flops=[True, 2.0]), TypeError, r"flops\[0\] must be a real number"),
    (dict(flops=5.0), TypeError, "flops must be a sequence"),
    (dict(flops="123"), TypeError, "flops must be a sequence"),
    (dict(flops=torch.ones(2, 2)), ValueError, "flops must be one-dimensional"),
    (dict(num_intervals=0), ValueError, "num_intervals must be at least 1"),
    (dict(num_intervals=-3), ValueError, "num_intervals must be at least 1"),
    (dict(num_intervals=2.0), TypeError, "num_intervals must be an int"),
    (dict(num_intervals=True), TypeError, "num_intervals must be an int"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be at least 0"),
    (dict(warmup_steps=False), TypeError, "warmup_steps must be an int"),
    (dict(warmup_steps=1.5), TypeError, "warmup_steps must be an int"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a positive finite"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a positive"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(momentum=None), TypeError, "momentum must be a real number"),
    (dict(seed=-1), ValueError, "seed must be at least 0"),
    (dict(seed=2**64), ValueError, "seed must be below 2\\*\\*64"),
    (dict(seed=1.0), TypeError, "seed must be an int"),
    (dict(seed=True), TypeError, "seed must be an int"),
    (dict(uniform=1), TypeError, "uniform must be a bool"),
])
def test_constructor_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    flops = kwargs.pop("flops", [1.0, 2.0])
    with pytest.raises(exc, match=match):
        TaskSpecificSampler(flops, **kwargs)


@pytest.mark.parametrize("args, exc, match", [
    ((3, 1.0), IndexError, r"stitch id 3 is outside \[0, 3\)"),
    ((-1, 1.0), IndexError, r"stitch id -1 is outside \[0, 3\)"),
    ((True, 1.0), TypeError, "stitch must be an int"),
    ((1.0, 1.0), TypeError, "stitch must be an int"),
    ((0, float("nan")), ValueError, "score must be finite"),
    ((0, float("inf")), ValueError, "score must be finite"),
    ((0, -0.5), ValueError, "score must be non-negative"),
    ((0, "1"), TypeError, "score must be a real number"),
    ((0, True), TypeError, "score must be a real number"),
    ((0, torch.ones(2)), TypeError, "score must be a real number"),
    ((0, 1.0, 0), ValueError, "count must be at least 1"),
    ((0, 1.0, -4), ValueError, "count must be at least 1"),
    ((0, 1.0, True), TypeError, "count must be an int"),
    ((0, 1.0, 2.0), TypeError, "count must be an int"),
    ((0, 1.0, 2, 0.0), ValueError, "loss must be a positive finite number"),
    ((0, 1.0, 2, -1.0), ValueError, "loss must be a positive finite number"),
    ((0, 1.0, 2, float("nan")), ValueError, "loss must be a positive finite number"),
    ((0, 1.0, 2, float("inf")), ValueError, "loss must be a positive finite number"),
    ((0, 1.0, 2, "1"), TypeError, "loss must be a real number"),
])
def test_update_bad_inputs(args, exc, match):
    s = TaskSpecificSampler([1.0, 2.0, 3.0])
    with pytest.raises(exc, match=match):
        if len(args) == 4:
            s.update(*args[:3], loss=args[3])
        else:
            s.update(*args)
    assert torch.isnan(s.scores).all() and s.num_updates.sum() == 0  # nothing recorded


def test_update_accepts_tensor_and_numpy_scalars():
    np = pytest.importorskip("numpy")
    s = TaskSpecificSampler([1.0, 2.0, 3.0], momentum=0.5)
    s.update(np.int64(1), torch.tensor(4.0), np.int64(2))
    s.update(1, np.float32(6.0), 1)
    assert float(s.scores[1]) == pytest.approx(0.5 * 2 + 0.5 * 6)


def test_interval_queries_bad_inputs():
    s = TaskSpecificSampler(FLOPS, num_intervals=4)
    with pytest.raises(IndexError, match="outside"):
        s.interval_of(len(FLOPS))
    with pytest.raises(TypeError, match="must be an int"):
        s.interval_of(False)
    with pytest.raises(IndexError, match=r"interval 3 is outside \[0, 3\)"):
        s.probabilities(3)
    with pytest.raises(TypeError, match="interval must be an int"):
        s.probabilities(True)


# ----------------------------------------------------------------------------------------- distributed
def test_all_reduce_score_without_process_group_is_identity():
    assert all_reduce_score(2.5) == 2.5
    assert all_reduce_score(3) == 3.0 and isinstance(all_reduce_score(3), float)
    with pytest.raises(ValueError, match="op must be"):
        all_reduce_score(1.0, op="max")
    with pytest.raises(TypeError, match="score must be a real number"):
        all_reduce_score("1")
    assert all_reduce_scores([2.5, 3]) == [2.5, 3.0] and all_reduce_scores(()) == []
    with pytest.raises(TypeError, match=r"scores\[1\] must be a real number"):
        all_reduce_scores([1.0, "2"])
    with pytest.raises(TypeError, match="scores must be a sequence"):
        all_reduce_scores(torch.ones(2))
    with pytest.raises(ValueError, match="all_reduce_scores: op must be"):
        all_reduce_scores([1.0], op="max")


def _rank_main(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = TaskSpecificSampler(FLOPS, num_intervals=4, warmup_steps=5, seed=9)
        seq = []
        for t in range(40):
            i = s.sample()
            seq.append(i)
            local = float(1 + rank * 10 + (i * 3 + t) % 7)  # different on every rank
            s.update(i, all_reduce_score(local), 4)
        torch.save({"seq": seq, "scores": s.scores, "mean": all_reduce_score(float(rank + 1)),
                    "sum": all_reduce_score(float(rank + 1), op="sum"),
                    "many": all_reduce_scores([float(rank + 1), 10.0 * rank, 7.0], op="sum")}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_keeps_ranks_in_lockstep(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method (spawn re-imports torch in each rank: seconds)")
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["mean"] == r1["mean"] == 1.5
    assert r0["sum"] == r1["sum"] == 3.0
    assert r0["many"] == r1["many"] == [3.0, 10.0, 14.0]  # several numbers in one collective, in order
    assert r0["seq"] == r1["seq"]
    assert torch.equal(r0["scores"].nan_to_num(-1), r1["scores"].nan_to_num(-1))
    # and it equals a single process fed the averaged scores
    s = TaskSpecificSampler(FLOPS, num_intervals=4, warmup_steps=5, seed=9)
    for t in range(40):
        i = s.sample()
        assert i == r0["seq"][t]
        s.update(i, (float(1 + (i * 3 + t) % 7) + float(11 + (i * 3 + t) % 7)) / 2, 4)
    assert torch.allclose(s.scores.nan_to_num(-1), r0["scores"].nan_to_num(-1))


# ----------------------------------------------------------------------------------------- end to end
def test_training_loop_with_snip_scores():
    """A toy palette: member i is a linear of width w_i with a shared head and one bias row per member.
    The loop samples, trains, scores from the grads it computed anyway, and deploys."""
    torch.manual_seed(0)
    widths = [2, 3, 4, 6, 8, 12]
    members = nn.ModuleList(nn.Linear(5, w) for w in widths)
    heads = nn.ModuleList(nn.Linear(w, 1) for w in widths)
    bias = nn.Parameter(torch.zeros(len(widths), 1))
    params = list(members.parameters()) + list(heads.parameters()) + [bias]
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    s = TaskSpecificSampler([5 * w + w for w in widths], num_intervals=3, warmup_steps=12, seed=0)
    for _ in range(40):
        i = s.sample()
        loss = (heads[i](torch.relu(members[i](x))) + bias[i] - y).pow(2).mean()
        loss.backward()
        own = list(members[i].parameters()) + list(heads[i].parameters()) + [(bias, i)]
        total, count = snip_score(own)
        assert count == sum(p.numel() for p in members[i].parameters()) + \
            sum(p.numel() for p in heads[i].parameters()) + 1
        s.update(i, all_reduce_score(total), count)
        with torch.no_grad():  # plain SGD (torch.optim's first step imports dynamo: seconds)
            for p in params:
                if p.grad is not None:
                    p -= 0.01 * p.grad
                    p.grad = None
    assert s.step == 40
    assert int((~s.scores.isnan()).sum()) == len(widths)  # every member got sampled and scored
    dep = s.deploy()
    assert len(dep) == len(s.intervals)
    for k, i in enumerate(dep):
        q = s.scores[s.intervals[k]]
        assert float(s.scores[i]) == float(q.max())
