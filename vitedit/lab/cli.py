"""``vitedit-lab``: the research harness's command line, apart from the tool's.

``vitedit`` holds what a user of the tool decides (what to fix, how much, which images to keep and to
measure). The benchmarks that chose its defaults live here, with every knob they sweep visible:

- ``vitedit-lab compare``: the paper's comparison on the default model (learned vs random vs
  gradient masks vs L1/L2 fine-tuning, and the local editor on those masks), ``vitedit.lab.benchmark``;
- ``vitedit-lab stack``: many edits in one model, every group edited one after another (and all at
  once), each earlier edit re-measured after every edit, ``vitedit.lab.sequential``.

Both run behind ``vitedit``'s error boundary (``vitedit.cli.run``) and print tables, or with
``--json`` one JSON object on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli import JsonOpt, QuietOpt, SeedOpt, UI, _floats, _pct, run

app = typer.Typer(
    name="vitedit-lab",
    help="The benchmarks behind vitedit's defaults: the paper's comparison (compare) and many edits in one "
         "model (stack), on the embedded default model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

GroupsOpt = typer.Option(None, "--groups", help="Comma-separated bundled groups (default: all with enough failures).")
LocalityOpt = typer.Option(None, "--locality", help="Locality folder (from `vitedit sensitive`). Default: the bundled sensitive set.")
CheckOpt = typer.Option(None, "--check", help="Labeled check folder for the accuracy drop and flip rate. "
                        "Default: the bundled 1,000-image test sample.")
PreserveOpt = typer.Option(None, "--preserve", help="The local editor's preserve set. Default: the bundled one.")


def _names(text: Optional[str]) -> tuple[str, ...] | None:
    return tuple(g.strip() for g in text.split(",") if g.strip()) if text else None


@app.command()
def compare(
    groups: Optional[str] = GroupsOpt,
    methods: str = typer.Option(
        "hypernet,random,gradient,l1,l2,local-hypernet,local-gradient,local-random", "--methods",
        help="Any of hypernet (the paper's method), random, gradient, l1, l2, local-hypernet, local-gradient, "
             "local-random (those masks with the local editor), and two diagnostics not run by default: bilevel (the "
             "hypernetwork's training target computed on the edit images with their labels) and group-gradient "
             "(gradient masks from every failure of the group, held-out ones included: an upper bound)."),
    edit_sizes: str = typer.Option("1,3", "--edit-sizes", help="Comma-separated images per edit (1 = the paper's protocol)."),
    sparsities: str = typer.Option("0.01,0.02,0.05,0.1,0.25,0.5", "--sparsities", help="Comma-separated fractions of units to edit."),
    local_sparsities: Optional[str] = typer.Option(None, "--local-sparsities", help="The local methods' sparsities (default: --sparsities)."),
    edits_per_group: int = typer.Option(5, "--edits-per-group", help="Edits per group and setting."),
    hypernet: Optional[Path] = typer.Option(None, "--hypernet", help="Default: the shipped hypernetwork."),
    locality: Optional[Path] = LocalityOpt,
    check: Optional[Path] = CheckOpt,
    preserve: Optional[Path] = PreserveOpt,
    lr: Optional[float] = typer.Option(None, "--lr", help="Edit learning rate (default: the model's recommended value)."),
    max_steps: int = typer.Option(100, "--max-steps", help="Most optimizer steps of the plain editor."),
    out: Path = typer.Option(Path("benchmark-results"), "--out", "-o", help="Folder for the results."),
    seed: int = SeedOpt,
    published: Optional[Path] = typer.Option(
        None, "--compare", help="A published results.json: check that every mean of this run lies within its 95% CI."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """The paper's comparison (learned vs random vs gradient masks vs L1/L2 fine-tuning) on the default model."""
    from .benchmark import BenchmarkConfig, run_benchmark

    ui = UI(as_json, quiet)
    cfg = BenchmarkConfig(_names(groups), _names(methods) or (),
                          tuple(int(k) for k in _floats(edit_sizes, "--edit-sizes")), _floats(sparsities, "--sparsities"),
                          edits_per_group=edits_per_group, out=out, seed=seed, lr=lr, max_steps=max_steps,
                          hypernet=hypernet, compare_to=published, locality=locality, check=check, preserve=preserve,
                          local_sparsities=_floats(local_sparsities, "--local-sparsities") if local_sparsities else None)
    with ui.progress() as progress:
        res = run_benchmark(cfg, progress)
    if as_json:
        return ui.emit_json(res)
    _compare_tables(ui, res)
    ui.out.print(f"{res['wall_seconds']:.0f}s; results in {res['out']} (results.json, edits.csv, summary.csv, tradeoff.png)")


