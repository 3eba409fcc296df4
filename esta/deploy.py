"""Deployment without an evaluation stage: the top-score stitch of each FLOPs interval, and its report.

    deployed = sampler.deploy()                       # ids, one per non-empty interval
    report = build_report(model, sampler, flops, accuracy)   # accuracy: {id: top-1} of the members evaluated
    write_report(report, "out/")                      # out/report.json and out/report.png

The Pareto frontier is measured on the evaluated members: member i is on it when no other evaluated member
has FLOPs <= i's and accuracy >= i's with one of the two strict. The report states how many deployed
members are on it (the paper's claim is "mostly"), the share a uniformly random member per interval
would reach on average (`share_on_front_random_pick`), the chance level the scores should beat, and how
many deployed members are the most accurate evaluated member of their own interval
(`deployed_best_in_interval`: the score's ranking, free of how the intervals compare with each other).

How much of that the test set can tell. A frontier measured on a few hundred images is partly noise: two
stitches of one interval often differ by less than one standard error of an accuracy. Given the per-example
results (`esta.evaluate.evaluate(..., per_example=True)`), `build_report` adds a paired test per deployed
member d: for every member j that dominates d on the measured data, the exact one-sided McNemar test on the
images where exactly one of the two is right (b: j right and d wrong, c: the reverse; p = P(X >= b) for
X ~ Binomial(b + c, 1/2)), and keeps the smallest p and its j (`dominance_p`, `dominated_by`). d is
"significantly dominated" when that p < `alpha` (0.05). Taking the smallest p over all dominators is not
corrected for multiple comparisons, so it errs toward calling a deployed member dominated. The strict share
on the measured frontier stays the headline number; the significance count says how many of the misses the
test set can actually distinguish from the frontier.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["pareto_front", "mcnemar_p", "dominance", "build_report", "write_report", "format_table",
           "add_lm_metrics", "relative_quality", "format_lm_table"]


def _dominates(j: int, i: int, flops, accuracy) -> bool:
    """Member j dominates member i: FLOPs <= and accuracy >=, one of the two strict."""
    return (flops[j] <= flops[i] and accuracy[j] >= accuracy[i]
            and (flops[j] < flops[i] or accuracy[j] > accuracy[i]))


def pareto_front(flops: Dict[int, float], accuracy: Dict[int, float]) -> List[int]:
    """Ids of the members (keys of `accuracy`) that no other member dominates, in ascending FLOPs."""
    ids = sorted(accuracy, key=lambda i: (flops[i], -accuracy[i], i))
    front, best = [], float("-inf")
    for i in ids:
        if accuracy[i] > best:
            dominated = any(_dominates(j, i, flops, accuracy) for j in accuracy if j != i)
            if not dominated:
                front.append(i)
            best = accuracy[i]
    return front


def mcnemar_p(b: int, c: int) -> float:
    """Exact one-sided McNemar p-value that the first of two classifiers is better: P(X >= b) for
    X ~ Binomial(b + c, 1/2), where b counts the examples only the first gets right and c those only the
    second gets right. 1.0 when b = c = 0."""
    for name, v in (("b", b), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"mcnemar_p: {name} must be a non-negative int, got {v!r}")
    n = b + c
    if b == 0:
        return 1.0
    # sum of C(n, k) / 2^n for k >= b, in log space (n can be large)
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0)
            for k in range(b, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def dominance(member: int, flops: Dict[int, float], accuracy: Dict[int, float],
              correct: Dict[int, object]) -> Tuple[Optional[int], float]:
    """(j, p): among the members j that dominate `member` on the measured data (FLOPs <= and accuracy >=,
    one strict), the one with the smallest exact McNemar p-value (`mcnemar_p`) on the per-example results
    `correct` (bool tensors or arrays of equal length); (None, 1.0) when nothing dominates it."""
    import torch

    mine = torch.as_tensor(correct[member], dtype=torch.bool)
    best: Tuple[Optional[int], float] = (None, 1.0)
    for j in accuracy:
        if j == member or j not in correct or not _dominates(j, member, flops, accuracy):
            continue
        other = torch.as_tensor(correct[j], dtype=torch.bool)
        if other.shape != mine.shape:
            raise ValueError(f"dominance: per-example results of members {j} and {member} have different "
                             f"lengths ({other.numel()} and {mine.numel()})")
        b = int((other & ~mine).sum())
        c = int((mine & ~other).sum())
        p = mcnemar_p(b, c)
        if best[0] is None or p < best[1]:
            best = (j, p)
    return best


def build_report(model, sampler, flops: Sequence[float], accuracy: Optional[Dict[int, float]] = None,
                 *, correct: Optional[Dict[int, object]] = None, alpha: float = 0.05,
                 extra: Optional[dict] = None) -> dict:
    """The deployment report (a JSON-ready dict). `correct` (per-example results of the evaluated members,
    from `esta.evaluate.evaluate(..., per_example=True)`) adds the paired significance test of the module
    docstring at level `alpha`."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"build_report: alpha must be in (0, 1), got {alpha}")
    accuracy = dict(accuracy or {})
    if correct is not None:
        missing = sorted(set(accuracy) - set(correct))
        if missing:
            raise ValueError(f"build_report: correct has no per-example results for evaluated members {missing[:8]}")
    deployed = sampler.deploy()
    scores = sampler.scores
    anchors = [s.id for s in model.stitches if s.is_anchor]
    rows = []
    for k, members in enumerate(sampler.intervals):
        chosen = deployed[k]
        rows.append({"interval": k, "members": members, "deployed": chosen, "flops": float(flops[chosen]),
                     "score": _num(scores[chosen]), "accuracy": accuracy.get(chosen),
                     "params": model.num_parameters(chosen)})
    report = {
        "deployed": rows,
        "anchors": anchors,
        "members": [{"id": s.id, "path": list(s.path), "flops": float(flops[s.id]), "score": _num(scores[s.id]),
                     "params": s.params, "accuracy": accuracy.get(s.id)} for s in model.stitches],
    }
    if accuracy:
        front = pareto_front({i: float(flops[i]) for i in accuracy}, accuracy)
        on = [r["deployed"] for r in rows if r["deployed"] in front]
        evaluated = [r["deployed"] for r in rows if r["deployed"] in accuracy]
        report["pareto_front"] = front
        report["deployed_on_front"] = on
        report["share_deployed_on_front"] = len(on) / len(evaluated) if evaluated else None
        # deployed members that are the most accurate evaluated member of their interval
        best = [r["deployed"] for r in rows if r["deployed"] in accuracy and accuracy[r["deployed"]] >=
                max(accuracy[i] for i in r["members"] if i in accuracy)]
        report["deployed_best_in_interval"] = best
        report["share_best_in_interval"] = len(best) / len(evaluated) if evaluated else None
        # the same share for a uniformly random member per interval (the chance level of the selection)
        pools = [[i for i in r["members"] if i in accuracy] for r in rows if r["deployed"] in accuracy]
        report["share_on_front_random_pick"] = (
            sum(sum(i in front for i in pool) / len(pool) for pool in pools) / len(pools) if pools else None)
        if correct is not None and evaluated:
            fl = {i: float(flops[i]) for i in accuracy}
            for r in rows:
                if r["deployed"] in accuracy:
                    j, p = dominance(r["deployed"], fl, accuracy, correct)
                    r["dominated_by"], r["dominance_p"] = j, p
            clear = [r["deployed"] for r in rows if r.get("dominance_p", 0.0) >= alpha]
            report["significance"] = {
                "test": "exact one-sided McNemar against each dominating member, smallest p kept",
                "alpha": alpha, "examples": int(len(next(iter(correct.values())))),
                "deployed_not_significantly_dominated": clear,
                "share_not_significantly_dominated": len(clear) / len(evaluated)}
        anchor_acc = [accuracy[a] for a in anchors if a in accuracy]
        if anchor_acc:
            report["anchor_accuracy"] = {a: accuracy[a] for a in anchors if a in accuracy}
            report["deployed_at_or_above_smallest_anchor"] = sum(
                1 for r in rows if r["deployed"] in accuracy and accuracy[r["deployed"]] >= min(anchor_acc))
    if extra:
        report.update(extra)
    return report


