"""``vitedit sensitive``: the paper's fragile locality set, copied out of a folder of images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifacts import atomic_path
from ..device import resolve_device
from ..errors import InputDataError, UsageError
from ..models import load_model
from .common import ModelOptions, Progress, _load_labeled, _noop, _predict


@dataclass(frozen=True)
class SensitiveConfig:
    images: Path
    out: Path
    margin: float = 0.05
    model: ModelOptions = ModelOptions()
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.margin <= 1.0:
            raise UsageError(f"--margin {self.margin} must be in (0, 1], e.g. --margin 0.05")


def run_sensitive(cfg: SensitiveConfig, progress: Progress = _noop) -> dict:
    """Copy the images that pass the paper's sensitivity rule into ``cfg.out/<class folder>/``."""
    import shutil

    from ..data import safe_label_name
    from ..evaluate import sensitive_mask

    loaded = load_model(cfg.model.name, weights=cfg.model.weights, labels_file=cfg.model.labels,
                        device=resolve_device(cfg.model.device), offline=cfg.model.offline,
                        img_size=cfg.model.img_size)
    images, labels, refs, bad = _load_labeled(cfg.images, loaded, cfg.skip_bad_images, progress, "images")
    dev = next(loaded.model.parameters()).device
    keep = sensitive_mask(_predict(loaded.model, images.to(dev)), labels.to(dev), cfg.margin).cpu()
    chosen = [r for r, k in zip(refs, keep.tolist()) if k]
    targets = [Path(cfg.out) / safe_label_name(loaded.labels[r.label]) / r.path.name for r in chosen]
    clash = [t for t in targets if t.exists()]
    if clash:
        raise InputDataError(f"{clash[0]} already exists ({len(clash)} clashing file(s)); choose an empty --out folder "
                             "so nothing is overwritten")
    for r, t in zip(chosen, targets):
        with atomic_path(t) as tmp:
            shutil.copyfile(r.path, tmp)
    return {"images": len(refs), "selected": len(chosen), "margin": cfg.margin, "out": str(cfg.out),
            "model": loaded.name, "model_note": loaded.note, "skipped_bad_images": [{"path": str(b.path), "reason": b.reason} for b in bad]}
