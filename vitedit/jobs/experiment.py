"""The experiment apply and report share: the workspace's split, every image set cached at the first
edited block (edit, held-out, locality, check), the preserve set, and one edit measured on them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..artifacts import load_tensors, sha256_file
from ..api import Editor
from ..edit import DEFAULT_OBJECTIVE, EditConfig, Patch
from ..errors import UsageError
from ..imagesets import (CHECK, FAILURES, GENERALIZATION, LOCALITY, PRESERVE, ImageSet, check_apart,
                         check_disjoint,  # noqa: F401 (kept importable from here: tests/test_imagesets.py)
                         default_check_dir, default_locality_dir, default_preserve_dir, set_folder)
from ..models import LoadedModel, Site
from ..workspace import Workspace
from .common import (Progress, _check_holdout, _failure_refs, _image_batches, _load_workspace_model, _noop, _stream,
                     split_rows)

if TYPE_CHECKING:
    import torch


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
    objective: str = DEFAULT_OBJECTIVE
    preserve: Path | None = None
    check: Path | None = None
    no_preserve: bool = False
    no_check: bool = False
    on_top: bool | None = None       # edit on top of the workspace's edit history (see vitedit.history);
                                     # None: as `vitedit locate` scored (its --on-top)
    disjoint: bool = False           # on top: never change a unit an earlier edit of the history changed

    def __post_init__(self) -> None:
        if self.holdout is not None:
            _check_holdout(self.holdout)
        if self.holdout is not None and self.generalization is not None:
            raise UsageError("give either --holdout or --generalization DIR, not both")
        if self.preserve is not None and self.no_preserve:
            raise UsageError("give either --preserve DIR or --no-preserve, not both")
        if self.check is not None and self.no_check:
            raise UsageError("give either --check DIR or --no-check, not both")
        if self.disjoint and self.on_top is False:
            _no_stack_to_keep_apart()
        from ..edit import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: choose {' or '.join(OBJECTIVES)}")


def _no_stack_to_keep_apart() -> None:
    raise UsageError("--disjoint keeps an edit off the units earlier edits changed: it needs a stack (run "
                     "`vitedit locate FAILURES --on-top` first)")


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
    stacked: int = 0                 # edits of the history under this one (--on-top)
    anchors: object = None           # preserve.AnchorSet: the earlier edits' images (--on-top)
    exclude: dict | None = None      # param -> units the history changed, never chosen (--disjoint)
    stats: object = None             # stats.PreserveStats of the preserve set (statistics objectives)
    anchor_moments: dict | None = None  # the earlier edits' images' input moments (statistics objectives)

    @cached_property
    def editor(self) -> Editor:
        """The API's editor over this job's model (with its stack), sites, preserve set and statistics:
        every edit of the job fits through it, as ``Editor.fix``'s do."""
        return Editor.of_workspace(self.loaded, self.sites, preserve_set=self.preserve, stats=self.stats)


