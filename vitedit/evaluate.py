"""Metrics of an edit, with the written definitions used everywhere in vitedit (method.md):

- **success** (reliability): share of the *edit* images classified as their true class after the edit;
- **generalization**: share of *held-out* failures of the same group classified correctly after the
  edit (none of them were used to fit it);
- **locality**: share of the locality ("sensitive") set whose top-1 prediction is unchanged by the edit;
- **accuracy before / after** on the *check set* (labeled ordinary images, never used to fit the
  edit), the **accuracy drop** (before minus after, in percentage points) and the **flip rate**
  (share of check images whose top-1 prediction changed, whichever way).

Speed: base predictions are computed once; every set's prefix tokens at the first edited block are
computed once (``TokenCache``) and each edit re-runs only the suffix, in batches. Memory: a set whose
tokens exceed a budget (1 GiB, ``VITEDIT_CACHE_BUDGET_MB``) is not cached but re-read and recomputed
batch by batch on every measurement, so any set size runs in bounded memory, with identical results.

Also the paper's rule for the sensitive set: images the model classifies correctly with a top-2
probability gap below ``margin`` (the images most likely to flip under any change).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from .errors import UsageError
from .models import forward_prefix, make_suffix

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_BATCH = 256
# Prefix tokens are cached only while one set's tokens stay under this many bytes (a ViT-B/16 at
# 224 px holds ~600 KB of tokens per image, so 1 GiB is ~1,700 images); larger sets are streamed.
DEFAULT_CACHE_BUDGET_MB = 1024
CACHE_BUDGET_ENV = "VITEDIT_CACHE_BUDGET_MB"

Batches = Callable[[], Iterable["torch.Tensor"]]  # () -> fresh iterator over (B, C, H, W) batches


def cache_budget_bytes() -> int:
    """The token cache budget: ``$VITEDIT_CACHE_BUDGET_MB`` (megabytes, 0 = never cache) or 1 GiB."""
    raw = os.environ.get(CACHE_BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_CACHE_BUDGET_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:  # also rejects nan
        raise UsageError(f"{CACHE_BUDGET_ENV}={raw!r}: give the token cache budget in megabytes, e.g. "
                         f"{CACHE_BUDGET_ENV}=512 (0 = recompute every time)")
    return int(mb * (1 << 20))


class TokenCache:
    """Prefix tokens of an image set at block ``start`` of a frozen model, computed once if they fit.

    ``images`` is a (N, C, H, W) tensor or a callable returning a fresh iterator over (B, C, H, W)
    batches (e.g. ``lambda: (x for x, _ in ImageBatches(...))``), for sets that do not fit in memory
    as images either. The constructor runs the prefix over every batch. If the tokens of the whole
    set fit in ``budget_bytes`` (default :func:`cache_budget_bytes`) they are kept and each call runs
    only the suffix; otherwise they are dropped, the cache keeps the batch source, and each call
    recomputes the prefix one batch at a time: slower, with memory bounded by one batch. Either way
    every batch goes through the same prefix and suffix calls, so the results are identical.
    """

    def __init__(self, model: "nn.Module", start: int, images: "torch.Tensor | Batches",
                 batch_size: int = DEFAULT_BATCH, progress: Callable[[int, int], None] | None = None,
                 budget_bytes: int | None = None) -> None:
        import torch

        self.model, self.start, self.batch_size = model, start, batch_size
        self.suffix = make_suffix(model, start)
        if isinstance(images, torch.Tensor):
            tensor = images
            self._source: Batches | None = lambda: tensor.split(batch_size)
            total = len(tensor)
        else:
            self._source, total = images, 0  # total unknown: progress reports (done, done)
        budget = cache_budget_bytes() if budget_bytes is None else budget_bytes
        chunks: list | None = []  # None once over budget
        held, n = 0, 0
        with torch.inference_mode():
            for x in self._source():
                n += len(x)
                if chunks is not None:
                    t = forward_prefix(model, x, start)  # (B, C, H, W) -> (B, N, D)
                    held += t.numel() * t.element_size()
                    if held <= budget:
                        chunks.append(t)
                    else:
                        chunks = None  # over budget: drop what was kept and stream from now on
                if progress:
                    progress(n, max(total, n))
        self._len = n
        self._chunks = chunks
        if chunks is not None:
            self._source = None  # the images are not needed any more

    @property
    def cached(self) -> bool:
        """Whether the tokens are held in memory (False: recomputed per batch on every call)."""
        return self._chunks is not None

    def __len__(self) -> int:
        return self._len

    def _token_batches(self) -> Iterator["torch.Tensor"]:
        """(B, N, D) prefix tokens, batch by batch: from the cache or recomputed from the source."""
        if self._chunks is not None:
            yield from self._chunks
            return
        for x in self._source():
            yield forward_prefix(self.model, x, self.start)

    @property
    def tokens(self) -> "torch.Tensor":
        """(N, T, D) tokens of the whole set. Cheap when cached; otherwise computed now, in full."""
        import torch

        with torch.inference_mode():
            chunks = list(self._token_batches())
        if len(chunks) == 1:
            return chunks[0]
        param = next(self.model.parameters())
        return torch.cat(chunks) if chunks else torch.empty(0, device=param.device)

    def logits(self, weights: Mapping[str, "torch.Tensor"] | None = None) -> "torch.Tensor":
        """(N, classes) logits of the suffix with ``weights`` substituted (None = base model)."""
        import torch
        from torch.func import functional_call

        out = []
        with torch.inference_mode():
            for tokens in self._token_batches():
                for t in tokens.split(self.batch_size):
                    out.append(functional_call(self.suffix, dict(weights), (t,)) if weights else self.suffix(t))
        return torch.cat(out) if out else torch.empty(0)

    def predict(self, weights: Mapping[str, "torch.Tensor"] | None = None) -> "torch.Tensor":
        return self.logits(weights).argmax(-1)


def accuracy(pred: "torch.Tensor", labels: "torch.Tensor") -> float | None:
    """Share of ``pred == labels``; None for an empty set (never 0 or 1 by default)."""
    if len(labels) == 0:
        return None
    return float((pred.cpu() == labels.cpu()).float().mean())


def unchanged(pred: "torch.Tensor", base_pred: "torch.Tensor") -> float | None:
    if len(base_pred) == 0:
        return None
    return float((pred.cpu() == base_pred.cpu()).float().mean())


Z95 = 1.959964  # two-sided 95% normal quantile


def drop_interval(base_right: "torch.Tensor", edit_right: "torch.Tensor") -> tuple[float, float] | None:
    """95% interval of the accuracy drop in points, paired over the same check images.

    Adjusted Wald interval for a difference of paired proportions (Agresti & Min 2005): half an image
    is added to each cell of the 2x2 right/wrong table before the usual variance, so an edit that
    changed nothing still gets an interval of about +-196/n points rather than a false [0, 0]."""
    n = len(base_right)
    if n == 0:
        return None
    b = float((base_right & ~edit_right).sum()) + 0.5   # right before, wrong after
    c = float((~base_right & edit_right).sum()) + 0.5   # wrong before, right after
    m = n + 2.0
    diff = (b - c) / m
    var = max(((b + c) / m - diff * diff) / m, 0.0)
    half = Z95 * var ** 0.5
    return round(100 * (diff - half), 3), round(100 * (diff + half), 3)


def rate_interval(k: int, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval of a share ``k / n`` (sensible at 0 and at small n)."""
    if n == 0:
        return None
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    return round(max(centre - half, 0.0), 6), round(min(centre + half, 1.0), 6)


