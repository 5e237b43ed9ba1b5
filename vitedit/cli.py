"""The ``vitedit`` command line: a thin layer over ``vitedit.pipeline`` and friends.

Each command parses options, builds a frozen config, calls one library function and renders the
dict it returns: rich tables on stdout by default, or with ``--json`` one JSON object on stdout and
nothing else there. Progress bars go to stderr and are hidden with ``--quiet``, ``--json`` or when
stderr is not a terminal. ``main`` is the one error boundary: a ``VitEditError`` becomes one red
line and its documented exit code (docs/cli.md); set ``VITEDIT_DEBUG=1`` for the traceback.

Heavy imports (torch, timm, onnx) happen inside the commands, so ``vitedit --help`` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from . import __version__
from .errors import UsageError, VitEditError

app = typer.Typer(
    name="vitedit",
    help="Locate and edit the few MLP neurons of a Vision Transformer that fix a subpopulation of failures, "
         "measure generalization vs locality, and export the edited model to ONNX.",
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


class UI:
    """Output for one command: tables or JSON on stdout, progress and notes on stderr."""

    def __init__(self, as_json: bool, quiet: bool) -> None:
        from rich.console import Console

        self.as_json, self.quiet = as_json, quiet
        self.out = Console(soft_wrap=True)
        self.err = Console(stderr=True)

    @contextmanager
    def progress(self) -> Iterator:
        """Yield a ``progress(description, done, total)`` callback backed by a rich progress bar."""
        show = not (self.as_json or self.quiet) and self.err.is_terminal
        if not show:
            yield lambda *_: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        tasks: dict[str, int] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.err, transient=True) as bar:
            def update(desc: str, done: int, total: int) -> None:
                if desc not in tasks:
                    tasks[desc] = bar.add_task(desc, total=total)
                bar.update(tasks[desc], completed=done, total=total)

            yield update

    def note(self, text: str) -> None:
        if not self.as_json:
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


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 0.01,0.05,0.1") from None


def _edit_config(lr: Optional[float], max_steps: Optional[int]):
    if lr is None and max_steps is None:
        return None  # the model's recommended settings
    from .edit import EditConfig

    base = EditConfig()
    return EditConfig(lr=lr if lr is not None else base.lr, max_steps=max_steps if max_steps is not None else base.max_steps)


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
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class names, one per line (when the model has none)."),
    locator: str = typer.Option("auto", "--locator", help="hypernet, gradient or random; auto = hypernet when one is available, else gradient."),
    hypernet: Optional[str] = typer.Option(None, "--hypernet", help="Hypernetwork file, registry name or URL."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Blocks whose MLP may be edited, e.g. 7,8,9 or 7-9. Default: 3 blocks ending 2 before the last."),
    holdout: float = typer.Option(0.3, "--holdout", help="Share of the failures kept out of the edit to measure generalization."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1)."),
    skip_bad_images: bool = SkipBadOpt,
    workspace: Path = WorkspaceOpt,
    device: str = DeviceOpt,
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Score every editable unit (fc1 row / fc2 column of each edited block) for these failures."""
    from .pipeline import LocateConfig, ModelOptions, run_locate

    ui = UI(as_json, quiet)
    cfg = LocateConfig(failures, ModelOptions(model, weights, labels, device, offline or None), locator, hypernet,
                       blocks, holdout, seed, workspace, skip_bad_images)
    with ui.progress() as progress:
        res = run_locate(cfg, progress)
    if as_json:
        return ui.emit_json(res)
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
    sparsity: float = typer.Option(0.05, "--sparsity", "-s", help="Fraction of units to EDIT (density), e.g. 0.05 edits the top 5% of units. (The paper calls 1 - this the sparsity.)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Most optimizer steps (default 100)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Edit learning rate (RMSprop). Default: the model's recommended value, else 2e-5 (the paper's)."),
    holdout: Optional[float] = typer.Option(None, "--holdout", help="Share of failures held out for generalization (default: as in locate)."),
    generalization: Optional[Path] = typer.Option(None, "--generalization", help="Measure generalization on this labeled folder instead; all failures are edited."),
    locality: Optional[Path] = typer.Option(None, "--locality", help="Folder of images whose predictions must not change (see `vitedit sensitive`). Default for the embedded model: its bundled sensitive set."),
    skip_bad_images: bool = SkipBadOpt,
    workspace: Path = WorkspaceOpt,
    device: str = DeviceOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Split seed (default: as in locate)."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Edit only the top units, then measure success, generalization and locality; save the patch."""
    from .pipeline import ApplyConfig, run_apply

    ui = UI(as_json, quiet)
    cfg = ApplyConfig(workspace, sparsity, _edit_config(lr, max_steps), holdout, generalization, locality, seed,
                      device, skip_bad_images)
    with ui.progress() as progress:
        res = run_apply(cfg, progress)
    if as_json:
        return ui.emit_json(res)
    if res["locality_note"]:
        ui.note(res["locality_note"])
    ui.table(f"Edit at sparsity {res['sparsity']:g} ({res['locator']} mask)", ["metric", "before", "after", "on"],
             [["success", _pct(res["base"]["success"]), _pct(res["success"]), f"{res['edit_images']} edited images"],
              ["generalization", _pct(res["base"]["holdout_base_accuracy"]), _pct(res["generalization"]),
               f"{res['holdout_images']} {res['generalization_source']}"],
              ["locality", "100.0%", _pct(res["locality"]), f"{res['locality_images']} locality images"]])
    ui.out.print(f"edited {res['units_edited']} units ({res['params_edited']:,} weights) in {res['steps']} steps"
                 f"{'' if res['converged'] else ' (stopped at --max-steps before every image was fixed)'}")
    ui.out.print(f"patch: {res['patch']}\nedited model: {res['edited_model']}")


