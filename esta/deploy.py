"""Deployment without an evaluation stage: the top-score stitch of each FLOPs interval, and its report.

    deployed = sampler.deploy()                       # ids, one per non-empty interval
    report = build_report(model, sampler, flops, accuracy)   # accuracy: {id: top-1} of the members evaluated
    write_report(report, "out/")                      # out/report.json and out/report.png

The Pareto frontier is measured on the evaluated members: member i is on it when no other evaluated member
has FLOPs <= i's and accuracy >= i's with one of the two strict. The report states how many deployed
members are on it (the paper's claim is "mostly").
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

__all__ = ["pareto_front", "build_report", "write_report", "format_table"]


def pareto_front(flops: Dict[int, float], accuracy: Dict[int, float]) -> List[int]:
    """Ids of the members (keys of `accuracy`) that no other member dominates, in ascending FLOPs."""
    ids = sorted(accuracy, key=lambda i: (flops[i], -accuracy[i], i))
    front, best = [], float("-inf")
    for i in ids:
        if accuracy[i] > best:
            dominated = any(flops[j] <= flops[i] and accuracy[j] >= accuracy[i] and
                            (flops[j] < flops[i] or accuracy[j] > accuracy[i]) for j in accuracy if j != i)
            if not dominated:
                front.append(i)
            best = accuracy[i]
    return front


def build_report(model, sampler, flops: Sequence[float], accuracy: Optional[Dict[int, float]] = None,
                 *, extra: Optional[dict] = None) -> dict:
    """The deployment report (a JSON-ready dict)."""
    accuracy = dict(accuracy or {})
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
    lines = [f"{'interval':>8} {'stitch':>6} {'GFLOPs' if _big(report) else 'MFLOPs':>9} {'params':>10} "
             f"{'score':>10} {'accuracy':>9}"]
    unit = 1e9 if _big(report) else 1e6
    front = set(report.get("pareto_front", []))
    for r in report["deployed"]:
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        mark = " *" if r["deployed"] in front else ""
        score = "" if r["score"] is None else f"{r['score']:.3e}"
        lines.append(f"{r['interval']:>8} {r['deployed']:>6} {r['flops'] / unit:>9.3f} {r['params']:>10,} "
                     f"{score:>10} {acc:>9}{mark}")
    if report.get("share_deployed_on_front") is not None:
        on = len(report["deployed_on_front"])
        lines.append(f"deployed on the measured Pareto frontier (*): {on} of {len(report['deployed'])} "
                     f"({100 * report['share_deployed_on_front']:.0f}%)")
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
    ax.set_ylabel("top-1 accuracy (%)")
    share = report.get("share_deployed_on_front")
    ax.set_title(title + ("" if share is None else f" — {100 * share:.0f}% of deployed on the frontier"),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
