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


@dataclass(frozen=True)
class EditMetrics:
    success: float | None
    generalization: float | None
    locality: float | None
    accuracy_before: float | None = None  # check set, base model
    accuracy_after: float | None = None   # check set, edited model
    flip_rate: float | None = None        # check set: share whose top-1 changed

    @property
    def accuracy_drop(self) -> float | None:
        """Percentage points of check-set accuracy lost (negative: gained)."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return round(100.0 * (self.accuracy_before - self.accuracy_after), 4)

    def to_json(self) -> dict:
        return {"success": self.success, "generalization": self.generalization, "locality": self.locality,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "accuracy_drop": self.accuracy_drop, "flip_rate": self.flip_rate}


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
        before = after = flips = None
        if self.check is not None:
            pred = self.check.predict(weights)
            before, after = accuracy(self.check_base, self.check_labels), accuracy(pred, self.check_labels)
            same = unchanged(pred, self.check_base)
            flips = None if same is None else round(1.0 - same, 6)
        return EditMetrics(success, gen, loc, before, after, flips)


def sensitive_mask(logits: "torch.Tensor", labels: "torch.Tensor", margin: float = 0.05) -> "torch.Tensor":
    """(N, classes), (N,) -> (N,) bool: correct and top-1 minus top-2 probability < margin."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values
    return (probs.argmax(-1) == labels) & ((top2[:, 0] - top2[:, 1]) < margin)
