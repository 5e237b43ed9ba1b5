"""Print the markdown tables of docs/benchmark.md from a `vitedit-lab compare` results.json.

    python benchmarks/benchmark_tables.py docs/benchmark-results/results.json
    python benchmarks/benchmark_tables.py docs/benchmark-results/results.json --hypernet-from other/results.json

``--hypernet-from`` replaces the hypernet rows with those of another run (for example a run with
``--methods hypernet --hypernet OTHER``) before computing the tables. ``--add`` takes every method of
another run (for example ``--methods bilevel``), replacing those rows where both runs have them. This
is sound because image draws are seeded per group and setting: both runs edited the same images.
"""

from __future__ import annotations

import argparse
import json

from vitedit.lab.benchmark import ORACLES, aggregate, format_ci, matched_locality


def ci(r: dict, key: str) -> str:
    return format_ci(r, key, "±")


def gain_cell(gain: float, ci95: float | None) -> str:
    """A matched-locality gain with its CI, or the one group it rests on when there is no CI."""
    return f"{gain:+.3f} (1 group)" if ci95 is None else f"{gain:+.3f} ± {ci95:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results")
    p.add_argument("--hypernet-from", help="take the hypernet edits from this results.json instead")
    p.add_argument("--add", action="append", default=[], help="take every method's edits from this results.json "
                   "(repeatable)")
    args = p.parse_args()
    res = json.load(open(args.results))
    edits = res["edits"]
    if args.hypernet_from:
        other = json.load(open(args.hypernet_from))
        edits = [e for e in edits if e["method"] != "hypernet"] + [e for e in other["edits"] if e["method"] == "hypernet"]
    for path in args.add:
        other = json.load(open(path))["edits"]
        added = {e["method"] for e in other}
        edits = [e for e in edits if e["method"] not in added] + other
    summary = aggregate(edits)
    for k in res["edit_images"]:
        rows = [r for r in summary if r["group"] == "all" and r["edit_images"] == k]
        print(f"\n**Edits from {k} image{'s' if k > 1 else ''}** (all groups; mean ± 95% CI over "
              f"{rows[0]['edits']} edits per row)\n")
        print("| method | setting | success | generalization | locality | accuracy drop (points) | flip rate |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            flips = ci(r, "flip_rate") if r.get("flip_rate") is not None else "n/a"
            print(f"| {r['method']} | {r['knob']} {r['setting']:g} | {ci(r, 'success')} | {ci(r, 'generalization')} | "
                  f"{ci(r, 'locality')} | {ci(r, 'accuracy_drop')} | {flips} |")
    methods = {e["method"] for e in edits}
    for other, name in (("random", "random masks"), ("bilevel", "the bilevel oracle")):
        if other not in methods:
            continue
        for k in res["edit_images"]:
            by = {(r["method"], r["setting"]): r for r in summary if r["group"] == "all" and r["edit_images"] == k}
            print(f"\n**Hypernetwork vs {name} at the same sparsity, edits from {k} image(s)**\n")
            print(f"| sparsity | generalization: hypernet vs {other} | locality: hypernet vs {other} | success: {other} |")
            print("|---|---|---|---|")
            for (m, s), h in sorted(by.items()):
                if m != "hypernet" or (other, s) not in by:
                    continue
                r = by[(other, s)]
                print(f"| {s:g} | {ci(h, 'generalization')} vs {ci(r, 'generalization')} | "
                      f"{ci(h, 'locality')} vs {ci(r, 'locality')} | {r['success']:.3f} |")
    for method in ("hypernet",) + ORACLES:
        gains = matched_locality(summary, method)
        if not gains:
            continue
        name = {"hypernet": "Hypernetwork", "bilevel": "The bilevel oracle",
                "group-gradient": "The group-gradient upper bound"}.get(method, method)
        print(f"\n**{name} minus each baseline at matched locality** (generalization points; mean over "
              "groups ± 95% CI across groups; `groups` counts those where the best baseline's curve overlaps)\n")
        print("| edit images | sparsity | groups | best baseline | gain vs best | gradient | random | l1 | l2 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for g in gains:
            per, half = g["gain_by_baseline"], g["gain_ci95_by_baseline"]
            cells = [gain_cell(per[b], half[b]) if b in per else "n/a" for b in ("gradient", "random", "l1", "l2")]
            print(f"| {g['edit_images']} | {g['setting']:g} | {g['groups']} | {g['best_baseline']} | "
                  f"{gain_cell(g['gain'], g['gain_ci95'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