def _num(value) -> Optional[float]:
    v = float(value)
    return None if v != v else v


def format_table(report: dict) -> str:
    sig = report.get("significance")
    lines = [f"{'interval':>8} {'stitch':>6} {'GFLOPs' if _big(report) else 'MFLOPs':>9} {'params':>10} "
             f"{'score':>10} {'accuracy':>9}" + ("  p(dominated)" if sig is not None else "")]
    unit = 1e9 if _big(report) else 1e6
    front = set(report.get("pareto_front", []))
    for r in report["deployed"]:
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        mark = " *" if r["deployed"] in front else ""
        score = "" if r["score"] is None else f"{r['score']:.3e}"
        dom = ""
        if sig is not None and r.get("dominated_by") is not None:
            dom = f"{r['dominance_p']:.2g} (by {r['dominated_by']})"
        lines.append(f"{r['interval']:>8} {r['deployed']:>6} {r['flops'] / unit:>9.3f} {r['params']:>10,} "
                     f"{score:>10} {acc:>9}{mark:2} {dom}".rstrip())
    if report.get("share_deployed_on_front") is not None:
        on = len(report["deployed_on_front"])
        chance = report.get("share_on_front_random_pick")
        lines.append(f"deployed on the measured Pareto frontier (*): {on} of {len(report['deployed'])} "
                     f"({100 * report['share_deployed_on_front']:.0f}%" +
                     ("" if chance is None else f"; a random member per interval: {100 * chance:.0f}% expected") + ")")
    if report.get("share_best_in_interval") is not None:
        lines.append(f"deployed that are their interval's most accurate member: "
                     f"{len(report['deployed_best_in_interval'])} of {len(report['deployed'])}")
    if sig is not None:
        clear = len(sig["deployed_not_significantly_dominated"])
        lines.append(f"deployed not significantly dominated (exact McNemar, p >= {sig['alpha']:g}, "
                     f"{sig['examples']} test examples): {clear} of {len(report['deployed'])} "
                     f"({100 * sig['share_not_significantly_dominated']:.0f}%)")
    return "\n".join(lines)


