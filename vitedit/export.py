"""ONNX export of a (possibly edited) ViT, verified against PyTorch before it is kept.

This module owns one promise: a file at ``out`` is a single self-contained ``.onnx`` (weights
embedded, no ``.onnx.data`` beside it) that passed ``onnx.checker`` and whose onnxruntime logits
matched PyTorch on real preprocessed images - max absolute logit difference within ``atol`` and
the same top-1 class for every image. The graph takes ``pixel_values`` (N, C, H, W) float32 and
returns ``logits`` (N, num_classes), with a dynamic batch axis; its ``metadata_props`` carry the
preprocessing (see :func:`preprocessing_metadata`) so the file can be used without vitedit.

The exporter works in a temporary folder; the single file is written beside ``out`` under a
temporary name and only renamed into place once verified, so a failing export never replaces a
good one. A file that fails verification is kept as
``<out stem>.failed.onnx`` for inspection.

Exporters: ``torch.onnx.export(dynamo=True)`` (the default since torch 2.9) first. If it raises,
or cannot produce the requested opset (it silently keeps opset 18 when asked for less, and
writes an invalid graph above what its version converter supports), the TorchScript exporter
(``dynamo=False``) is tried where this torch still has it. The result names the exporter used
and why the first one was not.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from .artifacts import atomic_path
from .errors import ArtifactError, InputDataError, ModelError, UsageError, VerificationError

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
MIN_OPSET = 13
METADATA_PREFIX = "vitedit."

Progress = Callable[[str], None]

# Loggers the exporters chat on (version-converter tracebacks, "setting opset to 18" warnings).
# We detect and report those outcomes ourselves, so they are quietened while exporting.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")


def max_supported_opset() -> int:
    """Highest default-domain opset the installed ``onnx`` package knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


@dataclass(frozen=True)
class ExportConfig:
    """How to export and how strictly to verify. Validated on construction.

    ``atol`` bounds the max absolute difference between onnxruntime and PyTorch logits. With
    ``dynamic_batch=False`` the graph is fixed to the batch size of the example.
    """

    opset: int = 18
    atol: float = 1e-4
    dynamic_batch: bool = True

    def __post_init__(self) -> None:
        highest = max_supported_opset()
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= highest:
            raise UsageError(f"--opset {self.opset!r} is not supported; use an integer from {MIN_OPSET} to "
                             f"{highest} (the default 18 is the safest)")
        if (isinstance(self.atol, bool) or not isinstance(self.atol, (int, float))
                or not math.isfinite(self.atol) or self.atol < 0):
            raise UsageError(f"--atol {self.atol!r} is not a valid tolerance; use a finite number >= 0, e.g. 1e-4")
        if not isinstance(self.dynamic_batch, bool):
            raise UsageError(f"dynamic_batch must be true or false, not {self.dynamic_batch!r}")


@dataclass(frozen=True)
class ExportResult:
    """What was written and how well it matched PyTorch.

    ``num_checked`` is the number of distinct images compared; ``top1_agreement`` the fraction of
    them whose onnxruntime top-1 class equals PyTorch's in every batch size run (the example batch
    and, with a dynamic axis, one other batch size). ``max_abs_diff`` is over all runs.
    ``exporter`` is ``"dynamo"`` or ``"torchscript"``; ``fallback_reason`` says why dynamo was not
    used (empty when it was).
    """

    path: Path
    opset: int
    max_abs_diff: float
    top1_agreement: float
    num_checked: int
    ok: bool
    exporter: str
    fallback_reason: str = ""