def _compare_tables(ui: UI, res: dict) -> None:
    from .benchmark import METRICS, format_ci

    for k in res["edit_images"]:
        rows = [r for r in res["summary"] if r["group"] == "all" and r["edit_images"] == k]
        ui.table(f"All groups, edits from {k} image(s): mean +/- 95% CI", ["method", "setting", "edits", "success",
                 "generalization", "locality", "accuracy drop (points)", "flip rate"],
                 [[r["method"], f"{r['knob']} {r['setting']:g}", r["edits"], *(format_ci(r, m) for m in METRICS)]
                  for r in rows])
    if res.get("matched_locality"):
        ui.table("Hypernetwork (and any diagnostic run) minus the best baseline at the same locality, "
                 "mean over groups +/- 95% CI",
                 ["method", "edit images", "sparsity", "best baseline", "groups", "gain", "gain vs each baseline"],
                 [[r["method"], r["edit_images"], f"{r['setting']:g}", r["best_baseline"], r["groups"], format_ci(r, "gain"),
                   ", ".join(f"{b} {g:+.3f}" for b, g in r["gain_by_baseline"].items())]
                  for r in res["matched_locality"]])
    if res.get("matched_accuracy_drop"):
        ui.table("Local editor minus the paper's method (hypernet masks, plain fine-tune) at the same check-set "
                 "accuracy drop, mean over groups +/- 95% CI (origin: the unedited model is the paper's zero point)",
                 ["method", "edit images", "sparsity", "origin", "groups", "outside the curve", "gain"],
                 [[r["method"], r["edit_images"], f"{r['setting']:g}", "yes" if r["origin"] else "no", r["groups"],
                   r["groups_outside"], format_ci(r, "gain")] for r in res["matched_accuracy_drop"]])
    if "comparison" in res:
        c = res["comparison"]
        ui.out.print(f"against {c['published']}: {c['values_checked'] - c['values_outside_ci']}/{c['values_checked']} "
                     f"values within the published 95% CI (max |difference| {c['max_abs_diff']:g})"
                     + (f"; config differs in {', '.join(c['config_differences'])}" if c["config_differences"] else "")
                     + ("" if c["overall_rows_compared"] else "; overall rows skipped (other groups)"))
        ui.out.print(f"{c['edits_identical']}/{c['edits_matched']} edits identical to the published ones")
        for o in c["outside"][:10]:
            ui.out.print(f"  outside: {o['group']} k={o['edit_images']} {o['method']} {o['setting']:g} {o['metric']}: "
                         f"published {o['published']:.4f} +/- {o['published_ci95'] or 0:.4f}, rerun {o['rerun']:.4f}")


@app.command()
def stack(
    groups: Optional[str] = GroupsOpt,
    editors: str = typer.Option("plain,local", "--editors", help="plain (the paper's editor) and/or local (the default)."),
    edit_images: int = typer.Option(10, "--edit-images", help="Failures per edit; the rest of each group is held out."),
    sparsity: float = typer.Option(0.05, "--sparsity", help="Fraction of units each edit changes."),
    orders: int = typer.Option(2, "--orders", help="Seeded orders of the groups."),
    anchor_weight: Optional[float] = typer.Option(None, "--anchor-weight", help="The local editor's hold on earlier "
                                                  "edits' images (default: the preset's; 0 = none)."),
    anchor_views: Optional[int] = typer.Option(None, "--anchor-views", help="Shifted / mirrored views of each earlier "
                                               "edit image also held (default: the preset's; 0 = none)."),
    disjoint: bool = typer.Option(False, "--disjoint", help="A later edit never changes the units an earlier edit changed."),
    locality: Optional[Path] = LocalityOpt,
    check: Optional[Path] = CheckOpt,
    preserve: Optional[Path] = PreserveOpt,
    out: Path = typer.Option(Path("benchmark-sequential"), "--out", "-o", help="Folder for the results."),
    seed: int = SeedOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Many edits in one model: every group edited one after another (and all at once), each earlier edit
    re-measured after every edit."""
    from .sequential import SequentialConfig, run_sequential

    ui = UI(as_json, quiet)
    cfg = SequentialConfig(_names(editors) or (), edit_images, orders, sparsity, seed, out, check, preserve, locality,
                           groups=_names(groups), anchor_weight=anchor_weight, anchor_views=anchor_views,
                           disjoint=disjoint)
    with ui.progress() as progress:
        res = run_sequential(cfg, progress)
    if as_json:
        return ui.emit_json({k: v for k, v in res.items() if k != "rows"})
    ui.table(f"{len(res['groups'])} groups, {res['edit_images']} edit images each, sparsity {res['sparsity']:g}, "
             f"{res['orders']} orders: after the last edit (mean over orders +/- 95% CI)",
             ["editor", "arm", "edits", "generalization", "retained", "still fixed", "worst group retained",
              "accuracy drop (points)", "flip rate"],
             [[r["editor"], r["arm"], r["edits"], _pct(r.get("mean_generalization")), _pct(r.get("mean_retained")),
               _pct(r.get("mean_still_fixed")), _pct(r.get("worst_group_retained")),
               "n/a" if r.get("accuracy_drop") is None else f"{r['accuracy_drop']:.2f}", _pct(r.get("flip_rate"))]
              for r in res["summary"]])
    ui.out.print(f"{res['wall_seconds']:.0f}s; results in {res['out']} (sequential.json, sequential.png)")


def main(argv: Optional[list[str]] = None) -> None:
    run(app, argv)


if __name__ == "__main__":
    main()
