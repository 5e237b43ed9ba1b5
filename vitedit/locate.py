"""Locators: where to edit. Each scores every unit of every site *per failure image*.

All locators share one call signature, ``locator(inputs) -> {site.param: (N or 1, units) tensor}``,
and register by name in ``LOCATORS`` (duplicates raise):

- ``hypernet``: the learned hypernetwork of paper Sec. 3.2 (``vitedit.hypernet``), fed the frozen
  model's final [CLS] feature of each image;
- ``gradient``: per-unit gradient magnitude of the cross-entropy toward the true label (L2 norm of
  the unit's row of fc1 / column of fc2), per image;
- ``random``: seeded uniform scores (a control with no information; the paper's random baseline);
- ``bilevel``: the hypernetwork's own training target computed directly on each failure: the
  bi-level mask optimization of meta-training (``vitedit.metatrain.label_masks``), with the
  cross-entropy toward the true label in place of the pseudo-failure's KL. It needs labels and about
  20 backward passes per image; the benchmark uses it as an oracle for what the hypernetwork
  imitates.

Per-image scores are kept so that any split of the failures into edit and held-out images can be
aggregated later (mean over the edit images only), keeping held-out images out of the mask.
``score_batches`` feeds a locator one batch of failures at a time and joins the rows, so scoring
any number of failures holds one batch of images and activations at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

from .errors import UsageError
from .masks import UnitScores
from .models import Site, forward_prefix, make_suffix

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LocateInputs:
    model: "nn.Module"            # frozen, eval mode
    sites: tuple[Site, ...]
    images: "torch.Tensor"        # (N, C, H, W) preprocessed failure images
    labels: "torch.Tensor"        # (N,) true class indices
    seed: int = 0
    hypernet: "nn.Module | None" = None


class Locator(Protocol):
    def __call__(self, inputs: LocateInputs) -> dict[str, "torch.Tensor"]: ...


LOCATORS: dict[str, Locator] = {}
IMAGE_FREE: set[str] = set()  # registered with per_image=False
PREFIX_BATCH = 256  # images whose prefix tokens are computed together by the gradient locator


def register(name: str, per_image: bool = True) -> Callable[[Locator], Locator]:
    """Register a locator. ``per_image=False``: its scores ignore the images (one row), so
    ``score_batches`` calls it once instead of once per batch."""

    def deco(fn: Locator) -> Locator:
        if name in LOCATORS:
            raise ValueError(f"locator {name!r} is already registered")
        LOCATORS[name] = fn
        if not per_image:
            IMAGE_FREE.add(name)
        return fn

    return deco


def get_locator(name: str) -> Locator:
    if name not in LOCATORS:
        raise UsageError(f"--locator {name!r} is unknown; choose one of {', '.join(sorted(LOCATORS))}")
    return LOCATORS[name]


@register("random", per_image=False)
def random_locator(inputs: LocateInputs) -> dict[str, "torch.Tensor"]:
    import torch

    gen = torch.Generator().manual_seed(inputs.seed)
    return {s.param: torch.rand(1, s.units, generator=gen) for s in inputs.sites}


@register("gradient")
def gradient_locator(inputs: LocateInputs) -> dict[str, "torch.Tensor"]:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    start = min(s.block for s in inputs.sites)
    suffix = make_suffix(inputs.model, start)
    out: dict[str, list] = {s.param: [] for s in inputs.sites}
    for lo in range(0, len(inputs.images), PREFIX_BATCH):
        with torch.no_grad():
            tokens = forward_prefix(inputs.model, inputs.images[lo:lo + PREFIX_BATCH], start)  # (B, T, D)
        labels = inputs.labels[lo:lo + PREFIX_BATCH]
        for i in range(len(tokens)):
            weights = {s.param: inputs.model.get_parameter(s.param).detach().clone().requires_grad_(True)
                       for s in inputs.sites}
            loss = F.cross_entropy(functional_call(suffix, weights, (tokens[i:i + 1],)), labels[i:i + 1])
            grads = torch.autograd.grad(loss, list(weights.values()))
            for s, g in zip(inputs.sites, grads):
                out[s.param].append(g.norm(dim=1 - s.dim))  # fc1: norm of row; fc2: norm of column -> (units,)
    return {p: torch.stack(v).cpu() for p, v in out.items()}


# The bi-level search of the shipped meta-training recipe (docs/hypernetwork.md), on cross-entropy (T=1).
BILEVEL_STEPS = {"outer_steps": 5, "inner_steps": 3, "inner_lr": 0.5, "sparsity_weight": 0.3, "temperature": 1.0}
BILEVEL_BATCH = 8  # images optimized together (each owns a copy of the edited matrices)


@register("bilevel")
def bilevel_locator(inputs: LocateInputs) -> dict[str, "torch.Tensor"]:
    import torch

    from .metatrain import BatchedEditor, MetaTrainConfig, label_masks

    cfg = MetaTrainConfig(**BILEVEL_STEPS)
    start = min(s.block for s in inputs.sites)
    editor = BatchedEditor(inputs.model, inputs.sites)
    gen = torch.Generator().manual_seed(inputs.seed)
    n = len(inputs.images)
    z_all = {s.param: torch.rand(n, s.units, generator=gen) * 2 - 1 for s in inputs.sites}  # paper: z ~ U(-1, 1)
    out: dict[str, list] = {s.param: [] for s in inputs.sites}
    for lo in range(0, n, BILEVEL_BATCH):
        with torch.no_grad():
            tokens = forward_prefix(inputs.model, inputs.images[lo:lo + BILEVEL_BATCH], start)
        target = torch.nn.functional.one_hot(inputs.labels[lo:lo + BILEVEL_BATCH].to(tokens.device),
                                             inputs.model.num_classes).to(tokens.dtype)
        z0 = {p: z[lo:lo + BILEVEL_BATCH].to(tokens.device) for p, z in z_all.items()}
        with torch.enable_grad():
            masks, _ = label_masks(editor, tokens, target, z0, cfg)
        for p, m in masks.items():
            out[p].append(m)
    return {p: torch.cat(v).cpu() for p, v in out.items()}


@register("hypernet")
def hypernet_locator(inputs: LocateInputs) -> dict[str, "torch.Tensor"]:
    import torch

    if inputs.hypernet is None:
        raise UsageError("--locator hypernet needs a hypernetwork: pass --hypernet PATH|NAME "
                         "(or use --locator gradient)")
    feats = cls_features(inputs.model, inputs.images, min(s.block for s in inputs.sites))
    with torch.no_grad():
        scores = inputs.hypernet(feats)
    return {s.param: sc.cpu() for s, sc in zip(inputs.sites, scores)}


def cls_features(model: "nn.Module", images: "torch.Tensor", start: int, batch_size: int = 256) -> "torch.Tensor":
    """The frozen model's final [CLS] feature after the final norm: (N, C, H, W) -> (N, D)."""
    import torch

    suffix = make_suffix(model, start)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(suffix(forward_prefix(model, images[i:i + batch_size], start), pre_logits=True))
    return torch.cat(out)