def export_onnx(
    model: "torch.nn.Module",
    out: str | os.PathLike,
    example: "torch.Tensor",
    *,
    metadata: Mapping[str, str],
    config: ExportConfig | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export ``model`` to one verified ``.onnx`` file at ``out``; see the module docstring.

    ``example`` holds real preprocessed images (N, C, H, W), N >= 1, on any device; the model is
    run as is on its own device and left exactly as it was given (parameters and train/eval mode
    of every submodule; it is put in eval mode only while exporting). ``metadata`` values must be
    strings (build them with :func:`preprocessing_metadata`). ``config`` defaults to
    ``ExportConfig()`` (built on call: constructing one imports onnx to learn the highest opset).

    Raises ``VerificationError`` (file kept as ``*.failed.onnx``) when the checker, onnxruntime or
    the comparison fails, ``UsageError`` when no exporter can produce ``config.opset``,
    ``ModelError`` when the model cannot be exported, and ``InputDataError`` for an unusable
    example batch. A stale ``*.failed.onnx`` from an earlier run is removed once ``out`` verifies.
    """
    config = config if config is not None else ExportConfig()
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"the ONNX output {out} is a folder; give a file path such as {out / 'model.onnx'}")
    say = progress or (lambda _msg: None)
    meta = _check_metadata(metadata)
    example = _check_example(example)
    _check_metadata_against_example(example, meta)

    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        example = example.to(_model_device(model))
        runs = _reference_runs(model, example, config.dynamic_batch)
        _check_labels(meta, runs[0].expected.shape[1])

        with tempfile.TemporaryDirectory(prefix="vitedit-export-") as workdir:
            proto, opset, exporter, fallback_reason = _export_any(model, example, config, Path(workdir), say)
            _set_metadata(proto, meta)
            with atomic_path(out) as tmp:
                _save_single_file(proto, tmp)
                del proto
                failed = out.with_suffix(".failed.onnx")
                try:
                    say("checking the ONNX graph (onnx.checker, full check)")
                    _run_checker(tmp)
                    say(f"comparing onnxruntime with PyTorch on {example.shape[0]} image(s)")
                    max_abs_diff, agreement = _compare(tmp, runs, int(example.shape[0]))
                except VerificationError as e:
                    os.replace(tmp, failed)
                    raise VerificationError(f"{e}; the failed export is kept at {failed} for inspection and "
                                            f"{out} was not written") from None
                ok = agreement == 1.0 and max_abs_diff <= config.atol  # False for NaN too
                if not ok:
                    os.replace(tmp, failed)
                    raise VerificationError(
                        f"ONNX export does not match PyTorch: max abs logit difference {max_abs_diff:.3g} "
                        f"(tolerance --atol {config.atol:g}), top-1 agreement {agreement:.1%} on "
                        f"{example.shape[0]} image(s); kept the file at {failed} for inspection and did not "
                        f"write {out}; try another --opset or report the model")
                if failed.exists():
                    failed.unlink()  # a stale failure from an earlier run would now mislead
    finally:
        for module, training in modes:
            module.training = training

    return ExportResult(path=out, opset=opset, max_abs_diff=max_abs_diff, top1_agreement=agreement,
                        num_checked=int(example.shape[0]), ok=True, exporter=exporter,
                        fallback_reason=fallback_reason)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... depending on the damage
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(e).__name__}); export it again") from None
    return {prop.key: prop.value for prop in proto.metadata_props}


def preprocessing_metadata(
    data_config: Mapping,
    labels: Sequence[str],
    channels: int,
    extra: Mapping | None = None,
) -> dict[str, str]:
    """The ``vitedit.*`` metadata that lets anyone preprocess images for the exported file.

    ``data_config`` is timm's ``resolve_model_data_config`` output (input_size, interpolation,
    mean, std, crop_pct, crop_mode); ``channels`` is the model's input channel count and must agree
    with it. ``extra`` items (model name, edited, patch sha256, ...) are added under the
    ``vitedit.`` prefix: strings as is, booleans as ``true``/``false``, lists and dicts as JSON.
    ``vitedit.version`` is filled in unless ``extra`` gives it.
    """
    from . import __version__

    declared, height, width = _input_size(data_config)
    mean = [float(v) for v in data_config["mean"]]
    std = [float(v) for v in data_config["std"]]
    if declared is not None and declared != channels:
        raise ModelError(f"the data config says {declared} input channels but the model takes {channels}; "
                         "resolve the data config from the model itself")
    if len(mean) != channels or len(std) != channels:
        raise ModelError(f"the data config has {len(mean)} mean and {len(std)} std values for a {channels}-channel "
                         "model; give one per channel")
    interpolation = str(data_config.get("interpolation") or "bilinear")
    crop_pct = float(data_config.get("crop_pct") or 0.875)  # timm's default when unset
    crop_mode = str(data_config.get("crop_mode") or "center")

    meta = {
        "vitedit.version": __version__,
        "vitedit.input_size": f"{channels},{height},{width}",
        "vitedit.channels": str(channels),
        "vitedit.mean": json.dumps(mean),
        "vitedit.std": json.dumps(std),
        "vitedit.interpolation": interpolation,
        "vitedit.crop_pct": repr(crop_pct),
        "vitedit.crop_mode": crop_mode,
        "vitedit.labels": json.dumps([str(label) for label in labels], ensure_ascii=False),
        "vitedit.preprocessing": _describe_preprocessing(channels, height, width, interpolation, crop_pct,
                                                         crop_mode, mean, std),
    }
    for key, value in (extra or {}).items():
        key = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        meta[key] = _stringify(value)
    return meta


# --- metadata helpers -------------------------------------------------------------------------


def _input_size(data_config: Mapping) -> tuple[int | None, int, int]:
    size = data_config["input_size"]
    if isinstance(size, int):
        return None, size, size
    size = tuple(int(v) for v in size)
    if len(size) == 3:
        return size[0], size[1], size[2]
    if len(size) == 2:
        return None, size[0], size[1]
    raise ModelError(f"the data config input_size {size!r} is not (C, H, W); resolve it with timm")


def _describe_preprocessing(channels: int, height: int, width: int, interpolation: str, crop_pct: float,
                            crop_mode: str, mean: list[float], std: list[float]) -> str:
    """One sentence mirroring timm's eval transform (``transforms_imagenet_eval``)."""
    if channels == 1:
        convert = "convert to L (1 channel)"
    elif channels == 3:
        convert = "convert to RGB (3 channels)"
    else:
        convert = f"use {channels} channels"
    scale_h, scale_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    crop = f"center-crop {height}x{width}"
    if crop_mode == "squash":
        resize = f"resize to {scale_h}x{scale_w} with {interpolation} (aspect ratio not kept), {crop}"
    elif crop_mode == "border":
        resize = (f"resize the longer side to fit {scale_h}x{scale_w} with {interpolation}, "
                  f"{crop} padding with the mean colour")
    elif scale_h == scale_w:
        resize = f"resize shorter side to {scale_h} with {interpolation}, {crop}"
    else:
        resize = f"resize keeping aspect ratio to cover {scale_h}x{scale_w} with {interpolation}, {crop}"

    def fmt(values: list[float]) -> str:
        return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"

    return f"{convert}, {resize}, scale to [0,1], subtract mean {fmt(mean)} and divide by std {fmt(std)}"


