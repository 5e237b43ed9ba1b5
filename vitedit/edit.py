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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .artifacts import check_model_match, load_tensors, save_tensors
from .errors import ArtifactError, UsageError
from .masks import UnitMask
from .models import Site, forward_prefix, make_suffix

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class EditConfig:
    """How an edit is fitted. The paper's values for ViT-B/16 are lr 2e-5, 100 steps, loss 0.01."""

    lr: float = 2e-5
    max_steps: int = 100
    loss_threshold: float = 0.01

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: the edit learning rate must be positive, e.g. --lr 2e-5")
        if self.max_steps < 1:
            raise UsageError(f"--max-steps {self.max_steps}: give at least 1 optimizer step")
        if self.loss_threshold < 0:
            raise UsageError(f"loss threshold {self.loss_threshold} must be >= 0")

    def to_json(self) -> dict:
        return asdict(self)


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


def edit(model: "nn.Module", mask: UnitMask, images: "torch.Tensor | None", labels: "torch.Tensor",
         config: EditConfig = EditConfig(), *, tokens: "torch.Tensor | None" = None,
         penalty: tuple[str, float] | None = None,
         progress: Callable[[int, int, float], None] | None = None) -> EditResult:
    """Fit the selected units of a frozen ``model`` to ``labels``; return the patch.

    ``images`` (B, C, H, W) or precomputed prefix ``tokens`` (B, N, D) at the first edited block.
    ``penalty=("l1" | "l2", strength)`` adds ``strength * sum |w - w0|`` (or squared) over the free
    weights to the loss: the paper's regularized fine-tuning baselines (used with a full mask). The
    stopping rule looks at the cross-entropy alone. ``progress(step, max_steps, loss)`` is called
    after every step.
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    start = first_block(mask)
    suffix = make_suffix(model, start)
    if tokens is None:
        with torch.no_grad():
            tokens = forward_prefix(model, images, start)
    labels = labels.to(tokens.device)
    sites = [s for s in mask.sites if mask.indices[s.param].numel() > 0]
    base = {s.param: model.get_parameter(s.param).detach() for s in sites}
    idx = {s.param: mask.indices[s.param].to(tokens.device) for s in sites}
    old = {s.param: base[s.param].index_select(s.dim, idx[s.param]).clone() for s in sites}
    free = {p: t.clone().requires_grad_(True) for p, t in old.items()}
    opt = torch.optim.RMSprop(list(free.values()), lr=config.lr)

    losses: list[float] = []
    steps, converged = 0, False
    while True:
        weights = {s.param: base[s.param].index_copy(s.dim, idx[s.param], free[s.param]) for s in sites}
        logits = functional_call(suffix, weights, (tokens,))  # (B, classes)
        loss = F.cross_entropy(logits, labels)
        losses.append(float(loss.detach()))
        correct = logits.argmax(-1) == labels
        if bool(correct.all()) and losses[-1] <= config.loss_threshold:
            converged = True
            break
        if steps == config.max_steps:
            break
        if penalty is not None:
            kind, strength = penalty
            delta = [free[p] - old[p] for p in free]
            reg = sum((d.abs().sum() if kind == "l1" else d.pow(2).sum()) for d in delta)
            loss = loss + strength * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if progress is not None:
            progress(steps, config.max_steps, losses[-1])
    patch = Patch(tuple(sites), {p: i.cpu() for p, i in idx.items()},
                  {p: t.detach().cpu().clone() for p, t in free.items()}, {p: t.cpu() for p, t in old.items()})
    return EditResult(patch, steps, losses[-1], float(correct.float().mean()), converged, losses)


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