def relative_quality(quality: Dict[int, float], reference: int) -> Dict[int, Optional[float]]:
    """Each member's quality in percent of the reference member's (the paper's Table 2: the smaller anchor's
    score is 100%); None everywhere when the reference scores 0."""
    base = quality.get(reference)
    if not base:
        return {i: None for i in quality}
    return {i: 100.0 * q / base for i, q in quality.items()}


def add_lm_metrics(report: dict, metrics: Dict[int, dict], quality_metric: str) -> dict:
    """Adds the instruction-tuning measures to a deployment report built by `build_report` with the
    members' quality as their "accuracy": each evaluated member's `metrics` (esta.evaluate.evaluate_lm), the
    name of the quality measure, and the relative quality of every evaluated member against the smallest
    anchor (member 0, = 100%). Returns the report."""
    quality = {m["id"]: m["accuracy"] for m in report["members"] if m["accuracy"] is not None}
    reference = min(report["anchors"])
    rel = relative_quality(quality, reference)
    for m in report["members"]:
        m["metrics"] = metrics.get(m["id"])
        m["relative_quality"] = rel.get(m["id"])
    for r in report["deployed"]:
        r["metrics"] = metrics.get(r["deployed"])
        r["relative_quality"] = rel.get(r["deployed"])
    report["task"] = "causal-lm"
    report["quality_metric"] = quality_metric
    report["relative_quality"] = {"reference": reference, "reference_quality": quality.get(reference),
                                  "note": "quality in percent of the smallest anchor's (the paper's Table 2)"}
    return report


