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
    """How apply and report set up an experiment on a workspace (the same for both).

    ``preserve`` (unlabeled images the edit is trained to leave alone) and ``check`` (labeled images
    the accuracy drop and flip rate are measured on) default to the embedded model's bundled sets;
    other models have none unless given. ``no_preserve`` / ``no_check`` switch the defaults off.
    """

    edit: dict | None = None         # overrides (lr, max_steps, ...) over the objective and model defaults
    holdout: float | None = None     # None: the split recorded by locate
    generalization: Path | None = None
    locality: Path | None = None
    seed: int | None = None          # None: the seed recorded by locate
    device: str = "auto"
    skip_bad_images: bool = False
    objective: str = "local"
    preserve: Path | None = None
    check: Path | None = None
    no_preserve: bool = False
    no_check: bool = False

    def __post_init__(self) -> None:
        if self.holdout is not None:
            _check_holdout(self.holdout)
        if self.holdout is not None and self.generalization is not None:
            raise UsageError("give either --holdout or --generalization DIR, not both")
        if self.preserve is not None and self.no_preserve:
            raise UsageError("give either --preserve DIR or --no-preserve, not both")
        if self.check is not None and self.no_check:
            raise UsageError("give either --check DIR or --no-check, not both")
        from .edit import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: choose {' or '.join(OBJECTIVES)}")


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


def _check_max_drop(d: float) -> None:
    if not d >= 0:
        raise UsageError(f"--max-accuracy-drop {d}: give the accuracy points an edit may lose, >= 0, e.g. 0.5")


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


def _default_asset_dir(loaded: LoadedModel, name: str) -> Path | None:
    if loaded.name == DEFAULT_MODEL and (DEFAULT_ASSETS / name).is_dir():
        return DEFAULT_ASSETS / name
    return None


def default_locality_dir(loaded: LoadedModel) -> Path | None:
    """The embedded model's sensitive set (locality)."""
    return _default_asset_dir(loaded, "sensitive")


def default_preserve_dir(loaded: LoadedModel) -> Path | None:
    """The embedded model's preserve set: 1,000 in-distribution training images."""
    return _default_asset_dir(loaded, "preserve")


def default_check_dir(loaded: LoadedModel) -> Path | None:
    """The embedded model's check set: its 1,000-image in-distribution test sample (labeled)."""
    return _default_asset_dir(loaded, "test")


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
    preserve: object = None          # preserve.PreserveSet | None
    preserve_dir: Path | None = None
    check_dir: Path | None = None
    notes: list = field(default_factory=list)
    edit_images: object = None       # (B, C, H, W) preprocessed, for augmented edits
    validation: object = None        # evaluate.EvalSets on the validation half (``--sparsity auto``)
    refs: dict = field(default_factory=dict)  # set name -> ImageRefs in cache order (for galleries)