def _prepare(ws: Workspace, opts: ExperimentOptions, progress: Progress, validation: bool = False) -> _Job:
    """Load the workspace's model, split and scores and cache every image set at the first edited block.

    ``validation``: split the generalization set (seeded, half and half) into a *validation* half,
    used only to choose an edit (``job.validation``), and the half its figures are measured on."""
    import torch

    from ..data import load_tensors as load_images
    from ..evaluate import EvalSets, TokenCache, accuracy
    from ..history import History, units_changed

    state = ws.state()
    on_top = int(state.get("on_top_of") or 0) > 0 if opts.on_top is None else opts.on_top  # None: as located
    if opts.disjoint and not on_top:
        _no_stack_to_keep_apart()
    loaded = _load_workspace_model(ws, state, opts.device)
    sites = tuple(Site.from_json(d) for d in state["sites"])
    # the base model's edited matrices, before the history goes in: the preserve set's targets
    base_weights = {s.param: loaded.model.get_parameter(s.param).detach().clone() for s in sites} \
        if on_top else None
    stacked = _stack(ws, state, loaded, on_top)
    exclude = units_changed(History(ws).patches(loaded.identity)) if opts.disjoint and stacked else None
    dev = next(loaded.model.parameters()).device
    per_image, _ = load_tensors(ws.require("scores.safetensors", "locate"), "workspace scores")
    failures = _failure_refs(ws, state)
    labels = torch.tensor([r.label for r in failures], dtype=torch.long, device=dev)
    seed = state["seed"] if opts.seed is None else opts.seed
    start = min(s.block for s in sites)

    # Edit images: few, held in memory (the edit fits them in one batch). Held-out, generalization,
    # locality and check images: read in batches, cached as tokens only while under the budget.
    split = _split_failures(state, opts, failures, loaded, seed, progress, validation)
    progress("caching activations", 0, 3)
    edit_images, _, _ = load_images([failures[i] for i in split.edit_rows], loaded.transform, loaded.channels)
    edit_images = edit_images.to(dev)
    edit_cache = TokenCache(loaded.model, start, edit_images)
    progress("caching activations", 1, 3)
    held = _cached(split.held, loaded, start, labeled=True)
    progress("caching activations", 2, 3)
    locality = _cache_folder(LOCALITY, "locality set", set_folder(opts.locality, default_locality_dir(loaded)), loaded,
                             start, opts.skip_bad_images, progress, labeled=False)
    progress("caching activations", 3, 3)
    # The check set (labeled, measured only) and the preserve set (fitted on, never measured).
    check = _cache_folder(CHECK, "check set", set_folder(opts.check, default_check_dir(loaded), opts.no_check), loaded,
                          start, opts.skip_bad_images, progress, labeled=True)
    skipped = split.bad + locality.bad + check.bad
    measured = [check.image_set, locality.image_set, ImageSet(GENERALIZATION, split.folder, held.refs),
                ImageSet(FAILURES, Path(state["failures_dir"]), failures)]
    kept = _preserve_for(ws, opts, loaded, sites, seed, progress, measured, base_weights if stacked else None)
    skipped += kept.bad
    skipped += [b for b in kept.stats_bad if b not in skipped]

    sets = EvalSets(edit_cache, labels[split.edit_rows], held.cache, held.labels, locality.cache, locality.base,
                    check.cache, check.labels, check.base)
    val_sets = None
    if split.validation is not None:
        val = _cached(split.validation, loaded, start, labeled=True)
        val_sets = replace(sets, holdout=val.cache, holdout_labels=val.labels)
    # the base model's locality is 1 by definition, and its check predictions are check.base already
    base_metrics = replace(sets, locality=None, check=None).measure({})
    base_check_accuracy = accuracy(check.base, check.labels) if check.base is not None else None
    edit_config = resolve_edit_config(loaded, opts.edit, opts.objective)
    notes = [kept.note] if kept.note else []
    anchors, anchor_moments = None, None
    if stacked and edit_config.anchor_weight > 0:
        anchors, anchor_moments = _anchors_for(ws, loaded, sites, held.refs, progress, edit_config, seed, kept.stats,
                                               base_weights, notes)
    if (kept.preserve is None and edit_config.uses_preserve) or (kept.stats is None and edit_config.uses_stats):
        edit_config = edit_config.without_preserve()
        notes.append("no preserve set was given (--preserve DIR: ordinary images of the model's inputs), so nothing "
                     "held the rest of the model in place; expect a larger accuracy drop")
    return _Job(ws, state, loaded, sites, edit_cache.tokens, labels[split.edit_rows], sets, per_image, split.edit_rows,
                split.hold_rows, edit_config, seed, locality.folder, split.source,
                # the unedited model's accuracy on the generalization set is measure({})'s generalization
                base={"success": base_metrics.success, "generalization": base_metrics.generalization,
                      "holdout_base_accuracy": base_metrics.generalization,
                      "check_accuracy": base_check_accuracy},
                skipped=skipped, preserve=kept.preserve, preserve_dir=kept.folder, check_dir=check.folder, notes=notes,
                edit_images=edit_images, validation=val_sets,
                refs={"edit": [failures[i] for i in split.edit_rows], "holdout": held.refs,
                      "check": check.refs, "locality": locality.refs}, stacked=stacked, anchors=anchors,
                exclude=exclude, stats=kept.stats, anchor_moments=anchor_moments)


