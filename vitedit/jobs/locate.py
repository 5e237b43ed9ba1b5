"""``vitedit locate``: score every editable unit for a folder of failures and start a workspace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..artifacts import save_tensors, sha256_file
from ..device import resolve_device
from ..errors import InputDataError, UsageError
from ..history import History
from ..models import LoadedModel, load_model, parse_blocks
from ..workspace import Workspace
from .common import (DEFAULT_SPARSITIES, ModelOptions, Progress, _check_holdout, _image_batches, _noop,
                     default_hypernet_for, split_rows)


@dataclass(frozen=True)
class LocateConfig:
    failures: Path
    model: ModelOptions = ModelOptions()
    locator: str = "auto"            # auto: hypernet if one is available for the model, else gradient
    hypernet: str | None = None
    blocks: str | None = None
    holdout: float = 0.3
    seed: int = 0
    workspace: Path = Path(".vitedit")
    skip_bad_images: bool = False
    max_edit_images: int | None = None  # cap on the edit images; every other failure is held out
    on_top: bool = False             # score with the workspace's edited model and keep its edit history

    def __post_init__(self) -> None:
        _check_holdout(self.holdout)
        if self.max_edit_images is not None and self.max_edit_images < 1:
            raise UsageError(f"--edit-images {self.max_edit_images}: give at least 1")


def run_locate(cfg: LocateConfig, progress: Progress = _noop) -> dict:
    from ..data import scan_labeled
    from ..locate import aggregate, get_locator

    ws = Workspace(cfg.workspace)
    with ws.lock():
        progress("loading model", 0, 1)
        loaded = load_model(cfg.model.name, weights=cfg.model.weights, labels_file=cfg.model.labels,
                            device=resolve_device(cfg.model.device), offline=cfg.model.offline,
                            img_size=cfg.model.img_size)
        progress("loading model", 1, 1)
        sites = tuple(loaded.sites(parse_blocks(cfg.blocks, loaded.depth)))
        stacked = _stack_for_locate(ws, loaded, sites) if cfg.on_top else 0
        locator, hypernet, hypernet_path, note = _choose_locator(cfg, loaded, sites)
        get_locator(locator)  # validates the name before any image work

        batches = _image_batches(scan_labeled(Path(cfg.failures), loaded.labels), loaded, cfg.skip_bad_images,
                                 progress, "failures")
        per_image, pred = _score(batches, loaded, sites, locator, hypernet, cfg.seed, progress)
        refs = batches.refs
        failing = [i for i, (r, p) in enumerate(zip(refs, pred)) if p != r.label]
        if not failing:
            raise InputDataError(f"the model already classifies all {len(refs)} images in {cfg.failures} correctly; "
                                 "there is nothing to edit (give images it gets wrong)")
        edit_rows, hold_rows = split_rows(len(failing), cfg.holdout, cfg.seed, cfg.max_edit_images)
        scores = aggregate(per_image, sites, edit_rows, locator)

        save_tensors(ws.path("scores.safetensors"), per_image,
                     {"kind": "per-image-scores", "model": loaded.identity, "locator": locator,
                      "sites": [s.to_json() for s in sites]})
        _clear_stale(ws, cfg.on_top)
        ws.save_state(_state(cfg, loaded, sites, locator, hypernet_path, batches, pred, failing, stacked))

    failing_set = set(failing)
    correct = [i for i in range(len(refs)) if i not in failing_set]
    return {
        "model": loaded.name,
        "model_note": loaded.note,
        "locator": locator,
        "note": note,
        "workspace": str(ws.root),
        "sites": _top_units(scores, sites),
        "total_units": scores.total,
        "failures": len(failing),
        "already_correct": len(correct),
        "already_correct_images": [str(refs[i].path) for i in correct],
        "skipped_bad_images": [{"path": str(b.path), "reason": b.reason} for b in batches.bad],
        "edit_images": len(edit_rows),
        "holdout_images": len(hold_rows),
        "selection": _selection(scores, sites),
        "on_top_of": stacked,
    }


def _choose_locator(cfg: LocateConfig, loaded: LoadedModel, sites) -> tuple[str, object, Path | None, str | None]:
    """(locator, hypernetwork or None, its path or None, a note): ``auto`` is the hypernetwork when one
    is available for the model, else the gradient locator (with a note saying so)."""
    locator = cfg.locator
    if locator not in ("auto", "hypernet"):
        return locator, None, None, None
    hypernet_path = _resolve_hypernet(cfg.hypernet, loaded, cfg.model.offline)
    if hypernet_path is None and locator == "hypernet":
        raise UsageError("--locator hypernet needs --hypernet PATH|NAME: no hypernetwork ships for "
                         f"{loaded.name}; train one with `vitedit meta-train` or use --locator gradient")
    if hypernet_path is None:
        return "gradient", None, None, (f"no hypernetwork is available for {loaded.name}, so the gradient locator "
                                        "was used; pass --hypernet or train one with `vitedit meta-train`")
    from ..hypernet import load_hypernet

    hypernet, _ = load_hypernet(hypernet_path, loaded.identity, sites)
    hypernet.to(next(loaded.model.parameters()).device)
    return "hypernet", hypernet, hypernet_path, None


def _score(batches, loaded: LoadedModel, sites, locator: str, hypernet, seed: int,
           progress: Progress) -> tuple[dict, list[int]]:
    """One pass over the images: per-image unit scores of the ones the model gets wrong, and the
    model's prediction for every image."""
    import torch

    from ..locate import score_batches

    device = next(loaded.model.parameters()).device
    pred: list[int] = []

    def failures_per_batch():
        """The base model's predictions, and each batch's failures for the locator."""
        for i, (x, chunk) in enumerate(batches):
            progress(f"scoring units ({locator})", i, len(batches))
            x = x.to(device)
            y = torch.tensor([r.label for r in chunk], dtype=torch.long, device=device)
            with torch.inference_mode():
                p = loaded.model(x).argmax(-1)
            pred.extend(p.tolist())
            wrong = p != y
            yield x[wrong], y[wrong]
        progress(f"scoring units ({locator})", len(batches), len(batches))

    per_image = score_batches(locator, loaded.model, sites, failures_per_batch(), seed, hypernet)
    return per_image, pred


