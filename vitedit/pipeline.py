"""The jobs behind the CLI commands: one public function per command, each taking a frozen config
and returning a plain result dict (what ``--json`` prints). Nothing here prints; long work reports
through ``progress(description, done, total)``.

locate -> apply -> report -> export share a workspace (``vitedit.workspace``); apply and report use
the same seeded split of the failures into *edit* images (used to choose and fit the edit) and
*held-out* images (used only to measure generalization).

Memory is bounded whatever the number of images: every image set is read in batches
(``data.ImageBatches``); the workspace records the failing images by path and sha256, not as
tensors; apply and report load only the edit images (few) at once and stream the held-out and
locality sets through ``evaluate.TokenCache``, which keeps their prefix tokens only under a budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from . import __version__
from .artifacts import atomic_path, load_tensors, save_tensors, sha256_file, write_json
from .edit import EditConfig, Patch, edit
from .errors import InputDataError, ModelError, UsageError, WorkspaceError
from .masks import validate_density
from .models import DEFAULT_ASSETS, DEFAULT_MODEL, LoadedModel, Site, load_model, parse_blocks
from .workspace import Workspace

if TYPE_CHECKING:
    import torch

    from .data import ImageBatches, ImageRef

Progress = Callable[[str, int, int], None]
DEFAULT_SPARSITIES = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)


def _noop(*_args) -> None:
    pass


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ModelOptions:
    name: str | None = None          # None: the embedded default
    weights: Path | None = None
    labels: Path | None = None
    device: str = "auto"
    offline: bool | None = None
    img_size: int | None = None      # with weights: the image size they were trained at (None: read from them)

    def __post_init__(self) -> None:
        if self.img_size is not None and self.weights is None:
            raise UsageError("--img-size applies to a --weights file (the size it was trained at); drop it, "
                             "or pass --model NAME --weights FILE")
        if self.img_size is not None and self.img_size < 1:
            raise UsageError(f"--img-size {self.img_size}: give the image side in pixels, e.g. --img-size 224")


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

    def __post_init__(self) -> None:
        _check_holdout(self.holdout)
        if self.max_edit_images is not None and self.max_edit_images < 1:
            raise UsageError(f"--edit-images {self.max_edit_images}: give at least 1")


@dataclass(frozen=True)
class ExperimentOptions:
    """How apply and report set up an experiment on a workspace (the same for both)."""

    edit: dict | None = None         # overrides (lr, max_steps) over the model's recommended settings
    holdout: float | None = None     # None: the split recorded by locate
    generalization: Path | None = None
    locality: Path | None = None
    seed: int | None = None          # None: the seed recorded by locate
    device: str = "auto"
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        if self.holdout is not None:
            _check_holdout(self.holdout)
        if self.holdout is not None and self.generalization is not None:
            raise UsageError("give either --holdout or --generalization DIR, not both")


@dataclass(frozen=True)
class ApplyConfig:
    workspace: Path = Path(".vitedit")
    sparsity: float = 0.05
    experiment: ExperimentOptions = ExperimentOptions()

    def __post_init__(self) -> None:
        validate_density(self.sparsity)


@dataclass(frozen=True)
class ReportConfig:
    workspace: Path = Path(".vitedit")
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    min_locality: float = 0.9
    plot: Path | None = None
    experiment: ExperimentOptions = ExperimentOptions()

    def __post_init__(self) -> None:
        if not self.sparsities:
            raise UsageError("--sparsities is empty; give e.g. --sparsities 0.01,0.05,0.1")
        for s in self.sparsities:
            validate_density(s, "--sparsities")
        if not 0.0 <= self.min_locality <= 1.0:
            raise UsageError(f"--min-locality {self.min_locality} must be in [0, 1]")


def _check_holdout(h: float) -> None:
    if not 0.0 <= h < 1.0:
        raise UsageError(f"--holdout {h}: give the share of failures kept out of the edit, in [0, 1), e.g. 0.3")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r}: choose auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine; use --device cpu")
    return device


# ----------------------------------------------------------------------------- helpers


def _load_workspace_model(ws: Workspace, state: dict, device: str) -> LoadedModel:
    spec = state["model"]
    try:
        loaded = load_model(spec["name"], weights=Path(spec["weights"]) if spec.get("weights") else None,
                            labels_file=Path(spec["labels_file"]) if spec.get("labels_file") else None,
                            device=resolve_device(device), img_size=spec.get("img_size"))
    except ModelError as e:
        raise WorkspaceError(f"the workspace {ws.root} was made for {spec['name']}"
                             f"{' with ' + spec['weights'] if spec.get('weights') else ''}, which no longer loads ({e}); "
                             "rerun `vitedit locate` or use another --workspace") from None
    if loaded.weights_sha256 != spec["weights_sha256"]:
        raise WorkspaceError(
            f"the workspace {ws.root} was made for {spec['name']} (weights {spec['weights_sha256'][:12]}) but the model "
            f"loaded now has weights {loaded.weights_sha256[:12]}; rerun `vitedit locate` or use another --workspace")
    return loaded


def _load_labeled(root: Path, loaded: LoadedModel, skip_bad: bool, progress: Progress, what: str):
    import torch

    from .data import load_tensors as load_images, scan_labeled

    refs = scan_labeled(Path(root), loaded.labels)
    images, good, bad = load_images(refs, loaded.transform, loaded.channels, skip_bad=skip_bad,
                                    progress=lambda d, t: progress(f"loading {what}", d, t))
    labels = torch.tensor([r.label for r in good], dtype=torch.long)
    return images, labels, good, bad


def _image_batches(refs: Sequence["ImageRef"], loaded: LoadedModel, skip_bad: bool, progress: Progress,
                   what: str) -> "ImageBatches":
    """``refs`` as bounded-memory batches; bad images are found (and raised or skipped) up front."""
    from .data import ImageBatches
    from .evaluate import DEFAULT_BATCH

    return ImageBatches(refs, loaded.transform, loaded.channels, DEFAULT_BATCH, skip_bad=skip_bad,
                        progress=lambda d, t: progress(f"loading {what}", d, t))


def _stream(batches: "ImageBatches", device) -> Callable:
    """A ``TokenCache`` source: re-reads the images batch by batch each time it is called."""
    return lambda: (x.to(device) for x, _ in batches)


def _failure_refs(ws: Workspace, state: dict, limit: int | None = None) -> list["ImageRef"]:
    """The failing images recorded by ``locate`` (the first ``limit``), checked to be the same files.

    A file that was moved, deleted or changed since (sha256) is a ``WorkspaceError`` naming it.
    """
    from .data import ImageRef

    entries = [state["images"][i] for i in state["failing"]][:limit]
    if any("sha256" not in e for e in entries):
        raise WorkspaceError(f"the workspace state {ws.root / 'workspace.json'} records no sha256 for some failing "
                             "images (it was edited or damaged); rerun `vitedit locate FAILURES`")
    missing, changed = [], []
    for e in entries:
        path = Path(e["path"])
        if not path.is_file():
            missing.append(path)
        elif sha256_file(path) != e["sha256"]:
            changed.append(path)
    for paths, what in ((missing, "is missing (moved, renamed or deleted)"), (changed, "has changed")):
        if paths:
            more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
            raise WorkspaceError(f"failure image {paths[0]}{more} {what} since `vitedit locate` recorded it in "
                                 f"{ws.root}; put it back or rerun `vitedit locate FAILURES`")
    return [ImageRef(Path(e["path"]), int(e["label"]), None) for e in entries]


def _predict(model, images: "torch.Tensor", batch: int = 256) -> "torch.Tensor":
    import torch

    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)]) if len(images) else \
            torch.empty(0)


def split_rows(n: int, holdout: float, seed: int, max_edit: int | None = None) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` failures into (edit rows, held-out rows); at least one edit row and at
    most ``max_edit`` (the rest is held out)."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = int(round(holdout * n))
    if max_edit is not None:
        n_hold = max(n_hold, n - max_edit)
    n_hold = min(n_hold, n - 1)
    return sorted(perm[n_hold:]), sorted(perm[:n_hold])


def default_hypernet_for(loaded: LoadedModel) -> Path | None:
    """The hypernetwork shipped with the embedded default model, if this installation has one."""
    if loaded.name == DEFAULT_MODEL and (DEFAULT_ASSETS / "hypernet.safetensors").exists():
        return DEFAULT_ASSETS / "hypernet.safetensors"
    return None


def default_locality_dir(loaded: LoadedModel) -> Path | None:
    if loaded.name == DEFAULT_MODEL and (DEFAULT_ASSETS / "sensitive").is_dir():
        return DEFAULT_ASSETS / "sensitive"
    return None


# ----------------------------------------------------------------------------- locate


def run_locate(cfg: LocateConfig, progress: Progress = _noop) -> dict:
    import torch

    from .data import scan_labeled
    from .locate import aggregate, get_locator, score_batches

    ws = Workspace(cfg.workspace)
    with ws.lock():
        progress("loading model", 0, 1)
        loaded = load_model(cfg.model.name, weights=cfg.model.weights, labels_file=cfg.model.labels,
                            device=resolve_device(cfg.model.device), offline=cfg.model.offline,
                            img_size=cfg.model.img_size)
        progress("loading model", 1, 1)
        device = next(loaded.model.parameters()).device
        blocks = parse_blocks(cfg.blocks, loaded.depth)
        sites = tuple(loaded.sites(blocks))

        locator, hypernet, hypernet_path, note = cfg.locator, None, None, None
        if locator in ("auto", "hypernet"):
            hypernet_path = _resolve_hypernet(cfg.hypernet, loaded, cfg.model.offline)
            if hypernet_path is None and locator == "hypernet":
                raise UsageError("--locator hypernet needs --hypernet PATH|NAME: no hypernetwork ships for "
                                 f"{loaded.name}; train one with `vitedit meta-train` or use --locator gradient")
            if hypernet_path is None:
                locator = "gradient"
                note = (f"no hypernetwork is available for {loaded.name}, so the gradient locator was used; "
                        "pass --hypernet or train one with `vitedit meta-train`")
            else:
                from .hypernet import load_hypernet

                locator = "hypernet"
                hypernet, _ = load_hypernet(hypernet_path, loaded.identity, sites)
                hypernet.to(device)
        get_locator(locator)  # validates the name before any image work

        batches = _image_batches(scan_labeled(Path(cfg.failures), loaded.labels), loaded, cfg.skip_bad_images,
                                 progress, "failures")
        refs, bad = batches.refs, batches.bad
        pred: list[int] = []

        def failures_per_batch():
            """One pass: the base model's predictions, and each batch's failures for the locator."""
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

        per_image = score_batches(locator, loaded.model, sites, failures_per_batch(), cfg.seed, hypernet)
        failing = [i for i, (r, p) in enumerate(zip(refs, pred)) if p != r.label]
        if not failing:
            raise InputDataError(f"the model already classifies all {len(refs)} images in {cfg.failures} correctly; "
                                 "there is nothing to edit (give images it gets wrong)")
        failing_set = set(failing)
        correct = [i for i in range(len(refs)) if i not in failing_set]
        edit_rows, hold_rows = split_rows(len(failing), cfg.holdout, cfg.seed, cfg.max_edit_images)
        scores = aggregate(per_image, sites, edit_rows, locator)

        save_tensors(ws.path("scores.safetensors"), per_image,
                     {"kind": "per-image-scores", "model": loaded.identity, "locator": locator,
                      "sites": [s.to_json() for s in sites]})
        # A new locate invalidates the previous job's outputs.
        for stale in ("patch.safetensors", "patch.json", "edited.safetensors", "edited.json", "apply.json",
                      "report.json"):
            if ws.path(stale).exists():
                ws.path(stale).unlink()
        state = {
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
                       for i, (r, p) in enumerate(zip(refs, pred))],
            "failing": failing,
            "skipped": [{"path": str(b.path), "reason": b.reason} for b in bad],
            "holdout": cfg.holdout,
            "max_edit_images": cfg.max_edit_images,
            "seed": cfg.seed,
        }
        ws.save_state(state)

    total = scores.total
    sites_out = []
    for s in sites:
        sc = scores.scores[s.param]
        top = torch.topk(sc, k=min(5, s.units))
        sites_out.append({**s.to_json(), "top_units": top.indices.tolist(),
                          "top_scores": [round(float(v), 4) for v in top.values]})
    selection = {}
    for d in DEFAULT_SPARSITIES:
        mask = scores.select(d)
        selection[str(d)] = {"units": mask.selected,
                             "per_site": {f"{s.block}.{s.matrix}": int(mask.indices[s.param].numel()) for s in sites}}
    return {
        "model": loaded.name,
        "model_note": loaded.note,
        "locator": locator,
        "note": note,
        "workspace": str(ws.root),
        "sites": sites_out,
        "total_units": total,
        "failures": len(failing),
        "already_correct": len(correct),
        "already_correct_images": [str(refs[i].path) for i in correct],
        "skipped_bad_images": [{"path": str(b.path), "reason": b.reason} for b in bad],
        "edit_images": len(edit_rows),
        "holdout_images": len(hold_rows),
        "selection": selection,
    }


def _resolve_hypernet(spec: str | None, loaded: LoadedModel, offline: bool | None) -> Path | None:
    if spec is None:
        return default_hypernet_for(loaded)
    from .hub import resolve

    return Path(resolve(spec, offline=offline))


# ----------------------------------------------------------------------------- apply / report


@dataclass
class _Job:
    """Everything apply and report share: model, split, cached token sets, scores."""

    ws: Workspace
    state: dict
    loaded: LoadedModel
    sites: tuple[Site, ...]
    edit_tokens: object
    edit_labels: "torch.Tensor"
    sets: object  # evaluate.EvalSets
    per_image: dict
    edit_rows: list[int]
    hold_rows: list[int]
    edit_config: EditConfig
    seed: int
    locality_dir: Path | None
    generalization_source: str
    base: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)


def _prepare(ws: Workspace, opts: ExperimentOptions, progress: Progress) -> _Job:
    import torch

    from .data import load_tensors as load_images, scan_labeled, scan_unlabeled
    from .evaluate import EvalSets, TokenCache

    holdout, generalization, locality, seed = opts.holdout, opts.generalization, opts.locality, opts.seed
    skip_bad = opts.skip_bad_images
    state = ws.state()
    loaded = _load_workspace_model(ws, state, opts.device)
    sites = tuple(Site.from_json(d) for d in state["sites"])
    dev = next(loaded.model.parameters()).device
    per_image, _ = load_tensors(ws.require("scores.safetensors", "locate"), "workspace scores")
    failures = _failure_refs(ws, state)
    labels = torch.tensor([r.label for r in failures], dtype=torch.long, device=dev)
    seed = state["seed"] if seed is None else seed
    start = min(s.block for s in sites)
    skipped: list = []

    # Edit images: few, held in memory (the edit fits them in one batch). Held-out, generalization
    # and locality images: read in batches, cached as tokens only while under the budget.
    if generalization is not None:
        edit_rows, hold_rows = list(range(len(failures))), []
        g_batches = _image_batches(scan_labeled(Path(generalization), loaded.labels), loaded, skip_bad, progress,
                                   "generalization set")
        skipped += g_batches.bad
        gen_source = f"{generalization}"
    else:
        edit_rows, hold_rows = split_rows(len(failures), state["holdout"] if holdout is None else holdout, seed,
                                          state.get("max_edit_images"))
        g_batches = _image_batches([failures[i] for i in hold_rows], loaded, False, progress,
                                   "held-out failures") if hold_rows else None
        gen_source = "held-out failures"
    g_labels = torch.tensor([r.label for r in g_batches.refs], dtype=torch.long, device=dev) if g_batches else None

    progress("caching activations", 0, 3)
    edit_images, _, _ = load_images([failures[i] for i in edit_rows], loaded.transform, loaded.channels)
    edit_cache = TokenCache(loaded.model, start, edit_images.to(dev))
    del edit_images
    progress("caching activations", 1, 3)
    holdout_cache = TokenCache(loaded.model, start, _stream(g_batches, dev)) if g_batches else None
    progress("caching activations", 2, 3)
    locality_dir = Path(locality) if locality is not None else default_locality_dir(loaded)
    loc_cache, loc_base = None, None
    if locality_dir is not None:
        l_batches = _image_batches(scan_unlabeled(locality_dir), loaded, skip_bad, progress, "locality set")
        skipped += l_batches.bad
        loc_cache = TokenCache(loaded.model, start, _stream(l_batches, dev))
        loc_base = loc_cache.predict()
    progress("caching activations", 3, 3)

    sets = EvalSets(edit_cache, labels[edit_rows], holdout_cache, g_labels, loc_cache, loc_base)
    base_metrics = replace(sets, locality=None).measure({})  # the base model's locality is 1 by definition
    edit_config = resolve_edit_config(loaded, opts.edit)
    return _Job(ws, state, loaded, sites, edit_cache.tokens, labels[edit_rows], sets, per_image, edit_rows, hold_rows,
                edit_config, seed, locality_dir, gen_source,
                # the unedited model's accuracy on the generalization set is measure({})'s generalization
                base={"success": base_metrics.success, "generalization": base_metrics.generalization,
                      "holdout_base_accuracy": base_metrics.generalization},
                skipped=skipped)


def resolve_edit_config(loaded: LoadedModel, overrides: dict | None) -> EditConfig:
    """Defaults in one place: the paper's EditConfig, then the model's recommendation, then the flags."""
    return EditConfig(**{**loaded.edit_defaults, **{k: v for k, v in (overrides or {}).items() if v is not None}})


def _scores(job: _Job, locator: str):
    """Unit scores of ``locator`` aggregated over the edit images (random: seeded, image-free)."""
    from .locate import LocateInputs, aggregate, random_locator

    if locator == "random":
        per_image = random_locator(LocateInputs(job.loaded.model, job.sites, None, None, job.seed))
    else:
        per_image = job.per_image
    return aggregate(per_image, job.sites, job.edit_rows, locator)


def _edit_and_measure(job: _Job, locator: str, sparsity: float) -> tuple[dict, Patch]:
    mask = _scores(job, locator).select(sparsity)
    result = edit(job.loaded.model, mask, None, job.edit_labels, job.edit_config, tokens=job.edit_tokens)
    metrics = job.sets.measure(result.patch.weights(job.loaded.model))
    point = {"sparsity": sparsity, "locator": locator, **metrics.to_json(), "units_edited": mask.selected,
             "params_edited": result.patch.params_edited, "steps": result.steps, "converged": result.converged,
             "final_loss": round(result.final_loss, 6)}
    return point, result.patch


def _locality_note(job: _Job) -> str | None:
    if job.locality_dir is None:
        return "no locality set was given (--locality DIR), so locality was not measured"
    return None


def run_apply(cfg: ApplyConfig, progress: Progress = _noop) -> dict:
    ws = Workspace(cfg.workspace)
    with ws.lock():
        job = _prepare(ws, cfg.experiment, progress)
        progress("editing", 0, 1)
        point, patch = _edit_and_measure(job, job.state["locator"], cfg.sparsity)
        progress("editing", 1, 1)
        provenance = {"sparsity": cfg.sparsity, "locator": job.state["locator"], "edit_config": job.edit_config.to_json(),
                      "seed": job.seed, "edit_images": len(job.edit_rows), "metrics": {k: point[k] for k in
                                                                                      ("success", "generalization", "locality")}}
        patch.save(ws.path("patch.safetensors"), job.loaded.identity, provenance)
        edited_state = {k: v for k, v in job.loaded.model.state_dict().items()}
        edited_state.update(patch.weights(job.loaded.model))
        save_tensors(ws.path("edited.safetensors"), edited_state,
                     {"kind": "edited-model", "model": job.loaded.identity, "architecture": job.loaded.name,
                      "patch": str(ws.path("patch.safetensors")), **provenance})
        result = {
            **point,
            "edit_lr": job.edit_config.lr,
            "max_steps": job.edit_config.max_steps,
            "edit_images": len(job.edit_rows),
            "holdout_images": len(job.hold_rows) if cfg.experiment.generalization is None else (
                len(job.sets.holdout_labels) if job.sets.holdout_labels is not None else 0),
            "generalization_source": job.generalization_source,
            "locality_images": len(job.sets.locality) if job.sets.locality is not None else 0,
            "locality_source": str(job.locality_dir) if job.locality_dir else None,
            "locality_note": _locality_note(job),
            "base": job.base,
            "patch": str(ws.path("patch.safetensors")),
            "edited_model": str(ws.path("edited.safetensors")),
            "skipped_bad_images": [{"path": str(b.path), "reason": b.reason} for b in job.skipped],
        }
        write_json(ws.path("apply.json"), result)
    return result


def recommend(points: Sequence[dict], locator: str, min_locality: float) -> dict:
    """The stated rule: among ``locator``'s points with locality >= ``min_locality``, the highest
    generalization (ties: the smaller sparsity). If none qualifies, the point with the best locality."""
    own = [p for p in points if p["locator"] == locator]
    ok = [p for p in own if p["locality"] is None or p["locality"] >= min_locality]
    if ok:
        best = max(ok, key=lambda p: (p["generalization"] if p["generalization"] is not None else p["success"] or 0.0,
                                      -p["sparsity"]))
        rule = (f"highest generalization among {locator} edits with locality >= {min_locality}"
                if best["locality"] is not None else f"highest generalization among {locator} edits (no locality set)")
    else:
        best = max(own, key=lambda p: (p["locality"], -p["sparsity"]))
        rule = f"no {locator} edit reached locality >= {min_locality}; chose the one with the best locality"
    return {"sparsity": best["sparsity"], "locator": locator, "rule": rule,
            **{k: best[k] for k in ("success", "generalization", "locality")}}


def run_report(cfg: ReportConfig, progress: Progress = _noop) -> dict:
    ws = Workspace(cfg.workspace)
    with ws.lock():
        job = _prepare(ws, cfg.experiment, progress)
        locator = job.state["locator"]
        methods = [locator] if locator == "random" else [locator, "random"]
        runs = [(m, s) for s in cfg.sparsities for m in methods]
        points = []
        for i, (m, s) in enumerate(runs):
            progress("sweeping sparsities", i, len(runs))
            points.append(_edit_and_measure(job, m, s)[0])
        progress("sweeping sparsities", len(runs), len(runs))
        rec = recommend(points, locator, cfg.min_locality)
        result = {
            "model": job.loaded.name,
            "locator": locator,
            "edit_images": len(job.edit_rows),
            "holdout_images": len(job.hold_rows),
            "generalization_source": job.generalization_source,
            "locality_images": len(job.sets.locality) if job.sets.locality is not None else 0,
            "locality_note": _locality_note(job),
            "edit_lr": job.edit_config.lr,
            "base": job.base,
            "points": points,
            "recommended": rec,
            "plot": None,
        }
        if cfg.plot is not None:
            plot_tradeoff(points, Path(cfg.plot), title=f"{job.loaded.name}: generalization vs locality")
            result["plot"] = str(cfg.plot)
        write_json(ws.path("report.json"), result)
    return result


def plot_tradeoff(points: Sequence[dict], out: Path, title: str) -> None:
    """Generalization (y) vs locality (x), one curve per locator, points labelled by sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for loc in sorted({p["locator"] for p in points}):
        pts = sorted((p for p in points if p["locator"] == loc), key=lambda p: p["sparsity"])
        xs = [p["locality"] if p["locality"] is not None else float("nan") for p in pts]
        ys = [p["generalization"] if p["generalization"] is not None else float("nan") for p in pts]
        ax.plot(xs, ys, marker="o", label=loc)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(f"{p['sparsity']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("locality (share of locality set unchanged)")
    ax.set_ylabel("generalization (held-out failures fixed)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="mask")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- export


EXPORT_FORMATS = ("onnx", "timm")


@dataclass(frozen=True)
class ExportJob:
    out: Path                        # the .onnx file, or the folder for format "timm"
    workspace: Path = Path(".vitedit")
    base: bool = False
    config: object = None            # export.ExportConfig (format "onnx" only)
    model: str | None = None         # only for --base without a workspace
    weights: Path | None = None
    max_images: int = 64
    img_size: int | None = None      # only for --base --weights without a workspace
    format: str = "onnx"             # "onnx": one verified .onnx file; "timm": a timm local-dir: folder

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise UsageError(f"--format {self.format!r}: choose {' or '.join(EXPORT_FORMATS)}")


def _example_images(loaded: LoadedModel, ws: Workspace, max_images: int) -> "torch.Tensor":
    """Real preprocessed images to verify the export on: the workspace's failures, else bundled ones."""
    from .data import load_tensors as load_images, scan_unlabeled

    if ws.exists:
        refs = _failure_refs(ws, ws.state(), limit=max_images)
    elif default_locality_dir(loaded) is not None:
        refs = scan_unlabeled(default_locality_dir(loaded))[:max_images]
    else:
        raise WorkspaceError(f"no images to verify the export on: run `vitedit locate FAILURES --workspace {ws.root}` first")
    images, _, _ = load_images(refs, loaded.transform, loaded.channels)
    return images


def run_export(job: ExportJob, progress: Progress = _noop) -> dict:
    ws = Workspace(job.workspace)
    if job.format == "timm":
        from .timm_export import check_target

        check_target(job.out)  # before any model is loaded
    if job.base and not ws.exists:
        loaded = load_model(job.model, weights=job.weights, device="cpu", img_size=job.img_size)
        patch_meta = None
        examples = _example_images(loaded, ws, job.max_images)
    else:
        if job.model is not None or job.weights is not None or job.img_size is not None:
            raise UsageError("--model/--weights/--img-size only apply to `export --base` without a workspace; the workspace "
                             "already names its model")
        with ws.lock():
            state = ws.state()
            loaded = _load_workspace_model(ws, state, "cpu")
            examples = _example_images(loaded, ws, job.max_images)
            patch_meta = None
            if not job.base:
                patch, patch_meta = Patch.load(ws.require("patch.safetensors", "apply"), loaded.identity)
                patch.apply(loaded.model)  # our own freshly loaded copy
    if job.format == "timm":
        return _export_timm(job, loaded, examples, patch_meta, progress)
    from .export import ExportConfig, export_onnx, preprocessing_metadata

    config = job.config or ExportConfig()
    meta = preprocessing_metadata(loaded.data_config, loaded.labels, loaded.channels, extra={
        "vitedit.version": __version__, "vitedit.model": loaded.name,
        "vitedit.base_weights_sha256": loaded.identity["weights_sha256"],
        "vitedit.edited": "false" if patch_meta is None else "true",
        "vitedit.patch_sha256": "" if patch_meta is None else patch_meta.get("sha256", ""),
        "vitedit.sparsity": "" if patch_meta is None else str(patch_meta.get("sparsity", "")),
    })
    progress("exporting to ONNX", 0, 1)
    res = export_onnx(loaded.model, Path(job.out), examples, metadata=meta, config=config)
    progress("exporting to ONNX", 1, 1)
    return {"format": "onnx", "path": str(res.path), "base": patch_meta is None, "opset": res.opset,
            "exporter": res.exporter,
            "max_abs_diff": res.max_abs_diff, "top1_agreement": res.top1_agreement, "num_checked": res.num_checked,
            "atol": config.atol, "model": loaded.name, "model_note": loaded.note}


def _export_timm(job: ExportJob, loaded: LoadedModel, examples: "torch.Tensor", patch_meta: dict | None,
                 progress: Progress) -> dict:
    """The model as a folder timm loads with ``local-dir:``, verified bit-identical on ``examples``."""
    from .timm_export import export_timm

    provenance = {"vitedit_version": __version__, "model": loaded.name,
                  "base_weights_sha256": loaded.identity["weights_sha256"], "edited": patch_meta is not None,
                  "patch_sha256": None if patch_meta is None else patch_meta.get("sha256"),
                  "sparsity": None if patch_meta is None else patch_meta.get("sparsity"),
                  "input_size": list(loaded.data_config["input_size"]), "model_note": loaded.note}
    progress("exporting a timm folder", 0, 1)
    res = export_timm(loaded.model, Path(job.out), examples, labels=loaded.labels, data_config=loaded.data_config,
                      provenance=provenance, source_checkpoint=loaded.source == "timm")
    progress("exporting a timm folder", 1, 1)
    return {"format": "timm", "path": str(res.path), "base": patch_meta is None, "files": list(res.files),
            "max_abs_diff": res.max_abs_diff, "top1_agreement": res.top1_agreement, "num_checked": res.num_checked,
            "model": loaded.name, "model_note": loaded.note, "load_with": f"timm.create_model('local-dir:{res.path}', "
            "pretrained=True)"}


# ----------------------------------------------------------------------------- sensitive set


@dataclass(frozen=True)
class SensitiveConfig:
    images: Path
    out: Path
    margin: float = 0.05
    model: ModelOptions = ModelOptions()
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.margin <= 1.0:
            raise UsageError(f"--margin {self.margin} must be in (0, 1], e.g. --margin 0.05")


def run_sensitive(cfg: SensitiveConfig, progress: Progress = _noop) -> dict:
    """Copy the images that pass the paper's sensitivity rule into ``cfg.out/<class folder>/``."""
    import shutil

    from .data import safe_label_name
    from .evaluate import sensitive_mask

    loaded = load_model(cfg.model.name, weights=cfg.model.weights, labels_file=cfg.model.labels,
                        device=resolve_device(cfg.model.device), offline=cfg.model.offline,
                        img_size=cfg.model.img_size)
    images, labels, refs, bad = _load_labeled(cfg.images, loaded, cfg.skip_bad_images, progress, "images")
    dev = next(loaded.model.parameters()).device
    keep = sensitive_mask(_predict(loaded.model, images.to(dev)), labels.to(dev), cfg.margin).cpu()
    chosen = [r for r, k in zip(refs, keep.tolist()) if k]
    targets = [Path(cfg.out) / safe_label_name(loaded.labels[r.label]) / r.path.name for r in chosen]
    clash = [t for t in targets if t.exists()]
    if clash:
        raise InputDataError(f"{clash[0]} already exists ({len(clash)} clashing file(s)); choose an empty --out folder "
                             "so nothing is overwritten")
    for r, t in zip(chosen, targets):
        with atomic_path(t) as tmp:
            shutil.copyfile(r.path, tmp)
    return {"images": len(refs), "selected": len(chosen), "margin": cfg.margin, "out": str(cfg.out),
            "model": loaded.name, "model_note": loaded.note, "skipped_bad_images": [{"path": str(b.path), "reason": b.reason} for b in bad]}
