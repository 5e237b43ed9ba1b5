"""``vitedit report``: sweep sparsities and preservation weights, recommend one by a stated rule, plot
the trade-off and write the HTML page of the edit."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..artifacts import atomic_path, sha256_file, write_json
from ..edit import Patch
from ..errors import UsageError
from ..evaluate import resolution_note
from ..masks import validate_density
from ..workspace import Workspace
from .common import DEFAULT_SPARSITIES, Progress, _check_max_drop, _noop
from .experiment import ExperimentOptions, _Job, _edit_and_measure, _prepare, _sets_info, _sweep


@dataclass(frozen=True)
class ReportConfig:
    workspace: Path = Path(".vitedit")
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    min_locality: float = 0.9        # the rule's bound when there is no check set
    plot: Path | None = None
    experiment: ExperimentOptions = ExperimentOptions()
    preserve_weights: tuple[float, ...] = (1.0, 3.0, 10.0)  # swept with the local objective
    max_accuracy_drop: float = 0.5
    html: Path | None = None         # a self-contained HTML page of the edit (vitedit.html_report)
    command: str = "vitedit report"  # recorded on the page

    def __post_init__(self) -> None:
        _check_max_drop(self.max_accuracy_drop)
        if any(not w >= 0 for w in self.preserve_weights):
            raise UsageError("--preserve-weights: every weight must be >= 0, e.g. --preserve-weights 1,3,10")
        if not self.sparsities:
            raise UsageError("--sparsities is empty; give e.g. --sparsities 0.01,0.05,0.1")
        for s in self.sparsities:
            validate_density(s, "--sparsities")
        if not 0.0 <= self.min_locality <= 1.0:
            raise UsageError(f"--min-locality {self.min_locality} must be in [0, 1]")


MAX_ACCURACY_DROP = 0.5  # points: the recommendation rule's bound on the check-set accuracy drop


def recommend(points: Sequence[dict], locator: str, max_accuracy_drop: float = MAX_ACCURACY_DROP,
              min_locality: float | None = None) -> dict:
    """The stated rule: among ``locator``'s edits that fix every edit image (success 100%) and lose at
    most ``max_accuracy_drop`` points of check-set accuracy, the highest generalization (ties: the
    smaller accuracy drop, then the smaller sparsity). Without a check set, locality >=
    ``min_locality`` stands in for the accuracy bound (when given). If nothing qualifies: the fully
    successful edit with the smallest accuracy drop (else the smallest drop overall), said plainly."""
    own = [p for p in points if p["locator"] == locator]
    has_check = any(p.get("accuracy_drop") is not None for p in own)

    def gen(p):
        return p["generalization"] if p["generalization"] is not None else p["success"] or 0.0

    def local_enough(p):
        if has_check:
            return p["accuracy_drop"] <= max_accuracy_drop
        return min_locality is None or p["locality"] is None or p["locality"] >= min_locality

    bound = (f"accuracy drop <= {max_accuracy_drop:g} points" if has_check else
             f"locality >= {min_locality:g}" if min_locality is not None else "no check set")
    ok = [p for p in own if (p["success"] or 0) >= 1.0 and local_enough(p)]
    if ok:
        best = max(ok, key=lambda p: (gen(p), -(p.get("accuracy_drop") or 0.0), -p["sparsity"]))
        rule = f"highest generalization among {locator} edits with success 100% and {bound}"
        qualifies = True
    else:
        pool = [p for p in own if (p["success"] or 0) >= 1.0] or own
        key = (lambda p: (p["accuracy_drop"], p["sparsity"])) if has_check else \
            (lambda p: (-(p["locality"] if p["locality"] is not None else 1.0), p["sparsity"]))
        best = min(pool, key=key)
        rule = (f"no {locator} edit reached success 100% with {bound}; this is the "
                f"{'fully successful ' if pool is not own else ''}edit with the "
                f"{'smallest accuracy drop' if has_check else 'best locality'}")
        qualifies = False
    return {"sparsity": best["sparsity"], "locator": locator, "preserve_weight": best.get("preserve_weight"),
            "rule": rule, "qualifies": qualifies,
            **{k: best.get(k) for k in ("success", "generalization", "locality", "accuracy_drop", "flip_rate",
                                        "accuracy_drop_ci95", "flip_rate_ci95")}}


def run_report(cfg: ReportConfig, progress: Progress = _noop) -> dict:
    ws = Workspace(cfg.workspace)
    with ws.lock():
        job = _prepare(ws, cfg.experiment, progress)
        locator = job.state["locator"]
        locators = [locator] if locator == "random" else [locator, "random"]
        weights = (cfg.preserve_weights if job.edit_config.preserve_weight > 0 and cfg.preserve_weights
                   else [job.edit_config.preserve_weight])
        points = _sweep(job, cfg.sparsities, weights, locators, progress, "sweeping sparsities")
        rec = recommend(points, locator, cfg.max_accuracy_drop, cfg.min_locality)
        info = _sets_info(job)
        resolution = resolution_note({**rec, "check_images": info["check_images"]}, cfg.max_accuracy_drop)
        info["notes"] += [resolution] if resolution else []
        plot = cfg.plot if cfg.plot is not None else (Path(cfg.html).with_suffix(".png") if cfg.html else None)
        result = {
            "model": job.loaded.name,
            "locator": locator,
            "edit_images": len(job.edit_rows),
            **info,
            "edit_lr": job.edit_config.lr,
            "edit_config": job.edit_config.to_json(),
            "preserve_weights": list(weights),
            "base": job.base,
            "points": points,
            "recommended": rec,
            "plot": None,
        }
        if plot is not None:
            plot_tradeoff(points, Path(plot), title=f"{job.loaded.name}: the trade-off of {len(job.edit_rows)}-image edits",
                          max_accuracy_drop=cfg.max_accuracy_drop)
            result["plot"] = str(plot)
        if cfg.html is not None:
            progress("writing the HTML report", 0, 1)
            result["html"] = write_html_report(job, result, Path(cfg.html), cfg.command, cfg.max_accuracy_drop,
                                               skip_note=resolution)
            progress("writing the HTML report", 1, 1)
        write_json(ws.path("report.json"), result)
    return result


def edit_galleries(job: _Job, weights: dict) -> tuple[list[dict], list[dict]]:
    """Per-image predictions before and after an edit, grouped as the report's galleries, and the
    check set's accuracy per class before and after. ``weights``: the edited tensors (Patch.weights)."""
    import torch

    sets, refs = job.sets, job.refs
    galleries: list[dict] = []

    def items(rs, before, after, keep):
        return [{"path": str(r.path), "label": None if r.label is None else int(r.label), "before": int(b),
                 "after": int(a)} for r, b, a, k in zip(rs, before.tolist(), after.tolist(), keep.tolist()) if k]

    before, after = sets.edit.predict(), sets.edit.predict(weights)
    galleries.append({"key": "edit", "title": "Edit images", "total": len(refs["edit"]),
                      "description": "the failures the edit was fitted on (prediction before -> after)",
                      "items": items(refs["edit"], before, after, torch.ones_like(before, dtype=torch.bool))})
    if sets.holdout is not None:
        before, after = sets.holdout.predict(), sets.holdout.predict(weights)
        y = sets.holdout_labels.to(after.device)
        fixed, wrong = (after == y) & (before != y), after != y
        galleries.append({"key": "fixed", "title": "Held-out failures fixed", "total": int(fixed.sum()),
                          "description": f"{job.generalization_source} the edit never saw, now classified correctly",
                          "items": items(refs["holdout"], before, after, fixed)})
        galleries.append({"key": "still_wrong", "title": "Held-out failures still wrong", "total": int(wrong.sum()),
                          "description": "held-out failures the edited model still gets wrong",
                          "items": items(refs["holdout"], before, after, wrong)})
    per_class: list[dict] = []
    if sets.check is not None:
        after = sets.check.predict(weights)
        before, y = sets.check_base.to(after.device), sets.check_labels.to(after.device)
        changed = after != before
        galleries.append({"key": "collateral_check", "title": "Collateral: check images whose prediction changed",
                          "total": int(changed.sum()),
                          "description": f"ordinary labeled images ({job.check_dir}) the edit was not fitted on",
                          "items": items(refs["check"], before, after, changed)})
        for c in sorted(set(y.tolist())):
            sel = y == c
            per_class.append({"class": job.loaded.labels[c], "images": int(sel.sum()),
                              "before": float((before[sel] == c).float().mean()),
                              "after": float((after[sel] == c).float().mean())})
    if sets.locality is not None:
        after = sets.locality.predict(weights)
        before = sets.locality_base.to(after.device)
        changed = after != before
        galleries.append({"key": "collateral_locality", "title": "Collateral: locality images whose prediction changed",
                          "total": int(changed.sum()),
                          "description": f"fragile images ({job.locality_dir}); their true class is not known here",
                          "items": items(refs["locality"], before, after, changed)})
    return galleries, per_class


