"""Preserve statistics: what an edit must leave alone, computed once per model and preserve set.

An edit changes a few rows of an ``fc1`` or columns of an ``fc2`` weight: ``W -> W + dW``. On an
input token ``x`` of that layer the output moves by ``dW x``, so over all tokens of all preserve
images the mean squared change of the layer's output is ``tr(dW C dW^T)``, with ``C = E[x x^T]`` the
uncentred second moment of the layer's inputs (fc1: the block's normalized tokens, model width;
fc2: the hidden activations, MLP width). ``C`` depends on the model and the preserve set only, so it
is computed in one streaming pass and reused by every edit (the design of the closed-form editors
MEMIT, AlphaEdit and their successors). An edit then costs what the paper's editor costs, whatever
the preserve set's size: ``edit.edit`` adds ``tr(dW C dW^T) / tr(W C W^T)`` per edited matrix (the
mean squared output change relative to the layer's mean squared output) to its loss.

The pass keeps only running sums in float64, (D_in, D_in) per edited matrix, so memory does not
grow with the preserve set; the prefix before the first edited block and the blocks after the last
are not run. A stack of edits is held the same way: the second moments of the earlier edits' images
(``preserve.input_second_moments``), computed under the *base* weights, are added to ``C``; they are sums, so the
constraint does not depend on the order of the edits and costs the same for the 8th edit as the 1st.

Stored in a workspace as ``preserve-stats.safetensors`` with a JSON sidecar: the model identity, the
preserve set's fingerprint (sha256 over its images' hashes), image and token counts and the sites.
Loading checks all three and refuses statistics of another model, preserve set or set of blocks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from .artifacts import load_tensors, save_tensors, sha256_file
from .errors import ArtifactError
from .models import Site, forward_prefix, make_suffix, site_layer

if TYPE_CHECKING:
    import torch
    from torch import nn

STATS_FILE = "preserve-stats.safetensors"
GRAD_PREFIX = "grad:"


class _Done(Exception):
    """Raised by the last site's hook: nothing after it is needed."""


