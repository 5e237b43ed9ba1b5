"""``vitedit apply``: one edit of the workspace's failures, measured, saved as a revertible patch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifacts import write_json
from ..evaluate import resolution_note
from ..masks import validate_density
from ..workspace import Workspace
from .common import DEFAULT_SPARSITIES, Progress, _check_max_drop, _noop
from .experiment import ExperimentOptions, _edit_and_measure, _prepare, _sets_info, _sweep
from .history import record_edit
from .report import recommend


@dataclass(frozen=True)
class ApplyConfig:
    """``sparsity``: the fraction of units to edit, or ``"auto"``: sweep the report's sparsities and
    keep the one the report's rule picks, judged on a validation half of the held-out failures."""

    workspace: Path = Path(".vitedit")
    sparsity: float | str = 0.05
    experiment: ExperimentOptions = ExperimentOptions()
    max_accuracy_drop: float = 0.5

    def __post_init__(self) -> None:
        if self.sparsity != "auto":
            validate_density(self.sparsity)
        _check_max_drop(self.max_accuracy_drop)


def run_apply(cfg: ApplyConfig, progress: Progress = _noop) -> dict:
    ws = Workspace(cfg.workspace)
    with ws.lock():
        job = _prepare(ws, cfg.experiment, progress, validation=cfg.sparsity == "auto")
        chosen = None
        if cfg.sparsity == "auto":
            # Choose on the validation half of the held-out failures; measure on the other half.
            points = _sweep(job, DEFAULT_SPARSITIES, [job.edit_config.preserve_weight], [job.state["locator"]],
                            progress, "choosing the sparsity", sets=job.validation)
            chosen = recommend(points, job.state["locator"], cfg.max_accuracy_drop)
            sparsity = chosen["sparsity"]
        else:
            sparsity = cfg.sparsity
        point, patch = _edit_and_measure(job, job.state["locator"], sparsity, progress=progress)
        provenance = {"sparsity": sparsity, "locator": job.state["locator"], "edit_config": job.edit_config.to_json(),
                      "seed": job.seed, "edit_images": len(job.edit_rows), "disjoint": job.exclude is not None,
                      "preserve": str(job.preserve_dir) if job.preserve is not None else None,
                      "metrics": {k: point[k] for k in ("success", "generalization", "locality", "accuracy_before",
                                                         "accuracy_after", "accuracy_drop", "flip_rate",
                                                         "accuracy_drop_ci95", "flip_rate_ci95")}}
        recorded = record_edit(job, patch, point, provenance, progress)
        info = _sets_info(job)
        if (note := resolution_note({**point, "check_images": info["check_images"]}, cfg.max_accuracy_drop)):
            info["notes"].append(note)
        result = {
            **point,
            "edit_lr": job.edit_config.lr,
            "max_steps": job.edit_config.max_steps,
            "edit_config": job.edit_config.to_json(),
            "edit_images": len(job.edit_rows),
            **info,
            "auto": None if chosen is None else {
                "rule": chosen["rule"], "qualifies": chosen["qualifies"], "validation_images": len(job.validation.holdout_labels),
                "candidates": points},
            "base": job.base,
            "on_top_of": job.stacked,
            **recorded,
            "patch": str(ws.path("patch.safetensors")),
            "edited_model": str(ws.path("edited.safetensors")),
            "skipped_bad_images": [{"path": str(b.path), "reason": b.reason} for b in job.skipped],
        }
        write_json(ws.path("apply.json"), result)
    return result