def _stringify(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"ONNX metadata keys and values must be str; not for {bad!r} (use preprocessing_metadata)")
    return dict(metadata)


def _check_labels(meta: Mapping[str, str], num_classes: int) -> None:
    if "vitedit.labels" not in meta:
        return
    labels = json.loads(meta["vitedit.labels"])
    if len(labels) != num_classes:
        raise ModelError(f"the metadata lists {len(labels)} class names but the model has {num_classes} outputs; "
                         "pass the model's own class names")


def _check_metadata_against_example(example: "torch.Tensor", meta: Mapping[str, str]) -> None:
    """The file must not describe inputs its graph does not take."""
    declared = meta.get("vitedit.input_size")
    actual = ",".join(str(d) for d in example.shape[1:])
    if declared is not None and declared.replace(" ", "") != actual:
        raise ModelError(f"the metadata says input size {declared} but the example images are {actual}; "
                         "resolve the data config from the model (its patch_embed img_size and in_chans)")


def _check_example(example: "torch.Tensor") -> "torch.Tensor":
    import torch

    if not isinstance(example, torch.Tensor) or example.ndim != 4 or example.shape[0] < 1:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise InputDataError(f"ONNX verification needs a batch of images shaped (N, C, H, W) with N >= 1, "
                             f"got {shape}; give it at least one preprocessed image")
    if not example.is_floating_point():
        raise InputDataError(f"the example images are {example.dtype}, not float; preprocess them "
                             "(scale and normalize) before export")
    return example.detach().float()


def _model_device(model: "torch.nn.Module") -> "torch.device":
    import torch

    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


