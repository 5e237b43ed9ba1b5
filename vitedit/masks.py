"""Unit scores and binary masks: the only type through which `locate` and `edit` meet.

A *unit* is one hidden neuron of one edited matrix (a row of fc1 or a column of fc2; paper Sec. 3).
``UnitScores`` holds a score per unit for every site; ``UnitScores.select(density)`` binarizes them
with one **global** top-k over all units, k = round(density x total units) (at least 1), as the
paper does. Ties break by site order, then unit index, so a selection is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .artifacts import check_model_match, load_tensors, save_tensors
from .errors import ArtifactError, UsageError
from .models import Site

if TYPE_CHECKING:
    import torch


def validate_density(density: float, flag: str = "--sparsity") -> float:
    if not (0.0 < float(density) <= 1.0):
        raise UsageError(f"{flag} {density}: give the fraction of units to edit, in (0, 1], e.g. {flag} 0.05")
    return float(density)


def units_for(density: float, total: int) -> int:
    """Number of units a density selects: round(density x total), at least 1."""
    return max(1, min(total, int(round(validate_density(density) * total))))


@dataclass(frozen=True)
class UnitMask:
    """Selected unit indices per site (sorted int64 tensors, keyed by ``site.param``)."""

    sites: tuple[Site, ...]
    indices: dict[str, "torch.Tensor"]

    @property
    def selected(self) -> int:
        return sum(int(v.numel()) for v in self.indices.values())

    @property
    def total(self) -> int:
        return sum(s.units for s in self.sites)

    @property
    def density(self) -> float:
        return self.selected / self.total

    def dense(self, site: Site) -> "torch.Tensor":
        """(units,) bool vector for one site."""
        import torch

        m = torch.zeros(site.units, dtype=torch.bool)
        m[self.indices[site.param]] = True
        return m

    def params_edited(self, model) -> int:
        """Number of weights the mask frees: units x the length of each row/column."""
        total = 0
        for s in self.sites:
            w = model.get_parameter(s.param)
            total += int(self.indices[s.param].numel()) * int(w.shape[1 - s.dim])
        return total


@dataclass(frozen=True)
class UnitScores:
    """A score per unit for every site (keyed by ``site.param``, each a float (units,) tensor)."""

    sites: tuple[Site, ...]
    scores: dict[str, "torch.Tensor"]
    locator: str

    def __post_init__(self) -> None:
        for s in self.sites:
            t = self.scores.get(s.param)
            if t is None or tuple(t.shape) != (s.units,):
                raise ValueError(f"scores for {s.param} must have shape ({s.units},)")

    @property
    def total(self) -> int:
        return sum(s.units for s in self.sites)

    def flat(self) -> "torch.Tensor":
        import torch

        return torch.cat([self.scores[s.param].float() for s in self.sites])

    def select(self, density: float, exclude: dict[str, "torch.Tensor"] | None = None) -> UnitMask:
        """Global top-k over all units; k = ``density`` x all units. ``exclude`` (site.param -> unit
        indices, e.g. the units earlier edits changed) are never chosen: k of the others are."""
        import torch

        k = units_for(density, self.total)
        flat = self.flat().clone()
        if exclude:
            offset, barred = 0, 0
            for s in self.sites:
                ix = exclude.get(s.param)
                if ix is not None and ix.numel():
                    ix = torch.unique(ix.to(torch.int64))
                    flat[offset + ix] = float("-inf")
                    barred += int(ix.numel())
                offset += s.units
            if k > self.total - barred:
                raise UsageError(f"sparsity {density:g} needs {k} units but only {self.total - barred} of {self.total} "
                                 "are not changed by earlier edits; give a smaller --sparsity or edit shared units")
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        indices, offset = {}, 0
        for s in self.sites:
            local = order[(order >= offset) & (order < offset + s.units)] - offset
            indices[s.param] = torch.sort(local).values.to(torch.int64)
            offset += s.units
        return UnitMask(self.sites, indices)

    def save(self, path: Path, model_identity: dict, extra: dict | None = None) -> None:
        meta = {"kind": "unit-scores", "locator": self.locator, "model": model_identity,
                "sites": [s.to_json() for s in self.sites], **(extra or {})}
        save_tensors(path, dict(self.scores), meta)

    @classmethod
    def load(cls, path: Path, model_identity: dict | None = None) -> "UnitScores":
        tensors, meta = load_tensors(path, "unit scores")
        if meta.get("kind") != "unit-scores":
            raise ArtifactError(f"{path} is not a vitedit unit-scores file; rerun `vitedit locate`")
        if model_identity is not None:
            check_model_match(meta, model_identity, "unit scores", path)
        sites = tuple(Site.from_json(d) for d in meta["sites"])
        try:
            return cls(sites, tensors, meta["locator"])
        except ValueError as e:
            raise ArtifactError(f"unit scores {path} are inconsistent ({e}); rerun `vitedit locate`") from None