def format_lm_table(report: dict) -> str:
    """Every evaluated member of an instruction-tuning report: FLOPs, held-out loss and perplexity, token
    accuracy, exact match and relative quality; D marks the deployed members, A the anchors, * the members
    on the measured frontier."""
    unit, name = (1e9, "GFLOPs") if _big(report) else (1e6, "MFLOPs")
    deployed = {r["deployed"] for r in report["deployed"]}
    anchors = set(report["anchors"])
    front = set(report.get("pareto_front", []))
    lines = [f"{'member':>6} {'path':<14} {name:>9} {'loss':>7} {'ppl':>7} {'tok acc':>8} {'exact':>7} "
             f"{'rel.':>6}  marks"]
    for m in report["members"]:
        x = m.get("metrics")
        if not x:
            continue
        f, fb, e, eb = m["path"][:4]
        path = f"anchor {f}" if m["id"] in anchors else f"{f}[..{fb}]>{e}[{eb}..]"
        em = "" if x["exact_match"] is None else f"{100 * x['exact_match']:.1f}%"
        rel = "" if m.get("relative_quality") is None else f"{m['relative_quality']:.0f}%"
        marks = ("D" if m["id"] in deployed else "") + ("A" if m["id"] in anchors else "") + \
            ("*" if m["id"] in front else "")
        lines.append(f"{m['id']:>6} {path:<14} {m['flops'] / unit:>9.3f} {x['loss']:>7.3f} {x['perplexity']:>7.2f} "
                     f"{100 * x['token_accuracy']:>7.1f}% {em:>7} {rel:>6}  {marks}")
    lines.append(f"quality: {report.get('quality_metric')}; rel. = quality in % of the smallest anchor's; "
                 f"D deployed, A anchor, * on the measured frontier")
    return "\n".join(lines)


def _big(report) -> bool:
    return max(r["flops"] for r in report["deployed"]) >= 1e9


def write_report(report: dict, directory: str, *, title: str = "ESTA deployment") -> Dict[str, str]:
    """Writes directory/report.json and, when members were evaluated, directory/report.png."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, "report.json")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    evaluated = [m for m in report["members"] if m["accuracy"] is not None]
    if evaluated:
        paths["png"] = os.path.join(directory, "report.png")
        _plot(report, evaluated, paths["png"], title)
    return paths


def _plot(report, evaluated, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, name = (1e9, "GFLOPs") if _big(report) else (1e6, "MFLOPs")
    deployed = {r["deployed"] for r in report["deployed"]}
    anchors = set(report["anchors"])
    front = report.get("pareto_front", [])
    by_id = {m["id"]: m for m in evaluated}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    others = [m for m in evaluated if m["id"] not in deployed and m["id"] not in anchors]
    ax.scatter([m["flops"] / unit for m in others], [100 * m["accuracy"] for m in others], s=18, c="#9aa5b1",
               label="stitch")
    if front:
        ax.plot([by_id[i]["flops"] / unit for i in front], [100 * by_id[i]["accuracy"] for i in front], "--",
                c="#52606d", lw=1, label="measured Pareto frontier")
    dep = [by_id[i] for i in deployed if i in by_id]
    ax.scatter([m["flops"] / unit for m in dep], [100 * m["accuracy"] for m in dep], s=46, c="#d64545",
               label="deployed (top score per interval)", zorder=3)
    anc = [by_id[i] for i in anchors if i in by_id]
    ax.scatter([m["flops"] / unit for m in anc], [100 * m["accuracy"] for m in anc], s=90, marker="*",
               c="#2186eb", label="anchor", zorder=4)
    ax.set_xlabel(name)
    ax.set_ylabel(report.get("quality_axis", "top-1 accuracy (%)"))
    share = report.get("share_deployed_on_front")
    ax.set_title(title + ("" if share is None else f" — {100 * share:.0f}% of deployed on the frontier"),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
