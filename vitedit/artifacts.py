"""Artifacts on disk: atomic writes and safetensors files with a JSON provenance sidecar.

Every artifact vitedit writes (unit scores, patches, edited models, hypernetworks) is a
``NAME.safetensors`` file plus ``NAME.json`` beside it. The sidecar records the vitedit version, the
model it belongs to and whatever the producer adds; loading refuses an artifact made for another
model. Nothing is ever unpickled. Writes go to a temporary file in the same folder and are renamed
into place, so an interrupted run leaves the previous version intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import ArtifactError

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def portable_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` as a result file should record it: an absolute path inside ``root`` (default: the
    working directory) made relative to it, anything else as given. Committed outputs then name
    ``build/fashion/test-images``, not the folder of the machine that made them."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    base = Path(root) if root is not None else Path.cwd()
    for inner, outer in ((p, base), (p.resolve(), base.resolve())):
        try:
            return inner.relative_to(outer).as_posix()
        except ValueError:
            pass
    return str(p)


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{what} {path} not found; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} {path} is not valid JSON ({e}); delete it and rerun the step that makes it") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what} {path} does not hold a JSON object; delete it and rerun the step that makes it")
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar(path: str | os.PathLike) -> Path:
    """``x.safetensors`` -> ``x.json``."""
    return Path(path).with_suffix(".json")


def save_tensors(path: str | os.PathLike, tensors: dict[str, "torch.Tensor"], meta: dict) -> None:
    """Write ``tensors`` as safetensors and ``meta`` (plus the vitedit version) as the sidecar.

    The sidecar also records the sha256 of the tensor file so a mismatched pair is detected.
    """
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        digest = sha256_file(tmp)
        write_json(sidecar(path), {"vitedit_version": __version__, **meta, "sha256": digest})


def load_tensors(path: str | os.PathLike, what: str = "artifact") -> tuple[dict[str, "torch.Tensor"], dict]:
    """Load a safetensors file and its sidecar; raise ``ArtifactError`` on anything corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what} {path} not found")
    meta = read_json(sidecar(path), f"{what} sidecar") if sidecar(path).exists() else {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{what} {path} is not a readable safetensors file ({e}); "
                            "re-download or regenerate it") from None
    digest = meta.get("sha256")
    if digest and digest != sha256_file(path):
        raise ArtifactError(f"{what} {path} does not match the checksum in its sidecar "
                            f"{sidecar(path).name}; the pair was mixed up or the file changed")
    return tensors, meta


def check_model_match(meta: dict, model_id: dict, what: str, path: str | os.PathLike) -> None:
    """Refuse an artifact whose recorded model differs from ``model_id`` (name and weight hash)."""
    want_name, want_hash = model_id.get("name"), model_id.get("weights_sha256")
    got = meta.get("model") or {}
    got_name, got_hash = got.get("name"), got.get("weights_sha256")
    if got_name is None:
        raise ArtifactError(f"{what} {path} records no model; it was not made by vitedit")
    if got_name != want_name or (got_hash and want_hash and got_hash != want_hash):
        got_desc = f"{got_name} (weights {str(got_hash)[:12]})"
        want_desc = f"{want_name} (weights {str(want_hash)[:12]})"
        raise ArtifactError(f"{what} {path} was made for {got_desc}, not for the loaded model "
                            f"{want_desc}; use one made for this model or make a new one")
