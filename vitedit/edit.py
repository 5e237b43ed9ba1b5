"""Editing only the selected units, and the sparse, revertible patch that records the edit.

Paper Sec. 3.1 / method.md "How to edit": fine-tune the selected rows of fc1 and columns of fc2 with
cross-entropy toward the true labels, RMSprop, at most ``max_steps`` steps, stopping as soon as every
edit image is classified correctly and the loss is at most ``loss_threshold``. Every edit starts
from the unedited model.

How it is fast and exact:
- the blocks before the first edited block never change, so their output is computed once
  (``models.forward_prefix``) and each step runs only the suffix;
- the free parameters are the selected slices themselves, (k, D) per fc1 site and (D, k) per fc2
  site; each step builds ``W = W_base.index_copy(dim, idx, slice)`` and runs the suffix with
  ``torch.func.functional_call``. Weights outside the mask are never written, so they stay
  bit-identical by construction, and the model passed in is never modified.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .artifacts import check_model_match, load_tensors, save_tensors
from .errors import ArtifactError, UsageError
from .masks import UnitMask
from .models import Site, forward_prefix, make_suffix

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .preserve import AnchorSet, PreserveSet
    from .stats import PreserveStats


OBJECTIVES = ("plain", "local", "stats")
# kl: KL(base || edited) on the preserve minibatch; margin: a hinge that only keeps each preserve
# image's base top-1 ahead by its base log-probability margin (capped at MARGIN_CAP nats), so the
# edit may change confidences freely as long as no prediction moves toward a flip.
PRESERVE_LOSSES = ("kl", "margin")
MARGIN_CAP = 2.0


@dataclass(frozen=True)
class EditConfig:
    """How an edit is fitted. Defaults are the paper's editor (``plain``): for ViT-B/16 lr 2e-5,
    at most 100 steps, stop when every edit image is right and the loss is <= 0.01.

    The terms that keep the rest of the model in place (all off by default; ``objective_config``
    gives the ``local`` preset):

    - ``preserve_weight``: add ``preserve_weight * KL(base || edited)`` on a minibatch of
      ``preserve_batch`` preserve images per step;
    - ``nullspace_threshold``: after every step, project each site's update onto the preserve
      inputs' near null space (eigenvalues below this share of the largest; ``None`` = off);
    - ``stop_margin``: stop when every edit image's true-class probability exceeds every other
      class's by this margin, instead of driving the loss to ``loss_threshold`` (``None`` = the
      paper's rule);
    - ``preserve_nearest``: draw half of each preservation minibatch from the preserve images
      nearest the edit images in feature space (this many of them), where flips happen;
    - ``augment``: also fit this many randomly shifted / mirrored views of each edit image per
      step (for generalization; the stopping rule still looks at the images themselves).
    - ``anchor_weight``: when editing on top of earlier edits, add ``anchor_weight *
      KL(current || edited)`` on *all* the earlier edits' edit images every step (the anchor set,
      ``preserve.AnchorSet``), so a new edit keeps what the earlier ones fixed. Ignored without
      anchors (a first edit).
    - ``anchor_views``: also hold this many shifted / mirrored views of each anchor image, drawn
      once (seeded) when the anchor set is built (``preserve.build_anchor_set``), so a new edit
      keeps the earlier edits' predictions around their images, not only on them.
    - ``stats_weight``: add ``stats_weight * sum over sites of tr(dW C dW^T) / tr(W C W^T)``, with
      ``C`` the second moment of the site's inputs over the preserve set (``stats.PreserveStats``,
      computed once): the mean squared change of each edited layer's output on preserve tokens,
      relative to its mean squared output. A step costs what the paper's editor's step costs. On top
      of a stack, the earlier edits' images' moments (``anchor_moments``) join ``C`` with weight
      ``anchor_weight`` instead of the KL anchor term.
    - ``preserve_fragile``: draw the preservation minibatch only from this many preserve images,
      those with the smallest margin between the base model's top two classes: the images an edit
      can flip. Chosen once per preserve set. ``fragile_share`` of each minibatch comes from them,
      the rest from the whole set (an edit can also flip a confident image of another class).
    - ``anchor_batch``: hold this many anchor images per step (a seeded permutation, reshuffled
      when used up) instead of all of them, so an edit on top of many costs what the first did.
    - ``plateau``: instead of the paper's loss rule, stop (every edit image right) once the fitted
      loss's mean over the last ``plateau`` steps is above 95% of its mean over the ``plateau`` steps
      before (0 = off). The loss rule could end an edit after its first step, before a preservation
      term has any gradient.
    """

    lr: float = 2e-5
    max_steps: int = 100
    loss_threshold: float = 0.01
    objective: str = "plain"
    preserve_weight: float = 0.0
    preserve_batch: int = 32
    nullspace_threshold: float | None = None
    stop_margin: float | None = None
    augment: int = 0
    preserve_nearest: int = 0
    preserve_loss: str = "kl"
    anchor_weight: float = 0.0
    anchor_views: int = 0
    anchor_batch: int = 0
    stats_weight: float = 0.0
    preserve_fragile: int = 0
    fragile_share: float = 1.0
    plateau: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: the edit learning rate must be positive, e.g. --lr 2e-5")
        if self.max_steps < 1:
            raise UsageError(f"--max-steps {self.max_steps}: give at least 1 optimizer step")
        if self.loss_threshold < 0:
            raise UsageError(f"loss threshold {self.loss_threshold} must be >= 0")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: choose {' or '.join(OBJECTIVES)}")
        if not self.preserve_weight >= 0:
            raise UsageError(f"--preserve-weight {self.preserve_weight} must be >= 0 (0 = no preservation term)")
        if self.preserve_batch < 1:
            raise UsageError(f"--preserve-batch {self.preserve_batch}: give at least 1 image per step")
        if self.nullspace_threshold is not None and not 0 < self.nullspace_threshold <= 1:
            raise UsageError(f"--nullspace {self.nullspace_threshold}: give a relative eigenvalue threshold in (0, 1], "
                             "e.g. 0.01, or leave it out")
        if self.preserve_loss not in PRESERVE_LOSSES:
            raise UsageError(f"--preserve-loss {self.preserve_loss!r}: choose {' or '.join(PRESERVE_LOSSES)}")
        if not self.anchor_weight >= 0:
            raise UsageError(f"--anchor-weight {self.anchor_weight} must be >= 0 (0 = earlier edits are not held)")
        if not self.stats_weight >= 0:
            raise UsageError(f"--stats-weight {self.stats_weight} must be >= 0 (0 = no statistics penalty)")
        if self.anchor_batch < 0:
            raise UsageError(f"anchor_batch {self.anchor_batch} must be >= 0 (0 = every anchor image every step)")
        if self.anchor_views < 0:
            raise UsageError(f"--anchor-views {self.anchor_views}: give the number of views per anchor image (0 = none)")
        if not 0 <= self.fragile_share <= 1:
            raise UsageError(f"fragile_share {self.fragile_share} must be in [0, 1]")
        if self.plateau < 0:
            raise UsageError(f"plateau {self.plateau} must be >= 0 (0 = no plateau rule)")
        if self.preserve_fragile < 0:
            raise UsageError(f"--preserve-fragile {self.preserve_fragile} must be >= 0 (0 = draw from the whole set)")
        if self.preserve_nearest < 0:
            raise UsageError(f"--preserve-nearest {self.preserve_nearest} must be >= 0 (0 = draw from the whole set)")
        if self.augment < 0:
            raise UsageError(f"--augment {self.augment}: give the number of augmented views per edit image (0 = none)")
        if self.stop_margin is not None and not 0 <= self.stop_margin < 1:
            raise UsageError(f"--stop-margin {self.stop_margin}: give a probability margin in [0, 1), e.g. 0.2")

    @property
    def uses_preserve(self) -> bool:
        """Needs the preserve images themselves (a minibatch every step, or their projector)."""
        return self.preserve_weight > 0 or self.nullspace_threshold is not None

    @property
    def uses_stats(self) -> bool:
        """Needs only the preserve set's statistics (``stats.PreserveStats``)."""
        return self.stats_weight > 0

    def without_preserve(self) -> "EditConfig":
        """The same edit with the terms that need a preserve set switched off."""
        return replace(self, preserve_weight=0.0, nullspace_threshold=None, stats_weight=0.0)

    def to_json(self) -> dict:
        return asdict(self)