def _prepare(ws: Workspace, opts: ExperimentOptions, progress: Progress, validation: bool = False) -> _Job:
    """Load the workspace's model, split and scores and cache every image set at the first edited block.

    ``validation``: split the generalization set (seeded, half and half) into a *validation* half,
    used only to choose an edit (``job.validation``), and the half its figures are measured on."""
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
    v_batches = None
    if validation:
        if g_batches is None or len(g_batches.refs) < 2:
            raise UsageError("--sparsity auto needs at least 2 held-out failures to choose on; give more failures, "
                             "a larger --holdout, or a number for --sparsity")
        perm = torch.randperm(len(g_batches.refs), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        half = len(perm) // 2
        v_refs = [g_batches.refs[i] for i in sorted(perm[:half])]
        m_refs = [g_batches.refs[i] for i in sorted(perm[half:])]
        v_batches = _image_batches(v_refs, loaded, False, progress, "validation failures")
        g_batches = _image_batches(m_refs, loaded, False, progress, "held-out failures")
        gen_source = f"{gen_source} (the half not used to choose the sparsity)"
    g_labels = torch.tensor([r.label for r in g_batches.refs], dtype=torch.long, device=dev) if g_batches else None

    progress("caching activations", 0, 3)
    edit_images, _, _ = load_images([failures[i] for i in edit_rows], loaded.transform, loaded.channels)
    edit_images = edit_images.to(dev)
    edit_cache = TokenCache(loaded.model, start, edit_images)
    progress("caching activations", 1, 3)
    holdout_cache = TokenCache(loaded.model, start, _stream(g_batches, dev)) if g_batches else None
    progress("caching activations", 2, 3)
    locality_dir = Path(locality) if locality is not None else default_locality_dir(loaded)
    loc_cache, loc_base, l_refs = None, None, []
    if locality_dir is not None:
        l_batches = _image_batches(scan_unlabeled(locality_dir), loaded, skip_bad, progress, "locality set")
        skipped += l_batches.bad
        l_refs = l_batches.refs
        loc_cache = TokenCache(loaded.model, start, _stream(l_batches, dev))
        loc_base = loc_cache.predict()
    progress("caching activations", 3, 3)

    # The check set (labeled, measured only) and the preserve set (fitted on, never measured).
    check_dir = None if opts.no_check else (Path(opts.check) if opts.check is not None else default_check_dir(loaded))
    check_cache = check_labels = check_base = None
    c_refs: list = []
    if check_dir is not None:
        c_batches = _image_batches(scan_labeled(check_dir, loaded.labels), loaded, skip_bad, progress, "check set")
        skipped += c_batches.bad
        c_refs = c_batches.refs
        check_labels = torch.tensor([r.label for r in c_refs], dtype=torch.long, device=dev)
        check_cache = TokenCache(loaded.model, start, _stream(c_batches, dev))
        check_base = check_cache.predict()
    preserve_dir = None if opts.no_preserve else (
        Path(opts.preserve) if opts.preserve is not None else default_preserve_dir(loaded))
    preserve, preserve_note = None, None
    if preserve_dir is not None:
        measured = {"check set (--check)": (check_dir, c_refs), "locality set (--locality)": (locality_dir, l_refs),
                    "generalization set": (Path(generalization) if generalization else None,
                                           g_batches.refs if g_batches else []),
                    "failures": (Path(state["failures_dir"]), failures)}
        p_refs = scan_unlabeled(preserve_dir)
        check_disjoint(preserve_dir, p_refs, measured)
        preserve, preserve_note, bad = _load_preserve(p_refs, loaded, sites, skip_bad, seed, progress)
        skipped += bad

    sets = EvalSets(edit_cache, labels[edit_rows], holdout_cache, g_labels, loc_cache, loc_base,
                    check_cache, check_labels, check_base)
    val_sets = None
    if v_batches is not None:
        val_sets = replace(sets, holdout=TokenCache(loaded.model, start, _stream(v_batches, dev)),
                           holdout_labels=torch.tensor([r.label for r in v_batches.refs], dtype=torch.long, device=dev))
    base_metrics = replace(sets, locality=None).measure({})  # the base model's locality is 1 by definition
    edit_config = resolve_edit_config(loaded, opts.edit, opts.objective)
    notes = [preserve_note] if preserve_note else []
    if preserve is None and edit_config.uses_preserve:
        edit_config = edit_config.without_preserve()
        notes.append("no preserve set was given (--preserve DIR: ordinary images of the model's inputs), so nothing "
                     "held the rest of the model in place; expect a larger accuracy drop")
    return _Job(ws, state, loaded, sites, edit_cache.tokens, labels[edit_rows], sets, per_image, edit_rows, hold_rows,
                edit_config, seed, locality_dir, gen_source,
                # the unedited model's accuracy on the generalization set is measure({})'s generalization
                base={"success": base_metrics.success, "generalization": base_metrics.generalization,
                      "holdout_base_accuracy": base_metrics.generalization,
                      "check_accuracy": base_metrics.accuracy_before},
                skipped=skipped, preserve=preserve, preserve_dir=preserve_dir, check_dir=check_dir, notes=notes,
                edit_images=edit_images, validation=val_sets,
                refs={"edit": [failures[i] for i in edit_rows], "holdout": g_batches.refs if g_batches else [],
                      "check": c_refs, "locality": l_refs})


def check_disjoint(preserve_dir: Path, preserve_refs: Sequence["ImageRef"], measured: dict) -> None:
    """Refuse a preserve set that is, or shares images with, a set that is measured.

    ``measured`` maps a name to (folder or None, refs). The same folder (or one inside the other) is a
    ``UsageError``; an image file with the same content in both is an ``InputDataError`` naming it.
    A preserve image in a measurement set would be fitted to stay unchanged and then counted as
    unchanged: the measurement would flatter the edit.
    """
    root = Path(preserve_dir).resolve()
    for what, (folder, _) in measured.items():
        if folder is None:
            continue
        other = Path(folder).resolve()
        if other == root or root in other.parents or other in root.parents:
            raise UsageError(f"--preserve {preserve_dir} is the {what} folder {folder} (or contains it): the images an "
                             "edit is fitted to keep must not be the ones it is measured on; pass another folder")
    hashes = {sha256_file(r.path): r.path for r in preserve_refs}
    for what, (_, refs) in measured.items():
        for r in refs:
            if sha256_file(r.path) in hashes:
                raise InputDataError(f"{r.path} in the {what} is the same image as {hashes[sha256_file(r.path)]} in the "
                                     "preserve set; remove it from one of them (the sets must not overlap)")


def _load_preserve(refs, loaded: LoadedModel, sites, skip_bad: bool, seed: int, progress: Progress):
    """The preserve set as the edit needs it, within the token cache budget.

    Its tokens must stay in memory (a minibatch is drawn every step), so a set too large for the
    budget is cut to a seeded subset that fits, and a note says so.
    """
    import torch

    from .evaluate import cache_budget_bytes
    from .models import forward_prefix
    from .preserve import build_preserve_set

    batches = _image_batches(refs, loaded, skip_bad, progress, "preserve set")
    dev = next(loaded.model.parameters()).device
    start = min(s.block for s in sites)
    chunks, note = [], None
    with torch.inference_mode():
        for x, _ in batches:
            chunks.append(forward_prefix(loaded.model, x.to(dev), start))
    tokens = torch.cat(chunks)
    per_image = tokens[0].numel() * tokens.element_size()
    fit = max(1, cache_budget_bytes() // max(per_image, 1))
    if len(tokens) > fit:
        keep = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))[:fit].sort().values
        tokens = tokens[keep.to(tokens.device)]
        note = (f"the preserve set's tokens exceed the cache budget, so a seeded {fit} of its {len(batches.refs)} "
                "images were used (raise VITEDIT_CACHE_BUDGET_MB to use more)")
    progress("caching preserve set", 1, 1)
    return build_preserve_set(loaded.model, sites, tokens=tokens), note, batches.bad