def score_batches(name: str, model: "nn.Module", sites: Sequence[Site],
                  batches: Iterable[tuple["torch.Tensor", "torch.Tensor"]], seed: int = 0,
                  hypernet: "nn.Module | None" = None) -> dict[str, "torch.Tensor"]:
    """Run locator ``name`` over ``(images, labels)`` batches and join its rows: {param: (N, units)}.

    ``batches`` is always consumed to the end (callers may do other work per batch in it); a batch
    may be empty. An image-free locator (``random``) is called once, without images: (1, units).
    """
    import torch

    locator = get_locator(name)
    parts = []
    for images, labels in batches:
        if name not in IMAGE_FREE and len(labels):
            parts.append(locator(LocateInputs(model, tuple(sites), images, labels, seed, hypernet)))
    if name in IMAGE_FREE:
        return locator(LocateInputs(model, tuple(sites), None, None, seed, hypernet))
    if not parts:
        return {s.param: torch.empty(0, s.units) for s in sites}
    return {s.param: torch.cat([part[s.param] for part in parts]) for s in sites}


def aggregate(per_image: dict[str, "torch.Tensor"], sites: Sequence[Site], rows: Sequence[int] | None,
              locator: str) -> UnitScores:
    """Mean of per-image scores over ``rows`` (None = all); image-independent scores pass through."""
    import torch

    scores = {}
    for s in sites:
        t = per_image[s.param]
        if t.shape[0] > 1 and rows is not None:
            t = t[torch.as_tensor(list(rows), dtype=torch.long)]
        scores[s.param] = t.float().mean(0)
    return UnitScores(tuple(sites), scores, locator)