def _clear_stale(ws: Workspace, on_top: bool) -> None:
    """A new locate invalidates the previous job's outputs (with --on-top: only the last report)."""
    stale = ("report.json",) if on_top else ("patch.safetensors", "patch.json", "edited.safetensors",
                                             "edited.json", "apply.json", "report.json")
    for name in stale:
        if ws.path(name).exists():
            ws.path(name).unlink()
    if not on_top:
        History(ws).clear()


def _state(cfg: LocateConfig, loaded: LoadedModel, sites, locator: str, hypernet_path: Path | None, batches,
           pred: list[int], failing: list[int], stacked: int) -> dict:
    """The workspace state apply, report and export start from."""
    failing_set = set(failing)
    return {
        "vitedit_version": __version__,
        "model": {"name": loaded.name, "weights": str(Path(cfg.model.weights).resolve()) if cfg.model.weights else None,
                  "labels_file": str(Path(cfg.model.labels).resolve()) if cfg.model.labels else None,
                  "weights_sha256": loaded.weights_sha256, "img_size": cfg.model.img_size},
        "labels": loaded.labels,
        "sites": [s.to_json() for s in sites],
        "locator": locator,
        "hypernet": str(hypernet_path) if hypernet_path else None,
        "failures_dir": str(Path(cfg.failures).resolve()),
        # Failing images are kept by path and content hash, re-read in batches by apply/report/export.
        "images": [{"path": str(Path(r.path).absolute()), "label": int(r.label), "prediction": int(p),
                    **({"sha256": sha256_file(r.path)} if i in failing_set else {})}
                   for i, (r, p) in enumerate(zip(batches.refs, pred))],
        "failing": failing,
        "skipped": [{"path": str(b.path), "reason": b.reason} for b in batches.bad],
        "holdout": cfg.holdout,
        "max_edit_images": cfg.max_edit_images,
        "seed": cfg.seed,
        "on_top_of": stacked,
    }


def _top_units(scores, sites) -> list[dict]:
    """Each site with its five best-scored units."""
    import torch

    out = []
    for s in sites:
        top = torch.topk(scores.scores[s.param], k=min(5, s.units))
        out.append({**s.to_json(), "top_units": top.indices.tolist(),
                    "top_scores": [round(float(v), 4) for v in top.values]})
    return out


def _selection(scores, sites) -> dict:
    """Units selected at each default sparsity, in all and per site."""
    selection = {}
    for d in DEFAULT_SPARSITIES:
        mask = scores.select(d)
        selection[str(d)] = {"units": mask.selected,
                             "per_site": {f"{s.block}.{s.matrix}": int(mask.indices[s.param].numel()) for s in sites}}
    return selection


def _stack_for_locate(ws: Workspace, loaded: LoadedModel, sites) -> int:
    """``--on-top``: write the workspace's edit stack into ``loaded.model``; the number of edits."""
    history = History(ws)
    if not history.exists:
        return 0
    identity = loaded.identity  # the base model's, computed before the stack goes in
    old = ws.state() if ws.exists else {}
    if [s.to_json() for s in sites] != old.get("sites"):
        raise UsageError("--on-top edits the same units as the workspace's earlier edits; leave out --blocks (or give "
                         "the same blocks as before)")
    return history.apply_stack(loaded.model, identity)


def _resolve_hypernet(spec: str | None, loaded: LoadedModel, offline: bool | None) -> Path | None:
    if spec is None:
        return default_hypernet_for(loaded)
    from ..hub import resolve

    return Path(resolve(spec, offline=offline))