def write_html_report(job: _Job, result: dict, out: Path, command: str, max_accuracy_drop: float = MAX_ACCURACY_DROP,
                      skip_note: str | None = None) -> str:
    """The report page for the workspace's applied edit (what ``export`` ships), or, when nothing was
    applied yet, for the recommended point of the sweep. ``skip_note``: a note of ``result`` about
    another point than the one shown (the page states the shown point's own)."""
    from ..html_report import render_report

    applied = job.ws.path("patch.safetensors")
    if applied.exists():
        patch, meta = Patch.load(applied, job.loaded.identity)
        figures = {**meta.get("metrics", {}), "sparsity": meta.get("sparsity"), "units_edited": patch.units_edited,
                   "objective": (meta.get("edit_config") or {}).get("objective")}
        which = "the applied edit (what `vitedit export` ships)"
    else:
        rec = result["recommended"]
        config = replace(job.edit_config, preserve_weight=rec["preserve_weight"] or 0.0)
        point, patch = _edit_and_measure(job, job.state["locator"], rec["sparsity"], config)
        figures = {k: point[k] for k in ("success", "generalization", "locality", "accuracy_before", "accuracy_after",
                                         "accuracy_drop", "flip_rate", "accuracy_drop_ci95", "flip_rate_ci95",
                                         "sparsity", "units_edited", "steps", "objective")}
        which = "the recommended point of the sweep (no edit has been applied in this workspace)"
    weights = patch.weights(job.loaded.model)
    galleries, per_class = edit_galleries(job, weights)
    hypernet = job.state.get("hypernet")
    provenance = {"model": job.loaded.name, "weights_sha256": job.loaded.weights_sha256,
                  "locator": job.state["locator"],
                  "hypernet": (f"{hypernet} (sha256 {sha256_file(Path(hypernet))[:16]})"
                               if hypernet and Path(hypernet).exists() else hypernet or "none"),
                  "failures": job.state["failures_dir"], "preserve set": result.get("preserve_source") or "none",
                  "check set": result.get("check_source") or "none", "vitedit_version": __version__,
                  "shown": which}
    data = {"title": f"vitedit edit report: {Path(job.state['failures_dir']).name}", "command": command,
            "provenance": provenance, "figures": {**figures, "edit_images": len(job.edit_rows),
                                                  "held_out_failures": result["holdout_images"]},
            "plots": [result["plot"]] if result.get("plot") else [], "labels": list(job.loaded.labels),
            "galleries": galleries, "per_class": per_class,
            "notes": [n for n in result.get("notes") or [] if n != skip_note]}
    if (note := resolution_note({**figures, "check_images": result.get("check_images")}, max_accuracy_drop)):
        data["notes"].append(note)
    render_report(data, out)
    return str(out)