# The presets behind ``--objective``. ``plain`` is the paper's editor; ``local`` adds the terms that
# keep the rest of the model in place, with the defaults chosen on the benchmark (docs/benchmark.md).
DEFAULT_OBJECTIVE = "local"  # the preset apply, report, demo and the Python API use unless told otherwise
OBJECTIVE_PRESETS: dict[str, dict] = {
    "plain": {},
    # KL on 8 preserve images a step, half of them from the 200 most fragile, one augmented view of each edit image,
    # stop when the fitted loss plateaus (window 20, at most 300 steps); on a stack, 4 of the earlier
    # edits' images a step (benchmarks/local_edit_attempts.py, docs/benchmark.md)
    "local": {"preserve_weight": 3.0, "preserve_batch": 8, "preserve_fragile": 200, "fragile_share": 0.5, "augment": 1,
              "max_steps": 300, "plateau": 20, "anchor_weight": 3.0, "anchor_batch": 4},
}


def objective_config(objective: str, **overrides) -> EditConfig:
    """An ``EditConfig`` from a preset name, then ``overrides`` (None values are ignored; ``"off"``
    switches an optional term off)."""
    if objective not in OBJECTIVE_PRESETS:
        raise UsageError(f"--objective {objective!r}: choose {' or '.join(OBJECTIVES)}")
    values = {**OBJECTIVE_PRESETS[objective], "objective": objective,
              **{k: v for k, v in overrides.items() if v is not None}}
    return EditConfig(**{k: None if v == "off" else v for k, v in values.items()})  # "off": a term switched off


