"""Markdown tables of `vitedit-lab stack` results (docs/benchmark.md, "Many edits in one
model"): the summary after the last edit, retained generalization and check accuracy per number of
edits, and every group's retained share after the last edit.

    python benchmarks/sequential_tables.py docs/benchmark-results/sequential/*/sequential.json

Several files (runs of different editors or settings) are printed one after another, each under
its own label (its folder name).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def num(v, ci=None, digits=3) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci else "")


def summary_table(res: dict) -> list[str]:
    lines = ["| editor | arm | generalization | retained | still fixed | worst group retained | accuracy drop (points) | flips |",
             "|---|---|---|---|---|---|---|---|"]
    n = len(res["groups"])
    for s in res["summary"]:
        if s["arm"] == "single":
            lines.append(f"| {s['editor']} | single (mean over groups) | {num(s['mean_generalization'])} | | | | | "
                         f"{pct(s['flip_rate'])} |")
            continue
        arm = f"sequential, after {n} edits ({s['runs']} order{'s' if s['runs'] > 1 else ''})" \
            if s["arm"] == "sequential" else "batch"
        lines.append(f"| {s['editor']} | {arm} | {num(s['mean_generalization'], s.get('mean_generalization_ci95'))} | "
                     f"{num(s['mean_retained'], s.get('mean_retained_ci95'))} | "
                     f"{num(s['mean_still_fixed'], s.get('mean_still_fixed_ci95'))} | {num(s['worst_group_retained'])} | "
                     f"{num(s['accuracy_drop'], s.get('accuracy_drop_ci95'), 2)} | {pct(s['flip_rate'])} |")
    return lines


def steps_table(res: dict) -> list[str]:
    rows = [r for r in res["rows"] if r["arm"] == "sequential"]
    n = len(res["groups"])
    orders = sorted({r["order"] for r in rows})
    lines = ["| edits | " + " | ".join(str(k) for k in range(1, n + 1)) + " |", "|---" * (n + 1) + "|"]
    for editor in sorted({r["editor"] for r in rows}):
        for key, label in (("mean_retained", "retained"), ("check_accuracy", "check accuracy")):
            cells = []
            for k in range(1, n + 1):
                vals = [next((r[key] for r in rows if r["editor"] == editor and r["order"] == o and r["step"] == k), None)
                        for o in orders]
                cells.append(" / ".join("" if v is None else f"{v:.{2 if key == 'mean_retained' else 3}f}" for v in vals))
            lines.append(f"| {editor}, {label} | " + " | ".join(cells) + " |")
    return lines


def groups_table(res: dict) -> list[str]:
    n = len(res["groups"])
    final = [r for r in res["rows"] if r["step"] == n and r["arm"] in ("sequential", "batch")]
    lines = ["| editor | run | " + " | ".join(res["groups"]) + " |", "|---|---" + "|---" * n + "|"]
    for r in final:
        by = {g["group"]: g["retained"] for g in r["groups"]}
        run = f"order {r['order']}" if r["arm"] == "sequential" else "batch"
        lines.append(f"| {r['editor']} | {run} | " + " | ".join(num(by.get(g), digits=2) for g in res["groups"]) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args()
    for path in args.results:
        res = json.loads(path.read_text())
        cfg = res.get("edit_configs", {}).get("local", {})
        print(f"## {path.parent.name}: {len(res['groups'])} groups, {res['orders']} orders, "
              f"sparsity {res['sparsity']:g}, anchor weight {cfg.get('anchor_weight', 0)}, "
              f"anchor views {cfg.get('anchor_views', 0)}, disjoint units {res.get('config', {}).get('disjoint', False)}, "
              f"preserve targets {res.get('config', {}).get('preserve_targets', '(not recorded)')}, "
              f"{res['wall_seconds']:.0f} s\n")
        for table in (summary_table(res), steps_table(res), groups_table(res)):
            print("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
