"""The preserve set: ordinary inputs an edit is *trained* to leave alone (method.md, "Beyond the paper").

A preserve set is a folder of unlabeled in-distribution images (the embedded default ships 1,000
training images). It is never used to measure anything: the check set (accuracy drop, flip rate),
the locality set and the generalization set must be other images, which the pipeline enforces.

This module owns what the edit needs from it, all computed once from the frozen model:

- the prefix tokens at the first edited block, ``(N, T, D)``, so a preservation minibatch costs
  only a suffix pass;
- the base model's log-probabilities on it, ``(N, classes)``, the target of the preservation term
  ``KL(base || edited)``;
- per edited matrix, the uncentred second moment of its *inputs* over every token of every preserve
  image: ``(D, D)`` for an fc1 site (the block's normalized token) and ``(H, H)`` for an fc2 site
  (the hidden activations). These give the null-space projectors of the constrained update
  (AlphaEdit, ICLR 2025): an update ``Delta`` of a linear map leaves its outputs on preserved inputs
  ``K0`` unchanged when ``Delta K0 = 0``; projecting ``Delta <- Delta U U^T``, with ``U`` the
  eigenvectors of ``K0 K0^T / n`` whose eigenvalues are below ``threshold * largest``, makes that
  (nearly) so.

For an fc1 site the update is ``(k, D)`` (k selected rows), acting on the D-dim normalized token, so
the projector is ``(D, D)`` whatever the mask. For an fc2 site it is ``(D_out, k)``, acting on the
selected hidden units only, so the projector is built from the ``(k, k)`` block of the second moment
that the mask selects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import UsageError
from .models import Site, forward_prefix, make_suffix, site_layer

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class PreserveSet:
    """Preserve images as the edit needs them; build with :func:`build_preserve_set`."""

    tokens: "torch.Tensor"                  # (N, T, D) at blocks[start]
    base_log_probs: "torch.Tensor"          # (N, classes)
    start: int
    features: "torch.Tensor | None" = None  # (N, D) base pre-logits features, for nearest()
    _moments: "Callable[[], dict[str, torch.Tensor]] | dict[str, torch.Tensor] | None" = field(default=None, repr=False)

    @property
    def second_moments(self) -> dict[str, "torch.Tensor"]:
        """site.param -> (D, D) for fc1, (H, H) for fc2: computed at first use (only the null-space
        projection needs them; one extra pass over every preserve token)."""
        if callable(self._moments):
            self._moments = self._moments()
        return self._moments

    def nearest(self, features: "torch.Tensor", n: int) -> "torch.Tensor":
        """Rows of the ``n`` preserve images closest (cosine, best over the given images) to
        ``features`` (B, D): the ordinary images an edit of those images is most likely to flip."""
        import torch

        a = torch.nn.functional.normalize(self.features.to(features.device), dim=-1)
        b = torch.nn.functional.normalize(features, dim=-1)
        best = (a @ b.T).max(-1).values  # (N,)
        return best.topk(min(n, len(best))).indices.sort().values

    def __len__(self) -> int:
        return len(self.tokens)

    def projector(self, site: Site, indices: "torch.Tensor", threshold: float) -> "torch.Tensor":
        """The right-multiplied projector onto the preserve set's (near) null space for ``site``.

        fc1: (D, D), independent of ``indices``; fc2: (k, k) for the k selected hidden units.
        ``threshold`` is relative: eigenvalues below ``threshold * largest`` span the null space.
        """
        import torch

        moment = self.second_moments[site.param]
        if site.matrix == "fc2":
            idx = indices.to(moment.device)
            moment = moment.index_select(0, idx).index_select(1, idx)
        values, vectors = torch.linalg.eigh(moment.double())  # ascending eigenvalues
        keep = values <= threshold * values[-1].clamp_min(0)
        u = vectors[:, keep]
        return (u @ u.T).to(moment.dtype)

    def null_dims(self, site: Site, indices: "torch.Tensor", threshold: float) -> int:
        """How many directions the projector for ``site`` leaves free (its rank)."""
        return int(round(float(self.projector(site, indices, threshold).trace())))


@dataclass
class AnchorSet:
    """Images earlier edits were made on, with the current (stacked) model's log-probabilities on
    them: a new edit on top is held to keep those predictions (``EditConfig.anchor_weight``), so it
    does not undo what the earlier edits fixed. Build with :func:`build_anchor_set`."""

    tokens: "torch.Tensor"     # (M, T, D) at blocks[start]
    log_probs: "torch.Tensor"  # (M, classes) under the current model
    start: int
    views: int = 0             # views per image after the images themselves: M = (1 + views) * images

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def images(self) -> int:
        return len(self.tokens) // (1 + self.views)


def _prefix_tokens(model, sites, images, tokens, batch_size: int):
    """(first edited block, prefix tokens there): ``tokens`` as given, else computed from ``images``."""
    import torch

    start = min(s.block for s in sites)
    if tokens is None:
        with torch.inference_mode():
            tokens = torch.cat([forward_prefix(model, x, start) for x in images.split(batch_size)])
    return start, tokens


def build_anchor_set(model: "nn.Module", sites: Sequence[Site], images: "torch.Tensor | None" = None, *,
                     tokens: "torch.Tensor | None" = None, views: int = 0, seed: int = 0,
                     batch_size: int = 256) -> AnchorSet:
    """The anchor set of ``model`` (which holds the stack so far): (M, C, H, W) images or their
    prefix tokens at the first edited block. ``views`` > 0 adds that many shifted / mirrored views of
    every image (``edit.augment_views``, drawn with ``seed``): (M, ...) -> ((1 + views) * M, ...)
    anchors. Views need the images; ``tokens``, when given with them, are the images' own tokens."""
    import torch

    from .edit import augment_views

    if views and images is None:
        raise UsageError("anchor views need the earlier edits' images, not only their tokens")
    start, tokens = _prefix_tokens(model, sites, images, tokens, batch_size)
    if views:
        extra = augment_views(images, views, torch.Generator().manual_seed(seed))
        tokens = torch.cat([tokens, _prefix_tokens(model, sites, extra, None, batch_size)[1]])
    suffix = make_suffix(model, start)
    with torch.inference_mode():
        log_probs = torch.cat([torch.log_softmax(suffix(t), -1) for t in tokens.split(batch_size)])
    return AnchorSet(tokens.clone(), log_probs.clone(), start, views)


