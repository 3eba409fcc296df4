"""The demo's per-seed table (docs/demo-results.md) from the report.json of `esta demo --seed N` runs.

    for s in 0 1 2 3 4; do python -m esta demo --seed $s --out /tmp/vitdemo-$s; done
    python scripts/demo_seed_table.py /tmp/vitdemo-{0,1,2,3,4}

Prints a Markdown table: per seed, the deployed members on the measured Pareto frontier, the share a random
member per interval would reach (expected), the deployed that are their interval's most accurate member, and
those not significantly dominated (exact one-sided McNemar, the report's alpha); then the totals, and each run's
anchors and deployed members with their accuracies.
"""
import json
import sys
from pathlib import Path


def _seed(run: Path):
    config = json.loads((run / "config.json").read_text())
    return config["train"]["seed"]


def main(runs):
    rows, totals = [], dict(n=0, front=0, best=0, notdom=0, chance=[])
    details = []
    for run in map(Path, runs):
        r = json.loads((run / "report.json").read_text())
        n = len(r["deployed"])
        front = len(r["deployed_on_front"])
        best = len(r["deployed_best_in_interval"])
        notdom = len(r["significance"]["deployed_not_significantly_dominated"])
        chance = r["share_on_front_random_pick"]
        rows.append(f"| {_seed(run)} | {front} of {n} | {100 * chance:.0f}% | {best} of {n} | {notdom} of {n} |")
        totals["n"] += n
        totals["front"] += front
        totals["best"] += best
        totals["notdom"] += notdom
        totals["chance"].append(chance)
        acc = r["anchor_accuracy"]
        dep = ", ".join(f"#{d['deployed']} {100 * d['accuracy']:.1f}%" for d in r["deployed"])
        details.append(f"| {_seed(run)} | " + ", ".join(f"{100 * acc[str(a)]:.1f}%" for a in r["anchors"])
                       + f" | {dep} |")
    t = totals
    pct = lambda k: f"{t[k]} of {t['n']} ({100 * t[k] / t['n']:.0f}%)"  # noqa: E731
    print("| seed | on the frontier | random pick (expected) | best of its interval | not significantly dominated |")
    print("|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"| all | **{pct('front')}** | {100 * sum(t['chance']) / len(t['chance']):.0f}% | {pct('best')} | "
          f"{pct('notdom')} |")
    print()
    print("| seed | anchors Ti, S, B | deployed, cheapest interval first |")
    print("|---:|---|---|")
    print("\n".join(details))


if __name__ == "__main__":
    main(sys.argv[1:])
