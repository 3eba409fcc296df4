"""The deployment report (esta.deploy): Pareto frontier, McNemar dominance test, JSON, plot and shares."""
import json

import pytest
import torch

from esta.deploy import build_report, dominance, format_table, mcnemar_p, pareto_front, write_report
from esta.sampling import TaskSpecificSampler

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")


def test_pareto_front_by_hand():
    flops = {0: 1, 1: 2, 2: 2, 3: 3, 4: 4, 5: 5}
    acc = {0: 0.5, 1: 0.6, 2: 0.55, 3: 0.6, 4: 0.8, 5: 0.7}
    # 2 is beaten by 1 (same FLOPs), 3 by 1 (same accuracy, fewer FLOPs), 5 by 4
    assert pareto_front(flops, acc) == [0, 1, 4]
    assert pareto_front({0: 1, 1: 1}, {0: 0.5, 1: 0.5}) == [0]  # exact ties keep one
    assert pareto_front(flops, {}) == []


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (1, 0), (3, 1), (7, 2), (10, 10), (40, 25), (600, 540)])
def test_mcnemar_p_against_the_binomial_tail(b, c):
    stats = pytest.importorskip("scipy.stats", reason="scipy (a scikit-learn dependency) checks the tail")
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue
    assert mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_p_bad_input():
    for b, c in ((-1, 2), (1.5, 2), (True, 2), (1, None)):
        with pytest.raises(ValueError, match="mcnemar_p: [bc] must be a non-negative int"):
            mcnemar_p(b, c)


def test_dominance_paired_test():
    g = torch.Generator().manual_seed(0)
    n = 400
    base = torch.rand(n, generator=g) < 0.7
    wrong, right = (~base).nonzero().flatten(), base.nonzero().flatten()
    better = base.clone()
    better[wrong[:40]] = True          # right wherever base is, and on 40 more: clearly better (p = 2^-40)
    close = base.clone()
    close[wrong[:3]] = True            # 3 gained, 1 lost: better on the data, not significantly (p = 5/16)
    close[right[:1]] = False
    correct = {0: base, 1: better, 2: close, 3: base.clone()}
    acc = {i: float(v.float().mean()) for i, v in correct.items()}
    flops = {0: 10.0, 1: 9.0, 2: 8.0, 3: 11.0}
    j, p = dominance(0, flops, acc, correct)
    assert j == 1 and p == pytest.approx(2.0 ** -40)
    flops[1] = 12.0                    # 1 now costs more: only 2 dominates 0, and not significantly
    j, p = dominance(0, flops, acc, correct)
    assert j == 2 and p == pytest.approx(5 / 16)
    assert dominance(1, flops, acc, correct) == (None, 1.0)  # the most accurate member
    assert dominance(3, {0: 10.0, 3: 10.0}, {0: acc[0], 3: acc[3]}, correct) == (None, 1.0)  # exact tie
    with pytest.raises(ValueError, match="different lengths"):
        dominance(0, {0: 1.0, 1: 0.5}, {0: 0.5, 1: 0.9}, {0: base, 1: better[:10]})


def test_report_json_plot_and_share(tmp_path):
    from tests.helpers.models import tiny_model

    model = tiny_model()
    flops = model.flops_table((1, 3, 16, 16))
    sampler = TaskSpecificSampler(flops, num_intervals=3, seed=0)
    for i in range(len(model)):
        sampler.update(i, float(i % 7 + 1), 10)
    accuracy = {i: 0.3 + 0.02 * (i % 5) for i in range(len(model))}
    report = build_report(model, sampler, flops, accuracy)
    deployed = sampler.deploy()
    assert [r["deployed"] for r in report["deployed"]] == deployed
    front = pareto_front({i: flops[i] for i in accuracy}, accuracy)
    on = [i for i in deployed if i in front]
    assert report["deployed_on_front"] == on
    assert report["share_deployed_on_front"] == pytest.approx(len(on) / len(deployed))
    best = [d for d, members in zip(deployed, sampler.intervals) if accuracy[d] == max(accuracy[i] for i in members)]
    assert report["deployed_best_in_interval"] == best and report["share_best_in_interval"] == len(best) / len(deployed)
    chance = [sum(i in front for i in members) / len(members) for members in sampler.intervals]
    assert report["share_on_front_random_pick"] == pytest.approx(sum(chance) / len(chance))
    paths = write_report(report, str(tmp_path / "r"))
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["deployed_on_front"] == on and len(saved["members"]) == len(model)
    png = (tmp_path / "r" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 and "png" in paths
    table = format_table(report)
    assert "Pareto frontier" in table and len(table.splitlines()) == len(deployed) + 3
    assert "significance" not in report  # no per-example results given
    # with per-example results: the paired test per deployed member
    g = torch.Generator().manual_seed(1)
    correct = {i: torch.rand(300, generator=g) < accuracy[i] + 0.3 for i in range(len(model))}
    acc = {i: float(v.float().mean()) for i, v in correct.items()}
    sig_report = build_report(model, sampler, flops, acc, correct=correct)
    sig = sig_report["significance"]
    assert sig["examples"] == 300 and sig["alpha"] == 0.05
    fl = {i: float(flops[i]) for i in acc}
    for r in sig_report["deployed"]:
        assert (r["dominated_by"], r["dominance_p"]) == dominance(r["deployed"], fl, acc, correct)
        if r["deployed"] in sig_report["pareto_front"]:
            assert r["dominated_by"] is None and r["dominance_p"] == 1.0
    clear = [r["deployed"] for r in sig_report["deployed"] if r["dominance_p"] >= 0.05]
    assert sig["deployed_not_significantly_dominated"] == clear
    assert sig["share_not_significantly_dominated"] == pytest.approx(len(clear) / len(deployed))
    assert "not significantly dominated" in format_table(sig_report)
    assert len(format_table(sig_report).splitlines()) == len(deployed) + 4
    with pytest.raises(ValueError, match="no per-example results for evaluated members"):
        build_report(model, sampler, flops, acc, correct={0: correct[0]})
    with pytest.raises(ValueError, match="alpha must be in"):
        build_report(model, sampler, flops, acc, correct=correct, alpha=1.5)
    # without evaluation: no frontier claims, no plot
    bare = build_report(model, sampler, flops)
    assert "share_deployed_on_front" not in bare
    assert set(write_report(bare, str(tmp_path / "b"))) == {"json"}