@dataclass(frozen=True)
class Patch:
    """A sparse edit: per site, the unit indices and the old and new slices of the weight.

    ``apply`` writes the new slices into a model with the base weights; ``revert`` writes the old
    ones back, restoring the base model bit for bit. Both check they are applied to the right state.
    """

    sites: tuple[Site, ...]
    indices: dict[str, "torch.Tensor"]
    new: dict[str, "torch.Tensor"]
    old: dict[str, "torch.Tensor"]

    @property
    def params_edited(self) -> int:
        return sum(int(t.numel()) for t in self.new.values())

    @property
    def units_edited(self) -> int:
        return sum(int(t.numel()) for t in self.indices.values())

    def weights(self, model: "nn.Module") -> dict[str, "torch.Tensor"]:
        """Full edited weight tensors keyed by parameter name (the model itself is not changed)."""
        out = {}
        for s in self.sites:
            base = model.get_parameter(s.param)
            idx = self.indices[s.param].to(base.device)
            out[s.param] = base.detach().index_copy(s.dim, idx, self.new[s.param].to(base.device, base.dtype))
        return out

    def _write(self, model: "nn.Module", expect: dict, values: dict, action: str) -> None:
        import torch

        for s in self.sites:
            w = model.get_parameter(s.param)
            idx = self.indices[s.param].to(w.device)
            current = w.detach().index_select(s.dim, idx)
            if not torch.equal(current, expect[s.param].to(w.device, w.dtype)):
                raise ArtifactError(f"cannot {action} the patch: {s.param} does not hold the values the patch expects "
                                    f"(the model is not in the state the patch was made {'from' if action == 'apply' else 'into'})")
        with torch.no_grad():
            for s in self.sites:
                w = model.get_parameter(s.param)
                w.index_copy_(s.dim, self.indices[s.param].to(w.device), values[s.param].to(w.device, w.dtype))

    def apply(self, model: "nn.Module") -> None:
        """Base -> edited, in place."""
        self._write(model, self.old, self.new, "apply")

    def revert(self, model: "nn.Module") -> None:
        """Edited -> base, in place, bit for bit."""
        self._write(model, self.new, self.old, "revert")

    def save(self, path: Path, model_identity: dict, extra: dict | None = None) -> None:
        tensors = {}
        for s in self.sites:
            tensors[f"{s.param}.indices"] = self.indices[s.param]
            tensors[f"{s.param}.new"] = self.new[s.param]
            tensors[f"{s.param}.old"] = self.old[s.param]
        meta = {"kind": "patch", "model": model_identity, "sites": [s.to_json() for s in self.sites],
                "units_edited": self.units_edited, "params_edited": self.params_edited, **(extra or {})}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: Path, model_identity: dict | None = None) -> tuple["Patch", dict]:
        tensors, meta = load_tensors(path, "patch")
        if meta.get("kind") != "patch":
            raise ArtifactError(f"{path} is not a vitedit patch; rerun `vitedit apply`")
        if model_identity is not None:
            check_model_match(meta, model_identity, "patch", path)
        sites = tuple(Site.from_json(d) for d in meta["sites"])
        try:
            parts = [{s.param: tensors[f"{s.param}.{k}"] for s in sites} for k in ("indices", "new", "old")]
        except KeyError as e:
            raise ArtifactError(f"patch {path} lacks tensor {e}; it is truncated or not a vitedit patch") from None
        return cls(sites, *parts), meta


