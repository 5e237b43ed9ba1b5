"""Metrics of an edit, with the written definitions used everywhere in vitedit (method.md):

- **success** (reliability): share of the *edit* images classified as their true class after the edit;
- **generalization**: share of *held-out* failures of the same group classified correctly after the
  edit (none of them were used to fit it);
- **locality**: share of the locality ("sensitive") set whose top-1 prediction is unchanged by the edit.

Speed: base predictions are computed once; every set's prefix tokens at the first edited block are
computed once (``TokenCache``) and each edit re-runs only the suffix, in batches.

Also the paper's rule for the sensitive set: images the model classifies correctly with a top-2
probability gap below ``margin`` (the images most likely to flip under any change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from .models import forward_prefix, make_suffix

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_BATCH = 256


class TokenCache:
    """Prefix tokens of an image set at block ``start`` of a frozen model, computed once."""

    def __init__(self, model: "nn.Module", start: int, images: "torch.Tensor", batch_size: int = DEFAULT_BATCH,
                 progress: Callable[[int, int], None] | None = None) -> None:
        import torch

        self.model, self.start, self.batch_size = model, start, batch_size
        self.suffix = make_suffix(model, start)
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                chunks.append(forward_prefix(model, images[i:i + batch_size], start))
                if progress:
                    progress(min(i + batch_size, len(images)), len(images))
        param = next(model.parameters())
        self.tokens = torch.cat(chunks) if chunks else torch.empty(0, device=param.device)

    def __len__(self) -> int:
        return len(self.tokens)

    def logits(self, weights: Mapping[str, "torch.Tensor"] | None = None) -> "torch.Tensor":
        """(N, classes) logits of the suffix with ``weights`` substituted (None = base model)."""
        import torch
        from torch.func import functional_call

        out = []
        with torch.inference_mode():
            for i in range(0, len(self.tokens), self.batch_size):
                t = self.tokens[i:i + self.batch_size]
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

    def to_json(self) -> dict:
        return {"success": self.success, "generalization": self.generalization, "locality": self.locality}


@dataclass
class EvalSets:
    """The three sets of one experiment, cached at the first edited block."""

    edit: TokenCache
    edit_labels: "torch.Tensor"
    holdout: TokenCache | None = None
    holdout_labels: "torch.Tensor | None" = None
    locality: TokenCache | None = None
    locality_base: "torch.Tensor | None" = None  # base top-1 on the locality set

    def measure(self, weights: Mapping[str, "torch.Tensor"]) -> EditMetrics:
        success = accuracy(self.edit.predict(weights), self.edit_labels)
        gen = accuracy(self.holdout.predict(weights), self.holdout_labels) if self.holdout is not None else None
        loc = unchanged(self.locality.predict(weights), self.locality_base) if self.locality is not None else None
        return EditMetrics(success, gen, loc)


def sensitive_mask(logits: "torch.Tensor", labels: "torch.Tensor", margin: float = 0.05) -> "torch.Tensor":
    """(N, classes), (N,) -> (N,) bool: correct and top-1 minus top-2 probability < margin."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values
    return (probs.argmax(-1) == labels) & ((top2[:, 0] - top2[:, 1]) < margin)
