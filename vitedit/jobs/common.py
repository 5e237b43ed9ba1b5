"""What every job shares: the progress callback type, model options, the workspace's model and
failures, the seeded edit/held-out split and the embedded model's hypernetwork (its bundled image sets
are ``vitedit.imagesets``'s, re-exported here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..artifacts import sha256_file
from ..device import resolve_device
from ..errors import ModelError, UsageError, WorkspaceError
from ..models import DEFAULT_ASSETS, DEFAULT_MODEL, LoadedModel, load_model
from ..workspace import Workspace

if TYPE_CHECKING:
    import torch

    from ..data import ImageBatches, ImageRef

Progress = Callable[..., None]  # (description, done, total[, info: str])
DEFAULT_SPARSITIES = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)


def _noop(*_args) -> None:
    pass


@dataclass(frozen=True)
class ModelOptions:
    name: str | None = None          # None: the embedded default
    weights: Path | None = None
    labels: Path | None = None
    device: str = "auto"
    offline: bool | None = None
    img_size: int | None = None      # with weights: the image size they were trained at (None: read from them)

    def __post_init__(self) -> None:
        if self.img_size is not None and self.weights is None:
            raise UsageError("--img-size applies to a --weights file (the size it was trained at); drop it, "
                             "or pass --model NAME --weights FILE")
        if self.img_size is not None and self.img_size < 1:
            raise UsageError(f"--img-size {self.img_size}: give the image side in pixels, e.g. --img-size 224")


def _check_max_drop(d: float) -> None:
    if not d >= 0:
        raise UsageError(f"--max-accuracy-drop {d}: give the accuracy points an edit may lose, >= 0, e.g. 0.5")


def _check_holdout(h: float) -> None:
    if not 0.0 <= h < 1.0:
        raise UsageError(f"--holdout {h}: give the share of failures kept out of the edit, in [0, 1), e.g. 0.3")


def _load_workspace_model(ws: Workspace, state: dict, device: str) -> LoadedModel:
    spec = state["model"]
    try:
        loaded = load_model(spec["name"], weights=Path(spec["weights"]) if spec.get("weights") else None,
                            labels_file=Path(spec["labels_file"]) if spec.get("labels_file") else None,
                            device=resolve_device(device), img_size=spec.get("img_size"))
    except ModelError as e:
        raise WorkspaceError(f"the workspace {ws.root} was made for {spec['name']}"
                             f"{' with ' + spec['weights'] if spec.get('weights') else ''}, which no longer loads ({e}); "
                             "rerun `vitedit locate` or use another --workspace") from None
    if loaded.weights_sha256 != spec["weights_sha256"]:
        raise WorkspaceError(
            f"the workspace {ws.root} was made for {spec['name']} (weights {spec['weights_sha256'][:12]}) but the model "
            f"loaded now has weights {loaded.weights_sha256[:12]}; rerun `vitedit locate` or use another --workspace")
    return loaded


def _load_labeled(root: Path, loaded: LoadedModel, skip_bad: bool, progress: Progress, what: str):
    import torch

    from ..data import load_tensors as load_images, scan_labeled

    refs = scan_labeled(Path(root), loaded.labels)
    images, good, bad = load_images(refs, loaded.transform, loaded.channels, skip_bad=skip_bad,
                                    progress=lambda d, t: progress(f"loading {what}", d, t))
    labels = torch.tensor([r.label for r in good], dtype=torch.long)
    return images, labels, good, bad


def _image_batches(refs: Sequence["ImageRef"], loaded: LoadedModel, skip_bad: bool, progress: Progress,
                   what: str) -> "ImageBatches":
    """``refs`` as bounded-memory batches; bad images are found (and raised or skipped) up front."""
    from ..data import ImageBatches
    from ..evaluate import DEFAULT_BATCH

    return ImageBatches(refs, loaded.transform, loaded.channels, DEFAULT_BATCH, skip_bad=skip_bad,
                        progress=lambda d, t: progress(f"loading {what}", d, t))


def _stream(batches: "ImageBatches", device) -> Callable:
    """A ``TokenCache`` source: re-reads the images batch by batch each time it is called."""
    return lambda: (x.to(device) for x, _ in batches)


def _failure_refs(ws: Workspace, state: dict, limit: int | None = None) -> list["ImageRef"]:
    """The failing images recorded by ``locate`` (the first ``limit``), checked to be the same files.

    A file that was moved, deleted or changed since (sha256) is a ``WorkspaceError`` naming it.
    """
    from ..data import ImageRef

    entries = [state["images"][i] for i in state["failing"]][:limit]
    if any("sha256" not in e for e in entries):
        raise WorkspaceError(f"the workspace state {ws.root / 'workspace.json'} records no sha256 for some failing "
                             "images (it was edited or damaged); rerun `vitedit locate FAILURES`")
    missing, changed = [], []
    for e in entries:
        path = Path(e["path"])
        if not path.is_file():
            missing.append(path)
        elif sha256_file(path) != e["sha256"]:
            changed.append(path)
    for paths, what in ((missing, "is missing (moved, renamed or deleted)"), (changed, "has changed")):
        if paths:
            more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
            raise WorkspaceError(f"failure image {paths[0]}{more} {what} since `vitedit locate` recorded it in "
                                 f"{ws.root}; put it back or rerun `vitedit locate FAILURES`")
    return [ImageRef(Path(e["path"]), int(e["label"]), None) for e in entries]


def _predict(model, images: "torch.Tensor", batch: int = 256) -> "torch.Tensor":
    import torch

    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)]) if len(images) else \
            torch.empty(0)


def split_rows(n: int, holdout: float, seed: int, max_edit: int | None = None) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` failures into (edit rows, held-out rows); at least one edit row and at
    most ``max_edit`` (the rest is held out)."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = int(round(holdout * n))
    if max_edit is not None:
        n_hold = max(n_hold, n - max_edit)
    n_hold = min(n_hold, n - 1)
    return sorted(perm[n_hold:]), sorted(perm[:n_hold])


def default_hypernet_for(loaded: LoadedModel) -> Path | None:
    """The hypernetwork shipped with the embedded default model, if this installation has one."""
    if loaded.name == DEFAULT_MODEL and (DEFAULT_ASSETS / "hypernet.safetensors").exists():
        return DEFAULT_ASSETS / "hypernet.safetensors"
    return None