@dataclass
class EditResult:
    patch: Patch
    steps: int
    final_loss: float
    edit_accuracy: float  # share of the edit images classified correctly after the edit
    converged: bool       # stopped by the success criterion rather than by max_steps
    losses: list[float] = field(default_factory=list)


def first_block(mask_or_sites) -> int:
    sites = mask_or_sites.sites if hasattr(mask_or_sites, "sites") else mask_or_sites
    return min(s.block for s in sites)


def _quadratic(dw: "torch.Tensor", left: "torch.Tensor | None", right: "torch.Tensor") -> "torch.Tensor":
    """``tr(L dW R dW^T)`` (``L`` None: the identity)."""
    return (((dw if left is None else left @ dw) @ right) * dw).sum()


def edit(model: "nn.Module", mask: UnitMask, images: "torch.Tensor | None", labels: "torch.Tensor",
         config: EditConfig = EditConfig(), *, tokens: "torch.Tensor | None" = None,
         penalty: tuple[str, float] | None = None, preserve: "PreserveSet | None" = None, seed: int = 0,
         anchors: "AnchorSet | None" = None, stats: "PreserveStats | None" = None,
         anchor_moments: dict | None = None,
         progress: Callable[[int, int, float], None] | None = None) -> EditResult:
    """Fit the selected units of a frozen ``model`` to ``labels``; return the patch.

    ``images`` (B, C, H, W) or precomputed prefix ``tokens`` (B, N, D) at the first edited block.
    ``penalty=("l1" | "l2", strength)`` adds ``strength * sum |w - w0|`` (or squared) over the free
    weights to the loss: the paper's regularized fine-tuning baselines (used with a full mask).
    ``preserve`` is needed by the config's preservation term and null-space projection
    (``config.uses_preserve``); its minibatches are drawn with ``seed``. The stopping rule looks at
    the edit images alone. ``anchors`` (earlier edits' images, with the current model's
    predictions) are held by ``config.anchor_weight``. ``stats`` (the preserve set's input moments)
    is needed by ``config.stats_weight``; with it, ``anchor_moments`` (param -> the earlier edits'
    images' input moments, ``preserve.input_second_moments``) take the anchors' place, weighted by
    ``config.anchor_weight``. ``progress(step, max_steps, loss)`` is called after every step.

    Every objective changes only the free slices, so weights outside the mask stay bit-identical;
    with ``preserve_weight=0`` and no projection the steps are exactly the paper's editor's.
    """
    import torch

    _check_edit_inputs(config, images, preserve, stats)
    start = first_block(mask)
    suffix = make_suffix(model, start)
    if tokens is None:
        with torch.no_grad():
            tokens = forward_prefix(model, images, start)
    labels = labels.to(tokens.device)
    slices = _Slices.of(model, mask, tokens.device)
    opt = torch.optim.RMSprop(list(slices.free.values()), lr=config.lr)
    keep = _keep_terms(config, slices, start, suffix, tokens, preserve, stats, anchors, anchor_moments, seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)

    losses: list[float] = []
    fits: list[float] = []  # the fitted loss (edit images and their views) per step, for the plateau rule
    steps, converged = 0, False
    while True:
        step = _forward(model, suffix, start, slices, tokens, images, labels, config, keep, aug_gen)
        losses.append(float(step.loss.detach()))
        fits.append(float(step.fit_loss.detach()))
        if bool(step.correct.all()) and _stopping_rule(step.logits.detach(), labels, losses, fits, config):
            converged = True
            break
        if steps == config.max_steps:
            break
        opt.zero_grad(set_to_none=True)
        _objective(step, slices, config, penalty, keep).backward()
        opt.step()
        slices.project(keep.projectors)
        steps += 1
        if progress is not None:
            progress(steps, config.max_steps, losses[-1])
    return EditResult(slices.patch(), steps, losses[-1], float(step.correct.float().mean()), converged, losses)


