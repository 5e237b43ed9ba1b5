"""Export to a timm model folder: the edited model back in the timm ecosystem, verified before it is kept.

This module owns one promise: a folder at ``out`` loads with
``timm.create_model("local-dir:" + out, pretrained=True)`` as the same model, with its class names
and preprocessing, and that reloaded model gave logits bit-identical to the given model's on real
preprocessed images before the folder was put in place.

The layout is the one timm's own ``timm.models.save_for_hf`` (and ``push_to_hf_hub``) writes, and is
written by it: ``config.json`` (``architecture``, ``num_classes``, ``label_names``, ``model_args`` with
the non-default constructor arguments such as ``img_size``/``patch_size``/``in_chans``, and
``pretrained_cfg`` with ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ...) and
``model.safetensors`` (the native state dict). Beside them vitedit writes ``vitedit.json``: its
version, the model's name, the base weights' hash, whether and how it was edited, and the sha256 of
each file.

The folder is built and verified under a temporary name beside ``out`` and renamed into place. An
existing ``out`` is replaced only when it is empty or a previous vitedit timm export; anything else
is refused, so a folder of the user's is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from .artifacts import _umask, sha256_file, write_json
from .errors import ModelError, UsageError, VerificationError

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PROVENANCE = "vitedit.json"
KIND = "timm-export"
FILES = (CONFIG, WEIGHTS, PROVENANCE)

# pretrained_cfg fields that describe the architecture's default checkpoint, not these weights. They
# are dropped unless the weights are that checkpoint (possibly edited), i.e. loaded by timm name.
SOURCE_FIELDS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "description")
# Preprocessing fields the reloaded model must give back exactly.
DATA_FIELDS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TimmExportResult:
    """What was written and how the reloaded folder compared with the given model.

    ``max_abs_diff`` is the largest |reloaded - given| logit difference over the ``num_checked``
    images (0.0: bit-identical, which the export requires); ``top1_agreement`` the share of them
    with the same top-1 class.
    """

    path: Path
    files: tuple[str, ...]
    max_abs_diff: float
    top1_agreement: float
    num_checked: int


def export_timm(
    model: "torch.nn.Module",
    out: str | os.PathLike,
    examples: "torch.Tensor",
    *,
    labels: Sequence[str],
    data_config: Mapping,
    provenance: Mapping,
    source_checkpoint: bool = False,
    progress: Progress | None = None,
) -> TimmExportResult:
    """Write ``model`` as a timm folder at ``out`` and verify it; see the module docstring.

    ``examples`` are real preprocessed images (N, C, H, W), N >= 1. ``labels`` and ``data_config``
    (timm's resolved data config) are what the folder records; ``provenance`` goes into
    ``vitedit.json``. ``source_checkpoint`` keeps the source checkpoint's tag and licence in the
    config (true when the weights came from timm under the model's own name). The model is left as
    given (its train/eval mode included).

    Raises ``UsageError`` when ``out`` is a file or a non-empty folder that is not a previous export,
    ``ModelError`` when timm cannot describe the model, and ``VerificationError`` when the reloaded
    folder differs (nothing is left at ``out`` then, and a previous export there is kept).
    """
    out = Path(out)
    say = progress or (lambda _msg: None)
    check_target(out)
    if examples.ndim != 4 or examples.shape[0] < 1:
        raise ModelError(f"need at least one example image (N, C, H, W) to verify the export, got {tuple(examples.shape)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        say("writing config.json and model.safetensors with timm's save_for_hf")
        _write_folder(model, tmp, list(labels), data_config, source_checkpoint)
        write_json(tmp / PROVENANCE, {**provenance, "kind": KIND, "format": "timm",
                                      "files": {name: sha256_file(tmp / name) for name in (CONFIG, WEIGHTS)}})
        say("loading it back with timm.create_model('local-dir:...') and comparing logits")
        max_abs_diff, top1 = _verify(model, tmp, examples, list(labels), data_config)
        mask = _umask()  # mkdtemp makes 0700 (and safetensors may write 0600); give the usual permissions
        os.chmod(tmp, 0o777 & ~mask)
        for name in FILES:
            os.chmod(tmp / name, 0o666 & ~mask)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return TimmExportResult(out, FILES, max_abs_diff, top1, int(examples.shape[0]))


def is_timm_export(folder: str | os.PathLike) -> bool:
    """True for a folder written by :func:`export_timm` (its ``vitedit.json`` says so)."""
    try:
        meta = json.loads((Path(folder) / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == KIND


# ----------------------------------------------------------------------------- helpers


def check_target(out: str | os.PathLike) -> None:
    """Refuse an ``out`` that an export may not replace (a file, or a folder of the user's)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"the timm export {out} is a file; give a folder path (e.g. {out.with_suffix('')}-timm), "
                         "or use --format onnx for a .onnx file")
    if out.is_dir() and any(out.iterdir()) and not is_timm_export(out):
        raise UsageError(f"{out} is a folder that is not empty and not a vitedit timm export; give a new or empty "
                         "folder, so nothing of yours is overwritten")


def _write_folder(model: "torch.nn.Module", folder: Path, labels: list[str], data_config: Mapping,
                  source_checkpoint: bool) -> None:
    from timm.models import save_for_hf

    try:
        save_for_hf(model, str(folder), model_config={"label_names": labels} if labels else None,
                    safe_serialization=True, data_config=dict(data_config))
    except (ValueError, TypeError, AttributeError) as e:
        raise ModelError(f"timm cannot describe {type(model).__name__} as a model folder ({e}); "
                         "export it with --format onnx instead") from None
    if not source_checkpoint:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        for key in SOURCE_FIELDS:
            config.get("pretrained_cfg", {}).pop(key, None)
        write_json(folder / CONFIG, config)


def _verify(model: "torch.nn.Module", folder: Path, examples: "torch.Tensor", labels: list[str],
            data_config: Mapping) -> tuple[float, float]:
    """Reload ``folder`` through timm and compare it with ``model``: logits, labels, preprocessing."""
    import timm
    import torch
    from timm.data import resolve_model_data_config

    try:
        reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as e:  # timm raises several types for a config or state dict it cannot use
        raise VerificationError(f"timm cannot load the exported folder back ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160] if str(e) else ''}); export with --format onnx "
                                "and report this") from None
    reloaded.eval()
    got_labels = list(reloaded.pretrained_cfg.get("label_names") or [])
    if labels and got_labels != labels:
        raise VerificationError(f"the exported folder gives back {len(got_labels)} class names that differ from "
                                f"the model's {len(labels)}; report this")
    got_data = resolve_model_data_config(reloaded)
    differs = [k for k in DATA_FIELDS if k in data_config and _norm(got_data.get(k)) != _norm(data_config[k])]
    if differs:
        k = differs[0]
        raise VerificationError(f"the exported folder gives back {k} {got_data.get(k)} instead of {data_config[k]}; "
                                "report this")
    device = next(model.parameters()).device
    x = examples.to(device)
    with _eval(model), torch.inference_mode():
        expected = model(x).float().cpu()
        got = reloaded.to(device)(x).float().cpu()
    if got.shape != expected.shape:
        raise VerificationError(f"the reloaded model returns logits of shape {tuple(got.shape)}, the model "
                                f"{tuple(expected.shape)}; report this")
    max_abs_diff = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
    top1 = float((got.argmax(-1) == expected.argmax(-1)).float().mean()) if got.ndim == 2 and got.shape[1] else 1.0
    if not torch.equal(got, expected):
        raise VerificationError(f"the model reloaded from the timm folder differs from the model (max abs logit "
                                f"difference {max_abs_diff:.3g}, top-1 agreement {100 * top1:.1f}%); it must be "
                                "bit-identical; export with --format onnx and report this")
    return max_abs_diff, top1


def _norm(value):
    """Tuples and lists compare equal; numbers as floats."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


@contextlib.contextmanager
def _eval(model: "torch.nn.Module") -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; a previous export (or empty folder) there is moved aside first and
    removed once the new folder is in place, or restored if the rename fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old)