def plot_tradeoff(points: Sequence[dict], out: Path, title: str, max_accuracy_drop: float | None = MAX_ACCURACY_DROP) -> None:
    """Generalization (y) against the check-set accuracy drop and against locality (x), one curve per
    mask and preservation weight, points labelled by sparsity. A panel without data is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [(k, label) for k, label in (("accuracy_drop", "accuracy drop on the check set (points)"),
                                             ("locality", "locality (share of locality set unchanged)"))
                 if any(p.get(k) is not None for p in points)] or [("locality", "locality")]
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6 * len(axes_spec), 4.5), dpi=120, squeeze=False)
    curves = sorted({(p["locator"], p.get("preserve_weight") or 0.0) for p in points})
    for ax, (key, label) in zip(axes[0], axes_spec):
        for loc, w in curves:
            pts = sorted((p for p in points if p["locator"] == loc and (p.get("preserve_weight") or 0.0) == w),
                         key=lambda p: p["sparsity"])
            xs = [p[key] if p.get(key) is not None else float("nan") for p in pts]
            ys = [p["generalization"] if p["generalization"] is not None else float("nan") for p in pts]
            name = loc if len({c[1] for c in curves}) == 1 else f"{loc}, preserve weight {w:g}"
            ax.plot(xs, ys, marker="o", label=name)
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(f"{p['sparsity']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if key == "accuracy_drop" and max_accuracy_drop is not None:
            ax.axvline(max_accuracy_drop, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"{max_accuracy_drop:g}-point bound", (max_accuracy_drop, 0.02), fontsize=7, color="grey",
                        xytext=(3, 0), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("generalization (held-out failures fixed)")
        ax.grid(alpha=0.3)
        ax.legend(title="mask", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