def _check_edit_inputs(config: EditConfig, images, preserve, stats) -> None:
    """Refuse an edit whose objective lacks what it reads (the images, the preserve set, its statistics)."""
    if config.augment and images is None:
        raise UsageError("augmented edits need the edit images, not only their tokens")
    if config.uses_preserve and preserve is None:
        raise UsageError("this edit objective needs a preserve set (--preserve DIR: ordinary images the edit must "
                         "leave alone), or use --objective plain")
    if config.uses_stats and stats is None:
        raise UsageError("this edit objective needs the preserve set's statistics (--preserve DIR: ordinary images "
                         "the edit must leave alone), or use --objective plain")


@dataclass
class _Slices:
    """The fitted slices of one edit: per site with a selected unit, the base weight, the unit indices,
    the old slice and the free (trained) slice: (k, D) for fc1, (D, k) for fc2."""

    sites: list[Site]
    base: dict
    idx: dict
    old: dict
    free: dict

    @classmethod
    def of(cls, model: "nn.Module", mask: UnitMask, device) -> "_Slices":
        sites = [s for s in mask.sites if mask.indices[s.param].numel() > 0]
        base = {s.param: model.get_parameter(s.param).detach() for s in sites}
        idx = {s.param: mask.indices[s.param].to(device) for s in sites}
        old = {s.param: base[s.param].index_select(s.dim, idx[s.param]).clone() for s in sites}
        free = {p: t.clone().requires_grad_(True) for p, t in old.items()}
        return cls(sites, base, idx, old, free)

    def weights(self) -> dict:
        """The full matrices with the free slices written in (differentiable in the slices)."""
        return {s.param: self.base[s.param].index_copy(s.dim, self.idx[s.param], self.free[s.param]) for s in self.sites}

    def project(self, projectors: dict) -> None:
        """Project each slice's update onto its projector: ``free = old + (free - old) @ P``."""
        import torch

        if projectors:
            with torch.no_grad():
                for p, proj in projectors.items():
                    self.free[p].copy_(self.old[p] + (self.free[p] - self.old[p]) @ proj)

    def patch(self) -> Patch:
        return Patch(tuple(self.sites), {p: i.cpu() for p, i in self.idx.items()},
                     {p: t.detach().cpu().clone() for p, t in self.free.items()},
                     {p: t.cpu() for p, t in self.old.items()})


def _draw(order: list[int], candidates: int, n: int, gen: "torch.Generator") -> list[int]:
    """``n`` rows (at most ``candidates``) from a seeded permutation of ``range(candidates)`` kept in
    ``order``, reshuffled when used up."""
    import torch

    rows: list[int] = []
    while len(rows) < min(n, candidates):
        if not order:
            order.extend(torch.randperm(candidates, generator=gen).tolist())
        rows.append(order.pop())
    return rows


@dataclass
class _PreserveDraw:
    """The preservation term's pool (preserve tokens and base log-probabilities) and its seeded
    minibatches: from the whole set, or partly from the nearest or the most fragile images."""

    pool: "torch.Tensor"
    target: "torch.Tensor"
    gen: "torch.Generator"
    near: list[int]
    fragile: list[int]
    batch: int
    fragile_share: float
    orders: dict = field(default_factory=lambda: {"all": [], "near": [], "fragile": []})

    def rows(self, device) -> "torch.Tensor":
        """This step's preserve minibatch: ``batch`` rows (a share fragile, or half nearest, if asked)."""
        import torch

        if self.fragile:  # a share from the fragile images, the rest from the whole set
            n_frag = round(self.batch * self.fragile_share)
            rows = [self.fragile[i] for i in _draw(self.orders["fragile"], len(self.fragile), n_frag, self.gen)]
            rows += _draw(self.orders["all"], len(self.pool), self.batch - n_frag, self.gen)
            return torch.tensor(rows, device=device)
        n_near = self.batch // 2 if self.near else 0
        rows = ([self.near[i] for i in _draw(self.orders["near"], len(self.near), n_near, self.gen)]
                + _draw(self.orders["all"], len(self.pool), self.batch - n_near, self.gen))
        return torch.tensor(rows, device=device)