# --- export ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence exporter warnings and log chatter (we report the outcomes ourselves); restore after."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in _NOISY_LOGGERS]
    try:
        for logger, _ in saved:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at the null device for the duration.

    The TorchScript exporter dumps its whole IR graph to C++ stdout when it fails (and a torch bug
    leaves its ONNX log switched on afterwards); a CLI whose stdout carries JSON cannot have that.
    """
    import torch

    is_on = getattr(torch._C, "_jit_is_onnx_log_enabled", None)
    set_on = getattr(torch._C, "_jit_set_onnx_log_enabled", None)
    log_was_on = is_on() if callable(is_on) and callable(set_on) else None
    _flush_c_stdout()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to protect
        saved = None
    if saved is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    try:
        yield
    finally:
        _flush_c_stdout()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        if log_was_on is not None:
            set_on(log_was_on)


def _flush_c_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library handle on this platform
        pass


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _export_any(model: "torch.nn.Module", example: "torch.Tensor", config: ExportConfig, workdir: Path,
                say: Progress) -> tuple["onnx.ModelProto", int, str, str]:
    """Try dynamo, then TorchScript; return the loaded single-file proto, opset, exporter, reason."""
    import inspect

    import torch

    # A dynamic batch axis is traced from a batch of >= 2 (torch.export specializes size 1).
    if config.dynamic_batch:
        trace = example[:2] if example.shape[0] >= 2 else example.repeat(2, 1, 1, 1)
    else:
        trace = example
    has_dynamo_switch = "dynamo" in inspect.signature(torch.onnx.export).parameters

    problems: list[str] = []  # "<exporter>: <what went wrong>"
    wrong_opset = False
    attempts = ("dynamo", "torchscript") if has_dynamo_switch else ("torchscript",)
    for exporter in attempts:
        say(f"exporting with the {exporter} ONNX exporter (opset {config.opset})")
        target = workdir / exporter / "model.onnx"
        target.parent.mkdir()
        try:
            with _quiet_exporters():
                if exporter == "dynamo":
                    _export_dynamo(model, trace, target, config)
                else:
                    with _stdout_silenced():
                        _export_torchscript(model, trace, target, config, has_dynamo_switch)
            proto = _load_complete(target)
        except Exception as e:  # exporters raise many unrelated types; we report and try the next
            problems.append(f"{exporter}: {_first_line(e)}")
            log.debug("%s exporter failed", exporter, exc_info=True)
            continue
        opset = _default_opset(proto)
        if opset != config.opset:
            wrong_opset = True
            problems.append(f"{exporter}: produced opset {opset}, not {config.opset}")
            continue
        reason = "; ".join(problems)
        if reason:
            say(f"used the {exporter} exporter because {reason}")
        return proto, opset, exporter, reason

    detail = "; ".join(problems)
    if wrong_opset:
        raise UsageError(f"--opset {config.opset} cannot be produced by torch {torch.__version__}'s ONNX exporters "
                         f"for this model ({detail}); use --opset 18")
    raise ModelError(f"ONNX export failed ({detail}); try another --opset, or report the model and "
                     f"torch {torch.__version__}")


def _export_dynamo(model: "torch.nn.Module", trace: "torch.Tensor", target: Path, config: ExportConfig) -> None:
    import torch

    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if config.dynamic_batch else None
    program = torch.onnx.export(
        model, (trace,), str(target), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes, opset_version=config.opset, verbose=False, report=False,
        artifacts_dir=str(target.parent),
    )
    if not target.exists() and program is not None:  # older torch returned the program unsaved
        program.save(str(target))


def _export_torchscript(model: "torch.nn.Module", trace: "torch.Tensor", target: Path, config: ExportConfig,
                        has_dynamo_switch: bool) -> None:
    import torch

    kwargs = {"dynamo": False} if has_dynamo_switch else {}
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if config.dynamic_batch else None
    torch.onnx.export(model, (trace,), str(target), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes=dynamic_axes, opset_version=config.opset, do_constant_folding=True, **kwargs)


def _load_complete(path: Path) -> "onnx.ModelProto":
    """Load an exported model with any ``.onnx.data`` weights pulled into the proto."""
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    outputs = [o.name for o in proto.graph.output]
    if names != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise RuntimeError(f"exported graph has inputs {names} and outputs {outputs}, "
                           f"not [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
    return proto


def _default_opset(proto: "onnx.ModelProto") -> int:
    versions = [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else -1


def _set_metadata(proto: "onnx.ModelProto", meta: Mapping[str, str]) -> None:
    existing = {prop.key: prop.value for prop in proto.metadata_props}
    existing.update(meta)
    del proto.metadata_props[:]
    for key, value in existing.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _save_single_file(proto: "onnx.ModelProto", path: Path) -> None:
    import onnx

    try:
        onnx.save_model(proto, str(path), save_as_external_data=False)
    except ValueError as e:  # protobuf cannot serialize a message over 2 GiB
        raise ModelError(f"the model is too large for a single-file ONNX ({_first_line(e)}); "
                         "export a smaller model") from None
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise VerificationError(f"weights {external[:3]} still point to an external data file; "
                                "the export is not self-contained")


# --- verification ---------------------------------------------------------------------------------


def _run_checker(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerificationError(f"onnx.checker rejects the exported graph ({_first_line(e)})") from None


def _onnxruntime_logits(session, images: "np.ndarray") -> "np.ndarray":
    """One onnxruntime run; a seam for tests that simulate a broken export."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


