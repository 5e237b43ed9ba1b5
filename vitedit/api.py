"""The Python API: edit the model object the caller already holds (docs/api.md).

    editor = vitedit.Editor(model, preserve="ordinary/")   # a frozen copy; preservation cached once
    edit = editor.fix("failures/", sparsity=0.05)          # locate + edit; ``model`` is not touched
    report = edit.measure(check="check/")                  # accuracy before/after, flips, success
    edit.apply(model); edit.save("fix.safetensors"); edit.revert(model)

This module owns only the meeting point: a module (or a ``models.LoadedModel``) and folders,
tensors or DataLoaders become what the library's steps take, and their results become small frozen
objects. The steps are the library's: ``locate.score_batches`` (paper Sec. 3.2), the global top-k of
``masks.UnitScores.select``, ``edit.edit`` (Sec. 3.1), ``preserve.build_preserve_set`` /
``stats.compute_stats`` for the editor presets that hold the rest of the model in place, the metric
definitions of ``evaluate`` and the patch file of ``edit.Patch`` (the one the CLI writes and reads).

The editor works on its own frozen copy of the model, taken when it is made (one more copy of the
weights, on ``device``). Every fix starts from that unedited state, the preservation data cached
on the editor stays valid for it, and the caller's module (weights, training mode,
``requires_grad`` flags, gradients) is never written. Only ``Edit.apply`` / ``Edit.revert`` write.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from .errors import ArtifactError, InputDataError, ModelError, UnsupportedModelError, UsageError
from .models import DEFAULT_ASSETS, DEFAULT_MODEL, LoadedModel, Site

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .edit import EditConfig, EditResult, Patch
    from .evaluate import TokenCache
    from .masks import UnitMask
    from .preserve import AnchorSet, PreserveSet
    from .stats import PreserveStats

Progress = Callable[..., None]  # (description, done, total)
BATCH = 256                     # images per forward pass when reading and measuring sets


def _noop(*_args) -> None:
    pass


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Report:
    """What ``Edit.measure`` measured (``evaluate``'s definitions). Shares are in [0, 1]; ``None``
    where the set was not given. ``accuracy_drop`` is in percentage points: 100 x (before - after)."""

    success: float | None           # edit images classified as their true class after the edit
    generalization: float | None    # held-out failures (or ``generalization=``) right after the edit
    locality: float | None          # locality images whose top-1 the edit left unchanged
    accuracy_before: float | None   # check set, unedited model
    accuracy_after: float | None    # check set, edited model
    accuracy_drop: float | None     # points
    flip_rate: float | None         # check images whose top-1 changed, whichever way
    edit_images: int = 0
    generalization_images: int = 0
    check_images: int = 0
    locality_images: int = 0
    accuracy_drop_ci95: tuple[float, float] | None = None  # points, paired over the check images
    flip_rate_ci95: tuple[float, float] | None = None

    def resolution_note(self, budget_points: float = 0.5) -> str | None:
        """A sentence when the check set cannot resolve an accuracy drop of ``budget_points``."""
        from .evaluate import resolution_note

        return resolution_note(self.to_json(), budget_points)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Edit:
    """A sparse edit of one model: made by ``Editor.fix`` or read by ``Edit.load``.

    ``patch`` holds, per edited matrix, the unit indices and their old and new weights; nothing
    else of the model changes. ``measure`` evaluates the edited model without writing any model;
    ``apply`` / ``revert`` write the new / old weights into a model in place.
    """

    patch: "Patch"
    model_identity: dict            # {"name", "weights_sha256"} of the model it was made from
    editor: str | None              # the editor preset (``edit.OBJECTIVE_PRESETS``)
    config: "EditConfig | None"     # the preset with the overrides, as fitted
    sparsity: float | None
    locator: str | None
    seed: int | None
    steps: int | None               # optimizer steps taken
    converged: bool | None          # stopped by the success rule, not by ``max_steps``
    final_loss: float | None
    edit_images: int                # failures the edit was fitted on
    holdout_images: int             # failures kept out of it (measured as generalization)
    already_correct: int            # images given to ``fix`` that the model already got right
    preserve: str | None            # what the preserve set was (provenance)
    notes: tuple[str, ...] = ()
    _base: "_Base | None" = field(default=None, repr=False)
    _edit_set: "_Set | None" = field(default=None, repr=False)
    _holdout_set: "_Set | None" = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"Edit(model={self.model_identity.get('name')!r}, editor={self.editor!r}, locator={self.locator!r}, "
                f"sparsity={self.sparsity}, units_edited={self.units_edited}, steps={self.steps}, "
                f"converged={self.converged}, edit_images={self.edit_images}, holdout_images={self.holdout_images})")

    @property
    def units_edited(self) -> int:
        return self.patch.units_edited

    @property
    def params_edited(self) -> int:
        return self.patch.params_edited

    def measure(self, check: Any = None, *, generalization: Any = None, locality: Any = None) -> Report:
        """Measure the edited model against the unedited one; no model is written.

        ``check``: labeled ordinary images (accuracy before / after, drop, flip rate);
        ``generalization``: labeled failures not used by the edit (default: the held-out failures of
        ``fix``); ``locality``: unlabeled images whose predictions should not change. Each is a
        folder, tensors or a DataLoader, as for ``Editor.fix``."""
        from .evaluate import EditMetrics, accuracy, check_metrics, unchanged

        base = self._base
        weights = self.patch.weights(base.model)
        success = gen = loc = None
        check_fields: dict = {}
        counts = {"edit_images": 0, "generalization_images": 0, "check_images": 0, "locality_images": 0}
        if self._edit_set is not None:
            success = accuracy(base.cache(self._edit_set)[0].predict(weights), self._edit_set.labels)
            counts["edit_images"] = self._edit_set.size
        held = base.read(generalization, "generalization", labeled=True) if generalization is not None \
            else self._holdout_set
        if held is not None:
            gen = accuracy(base.cache(held)[0].predict(weights), held.labels)
            counts["generalization_images"] = held.size
        if locality is not None:
            images = base.read(locality, "locality", labeled=False)
            tokens, base_pred = base.cache(images)
            loc = unchanged(tokens.predict(weights), base_pred)
            counts["locality_images"] = images.size
        if check is not None:
            images = base.read(check, "check", labeled=True)
            tokens, base_pred = base.cache(images)
            check_fields = check_metrics(tokens.predict(weights), base_pred, images.labels)
        metrics = EditMetrics(success, gen, loc, **check_fields)
        counts["check_images"] = metrics.check_images or 0
        return Report(success, gen, loc, metrics.accuracy_before, metrics.accuracy_after, metrics.accuracy_drop,
                      metrics.flip_rate, **counts, accuracy_drop_ci95=metrics.accuracy_drop_ci95,
                      flip_rate_ci95=metrics.flip_rate_ci95)

    def apply(self, model: "nn.Module | LoadedModel") -> None:
        """Write the edit into ``model`` in place (it must hold the weights the edit was made from)."""
        self.patch.apply(_module(model))

    def revert(self, model: "nn.Module | LoadedModel") -> None:
        """Write the old weights back into an edited ``model``: bit for bit the model before ``apply``."""
        self.patch.revert(_module(model))

    def provenance(self, report: Report | None = None) -> dict:
        """What ``save`` records beside the tensors (plus the model identity and the sites)."""
        return {"made_by": "vitedit.Editor", "editor": self.editor, "sparsity": self.sparsity,
                "locator": self.locator, "edit_config": self.config.to_json() if self.config else None,
                "seed": self.seed, "steps": self.steps, "converged": self.converged,
                "edit_images": self.edit_images, "holdout_images": self.holdout_images, "preserve": self.preserve,
                **({"metrics": report.to_json()} if report is not None else {})}

    def save(self, path: str | os.PathLike, report: Report | None = None) -> Path:
        """Write the patch file (safetensors + JSON sidecar, atomically) that ``vitedit patch`` and
        ``Edit.load`` read; ``report`` adds its figures to the provenance. Returns the path."""
        path = Path(path)
        self.patch.save(path, self.model_identity, self.provenance(report))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: "nn.Module | LoadedModel", *, device: Any = None,
             labels: Sequence[str] | None = None, data_config: Mapping | None = None,
             skip_bad_images: bool = False) -> "Edit":
        """Read a patch file made for ``model`` (checked by the hash of its weights; ``ArtifactError``
        otherwise). The edit can be measured (on sets given to ``measure``), applied and reverted."""
        from .edit import Patch

        path = Path(path)
        patch, meta = Patch.load(path)
        blocks = sorted({s.block for s in patch.sites})
        base = _adopt(model, device=device, labels=labels, data_config=data_config, blocks=blocks,
                      skip_bad=skip_bad_images)
        recorded = meta.get("model") or {}
        if recorded.get("weights_sha256") != base.identity["weights_sha256"]:
            raise ArtifactError(f"patch {path} was made for {recorded.get('name')} (weights "
                                f"{str(recorded.get('weights_sha256'))[:12]}), not for this model (weights "
                                f"{base.identity['weights_sha256'][:12]}); load it with the model it was made from")
        if set(patch.sites) - set(base.sites):
            raise ArtifactError(f"patch {path} edits {', '.join(s.param for s in patch.sites)}, which do not all "
                                "exist with those widths in this model; it is damaged")
        config = _config_from(meta.get("edit_config"))
        editor = meta.get("editor") or (config.objective if config is not None else None)  # CLI patches: the objective
        return cls(patch, dict(base.identity), editor, config, meta.get("sparsity"), meta.get("locator"),
                   meta.get("seed"), meta.get("steps"), meta.get("converged"), None,
                   int(meta.get("edit_images") or 0), int(meta.get("holdout_images") or 0), 0, meta.get("preserve"),
                   _base=base)


# ----------------------------------------------------------------------------- the editor


class Editor:
    """Locates and fits sparse edits of one model; holds what every edit of it shares.

    ``model``: a timm Vision Transformer (``nn.Module``) or a ``vitedit.load_model()`` result.
    ``preserve``: ordinary, unlabeled images the edits are trained to leave alone (a folder, a
    (N, C, H, W) tensor or a DataLoader), needed by editor presets that hold the rest of the model
    in place. ``editor``: a preset name (default ``edit.DEFAULT_OBJECTIVE``); ``config``: overrides
    of its ``EditConfig`` fields, e.g. ``{"max_steps": 50}``. ``locator``: ``"auto"`` (the model's
    hypernetwork when one ships with it or ``hypernet=`` names one, else ``"gradient"``) or a name in
    ``locate.LOCATORS``. ``blocks``: the edited blocks (default: the paper's three). ``labels``:
    class names when the model carries none (folders are matched against them). ``data_config``:
    timm data-config keys that override the model's own (e.g. ``mean``/``std``). ``device``: where
    the work runs (default: the model's device). ``progress(description, done, total)`` follows
    long steps.
    """

    def __init__(self, model: "nn.Module | LoadedModel", preserve: Any = None, *, editor: str | None = None,
                 config: Mapping[str, Any] | None = None, locator: str = "auto",
                 hypernet: str | os.PathLike | None = None, blocks: Sequence[int] | None = None,
                 labels: Sequence[str] | None = None, data_config: Mapping | None = None, device: Any = None,
                 skip_bad_images: bool = False, progress: Progress | None = None) -> None:
        progress = progress or _noop
        self._setup(_adopt(model, device=device, labels=labels, data_config=data_config, blocks=blocks,
                           skip_bad=skip_bad_images, progress=progress), editor, config, progress)
        self.locator, self._hypernet, notes = _pick_locator(locator, hypernet, self._base)
        self.notes.extend(notes)
        self._preserve = None if preserve is None else self._base.read(preserve, "preserve", labeled=False)
        self._base.preserve = self._preserve
        self._preservation(self.config)  # computed once, now: errors surface here, not in fix()

    def _setup(self, base: "_Base", editor: str | None, config: Mapping[str, Any] | None, progress: Progress) -> None:
        from . import edit as edit_module

        self.editor = edit_module.DEFAULT_OBJECTIVE if editor is None else editor
        if self.editor not in edit_module.OBJECTIVE_PRESETS:
            raise UsageError(f"editor={self.editor!r}: choose one of {', '.join(edit_module.OBJECTIVE_PRESETS)}")
        self._progress = progress
        self._base = base
        self._overrides = dict(config or {})
        self.config = self._config(None)
        self.locator, self._hypernet = "given", None
        self.notes: list[str] = []
        self._preserve = None
        self._preserve_set: PreserveSet | None = None
        self._stats: PreserveStats | None = None

    @classmethod
    def of_workspace(cls, loaded: LoadedModel, sites: Sequence[Site], *, preserve_set: "PreserveSet | None" = None,
                     stats: "PreserveStats | None" = None) -> "Editor":
        """The editor of a ``vitedit apply`` / ``report`` job: the workspace's model as the job loaded it
        (owned by the job, so not copied; with its edit stack written in), its sites, and the preserve
        set and statistics the job built. Its edits go through ``fit_mask`` (whose ``config`` decides the
        editor), as ``fix``'s do."""
        self = cls.__new__(cls)
        self._setup(_Base(loaded, tuple(sites)), None, None, _noop)
        self._preserve_set, self._stats = preserve_set, stats
        return self

    @property
    def model_identity(self) -> dict:
        return dict(self._base.identity)

    @property
    def labels(self) -> list[str]:
        return list(self._base.loaded.labels)

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._base.sites

    @property
    def transform(self) -> Callable:
        """PIL image -> (C, H, W) tensor: the model's preprocessing, for callers who pass tensors."""
        return self._base.loaded.transform

    @property
    def stats(self) -> "PreserveStats | None":
        """The preserve statistics, when the editor's preset uses them (computed once)."""
        return self._stats

    def fix(self, failures: Any, sparsity: float = 0.05, *, holdout: float = 0.0, seed: int = 0,
            config: Mapping[str, Any] | None = None) -> Edit:
        """Locate the units to change for ``failures`` and fit them; the model is not written.

        ``failures``: images with their TRUE labels: a folder with one sub-folder per true class,
        ``(images, labels)`` tensors or a DataLoader of such pairs. Images the model already gets
        right are left out. ``sparsity``: the share of the edited blocks' units to change.
        ``holdout``: the share of the failures kept out of the edit, measured as generalization.
        ``seed`` draws the holdout and the editor's minibatches; ``config`` overrides the editor's
        configuration for this edit only."""
        from .jobs.common import split_rows
        from .locate import aggregate, score_batches
        from .masks import validate_density

        validate_density(sparsity, "sparsity")
        if not 0.0 <= holdout < 1.0:
            raise UsageError(f"holdout={holdout}: give the share of failures kept out of the edit, in [0, 1), "
                             "e.g. 0.3")
        cfg = self._config(config)
        preserve, stats = self._preservation(cfg)
        failing, already_correct = self._failures(failures)
        edit_rows, hold_rows = split_rows(failing.size, holdout, seed)
        on_edit, held = failing.subset(edit_rows), failing.subset(hold_rows) if hold_rows else None
        base, dev = self._base, self._base.device
        images, labels = on_edit.images.to(dev), on_edit.labels.to(dev)
        self._progress("locating", 0, 1)
        per_image = score_batches(self.locator, base.model, base.sites,
                                  zip(images.split(BATCH), labels.split(BATCH)), seed, self._hypernet)
        mask = aggregate(per_image, base.sites, None, self.locator).select(sparsity)
        self._progress("locating", 1, 1)
        result = self.fit_mask(mask, images, labels, cfg, seed=seed,
                               progress=lambda step, total, _loss: self._progress("editing", step, total))
        self._progress("editing", cfg.max_steps, cfg.max_steps)
        return Edit(result.patch, dict(base.identity), self.editor, cfg, float(sparsity), self.locator, seed,
                    result.steps, result.converged, result.final_loss, on_edit.size,
                    0 if held is None else held.size, already_correct,
                    None if preserve is None and stats is None else self._preserve.describe(), tuple(self.notes),
                    _base=base, _edit_set=on_edit, _holdout_set=held)

    def fit_mask(self, mask: "UnitMask", images: "torch.Tensor", labels: "torch.Tensor", config: "EditConfig",
                 *, seed: int = 0, tokens: "torch.Tensor | None" = None, anchors: "AnchorSet | None" = None,
                 anchor_moments: dict | None = None,
                 progress: Callable[[int, int, float], None] | None = None) -> "EditResult":
        """Fit the units of ``mask`` (``masks.UnitMask``: chosen by ``fix``'s locator, or by you) to
        ``images`` (N, C, H, W, preprocessed) and their TRUE ``labels`` with ``config``, holding the rest
        of the model with this editor's preserve set or statistics when ``config`` uses them. The model
        is not written; the result's ``patch`` holds the edit. ``fix`` and ``vitedit apply`` both edit
        through here. ``tokens``: the images' prefix activations at the first edited block, when
        already computed; ``anchors`` / ``anchor_moments``: earlier edits to hold (a stack)."""
        from .edit import edit

        return edit(self._base.model, mask, images, labels, config, tokens=tokens,
                    preserve=self._preserve_set if config.uses_preserve else None, seed=seed, anchors=anchors,
                    stats=self._stats if config.uses_stats else None, anchor_moments=anchor_moments,
                    progress=progress)

    def _config(self, overrides: Mapping[str, Any] | None) -> "EditConfig":
        """The preset, then the model's recommendation (its edit lr), then the editor's and this call's
        overrides."""
        from dataclasses import fields

        from .edit import EditConfig, objective_config

        given = {**self._base.loaded.edit_defaults, **self._overrides, **dict(overrides or {})}
        known = {f.name for f in fields(EditConfig)} - {"objective"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise UsageError(f"config key {unknown[0]!r} is not an editor setting; use one of "
                             f"{', '.join(sorted(known))}")
        return objective_config(self.editor, **given)

    def _preservation(self, cfg: "EditConfig") -> tuple["PreserveSet | None", "PreserveStats | None"]:
        """What ``cfg`` needs from the preserve set, each built once on first need and kept."""
        if not (cfg.uses_preserve or cfg.uses_stats):
            return None, None
        if self._preserve is None:
            from .imagesets import default_preserve_dir

            bundled = default_preserve_dir(self._base.loaded)
            raise UsageError(f"the {cfg.objective!r} editor keeps the rest of the model in place with ordinary images: "
                             "pass preserve=FOLDER (unlabeled images like the model's usual inputs; or a tensor or "
                             "DataLoader) to Editor"
                             f"{f' (this model ships one: {bundled})' if bundled is not None else ''}, "
                             "or use editor='plain'")
        if cfg.uses_preserve and self._preserve_set is None:
            self._preserve_set = self._base.preserve_set(self._preserve, self.notes)
        if cfg.uses_stats and self._stats is None:
            self._stats = self._base.preserve_stats(self._preserve)
        return (self._preserve_set if cfg.uses_preserve else None), (self._stats if cfg.uses_stats else None)

    def _failures(self, source: Any) -> tuple["_Set", int]:
        """The images of ``source`` the model gets wrong, in memory, and how many it got right."""
        import torch

        given = self._base.read(source, "failures", labeled=True).materialize()
        wrong = self._base.predict(given.images).cpu() != given.labels
        if not bool(wrong.any()):
            raise InputDataError(f"the model already classifies all {given.size} failure images correctly; there is "
                                 "nothing to fix (give images it gets wrong)")
        return given.subset(torch.nonzero(wrong).flatten().tolist()), int((~wrong).sum())


# ----------------------------------------------------------------------------- the frozen base model


@dataclass(eq=False)
class _Base:
    """The frozen copy of the caller's model, its edited sites, and the sets read for it
    (prefix tokens and base predictions of folders, cached while in the token budget)."""

    loaded: LoadedModel
    sites: tuple[Site, ...]
    skip_bad: bool = False
    progress: Progress = _noop
    preserve: "_Set | None" = None   # the editor's, checked apart from every set read after it
    _caches: dict = field(default_factory=dict)

    @property
    def model(self) -> "nn.Module":
        return self.loaded.model

    @property
    def identity(self) -> dict:
        return self.loaded.identity

    @property
    def device(self) -> "torch.device":
        return next(self.model.parameters()).device

    @property
    def start(self) -> int:
        return min(s.block for s in self.sites)

    def read(self, source: Any, what: str, labeled: bool) -> "_Set":
        """``source`` as a set of this model's inputs; a folder is checked apart from the preserve set."""
        images = _read_set(self.loaded, source, what, labeled, self.skip_bad)
        if self.preserve is not None and self.preserve.folder is not None and images.folder is not None:
            from .imagesets import check_disjoint

            check_disjoint(self.preserve.folder, self.preserve.refs, {f"{what} set": (images.folder, images.refs)})
        return images

    def predict(self, images: "torch.Tensor") -> "torch.Tensor":
        """Top-1 of the unedited model: (N, C, H, W) -> (N,)."""
        import torch

        with torch.inference_mode():
            return torch.cat([self.model(x.to(self.device)).argmax(-1) for x in images.split(BATCH)])

    def cache(self, images: "_Set") -> tuple["TokenCache", "torch.Tensor"]:
        """The set's prefix tokens at the first edited block and the unedited model's top-1 on it,
        computed once per folder (other sets are small or already in memory: computed per call)."""
        from .evaluate import TokenCache

        key = (str(images.folder.resolve()), images.labels is not None) if images.folder is not None else None
        if key is not None and key in self._caches:
            return self._caches[key]
        dev = self.device
        tokens = TokenCache(self.model, self.start, lambda: (x.to(dev) for x in images.batches()), BATCH)
        entry = (tokens, tokens.predict())
        if key is not None:
            self._caches[key] = entry
        return entry

    def preserve_set(self, images: "_Set", notes: list[str]) -> "PreserveSet":
        """The preserve images as the KL preservation term needs them (their tokens stay in memory:
        a set over the token budget is cut to a seeded subset that fits, with a note)."""
        import torch

        from .evaluate import cache_budget_bytes
        from .models import forward_prefix
        from .preserve import build_preserve_set

        self.progress("caching preserve set", 0, images.size)
        chunks = []
        with torch.inference_mode():
            for x in images.batches():
                chunks.append(forward_prefix(self.model, x.to(self.device), self.start))  # (B, T, D)
                self.progress("caching preserve set", sum(len(c) for c in chunks), images.size)
        tokens = torch.cat(chunks)
        fit = max(1, cache_budget_bytes() // max(tokens[0].numel() * tokens.element_size(), 1))
        if len(tokens) > fit:
            keep = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))[:fit].sort().values
            tokens = tokens[keep.to(tokens.device)]
            notes.append(f"the preserve set's tokens exceed the cache budget, so a seeded {fit} of its {images.size} "
                         "images are used (raise VITEDIT_CACHE_BUDGET_MB to use more)")
        return build_preserve_set(self.model, self.sites, tokens=tokens)

    def preserve_stats(self, images: "_Set") -> "PreserveStats":
        """The preserve statistics of this model (``stats.compute_stats``), in one streaming pass."""
        from .stats import compute_stats

        dev = self.device
        return compute_stats(self.model, self.sites, (x.to(dev) for x in images.batches()),
                             model_identity=dict(self.identity), preserve_sha256=images.fingerprint(),
                             progress=lambda done: self.progress("preserve statistics", done, images.size))


def _adopt(model: Any, *, device: Any = None, labels: Sequence[str] | None = None, data_config: Mapping | None = None,
           blocks: Sequence[int] | None = None, skip_bad: bool = False, progress: Progress = _noop) -> _Base:
    """A frozen copy of ``model`` on ``device``, described as a ``LoadedModel``, and its sites."""
    from torch import nn

    if isinstance(model, LoadedModel):
        source = model.model
    elif isinstance(model, nn.Module):
        source = model
    else:
        raise UsageError(f"vitedit edits a timm Vision Transformer (a torch.nn.Module) or a vitedit.load_model() "
                         f"result, not a {type(model).__name__}")
    target = _device(device, source)
    clone = copy.deepcopy(source).cpu()  # checked on CPU (``models._check_split`` feeds CPU tensors)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    clone.zero_grad(set_to_none=True)
    if isinstance(model, LoadedModel):
        config = {**model.data_config, **dict(data_config or {})}
        loaded = LoadedModel(clone, model.name, list(labels) if labels else list(model.labels), config,
                             model.source, model.weights_file, dict(model.edit_defaults), model.note)
    else:
        loaded = _describe(clone, labels, data_config)
    loaded.to(target)
    if blocks is not None:
        blocks = sorted({int(b) for b in blocks})
        if not blocks or not all(0 <= b < loaded.depth for b in blocks):
            raise UsageError(f"blocks={blocks}: the model has blocks 0..{loaded.depth - 1}; pick indices in that range")
    return _Base(loaded, tuple(loaded.sites(blocks)), skip_bad, progress)


def _describe(model: "nn.Module", labels: Sequence[str] | None, overrides: Mapping | None) -> LoadedModel:
    """What vitedit needs to know about a plain timm module: name, class names, the input size it
    was built for (not its pretrained config's, which keeps the checkpoint's), preprocessing; and
    whether it is a ViT vitedit can edit (``UnsupportedModelError`` otherwise)."""
    from timm.data import resolve_model_data_config

    from .models import _check_split, _labels_for, patch_grid

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    try:
        (grid_h, grid_w), (patch_h, patch_w) = patch_grid(model)
    except AttributeError:
        raise UnsupportedModelError(f"{type(model).__name__} has no patch embedding; vitedit edits timm Vision "
                                    "Transformers (VisionTransformer and its variants)") from None
    size = (_in_channels(model, cfg), grid_h * patch_h, grid_w * patch_w)
    data_config = {**resolve_model_data_config(model, args={"input_size": size}), **dict(overrides or {})}
    for key in ("mean", "std"):
        if len(data_config[key]) != size[0]:
            raise ModelError(f"the model takes {size[0]}-channel images but its data config has "
                             f"{len(data_config[key])} {key} values; pass data_config={{'mean': ..., 'std': ...}} "
                             f"with {size[0]} of each")
    _check_split(model, size)
    default = _default_model_meta(cfg)
    name = DEFAULT_MODEL if default is not None else str(cfg.get("architecture") or type(model).__name__)
    return LoadedModel(model, name, _labels_for(model, None, list(labels) if labels else None), data_config, "module",
                       edit_defaults=dict((default or {}).get("edit_defaults", {})))


def _in_channels(model: "nn.Module", cfg: dict) -> int:
    """Input channels, read from the first convolution timm's config names (its weight is
    (out, in, kh, kw)), else from the data config."""
    first = cfg.get("first_conv")
    if isinstance(first, str):
        try:
            return int(model.get_parameter(f"{first}.weight").shape[1])
        except AttributeError:
            pass
    from timm.data import resolve_model_data_config

    return int(resolve_model_data_config(model)["input_size"][0])


def _default_model_meta(cfg: dict) -> dict | None:
    """The embedded default's model.json when ``cfg`` is its config (its weights file is ours)."""
    file = cfg.get("file")
    ours = DEFAULT_ASSETS / "model.safetensors"
    if file and ours.exists() and Path(file).resolve() == ours.resolve():
        return json.loads((DEFAULT_ASSETS / "model.json").read_text())
    return None


def _device(device: Any, source: "nn.Module") -> "torch.device":
    import torch

    if device is None:
        first = next(source.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    from .device import resolve_device

    return torch.device(resolve_device(str(device)))


def _module(model: Any) -> "nn.Module":
    from torch import nn

    if isinstance(model, LoadedModel):
        return model.model
    if not isinstance(model, nn.Module):
        raise UsageError(f"apply and revert write into a torch.nn.Module (or a LoadedModel), not a "
                         f"{type(model).__name__}")
    return model


def _pick_locator(locator: str, hypernet: Any, base: _Base) -> tuple[str, "nn.Module | None", list[str]]:
    """(locator name, hypernetwork or None, notes): ``auto`` is the hypernetwork when there is one."""
    from .jobs.common import default_hypernet_for
    from .locate import get_locator

    if hypernet is not None and locator not in ("auto", "hypernet"):
        raise UsageError(f"hypernet= is used by locator 'hypernet' (or 'auto'), not {locator!r}; drop one of them")
    path = default_hypernet_for(base.loaded)
    if hypernet is not None:
        from .hub import resolve

        path = Path(resolve(str(hypernet)))
    if locator in ("auto", "hypernet") and path is not None:
        from .hypernet import load_hypernet

        net, _ = load_hypernet(path, base.identity, base.sites)
        return "hypernet", net.to(base.device), []
    if locator == "hypernet":
        raise UsageError(f"locator='hypernet' needs hypernet=PATH: no hypernetwork ships with {base.loaded.name}; "
                         "train one with `vitedit meta-train` or use locator='gradient'")
    if locator == "auto":
        return "gradient", None, [f"no hypernetwork is available for {base.loaded.name}, so the gradient locator "
                                  "is used; pass hypernet=PATH to use one"]
    get_locator(locator)
    return locator, None, []


def _config_from(data: dict | None) -> "EditConfig | None":
    """The ``EditConfig`` a patch file records, or None when it records none this version can read."""
    from .edit import EditConfig

    if not isinstance(data, dict):
        return None
    try:
        return EditConfig(**data)
    except (TypeError, UsageError):
        return None


# ----------------------------------------------------------------------------- image sets


@dataclass(eq=False)
class _Set:
    """An image set as the API reads it: preprocessed batches on demand, and where they came from."""

    batches: Callable[[], Iterator["torch.Tensor"]]  # () -> fresh (B, C, H, W) batches
    labels: "torch.Tensor | None"                     # (N,) true classes, or None (unlabeled)
    size: int
    folder: Path | None = None
    refs: list | None = None                          # data.ImageRef per image, for folders
    images: "torch.Tensor | None" = None              # (N, C, H, W) when held in memory

    def materialize(self) -> "_Set":
        import torch

        if self.images is not None:
            return self
        images = torch.cat(list(self.batches()))
        return _tensor_set(images, self.labels, self.folder, self.refs)

    def subset(self, rows: Sequence[int]) -> "_Set":
        import torch

        whole = self.materialize()
        index = torch.as_tensor(list(rows), dtype=torch.long)
        refs = [whole.refs[i] for i in rows] if whole.refs is not None else None
        return _tensor_set(whole.images[index], None if whole.labels is None else whole.labels[index], None, refs)

    def fingerprint(self) -> str:
        """sha256 of the set: over its files' hashes for a folder (``stats.fingerprint``), else over
        the tensor bytes."""
        import torch

        if self.refs is not None and self.folder is not None:
            from .stats import fingerprint

            return fingerprint(r.path for r in self.refs)
        h = hashlib.sha256()
        for x in self.batches():
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        from .artifacts import portable_path

        return portable_path(self.folder) if self.folder is not None else f"{self.size} images given as tensors"


def _tensor_set(images: "torch.Tensor", labels: "torch.Tensor | None", folder: Path | None = None,
                refs: list | None = None) -> _Set:
    return _Set(lambda: iter(images.split(BATCH)), labels, len(images), folder, refs, images)


def _read_set(loaded: LoadedModel, source: Any, what: str, labeled: bool, skip_bad: bool) -> _Set:
    """A folder (streamed in batches), tensors, or a DataLoader (read once, into memory), checked
    against the model's input size and classes."""
    import torch

    from .data import ImageBatches, scan_labeled, scan_unlabeled

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        refs = scan_labeled(folder, loaded.labels) if labeled else scan_unlabeled(folder)
        batches = ImageBatches(refs, loaded.transform, loaded.channels, BATCH, skip_bad=skip_bad)
        labels = torch.tensor([r.label for r in batches.refs], dtype=torch.long) if labeled else None
        return _Set(lambda: (x for x, _ in batches), labels, len(batches.refs), folder, batches.refs)
    images, labels = _tensors(source, what, labeled)
    _check_images(images, loaded, what)
    if labeled:
        _check_labels(labels, len(images), len(loaded.labels), what)
    return _tensor_set(images, labels)


def _tensors(source: Any, what: str, labeled: bool) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """(images, labels) from a tensor, an ``(images, labels)`` pair or an iterable of batches."""
    import torch

    def pair(item: Any) -> tuple[Any, Any]:
        if isinstance(item, torch.Tensor):
            return item, None
        if isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], torch.Tensor):
            return item[0], item[1]
        raise InputDataError(f"{what}: expected a folder, (images, labels) tensors or a DataLoader of "
                             f"(images, labels) batches, got {type(item).__name__}")

    if isinstance(source, (torch.Tensor, tuple, list)):
        images, labels = pair(source)
    elif hasattr(source, "__iter__"):
        parts = [pair(batch) for batch in source]
        if not parts:
            raise InputDataError(f"{what}: the DataLoader yielded no batches; give it some images")
        images = torch.cat([p[0] for p in parts])
        labels = None if any(p[1] is None for p in parts) else torch.cat([torch.as_tensor(p[1]) for p in parts])
    else:
        raise UsageError(f"{what}: give a folder, (images, labels) tensors or a DataLoader, not a "
                         f"{type(source).__name__}")
    if labeled and labels is None:
        raise InputDataError(f"{what}: the images need their true labels; give (images, labels)")
    return images.detach().cpu(), None if labels is None else torch.as_tensor(labels).cpu()


def _check_images(images: "torch.Tensor", loaded: LoadedModel, what: str) -> None:
    want = tuple(int(v) for v in loaded.data_config["input_size"])
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise InputDataError(f"{what}: images of shape {tuple(images.shape)}, but the model takes (N, {want[0]}, "
                             f"{want[1]}, {want[2]}); preprocess them with editor.transform")
    if not images.is_floating_point():
        raise InputDataError(f"{what}: images are {images.dtype}; give the model's preprocessed float tensors "
                             "(editor.transform)")
    if len(images) == 0:
        raise InputDataError(f"{what}: no images given")


def _check_labels(labels: "torch.Tensor", n: int, classes: int, what: str) -> None:
    if labels.ndim != 1 or len(labels) != n or labels.is_floating_point() or labels.is_complex():
        raise InputDataError(f"{what}: labels must be {n} integer class indices (one per image), got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise InputDataError(f"{what}: label {int(bad[0])} is not a class of the model (0..{classes - 1})")