@dataclass
class _AnchorDraw:
    """The anchor term's tokens and current-model log-probabilities, and its seeded minibatches."""

    tokens: "torch.Tensor"
    target: "torch.Tensor"
    gen: "torch.Generator"
    batch: int
    order: list[int] = field(default_factory=list)

    def rows(self, device) -> "torch.Tensor | slice":
        """This step's anchor rows: all of them, or ``batch`` from a seeded permutation."""
        import torch

        if not self.batch or self.batch >= len(self.tokens):
            return slice(None)
        return torch.tensor(_draw(self.order, len(self.tokens), self.batch, self.gen), device=device)


@dataclass
class _Keep:
    """The terms that keep the rest of the model in place, as one edit uses them (each off when
    empty or None): null-space projectors, the preservation minibatches, the statistics' quadratic
    forms and the anchor minibatches."""

    projectors: dict
    preserve: _PreserveDraw | None
    quad: dict
    anchors: _AnchorDraw | None


def _keep_terms(config: EditConfig, slices: _Slices, start: int, suffix, tokens: "torch.Tensor", preserve, stats,
                anchors, anchor_moments, seed: int) -> _Keep:
    """The config's keeping terms, checked against the edit's first block and moved to its device."""
    import torch

    device = tokens.device
    if config.uses_preserve and preserve.start != start:
        raise UsageError(f"the preserve set was cached at block {preserve.start}, the edit starts at block {start}; "
                         "build it for the same edited blocks")
    projectors = {}  # right-multiplied onto each slice's update: fc1 (k, D) @ (D, D), fc2 (D_out, k) @ (k, k)
    if config.nullspace_threshold is not None:
        projectors = {s.param: preserve.projector(s, slices.idx[s.param], config.nullspace_threshold).to(device)
                      for s in slices.sites}
    quad = {}
    if config.uses_stats:  # (dW @ Q * dW).sum() per site: the preserve tokens' relative output change
        quad = stats.quadratic_forms(slices.sites, slices.idx, anchor_moments, config.anchor_weight, device=device)
    held = None
    if config.anchor_weight > 0 and anchors is not None and len(anchors) > 0 and not quad:
        if anchors.start != start:
            raise UsageError(f"the anchor set was cached at block {anchors.start}, the edit starts at block {start}; "
                             "build it for the same edited blocks")
        held = _AnchorDraw(anchors.tokens.to(device), anchors.log_probs.to(device),
                           torch.Generator().manual_seed(seed + 2), config.anchor_batch)
    kept = _preserve_draw(config, preserve, suffix, tokens, seed) if config.preserve_weight > 0 else None
    return _Keep(projectors, kept, quad, held)


def _preserve_draw(config: EditConfig, preserve: "PreserveSet", suffix, tokens: "torch.Tensor",
                   seed: int) -> _PreserveDraw:
    import torch

    target = preserve.base_log_probs.to(tokens.device)
    near: list[int] = []
    if config.preserve_nearest:
        with torch.no_grad():
            near = preserve.nearest(suffix(tokens, pre_logits=True), config.preserve_nearest).tolist()
    fragile: list[int] = []
    if config.preserve_fragile:  # the preserve images closest to a flip under the base model
        top2 = target.topk(2, -1).values
        fragile = (top2[:, 0] - top2[:, 1]).topk(min(config.preserve_fragile, len(target)),
                                                 largest=False).indices.sort().values.tolist()
    return _PreserveDraw(preserve.tokens.to(tokens.device), target, torch.Generator().manual_seed(seed), near, fragile,
                         config.preserve_batch, config.fragile_share)


@dataclass
class _Step:
    """One forward pass of an edit: ``out`` (B + A*B + P + M, classes) over the edit images, their
    views, this step's preserve rows and anchor rows; ``loss`` on the edit images, ``fit_loss`` on
    them and their views."""

    out: "torch.Tensor"
    logits: "torch.Tensor"
    correct: "torch.Tensor"
    loss: "torch.Tensor"
    fit_loss: "torch.Tensor"
    n_fit: int
    n_kept: int
    rows: "torch.Tensor | None"
    a_rows: "torch.Tensor | slice | None"