def resolve_edit_config(loaded: LoadedModel, overrides: dict | None, objective: str = "plain") -> EditConfig:
    """Defaults in one place: the paper's EditConfig, then the objective's preset, then the model's
    recommendation (its edit learning rate), then the flags."""
    from .edit import objective_config

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return objective_config(objective, **{**loaded.edit_defaults, **given})


def _scores(job: _Job, locator: str):
    """Unit scores of ``locator`` aggregated over the edit images (random: seeded, image-free)."""
    from .locate import LocateInputs, aggregate, random_locator

    if locator == "random":
        per_image = random_locator(LocateInputs(job.loaded.model, job.sites, None, None, job.seed))
    else:
        per_image = job.per_image
    return aggregate(per_image, job.sites, job.edit_rows, locator)


def _edit_and_measure(job: _Job, locator: str, sparsity: float, config: EditConfig | None = None,
                      progress: Progress = _noop, sets=None) -> tuple[dict, Patch]:
    """One edit from the unedited model with ``config`` (default: the job's), measured on ``sets``."""
    config = config or job.edit_config
    mask = _scores(job, locator).select(sparsity)

    def step(done: int, total: int, loss: float) -> None:
        progress("editing", done, total, f"loss {loss:.3f}")

    result = edit(job.loaded.model, mask, job.edit_images, job.edit_labels, config, tokens=job.edit_tokens,
                  preserve=job.preserve if config.uses_preserve else None, seed=job.seed, progress=step)
    progress("editing", config.max_steps, config.max_steps, "done")
    metrics = (sets or job.sets).measure(result.patch.weights(job.loaded.model))
    point = {"sparsity": sparsity, "locator": locator, "objective": config.objective,
             "preserve_weight": config.preserve_weight, **metrics.to_json(), "units_edited": mask.selected,
             "params_edited": result.patch.params_edited, "steps": result.steps, "converged": result.converged,
             "final_loss": round(result.final_loss, 6)}
    return point, result.patch


