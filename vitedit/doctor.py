"""`vitedit env`: versions, devices and paths for bug reports."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def environment() -> dict:
    from . import __version__
    from .hub import cache_dir
    from .models import DEFAULT_ASSETS

    info = {"vitedit": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "safetensors", "typer", "rich",
                "platformdirs", "huggingface_hub", "pillow"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    import torch

    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = "available" if mps is not None and mps.is_available() else "not available"
    info["torch threads"] = torch.get_num_threads()
    info["cache dir"] = str(cache_dir())
    info["embedded default model"] = str(DEFAULT_ASSETS) if (DEFAULT_ASSETS / "model.json").exists() else "missing"
    return info