def _forward(model, suffix, start: int, slices: _Slices, tokens: "torch.Tensor", images, labels: "torch.Tensor",
             config: EditConfig, keep: _Keep, aug_gen: "torch.Generator") -> _Step:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    weights = slices.weights()
    parts = [tokens]
    if config.augment:  # fresh views each step: (A*B, C, H, W) -> prefix tokens, frozen
        with torch.no_grad():
            views = augment_views(images.to(tokens.device), config.augment, aug_gen)
            parts.append(forward_prefix(model, views, start))
    n_fit = sum(len(p) for p in parts)
    rows = a_rows = None
    if keep.preserve is not None:
        rows = keep.preserve.rows(tokens.device)
        parts.append(keep.preserve.pool[rows])
    n_kept = sum(len(p) for p in parts)
    if keep.anchors is not None:
        a_rows = keep.anchors.rows(tokens.device)
        parts.append(keep.anchors.tokens[a_rows])
    out = functional_call(suffix, weights, (torch.cat(parts) if len(parts) > 1 else tokens,))  # (B + A*B + P, classes)
    logits = out[:len(tokens)]
    loss = F.cross_entropy(logits, labels)
    fit_loss = F.cross_entropy(out[:n_fit], labels.repeat(1 + config.augment)) if config.augment else loss
    return _Step(out, logits, logits.argmax(-1) == labels, loss, fit_loss, n_fit, n_kept, rows, a_rows)


def _stopping_rule(logits: "torch.Tensor", labels: "torch.Tensor", losses: list[float], fits: list[float],
                   config: EditConfig) -> bool:
    """Whether the edit may stop, given every edit image is right. With a plateau window the plateau
    alone ends the edit: the paper's loss rule could stop it after one step, before a preservation
    term (zero gradient at the base weights) has acted at all."""
    if config.plateau and config.stop_margin is None:
        return _plateaued(fits, config.plateau)
    return _stop(logits, labels, losses[-1], config)


def _objective(step: _Step, slices: _Slices, config: EditConfig, penalty: tuple[str, float] | None,
               keep: _Keep) -> "torch.Tensor":
    """The loss a step descends: the fitted loss, then the penalty and the keeping terms, in that order."""
    import torch
    import torch.nn.functional as F

    loss = step.fit_loss
    if penalty is not None:
        kind, strength = penalty
        delta = [slices.free[p] - slices.old[p] for p in slices.free]
        reg = sum((d.abs().sum() if kind == "l1" else d.pow(2).sum()) for d in delta)
        loss = loss + strength * reg
    if keep.preserve is not None:  # the preservation term on this step's preserve minibatch
        logp = torch.log_softmax(step.out[step.n_fit:step.n_kept], -1)
        if config.preserve_loss == "kl":  # KL(base || edited)
            term = F.kl_div(logp, keep.preserve.target[step.rows], log_target=True, reduction="batchmean")
        else:
            term = _margin_hinge(logp, keep.preserve.target[step.rows])
        loss = loss + config.preserve_weight * term
    if keep.quad:
        loss = loss + config.stats_weight * sum(_quadratic(slices.free[p] - slices.old[p], left, right)
                                                for p, (left, right) in keep.quad.items())
    if keep.anchors is not None:  # every earlier edit's images keep the current model's predictions
        logp = torch.log_softmax(step.out[step.n_kept:], -1)
        loss = loss + config.anchor_weight * F.kl_div(logp, keep.anchors.target[step.a_rows], log_target=True,
                                                      reduction="batchmean")
    return loss


