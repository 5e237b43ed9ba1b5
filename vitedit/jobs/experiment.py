"""The experiment apply and report share: the workspace's split, every image set cached at the first
edited block (edit, held-out, locality, check), the preserve set, and one edit measured on them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..artifacts import load_tensors, sha256_file
from ..edit import DEFAULT_OBJECTIVE, EditConfig, Patch, edit
from ..errors import InputDataError, UsageError
from ..models import LoadedModel, Site
from ..workspace import Workspace
from .common import (Progress, _check_holdout, _failure_refs, _image_batches, _load_workspace_model, _noop, _stream,
                     default_check_dir, default_locality_dir, default_preserve_dir, split_rows)

if TYPE_CHECKING:
    import torch

    from ..data import ImageRef


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
    on_top: bool = False             # edit on top of the workspace's edit history (see vitedit.history)
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
        if self.disjoint and not self.on_top:
            raise UsageError("--disjoint keeps an edit off the units earlier edits changed: it needs --on-top")
        from ..edit import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: choose {' or '.join(OBJECTIVES)}")


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


def _prepare(ws: Workspace, opts: ExperimentOptions, progress: Progress, validation: bool = False) -> _Job:
    """Load the workspace's model, split and scores and cache every image set at the first edited block.

    ``validation``: split the generalization set (seeded, half and half) into a *validation* half,
    used only to choose an edit (``job.validation``), and the half its figures are measured on."""
    import torch

    from ..data import load_tensors as load_images, scan_labeled, scan_unlabeled
    from ..evaluate import EvalSets, TokenCache, accuracy
    from ..history import History, units_changed

    holdout, generalization, locality, seed = opts.holdout, opts.generalization, opts.locality, opts.seed
    skip_bad = opts.skip_bad_images
    state = ws.state()
    loaded = _load_workspace_model(ws, state, opts.device)
    sites = tuple(Site.from_json(d) for d in state["sites"])
    # the base model's edited matrices, before the history goes in: the preserve set's targets
    base_weights = {s.param: loaded.model.get_parameter(s.param).detach().clone() for s in sites} \
        if opts.on_top else None
    stacked = _stack(ws, state, loaded, opts.on_top)
    exclude = units_changed(History(ws).patches(loaded.identity)) if opts.disjoint and stacked else None
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
    preserve, preserve_note, stats = None, None, None
    if preserve_dir is not None:
        measured = {"check set (--check)": (check_dir, c_refs), "locality set (--locality)": (locality_dir, l_refs),
                    "generalization set": (Path(generalization) if generalization else None,
                                           g_batches.refs if g_batches else []),
                    "failures": (Path(state["failures_dir"]), failures)}
        p_refs = scan_unlabeled(preserve_dir)
        check_disjoint(preserve_dir, p_refs, measured)
        # on top of a stack the ordinary images keep the *base* model's predictions (they were never
        # meant to change; holding them to the stack would let every edit's drift compound), while
        # the earlier edits' own images keep the stack's (the anchor set, below)
        wanted = resolve_edit_config(loaded, opts.edit, opts.objective)
        if wanted.uses_preserve or not wanted.uses_stats:
            preserve, preserve_note, bad = _load_preserve(p_refs, loaded, sites, skip_bad, seed, progress,
                                                          targets_from=base_weights if stacked else None)
            skipped += bad
        if wanted.uses_stats:
            stats, bad = _load_stats(ws, loaded, sites, p_refs, skip_bad, progress,
                                     base_weights=base_weights if stacked else None)
            skipped += [b for b in bad if b not in skipped]

    sets = EvalSets(edit_cache, labels[edit_rows], holdout_cache, g_labels, loc_cache, loc_base,
                    check_cache, check_labels, check_base)
    val_sets = None
    if v_batches is not None:
        val_sets = replace(sets, holdout=TokenCache(loaded.model, start, _stream(v_batches, dev)),
                           holdout_labels=torch.tensor([r.label for r in v_batches.refs], dtype=torch.long, device=dev))
    # the base model's locality is 1 by definition, and its check predictions are check_base already
    base_metrics = replace(sets, locality=None, check=None).measure({})
    base_check_accuracy = accuracy(check_base, check_labels) if check_base is not None else None
    edit_config = resolve_edit_config(loaded, opts.edit, opts.objective)
    notes = [preserve_note] if preserve_note else []
    anchors = None
    anchor_moments = None
    if stacked and edit_config.anchor_weight > 0:
        anchors, note = _load_anchors(ws, loaded, sites, [r.path for r in (g_batches.refs if g_batches else [])],
                                      progress, views=edit_config.anchor_views, seed=seed)
        if note:
            notes.append(note)
        if anchors is not None and stats is not None:  # the earlier edits' images' inputs, under the base weights
            from ..preserve import input_second_moments

            anchor_moments = input_second_moments(loaded.model, sites, anchors.tokens, weights=base_weights)
    if (preserve is None and edit_config.uses_preserve) or (stats is None and edit_config.uses_stats):
        edit_config = edit_config.without_preserve()
        notes.append("no preserve set was given (--preserve DIR: ordinary images of the model's inputs), so nothing "
                     "held the rest of the model in place; expect a larger accuracy drop")
    return _Job(ws, state, loaded, sites, edit_cache.tokens, labels[edit_rows], sets, per_image, edit_rows, hold_rows,
                edit_config, seed, locality_dir, gen_source,
                # the unedited model's accuracy on the generalization set is measure({})'s generalization
                base={"success": base_metrics.success, "generalization": base_metrics.generalization,
                      "holdout_base_accuracy": base_metrics.generalization,
                      "check_accuracy": base_check_accuracy},
                skipped=skipped, preserve=preserve, preserve_dir=preserve_dir, check_dir=check_dir, notes=notes,
                edit_images=edit_images, validation=val_sets,
                refs={"edit": [failures[i] for i in edit_rows], "holdout": g_batches.refs if g_batches else [],
                      "check": c_refs, "locality": l_refs}, stacked=stacked, anchors=anchors, exclude=exclude,
                stats=stats, anchor_moments=anchor_moments)


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
                             "pass --on-top here too, or run `vitedit locate` without it to start from the base model")
        return 0
    identity = loaded.identity  # the base model's, before the stack goes in
    stacked = History(ws).apply_stack(loaded.model, identity) if History(ws).exists else 0
    if stacked != scored_on:
        raise UsageError(f"the workspace holds {stacked} edit(s) but locate scored on top of {scored_on}; run "
                         "`vitedit locate FAILURES --on-top` again")
    return stacked


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

    result = edit(job.loaded.model, mask, job.edit_images, job.edit_labels, config, tokens=job.edit_tokens,
                  preserve=job.preserve if config.uses_preserve else None, seed=job.seed,
                  anchors=job.anchors, stats=job.stats if config.uses_stats else None,
                  anchor_moments=job.anchor_moments, progress=step)
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