@dataclass(frozen=True)
class PreserveStats:
    """Per edited matrix, the second moment of its inputs over the preserve set, and provenance."""

    moments: dict[str, "torch.Tensor"]  # site.param -> (D_in, D_in), float32: E[a a^T] of the inputs
    output_energy: dict[str, float]     # site.param -> tr(W C W^T): the layer's mean squared output
    images: int
    tokens: int                         # tokens per image x images
    sites: tuple[Site, ...]
    model: dict                         # the identity of the model the statistics belong to
    preserve_sha256: str                # fingerprint of the preserve set (``fingerprint``)
    # site.param -> (D_out, D_out), float32: E[g g^T] of the gradients of the model's log-likelihood
    # (labels drawn from its own predictions) w.r.t. the layer's outputs; empty when not computed
    grad_moments: dict[str, "torch.Tensor"] = field(default_factory=dict)

    @property
    def has_fisher(self) -> bool:
        return all(s.param in self.grad_moments for s in self.sites)

    @property
    def start(self) -> int:
        return min(s.block for s in self.sites)

    def to_json(self) -> dict:
        return {"images": self.images, "tokens": self.tokens, "preserve_sha256": self.preserve_sha256,
                "sites": [s.to_json() for s in self.sites], "output_energy": self.output_energy}

    def save(self, path: Path) -> None:
        tensors = {p: m for p, m in self.moments.items()}
        tensors.update({GRAD_PREFIX + p: g for p, g in self.grad_moments.items()})
        save_tensors(path, tensors, {"kind": "preserve-stats", "model": self.model, **self.to_json()})

    @classmethod
    def load(cls, path: Path, model: dict, preserve_sha256: str | None, sites: Sequence[Site]) -> "PreserveStats":
        """Load and check that the statistics are of ``model``, the preserve set with fingerprint
        ``preserve_sha256`` (None: any) and cover every one of ``sites``."""
        from .artifacts import check_model_match

        tensors, meta = load_tensors(path, "preserve statistics")
        if meta.get("kind") != "preserve-stats":
            raise ArtifactError(f"{path} is not a vitedit preserve-statistics file; delete it and rerun the edit")
        check_model_match(meta, model, "preserve statistics", path)
        if preserve_sha256 is not None and meta.get("preserve_sha256") != preserve_sha256:
            raise ArtifactError(f"preserve statistics {path} were computed on another preserve set "
                                f"({str(meta.get('preserve_sha256'))[:12]}, not {preserve_sha256[:12]}); delete the "
                                "file or pass the preserve set they were made from")
        have = {Site.from_json(d) for d in meta.get("sites", [])}
        missing = [s.param for s in sites if s not in have or s.param not in tensors]
        if missing:
            raise ArtifactError(f"preserve statistics {path} do not cover {', '.join(missing)}; they were made for "
                                "other blocks: delete the file and rerun the edit")
        grads = {s.param: tensors[GRAD_PREFIX + s.param] for s in sites if GRAD_PREFIX + s.param in tensors}
        return cls({s.param: tensors[s.param] for s in sites},
                   {s.param: float(meta["output_energy"][s.param]) for s in sites},
                   int(meta["images"]), int(meta["tokens"]), tuple(sites), meta["model"], meta["preserve_sha256"],
                   grads)

    def quadratic_forms(self, sites: Sequence[Site], indices: dict[str, "torch.Tensor"],
                        extra: dict[str, "torch.Tensor"] | None = None, extra_weight: float = 0.0,
                        device=None, fisher: bool = True) -> dict[str, tuple["torch.Tensor | None", "torch.Tensor"]]:
        """Per site, the matrices ``(L, R)`` of the penalty ``sum((L @ dW @ R) * dW)`` for an update
        ``dW`` of the selected slice (fc1: (k, D) rows, fc2: (D, k) columns).

        With the gradient moments (``fisher``): ``L = T/2 * G``, ``R = C + extra_weight * C_extra``,
        the Kronecker-factored second-order expansion of the mean KL divergence between the model's
        predictions before and after the edit on a preserve image of ``T`` tokens (``G`` and ``C``
        restricted to the selected units). Without: ``L = None``, ``R = C / tr(W C W^T)``, the mean
        squared change of the layer's output relative to its mean squared output."""
        out = {}
        fisher = fisher and self.has_fisher
        for s in sites:
            idx = indices[s.param].to(device)
            c = self.moments[s.param].to(device)
            if extra and extra_weight > 0:
                c = c + extra_weight * extra[s.param].to(device)
            if s.matrix == "fc2":
                c = c.index_select(0, idx).index_select(1, idx)
            if not fisher:
                out[s.param] = (None, c / max(self.output_energy[s.param], 1e-12))
                continue
            g = self.grad_moments[s.param].to(device)
            if s.matrix == "fc1":
                g = g.index_select(0, idx).index_select(1, idx)
            out[s.param] = (g * (self.tokens / self.images / 2), c)
        return out


def fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the sorted sha256 of every file: the same images give the same fingerprint
    whatever their names or order."""
    h = hashlib.sha256()
    for digest in sorted(sha256_file(p) for p in paths):
        h.update(digest.encode())
    return h.hexdigest()


def _accumulate(model: "nn.Module", sites: Sequence[Site], tokens: "torch.Tensor", sums: dict, counts: dict,
                weights: dict | None) -> None:
    """Add the inputs of every site's layer on ``tokens`` (entering the first edited block) to ``sums``."""
    import torch

    start = min(s.block for s in sites)
    last = max(sites, key=lambda s: (s.block, s.matrix))
    suffix = make_suffix(model, start)

    def hook_for(site: Site):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (B*T, D_in)
            sums[site.param] = sums.get(site.param, 0) + x.T @ x
            counts[site.param] = counts.get(site.param, 0) + x.shape[0]
            if site == last:
                raise _Done
        return hook

    handles = [site_layer(model, s).register_forward_pre_hook(hook_for(s)) for s in sites]
    try:
        with torch.inference_mode():
            if weights:
                from torch.func import functional_call

                functional_call(suffix, weights, (tokens,))
            else:
                suffix(tokens)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _accumulate_fisher(model: "nn.Module", sites: Sequence[Site], tokens: "torch.Tensor", sums: dict, counts: dict,
                       grad_sums: dict, generator: "torch.Generator", samples: int, weights: dict | None,
                       probe: str = "logits") -> None:
    """As ``_accumulate``, and add every site's output gradients of ``log p(y | x)``, ``y`` drawn
    ``samples`` times from the model's own prediction, to ``grad_sums`` (the sampled Fisher's
    output-side factor, one outer product per token)."""
    import torch

    start = min(s.block for s in sites)
    suffix = make_suffix(model, start)
    outputs: dict = {}

    def pre_hook_for(site: Site):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[site.param] = sums.get(site.param, 0) + x.T @ x
            counts[site.param] = counts.get(site.param, 0) + x.shape[0]
        return hook

    def hook_for(site: Site):
        def hook(_module, _args, output):
            outputs[site.param] = output
        return hook

    handles = []
    for s in sites:
        handles.append(site_layer(model, s).register_forward_pre_hook(pre_hook_for(s)))
        handles.append(site_layer(model, s).register_forward_hook(hook_for(s)))
    try:
        with torch.enable_grad():
            x = tokens.detach().requires_grad_(True)
            if weights:
                from torch.func import functional_call

                logits = functional_call(suffix, weights, (x,))
            else:
                logits = suffix(x)
            params = [s.param for s in sites]
            for k in range(samples):
                # a Gaussian probe of the logits, centred over the classes (a shift of every logit
                # changes no prediction): E[g g^T] = J^T (I - 11^T/C) J, J = d logits / d output
                # one draw per image, so the probes do not depend on how the set is batched
                e = torch.stack([torch.randn(logits.shape[-1], generator=generator, dtype=torch.float64)
                                 for _ in range(len(logits))]).to(logits.device)
                if probe == "fisher":  # E[v v^T] = diag(p) - p p^T: the Fisher of the model's predictions
                    prob = torch.softmax(logits.detach().double(), -1)
                    root = prob.sqrt()
                    v = root * e - prob * (root * e).sum(-1, keepdim=True)
                else:
                    v = e - e.mean(-1, keepdim=True)
                picked = (logits.double() * v).sum()
                grads = torch.autograd.grad(picked, [outputs[p] for p in params], retain_graph=k + 1 < samples)
                for param, g in zip(params, grads):
                    g = g.detach().reshape(-1, g.shape[-1]).double()
                    grad_sums[param] = grad_sums.get(param, 0) + (g.T @ g) / samples
    finally:
        for handle in handles:
            handle.remove()


def compute_stats(model: "nn.Module", sites: Sequence[Site], batches: Iterable["torch.Tensor"], *,
                  model_identity: dict, preserve_sha256: str, weights: dict | None = None, fisher: bool = True,
                  seed: int = 0, samples: int = 1, probe: str = "logits",
                  progress: Callable[[int], None] | None = None) -> PreserveStats:
    """One streaming pass over preserve image ``batches`` (B, C, H, W): the statistics of ``model``
    (with ``weights`` substituted, e.g. the base matrices while the model holds a stack of edits).

    With ``fisher`` the pass also runs backward from the model's log-likelihood of ``samples`` labels
    per image drawn from its own predictions (seeded by ``seed``), for the output-side factor.
    Memory: one batch of activations (and their graph) plus float64 sums, (D_in, D_in) and
    (D_out, D_out) per site."""
    import torch

    start = min(s.block for s in sites)
    sums: dict = {}
    counts: dict = {}
    grad_sums: dict = {}
    generator = torch.Generator().manual_seed(seed)
    images = 0
    for x in batches:
        with torch.inference_mode():
            tokens = forward_prefix(model, x, start)
        if fisher:
            _accumulate_fisher(model, sites, tokens.clone(), sums, counts, grad_sums, generator, samples, weights,
                               probe)
        else:
            _accumulate(model, sites, tokens, sums, counts, weights)
        images += len(x)
        if progress is not None:
            progress(images)
    if not images:
        raise ArtifactError("the preserve set has no images to compute statistics from")
    moments = {s.param: (sums[s.param] / counts[s.param]).float() for s in sites}
    energy = {}
    for s in sites:
        w = (weights or {}).get(s.param)
        w = (w if w is not None else model.get_parameter(s.param)).detach().double()
        c = moments[s.param].to(w.device).double()
        energy[s.param] = float(((w @ c) * w).sum())
    grad_moments = {p: (g / counts[p]).float() for p, g in grad_sums.items()}
    return PreserveStats(moments, energy, images, counts[sites[0].param], tuple(sites), dict(model_identity),
                         preserve_sha256, grad_moments)