@dataclass
class _Split:
    """The failures' split: edit rows, held-out rows, and the generalization images measured on
    (held-out failures or a folder; ``validation``: the half kept to choose an edit on)."""

    edit_rows: list[int]
    hold_rows: list[int]
    held: object = None              # data.ImageBatches | None
    validation: object = None        # data.ImageBatches | None (--sparsity auto)
    source: str = "held-out failures"
    folder: Path | None = None       # --generalization DIR
    bad: list = field(default_factory=list)


def _split_failures(state: dict, opts: ExperimentOptions, failures: list, loaded: LoadedModel, seed: int,
                    progress: Progress, validation: bool) -> _Split:
    """All failures are edit images and ``--generalization DIR`` is measured on, or a seeded split of
    the failures into edit images and held-out ones (measured on)."""
    from ..data import scan_labeled

    if opts.generalization is not None:
        g_batches = _image_batches(scan_labeled(Path(opts.generalization), loaded.labels), loaded,
                                   opts.skip_bad_images, progress, "generalization set")
        split = _Split(list(range(len(failures))), [], g_batches, None, f"{opts.generalization}",
                       Path(opts.generalization), list(g_batches.bad))
    else:
        edit_rows, hold_rows = split_rows(len(failures), state["holdout"] if opts.holdout is None else opts.holdout,
                                          seed, state.get("max_edit_images"))
        g_batches = _image_batches([failures[i] for i in hold_rows], loaded, False, progress,
                                   "held-out failures") if hold_rows else None
        split = _Split(edit_rows, hold_rows, g_batches)
    return _halve(split, loaded, seed, progress) if validation else split


