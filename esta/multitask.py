"""Several runs (tasks) in the paper's view (Figures 3 and 4, Table 3): per FLOPs interval, the mean test
accuracy of the deployed members across tasks, per group.

    summary = aggregate([load_run(d) for d in dirs])
    paths = write_summary(summary, "out/")            # out/report.json and out/report.png
    esta report RUN1 RUN2 ... --out DIR

A run is a trained and deployed run directory (config.json and report.json), or a sweep directory
(`esta sweep`), which stands for its final run. The task of a run is its `data.dataset` (or
"folder:<name>" / "builtin:<name>"); its group is the dataset's VTAB-1k group (natural, specialized,
structured) or, for any other task, the task itself (one panel per dataset, as Figure 3 draws them).
Several runs of one task (seeds) are averaged first, so every task weighs the same.

The runs must share one palette (the same members with the same FLOPs, hence the same anchors, stitching
and input size) and one division into intervals, so that interval k means the same budget in every task:
the deployed stitch of interval k can differ from task to task (deployment is task-specific), so the FLOPs
of a point is the mean of the deployed members' FLOPs (their range is kept too). For each group: the
per-interval mean accuracy and FLOPs, the anchors' mean accuracies (the paper's stars) when every run
measured them; over all tasks the same ("all"), and with two or more VTAB-1k groups also the mean of the
group means (how VTAB-1k results are often averaged), both stated by name in the JSON.
"""
from __future__ import annotations

import os
import secrets
from typing import Dict, List, Sequence

from esta.config import ConfigError, parse_config
from esta.datasets import catalog
from esta.runs import RunError, read_json, write_json

__all__ = ["load_run", "aggregate", "write_summary", "format_summary"]


def load_run(path: str) -> dict:
    """{"run", "task", "group", "report"} of a run (or sweep) directory."""
    if os.path.isfile(os.path.join(path, "sweep.json")):
        path = os.path.join(path, "final")
    config_path, report_path = os.path.join(path, "config.json"), os.path.join(path, "report.json")
    if not os.path.isfile(config_path):
        raise RunError(f"{path} is not a run directory (no config.json)")
    if not os.path.isfile(report_path):
        raise RunError(f"{path} has no report.json (deploy it first: esta deploy --run {path})")
    try:
        data = parse_config(read_json(config_path)).data
    except ConfigError as e:
        raise RunError(f"{config_path}: {e}") from None
    if data.dataset is not None:
        task, group = data.dataset, catalog.group(data.dataset)
    else:
        task = f"folder:{os.path.basename(os.path.normpath(data.folder))}" if data.folder else f"builtin:{data.builtin}"
        group = task
    report = read_json(report_path)
    missing = [r["interval"] for r in report.get("deployed", []) if r.get("accuracy") is None]
    if missing or not report.get("deployed"):
        raise RunError(f"{report_path} has no test accuracy for the deployed member of interval(s) {missing} "
                       f"(re-deploy it: esta deploy --run {path})")
    return {"run": path, "task": task, "group": group, "report": report}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _palette(run: dict):
    r = run["report"]
    return ([round(float(m["flops"]), 3) for m in r["members"]], [list(d["members"]) for d in r["deployed"]])


def _curve(tasks: Dict[str, dict], names: List[str], intervals: int, anchors: List[int]) -> dict:
    rows = []
    for k in range(intervals):
        accs = [tasks[t]["deployed"][k]["accuracy"] for t in names]
        flops = [tasks[t]["deployed"][k]["flops"] for t in names]
        rows.append({"interval": k, "flops": _mean(flops), "flops_min": min(flops), "flops_max": max(flops),
                     "accuracy": _mean(accs)})
    out = {"tasks": names, "deployed": rows, "mean_accuracy": _mean([r["accuracy"] for r in rows])}
    if all(tasks[t]["anchor_accuracy"] is not None for t in names):
        out["anchor_accuracy"] = {a: _mean([tasks[t]["anchor_accuracy"][a] for t in names]) for a in anchors}
    else:
        out["anchor_accuracy"] = None
    return out