def augment_views(images: "torch.Tensor", views: int, gen: "torch.Generator") -> "torch.Tensor":
    """``views`` random label-preserving views of each image: (B, C, H, W) -> (views * B, C, H, W).

    Each view is mirrored left-right with probability 1/2 and shifted by up to 1/14 of the image
    size in each direction (edge pixels repeated), the light augmentation classifiers train with.
    """
    import torch
    import torch.nn.functional as F

    b, _, h, w = images.shape
    out = []
    for _ in range(views):
        x = images.clone()
        flip = torch.rand(b, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        ph, pw = max(1, h // 14), max(1, w // 14)
        padded = F.pad(x, (pw, pw, ph, ph), mode="replicate")
        dy = torch.randint(0, 2 * ph + 1, (b,), generator=gen).tolist()
        dx = torch.randint(0, 2 * pw + 1, (b,), generator=gen).tolist()
        out.append(torch.stack([padded[i, :, y:y + h, x0:x0 + w] for i, (y, x0) in enumerate(zip(dy, dx))]))
    return torch.cat(out)


def _margin_hinge(log_probs: "torch.Tensor", base_log_probs: "torch.Tensor") -> "torch.Tensor":
    """Mean of max(0, m0 - m): m is the edited log-probability margin of the base top-1 over the best
    other class, m0 the base margin capped at ``MARGIN_CAP``. (P, classes) x 2 -> scalar."""
    import torch

    top = base_log_probs.argmax(-1, keepdim=True)
    def margin(lp):
        return lp.gather(1, top).squeeze(1) - lp.scatter(1, top, float("-inf")).max(-1).values
    return torch.relu(margin(base_log_probs).clamp(max=MARGIN_CAP) - margin(log_probs)).mean()


def _plateaued(fits: list[float], window: int) -> bool:
    """The fitted loss has stopped falling: its mean over the last ``window`` steps is above 95% of
    its mean over the ``window`` steps before (``window`` 0: never)."""
    if not window or len(fits) < 2 * window:
        return False
    last, before = sum(fits[-window:]) / window, sum(fits[-2 * window:-window]) / window
    return last > 0.95 * before


def _stop(logits: "torch.Tensor", labels: "torch.Tensor", loss: float, config: EditConfig) -> bool:
    """The success criterion, given every edit image is classified correctly: the paper's loss
    threshold, or (``stop_margin``) a true-class probability ahead of every other class by the margin."""
    import torch

    if config.stop_margin is None:
        return loss <= config.loss_threshold
    probs = torch.softmax(logits, -1)
    true = probs.gather(1, labels[:, None]).squeeze(1)
    other = probs.scatter(1, labels[:, None], -1.0).max(-1).values
    return bool(((true - other) >= config.stop_margin).all())


def patch_weights_file(weights: Path, patch_path: Path, out: Path, revert: bool = False) -> dict:
    """Apply (or revert) a saved patch to a safetensors state dict file and write ``out`` atomically.

    The input must hash to the patch's recorded base weights (or, to revert, give them back exactly
    after reverting); otherwise nothing is written.
    """
    import torch
    from safetensors.torch import save_file

    from .artifacts import atomic_path
    from .models import read_state_dict, state_dict_sha256

    patch, meta = Patch.load(Path(patch_path))
    base_hash = meta["model"]["weights_sha256"]
    state = {k: v.clone() for k, v in read_state_dict(Path(weights)).items()}
    if not revert and state_dict_sha256(state) != base_hash:
        raise ArtifactError(f"{weights} is not the model the patch {patch_path} was made for ({meta['model']['name']}, "
                            f"weights {base_hash[:12]}); apply it to that model's weights")
    for s in patch.sites:
        if s.param not in state:
            raise ArtifactError(f"{weights} has no tensor {s.param}; it is not a {meta['model']['name']} state dict")
        idx = patch.indices[s.param]
        expect, value = (patch.new, patch.old) if revert else (patch.old, patch.new)
        w = state[s.param]
        if not torch.equal(w.index_select(s.dim, idx), expect[s.param].to(w.dtype)):
            raise ArtifactError(f"{weights}: {s.param} does not hold the values the patch expects; it is not the "
                                f"{'edited' if revert else 'base'} model of this patch")
        w.index_copy_(s.dim, idx, value[s.param].to(w.dtype))
    result_hash = state_dict_sha256(state)
    if revert and result_hash != base_hash:
        raise ArtifactError(f"reverting {weights} with {patch_path} does not give back the base weights "
                            f"({result_hash[:12]} != {base_hash[:12]}); the file holds other edits too")
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return {"input": str(weights), "patch": str(patch_path), "out": str(out), "reverted": revert,
            "units": patch.units_edited, "params": patch.params_edited, "weights_sha256": result_hash,
            "base_weights_sha256": base_hash}


def edited_copy(model: "nn.Module", patch: Patch) -> "nn.Module":
    """A deep copy of ``model`` with the patch applied (the original is untouched)."""
    import copy

    clone = copy.deepcopy(model)
    patch.apply(clone)
    return clone
