"""``vitedit export``: the edited (or base) model as one verified ONNX file or a timm folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..edit import Patch
from ..errors import UsageError, WorkspaceError
from ..imagesets import default_locality_dir
from ..models import LoadedModel, load_model
from ..workspace import Workspace
from .common import Progress, _failure_refs, _load_workspace_model, _noop

if TYPE_CHECKING:
    import torch


EXPORT_FORMATS = ("onnx", "timm")


@dataclass(frozen=True)
class ExportJob:
    out: Path                        # the .onnx file, or the folder for format "timm"
    workspace: Path = Path(".vitedit")
    base: bool = False
    config: object = None            # export.ExportConfig (format "onnx" only)
    model: str | None = None         # only for --base without a workspace
    weights: Path | None = None
    max_images: int = 64
    img_size: int | None = None      # only for --base --weights without a workspace
    format: str = "onnx"             # "onnx": one verified .onnx file; "timm": a timm local-dir: folder

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise UsageError(f"--format {self.format!r}: choose {' or '.join(EXPORT_FORMATS)}")


def _example_images(loaded: LoadedModel, ws: Workspace, max_images: int) -> "torch.Tensor":
    """Real preprocessed images to verify the export on: the workspace's failures, else bundled ones."""
    from ..data import load_tensors as load_images, scan_unlabeled

    if ws.exists:
        refs = _failure_refs(ws, ws.state(), limit=max_images)
    elif default_locality_dir(loaded) is not None:
        refs = scan_unlabeled(default_locality_dir(loaded))[:max_images]
    else:
        raise WorkspaceError(f"no images to verify the export on: run `vitedit locate FAILURES --workspace {ws.root}` first")
    images, _, _ = load_images(refs, loaded.transform, loaded.channels)
    return images


def run_export(job: ExportJob, progress: Progress = _noop) -> dict:
    ws = Workspace(job.workspace)
    if job.format == "timm":
        from ..timm_export import check_target

        check_target(job.out)  # before any model is loaded
    if job.base and not ws.exists:
        loaded = load_model(job.model, weights=job.weights, device="cpu", img_size=job.img_size)
        patch_meta = None
        examples = _example_images(loaded, ws, job.max_images)
    else:
        if job.model is not None or job.weights is not None or job.img_size is not None:
            raise UsageError("--model/--weights/--img-size only apply to `export --base` without a workspace; the workspace "
                             "already names its model")
        with ws.lock():
            state = ws.state()
            loaded = _load_workspace_model(ws, state, "cpu")
            examples = _example_images(loaded, ws, job.max_images)
            patch_meta = None
            from .history import sync

            sync(ws, loaded)  # the combined patch holds the whole edit history
            if not job.base:
                patch, patch_meta = Patch.load(ws.require("patch.safetensors", "apply"), loaded.identity)
                patch.apply(loaded.model)  # our own freshly loaded copy
    if job.format == "timm":
        return _export_timm(job, loaded, examples, patch_meta, progress)
    from ..export import ExportConfig, export_onnx, preprocessing_metadata

    config = job.config or ExportConfig()
    meta = preprocessing_metadata(loaded.data_config, loaded.labels, loaded.channels, extra={
        "vitedit.version": __version__, "vitedit.model": loaded.name,
        "vitedit.base_weights_sha256": loaded.identity["weights_sha256"],
        "vitedit.edited": "false" if patch_meta is None else "true",
        "vitedit.patch_sha256": "" if patch_meta is None else patch_meta.get("sha256", ""),
        "vitedit.sparsity": "" if patch_meta is None else str(patch_meta.get("sparsity", "")),
    })
    progress("exporting to ONNX", 0, 1)
    res = export_onnx(loaded.model, Path(job.out), examples, metadata=meta, config=config)
    progress("exporting to ONNX", 1, 1)
    return {"format": "onnx", "path": str(res.path), "base": patch_meta is None, "opset": res.opset,
            "exporter": res.exporter,
            "max_abs_diff": res.max_abs_diff, "top1_agreement": res.top1_agreement, "num_checked": res.num_checked,
            "atol": config.atol, "model": loaded.name, "model_note": loaded.note}


def _export_timm(job: ExportJob, loaded: LoadedModel, examples: "torch.Tensor", patch_meta: dict | None,
                 progress: Progress) -> dict:
    """The model as a folder timm loads with ``local-dir:``, verified bit-identical on ``examples``."""
    from ..timm_export import export_timm

    provenance = {"vitedit_version": __version__, "model": loaded.name,
                  "base_weights_sha256": loaded.identity["weights_sha256"], "edited": patch_meta is not None,
                  "patch_sha256": None if patch_meta is None else patch_meta.get("sha256"),
                  "sparsity": None if patch_meta is None else patch_meta.get("sparsity"),
                  "input_size": list(loaded.data_config["input_size"]), "model_note": loaded.note}
    progress("exporting a timm folder", 0, 1)
    res = export_timm(loaded.model, Path(job.out), examples, labels=loaded.labels, data_config=loaded.data_config,
                      provenance=provenance, source_checkpoint=loaded.source == "timm")
    progress("exporting a timm folder", 1, 1)
    return {"format": "timm", "path": str(res.path), "base": patch_meta is None, "files": list(res.files),
            "max_abs_diff": res.max_abs_diff, "top1_agreement": res.top1_agreement, "num_checked": res.num_checked,
            "model": loaded.name, "model_note": loaded.note, "load_with": f"timm.create_model('local-dir:{res.path}', "
            "pretrained=True)"}