def aggregate(runs: Sequence[dict]) -> dict:
    """The summary of the module docstring from `load_run` results."""
    if not runs:
        raise RunError("esta report needs at least one run")
    first = runs[0]
    flops0, intervals0 = _palette(first)
    for run in runs[1:]:
        flops, intervals = _palette(run)
        if flops != flops0:
            raise RunError(f"{run['run']} and {first['run']} have different palettes (members or FLOPs differ: other "
                           f"anchors, stitching or input size); a report compares runs of one palette")
        if intervals != intervals0:
            raise RunError(f"{run['run']} and {first['run']} divide the palette into different FLOPs intervals "
                           f"(train.num_intervals); a report compares runs of one division")
    members = first["report"]["members"]
    anchors = [int(a) for a in first["report"]["anchors"]]
    K = len(intervals0)
    by_task: Dict[str, List[dict]] = {}
    for run in runs:
        by_task.setdefault(run["task"], []).append(run)
    tasks = {}
    for task, rs in by_task.items():
        rows = []
        for k in range(K):
            rows.append({"interval": k,
                         "flops": _mean([float(r["report"]["deployed"][k]["flops"]) for r in rs]),
                         "accuracy": _mean([float(r["report"]["deployed"][k]["accuracy"]) for r in rs]),
                         "stitch": [r["report"]["deployed"][k]["deployed"] for r in rs]})
        measured = [r["report"].get("anchor_accuracy") for r in rs]
        anchor_acc = None
        if all(m and all(str(a) in m or a in m for a in anchors) for m in measured):
            anchor_acc = {a: _mean([float(m[str(a)] if str(a) in m else m[a]) for m in measured]) for a in anchors}
        tasks[task] = {"group": rs[0]["group"], "runs": [r["run"] for r in rs], "deployed": rows,
                       "anchor_accuracy": anchor_acc}
    order = [g for g in catalog.VTAB_GROUPS if any(t["group"] == g for t in tasks.values())]
    order += sorted({t["group"] for t in tasks.values()} - set(order))
    groups = {g: _curve(tasks, sorted(t for t in tasks if tasks[t]["group"] == g), K, anchors) for g in order}
    summary = {
        "runs": [{"run": r["run"], "task": r["task"], "group": r["group"]} for r in runs],
        "intervals": K,
        "anchors": [{"id": a, "flops": float(members[a]["flops"])} for a in anchors],
        "accuracy": "top-1 test accuracy of the deployed member of each FLOPs interval, averaged over tasks",
        "tasks": tasks,
        "groups": groups,
    }
    if len(tasks) > 1:
        summary["all"] = _curve(tasks, sorted(tasks), K, anchors)
        summary["all"]["averaged"] = "mean over tasks"
    vtab = [g for g in catalog.VTAB_GROUPS if g in groups]
    if len(vtab) > 1:
        summary["vtab_mean_of_group_means"] = {
            "groups": vtab,
            "deployed": [{"interval": k, "accuracy": _mean([groups[g]["deployed"][k]["accuracy"] for g in vtab])}
                         for k in range(K)]}
    return summary


def _unit(summary: dict):
    top = max(r["flops_max"] for g in summary["groups"].values() for r in g["deployed"])
    return (1e9, "GFLOPs") if top >= 1e9 else (1e6, "MFLOPs")


def format_summary(summary: dict) -> str:
    unit, name = _unit(summary)
    panels = dict(summary["groups"])
    if "all" in summary:
        panels["all tasks"] = summary["all"]
    lines = []
    for g, curve in panels.items():
        lines.append(f"{g} ({len(curve['tasks'])} task{'s' if len(curve['tasks']) != 1 else ''}): mean accuracy "
                     f"{100 * curve['mean_accuracy']:.2f}% over {summary['intervals']} intervals")
        lines.append("  " + "  ".join(f"{r['flops'] / unit:.3g}:{100 * r['accuracy']:.1f}%" for r in curve["deployed"])
                     + f"   ({name}:accuracy)")
    return "\n".join(lines)


def write_summary(summary: dict, directory: str) -> Dict[str, str]:
    """directory/report.json and directory/report.png (written to temporary names, then renamed)."""
    os.makedirs(directory, exist_ok=True)
    paths = {"json": write_json(directory, "report.json", summary)}
    png = os.path.join(directory, "report.png")
    tmp = f"{png}.{os.getpid()}.{secrets.token_hex(4)}.tmp.png"
    try:
        _plot(summary, tmp)
        os.replace(tmp, png)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    paths["png"] = png
    return paths


def _plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, name = _unit(summary)
    panels = dict(summary["groups"])
    if "all" in summary:
        panels["all tasks"] = summary["all"]
    n = len(panels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), dpi=120, squeeze=False)
    anchor_flops = {a["id"]: a["flops"] for a in summary["anchors"]}
    for ax, (g, curve) in zip(axes.flat, panels.items()):
        x = [r["flops"] / unit for r in curve["deployed"]]
        y = [100 * r["accuracy"] for r in curve["deployed"]]
        ax.plot(x, y, "-o", c="#d64545", ms=4, lw=1.2, label="ESTA (deployed)")
        if curve.get("anchor_accuracy"):
            ids = sorted(curve["anchor_accuracy"])
            ax.scatter([anchor_flops[a] / unit for a in ids], [100 * curve["anchor_accuracy"][a] for a in ids],
                       marker="*", s=110, c="#f0b429", edgecolors="#8d6708", zorder=3, label="anchors")
        count = len(curve["tasks"])
        ax.set_title(f"{g} ({count} task{'s' if count != 1 else ''})", fontsize=9)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("top-1 accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