def _halve(split: _Split, loaded: LoadedModel, seed: int, progress: Progress) -> _Split:
    """The generalization images split (seeded) into a validation half and the half measured on."""
    import torch

    if split.held is None or len(split.held.refs) < 2:
        raise UsageError("--sparsity auto needs at least 2 held-out failures to choose on; give more failures, "
                         "a larger --holdout, or a number for --sparsity")
    refs = split.held.refs
    perm = torch.randperm(len(refs), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    half = len(perm) // 2
    v_batches = _image_batches([refs[i] for i in sorted(perm[:half])], loaded, False, progress, "validation failures")
    m_batches = _image_batches([refs[i] for i in sorted(perm[half:])], loaded, False, progress, "held-out failures")
    return replace(split, held=m_batches, validation=v_batches,
                   source=f"{split.source} (the half not used to choose the sparsity)")


@dataclass
class _Cached:
    """A measured set cached at the first edited block (``cache`` None: no such set), with its labels
    (labeled sets) and the base model's top-1 on it (folders)."""

    folder: Path | None = None
    refs: list = field(default_factory=list)
    cache: object = None             # evaluate.TokenCache | None
    labels: "torch.Tensor | None" = None
    base: "torch.Tensor | None" = None
    bad: list = field(default_factory=list)
    name: str = ""

    @property
    def image_set(self) -> ImageSet:
        return ImageSet(self.name, self.folder, self.refs)


def _cached(batches, loaded: LoadedModel, start: int, labeled: bool) -> _Cached:
    """``batches`` (data.ImageBatches; None or empty: no set) streamed into a token cache."""
    import torch

    from ..evaluate import TokenCache

    if not batches:
        return _Cached()
    dev = next(loaded.model.parameters()).device
    labels = torch.tensor([r.label for r in batches.refs], dtype=torch.long, device=dev) if labeled else None
    return _Cached(refs=batches.refs, cache=TokenCache(loaded.model, start, _stream(batches, dev)), labels=labels,
                   bad=batches.bad)


def _cache_folder(name: str, what: str, folder: Path | None, loaded: LoadedModel, start: int, skip_bad: bool,
                  progress: Progress, labeled: bool) -> _Cached:
    """The set in ``folder`` (None: no such set) cached, with the base model's top-1 on it; ``name``
    for errors, ``what`` for progress."""
    from ..data import scan_labeled, scan_unlabeled

    if folder is None:
        return _Cached(name=name)
    refs = scan_labeled(folder, loaded.labels) if labeled else scan_unlabeled(folder)
    cached = _cached(_image_batches(refs, loaded, skip_bad, progress, what), loaded, start, labeled)
    return replace(cached, folder=folder, base=cached.cache.predict(), name=name)


@dataclass
class _Kept:
    """The preserve set as the edit config needs it: its tokens (``preserve``, with a note when cut to
    the budget) and/or its statistics, and the images skipped reading each."""

    folder: Path | None = None
    preserve: object = None          # preserve.PreserveSet | None
    note: str | None = None
    stats: object = None             # stats.PreserveStats | None
    bad: list = field(default_factory=list)
    stats_bad: list = field(default_factory=list)


def _preserve_for(ws: Workspace, opts: ExperimentOptions, loaded: LoadedModel, sites, seed: int, progress: Progress,
                  measured: list[ImageSet], base_weights: dict | None) -> _Kept:
    """The preserve set (given, bundled, or none), checked apart from every ``measured`` set.

    On top of a stack (``base_weights``) the ordinary images keep the *base* model's predictions
    (they were never meant to change; holding them to the stack would let every edit's drift
    compound), while the earlier edits' own images keep the stack's (the anchor set)."""
    from ..data import scan_unlabeled

    folder = set_folder(opts.preserve, default_preserve_dir(loaded), opts.no_preserve)
    if folder is None:
        return _Kept()
    refs = scan_unlabeled(folder)
    check_apart(ImageSet(PRESERVE, folder, refs), measured)
    kept = _Kept(folder)
    wanted = resolve_edit_config(loaded, opts.edit, opts.objective)
    if wanted.uses_preserve:  # the paper's editor reads no preserve set: it holds nothing in place
        kept.preserve, kept.note, kept.bad = _load_preserve(refs, loaded, sites, opts.skip_bad_images, seed, progress,
                                                            targets_from=base_weights)
    if wanted.uses_stats:
        kept.stats, kept.stats_bad = _load_stats(ws, loaded, sites, refs, opts.skip_bad_images, progress,
                                                 base_weights=base_weights)
    return kept


def _anchors_for(ws: Workspace, loaded: LoadedModel, sites, measured_refs: list, progress: Progress,
                 edit_config: EditConfig, seed: int, stats, base_weights: dict | None, notes: list[str]):
    """The anchor set of an edit on top of the history and, with statistics, the anchors' input
    moments under the base weights; a note on images left out goes to ``notes``."""
    anchors, note = _load_anchors(ws, loaded, sites, [r.path for r in measured_refs], progress,
                                  views=edit_config.anchor_views, seed=seed)
    if note:
        notes.append(note)
    if anchors is None or stats is None:
        return anchors, None
    from ..preserve import input_second_moments

    return anchors, input_second_moments(loaded.model, sites, anchors.tokens, weights=base_weights)


def _load_anchors(ws: Workspace, loaded: LoadedModel, sites, measured_paths: Sequence[Path], progress: Progress,
                  views: int = 0, seed: int = 0):
    """The anchor set of an edit on top of the history: every earlier edit's edit images (as recorded,
    checked by hash) and ``views`` seeded views of each, with the current stacked model's predictions
    on them. Images that are gone or changed, or that are among this edit's measured generalization
    images, are left out with a note."""
    from ..data import ImageRef, load_tensors as load_images
    from ..history import History
    from ..preserve import build_anchor_set
    from .history import intact_images

    measured = {sha256_file(p) for p in measured_paths}
    recorded = [e for entry in History(ws).read(loaded.identity)["edits"] for e in entry.get("edit_images", [])]
    intact = intact_images(recorded)
    held = [e for e in intact if e["sha256"] not in measured]
    missing, skipped_measured = len(recorded) - len(intact), len(intact) - len(held)
    refs = [ImageRef(Path(e["path"]), e["label"], None) for e in held]
    progress("caching earlier edits' images", 0, 1)
    anchors = None
    if refs:
        x, good, bad = load_images(refs, loaded.transform, loaded.channels, skip_bad=True)
        missing += len(bad)
        if len(good):
            anchors = build_anchor_set(loaded.model, sites, x.to(next(loaded.model.parameters()).device),
                                       views=views, seed=seed)
    progress("caching earlier edits' images", 1, 1)
    parts = []
    if missing:
        parts.append(f"{missing} of the earlier edits' images are gone or changed since they were edited")
    if skipped_measured:
        parts.append(f"{skipped_measured} are among this edit's generalization images")
    note = (f"{'; '.join(parts)}; those are not held by --anchor-weight") if parts else None
    return anchors, note


def _stack(ws: Workspace, state: dict, loaded: LoadedModel, on_top: bool) -> int:
    """``on_top``: write the edit history into ``loaded.model`` (checked to be what locate scored on)."""
    from ..history import History

    scored_on = int(state.get("on_top_of") or 0)
    if not on_top:
        if scored_on:
            raise UsageError(f"`vitedit locate --on-top` scored these failures on top of {scored_on} earlier edit(s); "
                             "leave out --from-base (apply follows locate), or run `vitedit locate` without --on-top to start "
                             "from the base model")
        return 0
    identity = loaded.identity  # the base model's, before the stack goes in
    stacked = History(ws).apply_stack(loaded.model, identity) if History(ws).exists else 0
    if stacked != scored_on:
        raise UsageError(f"the workspace holds {stacked} edit(s) but locate scored on top of {scored_on}; run "
                         "`vitedit locate FAILURES --on-top` again")
    return stacked


def _load_preserve(refs, loaded: LoadedModel, sites, skip_bad: bool, seed: int, progress: Progress,
                   targets_from: dict | None = None):
    """The preserve set as the edit needs it, within the token cache budget.

    Its tokens must stay in memory (a minibatch is drawn every step), so a set too large for the
    budget is cut to a seeded subset that fits, and a note says so.
    """
    import torch

    from ..evaluate import cache_budget_bytes
    from ..models import forward_prefix
    from ..preserve import build_preserve_set

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
    return build_preserve_set(loaded.model, sites, tokens=tokens, targets_from=targets_from), note, batches.bad


def _load_stats(ws: Workspace, loaded: LoadedModel, sites, refs, skip_bad: bool, progress: Progress,
                base_weights: dict | None = None):
    """The preserve set's statistics (``stats.PreserveStats``), from the workspace's cache when they
    were computed before for this model and these images, else in one streaming pass (cached).

    The cache is keyed by the preserve set's fingerprint (its images' sha256, whatever their names),
    so another preserve set gets its own file and nothing is overwritten. On top of a stack the
    statistics are those of the base model (``base_weights``): they do not move with the stack."""
    from ..stats import PreserveStats, compute_stats, fingerprint

    digest = fingerprint(r.path for r in refs)
    path = ws.path(f"stats/{digest[:16]}.safetensors")
    if path.exists():
        return PreserveStats.load(path, loaded.identity, digest, sites), []
    batches = _image_batches(refs, loaded, skip_bad, progress, "preserve set")
    dev = next(loaded.model.parameters()).device
    total = len(batches.refs)
    progress("preserve statistics (once per preserve set)", 0, total)

    def tick(done: int) -> None:
        progress("preserve statistics (once per preserve set)", done, total)

    stats = compute_stats(loaded.model, sites, (x.to(dev) for x, _ in batches), model_identity=loaded.identity,
                          preserve_sha256=digest, weights=base_weights, progress=tick)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats, batches.bad


def resolve_edit_config(loaded: LoadedModel, overrides: dict | None, objective: str = "plain") -> EditConfig:
    """Defaults in one place: the paper's EditConfig, then the objective's preset, then the model's
    recommendation (its edit learning rate), then the flags."""
    from ..edit import objective_config

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return objective_config(objective, **{**loaded.edit_defaults, **given})


def _scores(job: _Job, locator: str):
    """Unit scores of ``locator`` aggregated over the edit images (random: seeded, image-free)."""
    from ..locate import LocateInputs, aggregate, random_locator

    if locator == "random":
        per_image = random_locator(LocateInputs(job.loaded.model, job.sites, None, None, job.seed))
    else:
        per_image = job.per_image
    return aggregate(per_image, job.sites, job.edit_rows, locator)


def _edit_and_measure(job: _Job, locator: str, sparsity: float, config: EditConfig | None = None,
                      progress: Progress = _noop, sets=None) -> tuple[dict, Patch]:
    """One edit from the unedited model with ``config`` (default: the job's), measured on ``sets``."""
    config = config or job.edit_config
    mask = _scores(job, locator).select(sparsity, job.exclude)

    def step(done: int, total: int, loss: float) -> None:
        progress("editing", done, total, f"loss {loss:.3f}")

    result = job.editor.fit_mask(mask, job.edit_images, job.edit_labels, config, seed=job.seed, tokens=job.edit_tokens,
                                 anchors=job.anchors, anchor_moments=job.anchor_moments, progress=step)
    progress("editing", config.max_steps, config.max_steps, "done")
    metrics = (sets or job.sets).measure(result.patch.weights(job.loaded.model))
    point = {"sparsity": sparsity, "locator": locator, "objective": config.objective,
             "preserve_weight": config.preserve_weight, "stats_weight": config.stats_weight, **metrics.to_json(), "units_edited": mask.selected,
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
        "preserve_images": (len(job.preserve) if job.preserve is not None
                            else job.stats.images if job.stats is not None else 0),
        "preserve_source": str(job.preserve_dir) if job.preserve is not None or job.stats is not None else None,
        "anchor_images": job.anchors.images if job.anchors is not None else 0,
        "disjoint": job.exclude is not None,
        "units_excluded": sum(int(ix.numel()) for ix in job.exclude.values()) if job.exclude else 0,
        "notes": _notes(job),
    }


def _sweep(job: _Job, sparsities: Sequence[float], weights: Sequence[float], locators: Sequence[str],
           progress: Progress, what: str, sets=None) -> list[dict]:
    """Edits at every (locator, sparsity, preserve weight); random masks only at the job's weight.
    With --disjoint, sparsities that need more units than the history left free are skipped (noted)."""
    from ..masks import units_for

    if job.exclude:
        total = sum(s.units for s in job.sites)
        free = total - sum(int(ix.numel()) for ix in job.exclude.values())
        fits = [s for s in sparsities if units_for(s, total) <= free]
        if len(fits) < len(sparsities):
            if not fits:  # the error names the smallest one
                _scores(job, job.state["locator"]).select(min(sparsities), job.exclude)
            job.notes.append(f"--disjoint: {free} of {total} units are free of earlier edits, so sparsities "
                             f"{', '.join(f'{s:g}' for s in sparsities if s not in fits)} were skipped")
            sparsities = fits
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