@dataclass(frozen=True)
class EditMetrics:
    success: float | None
    generalization: float | None
    locality: float | None
    accuracy_before: float | None = None  # check set, base model
    accuracy_after: float | None = None   # check set, edited model
    flip_rate: float | None = None        # check set: share whose top-1 changed
    check_images: int | None = None
    accuracy_drop_ci95: tuple[float, float] | None = None  # points, paired over the check images
    flip_rate_ci95: tuple[float, float] | None = None

    @property
    def accuracy_drop(self) -> float | None:
        """Percentage points of check-set accuracy lost (negative: gained)."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return round(100.0 * (self.accuracy_before - self.accuracy_after), 4)

    def to_json(self) -> dict:
        return {"success": self.success, "generalization": self.generalization, "locality": self.locality,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "accuracy_drop": self.accuracy_drop, "flip_rate": self.flip_rate,
                "accuracy_drop_ci95": None if self.accuracy_drop_ci95 is None else list(self.accuracy_drop_ci95),
                "flip_rate_ci95": None if self.flip_rate_ci95 is None else list(self.flip_rate_ci95)}


def check_metrics(pred: "torch.Tensor", base_pred: "torch.Tensor", labels: "torch.Tensor") -> dict:
    """The check-set fields of :class:`EditMetrics`: accuracy before / after, flip rate, their 95%
    intervals and the number of images."""
    pred, base_pred, labels = pred.cpu(), base_pred.cpu(), labels.cpu()
    n = len(labels)
    flipped = int((pred != base_pred).sum())
    return {"accuracy_before": accuracy(base_pred, labels), "accuracy_after": accuracy(pred, labels),
            "flip_rate": None if n == 0 else round(flipped / n, 6), "check_images": n,
            "accuracy_drop_ci95": drop_interval(base_pred == labels, pred == labels),
            "flip_rate_ci95": rate_interval(flipped, n)}


def resolution_note(metrics: Mapping, budget_points: float | None) -> str | None:
    """A sentence when the check set is too small to tell an accuracy drop of ``budget_points`` from
    none: the 95% interval of the drop is wider than the budget on either side. None otherwise."""
    ci, n = metrics.get("accuracy_drop_ci95"), metrics.get("check_images")
    if ci is None or not n or budget_points is None or budget_points <= 0:
        return None
    half = (ci[1] - ci[0]) / 2
    if half <= budget_points:
        return None
    needed = int(-(-n * (half / budget_points) ** 2 // 100) * 100)  # rounded up to hundreds
    return (f"the check set is too small to resolve a {budget_points:g}-point accuracy budget: its {n:,} images give "
            f"the drop a 95% interval of +-{half:.2f} points; a check set of about {needed:,} images would resolve it "
            f"(--check DIR)")


@dataclass
class EvalSets:
    """The sets of one experiment, cached at the first edited block."""

    edit: TokenCache
    edit_labels: "torch.Tensor"
    holdout: TokenCache | None = None
    holdout_labels: "torch.Tensor | None" = None
    locality: TokenCache | None = None
    locality_base: "torch.Tensor | None" = None  # base top-1 on the locality set
    check: TokenCache | None = None
    check_labels: "torch.Tensor | None" = None
    check_base: "torch.Tensor | None" = None     # base top-1 on the check set

    def measure(self, weights: Mapping[str, "torch.Tensor"]) -> EditMetrics:
        success = accuracy(self.edit.predict(weights), self.edit_labels)
        gen = accuracy(self.holdout.predict(weights), self.holdout_labels) if self.holdout is not None else None
        loc = unchanged(self.locality.predict(weights), self.locality_base) if self.locality is not None else None
        check = {}
        if self.check is not None:
            check = check_metrics(self.check.predict(weights), self.check_base, self.check_labels)
        return EditMetrics(success, gen, loc, **check)


def sensitive_mask(logits: "torch.Tensor", labels: "torch.Tensor", margin: float = 0.05) -> "torch.Tensor":
    """(N, classes), (N,) -> (N,) bool: correct and top-1 minus top-2 probability < margin."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values
    return (probs.argmax(-1) == labels) & ((top2[:, 0] - top2[:, 1]) < margin)