@app.command()
def report(
    sparsities: str = typer.Option("0.01,0.02,0.05,0.1,0.25,0.5", "--sparsities", help="Fractions of units to edit."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of generalization vs locality."),
    min_locality: float = typer.Option(0.9, "--min-locality", help="Recommend the best generalization with at least this locality."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    holdout: Optional[float] = typer.Option(None, "--holdout"),
    generalization: Optional[Path] = typer.Option(None, "--generalization"),
    locality: Optional[Path] = typer.Option(None, "--locality"),
    skip_bad_images: bool = SkipBadOpt,
    workspace: Path = WorkspaceOpt,
    device: str = DeviceOpt,
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Sweep sparsities (with random masks for contrast) and recommend one."""
    from .pipeline import ReportConfig, run_report

    ui = UI(as_json, quiet)
    cfg = ReportConfig(workspace, _floats(sparsities, "--sparsities"), min_locality, plot, _edit_config(lr, max_steps),
                       holdout, generalization, locality, seed, device, skip_bad_images)
    with ui.progress() as progress:
        res = run_report(cfg, progress)
    if as_json:
        return ui.emit_json(res)
    if res["locality_note"]:
        ui.note(res["locality_note"])
    ui.table(f"Trade-off on {res['edit_images']} edit images, {res['holdout_images']} held out, "
             f"{res['locality_images']} locality images",
             ["sparsity", "mask", "units", "steps", "success", "generalization", "locality"],
             [[f"{p['sparsity']:g}", p["locator"], p["units_edited"], p["steps"], _pct(p["success"]),
               _pct(p["generalization"]), _pct(p["locality"])] for p in res["points"]])
    r = res["recommended"]
    ui.out.print(f"recommended: --sparsity {r['sparsity']:g} ({r['rule']}): generalization {_pct(r['generalization'])}, "
                 f"locality {_pct(r['locality'])}")
    if res["plot"]:
        ui.out.print(f"plot: {res['plot']}")


@app.command()
def export(
    out: Path = typer.Argument(..., help="Output .onnx file (one self-contained file)."),
    base: bool = typer.Option(False, "--base", help="Export the unedited model instead of the edited one."),
    opset: int = typer.Option(18, "--opset"),
    atol: float = typer.Option(1e-4, "--atol", help="Largest allowed |ONNX - PyTorch| logit difference."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With --base and no workspace: the model to export."),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    workspace: Path = WorkspaceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Export the edited (or --base) model to ONNX and verify it against PyTorch on real images."""
    from .export import ExportConfig
    from .pipeline import ExportJob, run_export

    ui = UI(as_json, quiet)
    with ui.progress() as progress:
        res = run_export(ExportJob(out, workspace, base, ExportConfig(opset=opset, atol=atol), model, weights), progress)
    if as_json:
        return ui.emit_json(res)
    ui.out.print(f"wrote {res['path']} ({'base' if res['base'] else 'edited'} model, opset {res['opset']}, "
                 f"{res['exporter']} exporter)")
    ui.out.print(f"verified on {res['num_checked']} images: top-1 agreement {_pct(res['top1_agreement'])}, "
                 f"max |logit diff| {res['max_abs_diff']:.2e} (tolerance {res['atol']:g})")


@app.command()
def sensitive(
    images: Path = typer.Argument(..., help="Labeled folder (one sub-folder per true class) of in-distribution images."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to copy the sensitive images into (must not hold files of the same names)."),
    margin: float = typer.Option(0.05, "--margin", help="Keep correct images whose top-2 probability gap is below this."),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    labels: Optional[Path] = typer.Option(None, "--labels"),
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
        res = run_sensitive(SensitiveConfig(images, out, margin, ModelOptions(model, weights, labels, device),
                                            skip_bad_images), progress)
    if as_json:
        return ui.emit_json(res)
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
    offline: bool = typer.Option(False, "--offline"),
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


# ----------------------------------------------------------------------------- error boundary


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
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
