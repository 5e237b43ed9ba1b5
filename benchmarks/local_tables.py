"""Tables of the local-edit comparison in docs/benchmark.md, from one or more `vitedit-lab compare` runs.

Runs on separate ``--groups`` (or methods) are merged by concatenating their edits: image draws are
seeded per group and setting, so a run on one group holds exactly the matching rows of a full run.
``--published`` adds the first ``--edits-per-group`` edits of each (group, setting) of another
results.json (e.g. the published random / gradient / L1 / L2 baselines), converting its accuracy drop
from a fraction to points (runs before the check set recorded it as a fraction, with no flip rate).

    python benchmarks/local_tables.py build/bench-A/*/results.json --published docs/benchmark-results/results.json
"""

from __future__ import annotations

import argparse
import json

from vitedit.lab.benchmark import LOCAL_METHODS, aggregate, format_ci, matched_accuracy_drop, mean_ci


def ci(r: dict, key: str) -> str:
    return format_ci(r, key, "±") if r.get(key) is not None else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--published", help="a results.json whose other methods to add")
    p.add_argument("--edits-per-group", type=int, default=1, help="edits per (group, setting) taken from --published")
    p.add_argument("--max-drop", type=float, default=0.5)
    args = p.parse_args()
    edits, check, groups = [], set(), set()
    for path in args.results:
        res = json.load(open(path))
        edits += res["edits"]
        check.add(res.get("check"))
        groups.update(res["groups"])
    methods = {e["method"] for e in edits}
    if args.published:
        pub = json.load(open(args.published))
        for e in pub["edits"]:
            if e["method"] not in methods and e["edit"] < args.edits_per_group and e["group"] in groups:
                edits.append({**e, "accuracy_drop": round(100 * e["accuracy_drop"], 4), "flip_rate": None})
    summary = aggregate(edits)
    print(f"{len(edits)} edits, groups: {', '.join(sorted(groups))}; check set: {', '.join(map(str, check))}")
    for k in sorted({e["edit_images"] for e in edits}):
        rows = [r for r in summary if r["group"] == "all" and r["edit_images"] == k]
        print(f"\n**Edits from {k} image{'s' if k > 1 else ''}** (all groups; mean ± 95% CI)\n")
        print("| method | setting | edits | success | generalization | accuracy drop (points) | flip rate | locality |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['knob']} {r['setting']:g} | {r['edits']} | {ci(r, 'success')} | "
                  f"{ci(r, 'generalization')} | {ci(r, 'accuracy_drop')} | {ci(r, 'flip_rate')} | {ci(r, 'locality')} |")
    for method in LOCAL_METHODS:
        for origin in (True, False):
            gains = matched_accuracy_drop(summary, method, origin=origin)
            if not any(g["groups"] for g in gains):
                continue
            how = ("with the unedited model as the paper's zero point (drop 0, generalization 0)" if origin else
                   "strictly inside the paper's own sweep")
            print(f"\n**{method} minus the paper's method (hypernet masks, plain fine-tune) at the same accuracy drop, "
                  f"{how}** (generalization; mean over groups ± 95% CI; `outside`: groups whose point lies outside "
                  "the paper's curve and is not compared)\n")
            print("| edit images | sparsity | groups | outside | gain |")
            print("|---|---|---|---|---|")
            for g in gains:
                cell = "n/a" if g["gain"] is None else format_ci(g, "gain", "±")
                print(f"| {g['edit_images']} | {g['setting']:g} | {g['groups']} | {g['groups_outside']} | {cell} |")
            # Overall: per group, the mean gain over its edit settings and sparsities; then over groups.
            by: dict = {}
            for r in summary:
                if r["group"] != "all" and r["generalization"] is not None and r.get("accuracy_drop") is not None:
                    by.setdefault((r["group"], r["edit_images"]), []).append(r)
            per_group: dict[str, list[float]] = {}
            for (group, k), rows in by.items():
                for g in matched_accuracy_drop(rows, method, origin=origin):
                    if g["gain"] is not None:
                        per_group.setdefault(group, []).append(g["gain"])
            means = [sum(v) / len(v) for v in per_group.values()]
            if means:
                m, half = mean_ci(means)
                print(f"\noverall ({method}, {'origin' if origin else 'strict'}): {m:+.3f}"
                      + (f" ± {half:.3f}" if half is not None else " (1 group)")
                      + f" (mean over {len(means)} groups of each group's mean gain over edit settings and sparsities)")
        for k in sorted({e["edit_images"] for e in edits}):
            own = [r for r in summary if r["group"] == "all" and r["edit_images"] == k and r["method"] == method]
            ok = [r for r in own if r["accuracy_drop"] <= args.max_drop]
            if ok:
                best = max(ok, key=lambda r: r["generalization"])
                print(f"recommended for {k}-image edits (highest mean generalization with mean drop <= {args.max_drop:g}): "
                      f"sparsity {best['setting']:g}: generalization {ci(best, 'generalization')}, drop "
                      f"{ci(best, 'accuracy_drop')}, flip rate {ci(best, 'flip_rate')}")
            elif own:
                print(f"no {method} sparsity has a mean drop <= {args.max_drop:g} for {k}-image edits")


if __name__ == "__main__":
    main()