@dataclass(frozen=True)
class _Run:
    """One batch to compare: images (B, C, H, W), which example image each row shows, PyTorch logits."""

    images: "np.ndarray"
    rows: "np.ndarray"
    expected: "np.ndarray"


def _reference_runs(model: "torch.nn.Module", example: "torch.Tensor", dynamic_batch: bool) -> list[_Run]:
    """PyTorch logits for the example batch and, with a dynamic axis, a batch of another size.

    The other size proves the axis is real: the first image alone, or it repeated twice when the
    example has one image. Computed in full fp32 (no TF32 on CUDA), as onnxruntime runs on CPU.
    """
    import numpy as np
    import torch

    n = example.shape[0]
    batches = [(example, np.arange(n))]
    if dynamic_batch:
        batches.append((example.repeat(2, 1, 1, 1), np.zeros(2, dtype=int)) if n == 1
                       else (example[:1], np.zeros(1, dtype=int)))
    runs = []
    with _exact_fp32(example.device), torch.inference_mode():
        for images, rows in batches:
            logits = model(images)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != images.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ModelError(f"the model returns {shape} for {images.shape[0]} image(s), not logits shaped "
                                 "(batch, classes); export a classifier (num_classes > 0)")
            runs.append(_Run(images=images.float().cpu().numpy(), rows=rows,
                             expected=logits.float().cpu().numpy()))
    return runs


@contextlib.contextmanager
def _exact_fp32(device: "torch.device") -> Iterator[None]:
    """Turn TF32 off on CUDA for the duration (it differs from onnxruntime's CPU fp32 by ~1e-3)."""
    import torch

    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]


def _compare(path: Path, runs: Sequence[_Run], num_images: int) -> tuple[float, float]:
    """Max abs logit difference and top-1 agreement of onnxruntime vs PyTorch over ``runs``.

    An image agrees only if its top-1 class matches in every run it appears in.
    """
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise VerificationError(f"onnxruntime cannot load the export ({_first_line(e)})") from None

    max_abs_diff = 0.0
    agrees = np.ones(num_images, dtype=bool)
    for run in runs:
        try:
            got = _onnxruntime_logits(session, run.images)
        except Exception as e:  # a graph that loads may still fail at run time (bad shapes, ...)
            raise VerificationError(f"onnxruntime failed on a batch of {run.images.shape[0]} "
                                    f"({_first_line(e)})") from None
        if got.shape != run.expected.shape:
            raise VerificationError(f"onnxruntime returned logits of shape {got.shape}, "
                                    f"PyTorch {run.expected.shape}")
        diff = float(np.max(np.abs(got.astype(np.float64) - run.expected.astype(np.float64))))
        if math.isnan(diff):
            return diff, 0.0
        max_abs_diff = max(max_abs_diff, diff)
        np.logical_and.at(agrees, run.rows, got.argmax(axis=1) == run.expected.argmax(axis=1))
    return max_abs_diff, float(agrees.mean())