def input_second_moments(model: "nn.Module", sites: Sequence[Site], tokens: "torch.Tensor",
                         batch_size: int = 256, weights: dict | None = None) -> dict[str, "torch.Tensor"]:
    """Uncentred second moments of every edited matrix's inputs over all tokens: X^T X / n.

    ``tokens`` (N, T, D) enter ``blocks[start]``; hooks on each site's linear layer collect its input
    during an ordinary suffix pass, (B, T, D_in) -> (D_in, D_in) accumulated in float64. ``weights``
    (param name -> tensor) are substituted for the model's own during the pass.
    """
    import torch

    start = min(s.block for s in sites)
    suffix = make_suffix(model, start)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook_for(param: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (B*T, D_in)
            sums[param] = sums.get(param, 0) + x.T @ x
            counts[param] = counts.get(param, 0) + x.shape[0]
        return hook

    for s in sites:
        handles.append(site_layer(model, s).register_forward_pre_hook(hook_for(s.param)))
    try:
        with torch.inference_mode():
            for t in tokens.split(batch_size):
                _run(suffix, weights, t)
    finally:
        for h in handles:
            h.remove()
    return {p: (sums[p] / counts[p]).float() for p in sums}


def _run(suffix, weights: dict | None, t: "torch.Tensor", **kwargs) -> "torch.Tensor":
    """``suffix(t)``, with ``weights`` substituted for the model's parameters of those names."""
    if not weights:
        return suffix(t, **kwargs)
    from torch.func import functional_call

    return functional_call(suffix, weights, (t,), kwargs)


def build_preserve_set(model: "nn.Module", sites: Sequence[Site], images: "torch.Tensor | None" = None, *,
                       tokens: "torch.Tensor | None" = None, batch_size: int = 256,
                       targets_from: dict | None = None) -> PreserveSet:
    """Cache everything the edit needs from the preserve images: (N, C, H, W) or their prefix tokens.

    ``targets_from`` (param name -> tensor, e.g. the base model's edited matrices while ``model``
    holds a stack of edits): the targets, features and second moments are those of the model with
    these weights, so an edit on top of a stack is held to that model's behaviour on ordinary images.
    The prefix tokens are the same either way (edits never touch the blocks before ``start``).
    """
    import torch

    start, tokens = _prefix_tokens(model, sites, images, tokens, batch_size)
    suffix = make_suffix(model, start)
    feats, log_probs = [], []
    with torch.inference_mode():
        for t in tokens.split(batch_size):
            f, logits = _run(suffix, targets_from, t, with_features=True)  # (B, D), (B, classes)
            feats.append(f)
            log_probs.append(torch.log_softmax(logits, -1))
    tokens = tokens.clone()
    return PreserveSet(tokens, torch.cat(log_probs).clone(), start, torch.cat(feats).clone(),
                       lambda: input_second_moments(model, sites, tokens, batch_size, weights=targets_from))