def _locality_note(job: _Job) -> str | None:
    if job.locality_dir is None:
        return "no locality set was given (--locality DIR), so locality was not measured"
    return None


def _notes(job: _Job) -> list[str]:
    notes = list(job.notes)
    if job.locality_dir is None:
        notes.append(_locality_note(job))
    if job.check_dir is None:
        notes.append("no check set was given (--check DIR: labeled ordinary images), so the accuracy drop and flip "
                     "rate were not measured")
    return notes


def _sets_info(job: _Job) -> dict:
    sets = job.sets
    return {
        "holdout_images": len(sets.holdout_labels) if sets.holdout_labels is not None else 0,
        "generalization_source": job.generalization_source,
        "locality_images": len(sets.locality) if sets.locality is not None else 0,
        "locality_source": str(job.locality_dir) if job.locality_dir else None,
        "locality_note": _locality_note(job),
        "check_images": len(sets.check_labels) if sets.check_labels is not None else 0,
        "check_source": str(job.check_dir) if job.check_dir else None,
        "preserve_images": len(job.preserve) if job.preserve is not None else 0,
        "preserve_source": str(job.preserve_dir) if job.preserve is not None else None,
        "notes": _notes(job),
    }


def _sweep(job: _Job, sparsities: Sequence[float], weights: Sequence[float], locators: Sequence[str],
           progress: Progress, what: str, sets=None) -> list[dict]:
    """Edits at every (locator, sparsity, preserve weight); random masks only at the job's weight."""
    runs = []
    for s in sparsities:
        for loc in locators:
            for w in (weights if loc == locators[0] else [job.edit_config.preserve_weight]):
                runs.append((loc, s, replace(job.edit_config, preserve_weight=w)))
    points = []
    for i, (loc, s, config) in enumerate(runs):
        progress(what, i, len(runs))
        points.append(_edit_and_measure(job, loc, s, config, sets=sets)[0])
    progress(what, len(runs), len(runs))
    return points


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
                      "seed": job.seed, "edit_images": len(job.edit_rows),
                      "preserve": str(job.preserve_dir) if job.preserve is not None else None,
                      "metrics": {k: point[k] for k in ("success", "generalization", "locality", "accuracy_before",
                                                         "accuracy_after", "accuracy_drop", "flip_rate")}}
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
            "edit_config": job.edit_config.to_json(),
            "edit_images": len(job.edit_rows),
            **_sets_info(job),
            "auto": None if chosen is None else {
                "rule": chosen["rule"], "qualifies": chosen["qualifies"], "validation_images": len(job.validation.holdout_labels),
                "candidates": points},
            "base": job.base,
            "patch": str(ws.path("patch.safetensors")),
            "edited_model": str(ws.path("edited.safetensors")),
            "skipped_bad_images": [{"path": str(b.path), "reason": b.reason} for b in job.skipped],
        }
        write_json(ws.path("apply.json"), result)
    return result


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
            **{k: best.get(k) for k in ("success", "generalization", "locality", "accuracy_drop", "flip_rate")}}


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
        plot = cfg.plot if cfg.plot is not None else (Path(cfg.html).with_suffix(".png") if cfg.html else None)
        result = {
            "model": job.loaded.name,
            "locator": locator,
            "edit_images": len(job.edit_rows),
            **_sets_info(job),
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
            result["html"] = write_html_report(job, result, Path(cfg.html), cfg.command)
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


def write_html_report(job: _Job, result: dict, out: Path, command: str) -> str:
    """The report page for the workspace's applied edit (what ``export`` ships), or, when nothing was
    applied yet, for the recommended point of the sweep."""
    from .html_report import render_report

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
                                         "accuracy_drop", "flip_rate", "sparsity", "units_edited", "steps", "objective")}
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
            "galleries": galleries, "per_class": per_class, "notes": list(result.get("notes") or [])}
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
