"""Downloadable artifacts: the registry of published hypernetworks, the local cache, verified fetches.

A pretrained hypernetwork is a ``NAME.safetensors`` file plus its ``NAME.json`` provenance sidecar
(see ``vitedit.artifacts``). The registry (``vitedit/registry.json``, optionally extended by a user
registry) maps a short name to those files, each with a source URL and a sha256 digest. Integrity
checking is mandatory: every byte that enters the cache is hashed and compared with the pinned
digest, because huggingface_hub does not re-hash files and ``torch.hub`` only checks hashes that are
spelled in the file name.

Cache layout (content addressed, so two entries sharing a file share one copy)::

    <cache_dir>/artifacts/<sha256[:2]>/<sha256>/<filename>
    <cache_dir>/entries/<name>/<key>/<filename>   # a registry entry's files side by side

The second folder exists because a sidecar must sit beside its tensor file. Files are written to a
temporary name in the same folder and renamed into place only after their digest matched, so an
interrupted or corrupted download never leaves a file where the cache looks.

Sources: ``https://...`` (expected for published entries), ``http://...`` (accepted; the pinned
digest still guards integrity, and local tests serve over it), ``hf://owner/repo[@revision]/path``
(through ``huggingface_hub.hf_hub_download``) and ``file:///abs/path``.

Offline mode (``offline=True``, or ``HF_HUB_OFFLINE`` / ``VITEDIT_OFFLINE`` set to 1/true/yes/on)
serves cached files only. This module never prints; it reports progress through an optional
``progress(done_bytes, total_bytes | None)`` callback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .artifacts import atomic_path, sha256_file
from .errors import ArtifactError, DownloadError, UsageError

Progress = Optional[Callable[[int, Optional[int]], None]]

REGISTRY_VERSION = 1
URL_SCHEMES = ("https", "http", "hf", "file")
_TRUTHY = {"1", "true", "yes", "on"}
_CHUNK = 1 << 16
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# Entry names and file names are single path components: no separators, no leading dot, so a
# registry can never make us write outside the cache.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# Files whose digest was checked in this process, keyed by (path, sha256, size, mtime_ns): a file
# rewritten since (same path, new size or mtime) is hashed again.
_VERIFIED: set[tuple[str, str, int, int]] = set()


# --------------------------------------------------------------------------------------------------
# Locations and modes


def vitedit_home() -> Path | None:
    """``$VITEDIT_HOME`` as a path, or None when unset or empty."""
    home = os.environ.get("VITEDIT_HOME", "").strip()
    return Path(home).expanduser() if home else None


def cache_dir() -> Path:
    """``<VITEDIT_HOME>/cache`` if VITEDIT_HOME is set, else platformdirs' user cache dir; created on demand."""
    home = vitedit_home()
    if home is not None:
        path = home / "cache"
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("vitedit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_registry_path() -> Path:
    """``<VITEDIT_HOME>/registry.json`` if VITEDIT_HOME is set, else in platformdirs' user config dir."""
    home = vitedit_home()
    if home is not None:
        return home / "registry.json"
    import platformdirs

    return Path(platformdirs.user_config_dir("vitedit")) / "registry.json"


def is_offline(offline: bool | None = None) -> bool:
    """True if ``offline`` is True, or it is None and HF_HUB_OFFLINE or VITEDIT_OFFLINE is truthy."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(var, "").strip().lower() in _TRUTHY for var in ("HF_HUB_OFFLINE", "VITEDIT_OFFLINE"))


# --------------------------------------------------------------------------------------------------
# Registry


def _scheme(source: str) -> str | None:
    """``"https"`` for ``"https://..."``; None if ``source`` is not a URL we know."""
    head, sep, _ = source.partition("://")
    return head.lower() if sep and head.lower() in URL_SCHEMES else None


def _remote_problem(source: object, sha256: object, filename: object) -> str | None:
    """What is wrong with a remote file description, or None if it is usable."""
    if not isinstance(source, str) or _scheme(source) is None:
        return f"source {source!r} is not a URL starting with one of {', '.join(s + '://' for s in URL_SCHEMES)}"
    if _scheme(source) == "hf":
        try:
            _parse_hf(source)
        except ValueError as e:
            return str(e)
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        return f"sha256 {sha256!r} is not 64 hex characters"
    if not isinstance(filename, str) or not _NAME_RE.match(filename):
        return f"filename {filename!r} is not a plain file name (letters, digits, . _ + -; no folders)"
    return None


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: where it lives, the digest it must have, the name it gets on disk.

    ``source`` is ``https://...`` (expected for published entries), ``http://...``,
    ``hf://owner/repo[@revision]/path/in/repo`` or ``file:///abs/path``.
    """

    source: str
    sha256: str
    filename: str

    def __post_init__(self) -> None:
        problem = _remote_problem(self.source, self.sha256, self.filename)
        if problem:
            raise UsageError(f"cannot use remote file: {problem}; pass a full URL and --sha256 with 64 hex characters")
        object.__setattr__(self, "sha256", self.sha256.lower())


@dataclass(frozen=True)
class RegistryEntry:
    """A published artifact: its files (tensor file plus sidecar), the model it was trained for."""

    name: str
    files: tuple[RemoteFile, ...]
    base_model: str
    description: str

    @property
    def main_file(self) -> RemoteFile:
        """The ``.safetensors`` file (the registry guarantees exactly one)."""
        return next(f for f in self.files if f.filename.endswith(".safetensors"))


def _package_registry_text() -> tuple[str, str]:
    """(label, text) of the registry shipped inside the package."""
    from importlib.resources import files

    resource = files("vitedit").joinpath("registry.json")
    return str(resource), resource.read_text(encoding="utf-8")


def _parse_registry(text: str, where: str) -> dict[str, RegistryEntry]:
    """Validate a registry document; any problem is an ArtifactError naming ``where``."""

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"registry {where} is malformed: {problem}; fix or delete that file "
                             f'(expected {{"version": {REGISTRY_VERSION}, "artifacts": {{NAME: {{...}}}}}})')

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad("the top level is not a JSON object")
    if doc.get("version") != REGISTRY_VERSION:
        raise bad(f"version is {doc.get('version')!r}, this vitedit reads version {REGISTRY_VERSION}")
    artifacts = doc.get("artifacts")
    if not isinstance(artifacts, dict):
        raise bad('"artifacts" is missing or not an object')

    entries: dict[str, RegistryEntry] = {}
    for name, spec in artifacts.items():
        if not _NAME_RE.match(name):
            raise bad(f"artifact name {name!r} is not a plain name (letters, digits, . _ + -)")
        if not isinstance(spec, dict):
            raise bad(f"artifact {name!r} is not an object")
        base_model, description = spec.get("base_model"), spec.get("description", "")
        if not isinstance(base_model, str) or not base_model:
            raise bad(f"artifact {name!r} has no \"base_model\" string")
        if not isinstance(description, str):
            raise bad(f"artifact {name!r} has a \"description\" that is not a string")
        file_specs = spec.get("files")
        if not isinstance(file_specs, list) or not file_specs:
            raise bad(f"artifact {name!r} has no \"files\" list")
        remotes = []
        for i, f in enumerate(file_specs):
            if not isinstance(f, dict):
                raise bad(f"artifact {name!r} file #{i} is not an object")
            problem = _remote_problem(f.get("source"), f.get("sha256"), f.get("filename"))
            if problem:
                raise bad(f"artifact {name!r} file #{i}: {problem}")
            remotes.append(RemoteFile(f["source"], f["sha256"], f["filename"]))
        filenames = [r.filename for r in remotes]
        if len(set(filenames)) != len(filenames):
            raise bad(f"artifact {name!r} lists the same file name twice")
        if sum(fn.endswith(".safetensors") for fn in filenames) != 1:
            raise bad(f"artifact {name!r} must list exactly one .safetensors file")
        entries[name] = RegistryEntry(name, tuple(remotes), base_model, description)
    return entries


def load_registry(path: Path | None = None) -> dict[str, RegistryEntry]:
    """The shipped registry merged with the user registry (user entries win on equal names).

    ``path`` is the user registry file; by default ``<VITEDIT_HOME>/registry.json`` or
    ``registry.json`` in platformdirs' user config dir. A missing user registry is fine; a malformed
    one (or a malformed shipped one) raises ArtifactError naming the file.
    """
    label, text = _package_registry_text()
    entries = _parse_registry(text, label)
    user_path = Path(path) if path is not None else user_registry_path()
    if user_path.is_file():
        try:
            user_text = user_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"registry {user_path} cannot be read ({e}); fix its permissions or delete it") from None
        entries.update(_parse_registry(user_text, str(user_path)))
    return entries


# --------------------------------------------------------------------------------------------------
# Fetching


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    """``hf://owner/repo@rev/sub/file`` -> ``("owner/repo", "rev", "sub/file")``; revision optional."""
    rest = source[len("hf://"):]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"hf source {source!r} is not of the form hf://owner/repo[@revision]/path/in/repo")
    owner, repo_rev, filename = parts[0], parts[1], "/".join(parts[2:])
    repo, at, revision = repo_rev.partition("@")
    if not repo or (at and not revision):
        raise ValueError(f"hf source {source!r} has an empty repo or revision after '@'")
    return f"{owner}/{repo}", (revision if at else None), filename


def _local_path_from_file_url(source: str) -> Path:
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    parsed = urlparse(source)
    if parsed.netloc not in ("", "localhost"):
        raise DownloadError(f"{source} names another host; file:// sources must be local (file:///abs/path)")
    return Path(url2pathname(unquote(parsed.path)))


def _cached_path(remote: RemoteFile) -> Path:
    return cache_dir() / "artifacts" / remote.sha256[:2] / remote.sha256 / remote.filename


def _stat_key(path: Path, sha256: str) -> tuple[str, str, int, int]:
    st = path.stat()
    return (str(path), sha256, st.st_size, st.st_mtime_ns)


def _verified(path: Path, sha256: str) -> bool:
    """True if ``path`` holds bytes with digest ``sha256``; hashed at most once per process per version."""
    key = _stat_key(path, sha256)
    if key in _VERIFIED:
        return True
    if sha256_file(path) != sha256:
        return False
    _VERIFIED.add(key)
    return True


def _mismatch(remote: RemoteFile, actual: str) -> DownloadError:
    return DownloadError(
        f"{remote.source} has sha256 {actual[:12]}..., expected {remote.sha256[:12]}...: the download was "
        "corrupted or the source changed; nothing was cached. Retry, and if it persists check the pinned "
        "digest (--sha256 or the registry entry)")


def _remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove the now empty folders between ``path`` and ``stop`` left by a failed download."""
    for parent in path.parents:
        if parent == stop or stop not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return


def _download_http(remote: RemoteFile, dest: Path, progress: Progress, timeout: float) -> None:
    """Stream ``remote.source`` to a temp file beside ``dest``, hashing as it goes; rename if it matches."""
    import http.client
    import urllib.error
    import urllib.request

    from . import __version__

    url = remote.source
    fix = "check the network or use --offline with a cached copy"
    request = urllib.request.Request(url, headers={"User-Agent": f"vitedit/{__version__}"})
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        done, total = 0, None
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                done = _copy_hashing(response.read, out, digest, progress, total)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}; check the URL, or {fix}") from None
        except urllib.error.URLError as e:
            raise DownloadError(f"cannot reach {url} ({e.reason}); {fix}") from None
        except http.client.IncompleteRead as e:
            done = Path(tmp).stat().st_size if Path(tmp).exists() else 0  # what was written before the cut
            raise DownloadError(f"download of {url} was cut off after {done + len(e.partial)} of "
                                f"{total if total is not None else '?'} bytes; retry, or {fix}") from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise DownloadError(f"download of {url} failed ({type(e).__name__}: {e}); retry, or {fix}") from None
        except OSError as e:
            raise DownloadError(f"download of {url} into {dest.parent} failed ({e}); "
                                f"free disk space there or set VITEDIT_HOME to another folder, or {fix}") from None
        if total is not None and done != total:
            raise DownloadError(f"download of {url} was cut off after {done} of {total} bytes; retry, or {fix}")
        actual = digest.hexdigest()
        if actual != remote.sha256:
            raise _mismatch(remote, actual)


def _copy_hashing(read: Callable[[int], bytes], out, digest, progress: Progress, total: int | None) -> int:
    """Copy ``read``'s blocks into ``out``, hashing them into ``digest`` and reporting progress; the bytes copied."""
    done = 0
    if progress:
        progress(0, total)
    while block := read(_CHUNK):
        out.write(block)
        digest.update(block)
        done += len(block)
        if progress:
            progress(done, total)
    return done


def _copy_verified(src: Path, remote: RemoteFile, dest: Path, progress: Progress) -> None:
    """Copy ``src`` to ``dest`` atomically, hashing the bytes copied; refuse a digest mismatch."""
    try:
        total = src.stat().st_size
        with atomic_path(dest) as tmp:
            digest = hashlib.sha256()
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                _copy_hashing(fin.read, fout, digest, progress, total)
            actual = digest.hexdigest()
            if actual != remote.sha256:
                raise _mismatch(remote, actual)
    except FileNotFoundError:
        raise DownloadError(f"{remote.source}: {src} does not exist; check the path") from None
    except OSError as e:
        raise DownloadError(f"copying {src} into {dest.parent} failed ({e}); check permissions and free disk space") from None


def _download_hf(remote: RemoteFile, dest: Path, progress: Progress) -> None:
    """Fetch through huggingface_hub's own cache, then verify and copy into ours."""
    try:
        import huggingface_hub
        import huggingface_hub.errors as hf_errors
    except ImportError:
        raise DownloadError(f"{remote.source} needs huggingface_hub; pip install huggingface_hub") from None
    from . import __version__

    repo_id, revision, filename = _parse_hf(remote.source)
    hf_http_error = getattr(hf_errors, "HTTPError", OSError)  # httpx's base error in recent versions
    try:
        local = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                                library_name="vitedit", library_version=__version__)
    except (OSError, ValueError, hf_http_error) as e:
        raise DownloadError(f"cannot fetch {remote.source} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                            "check the repo, revision and path, the network, or use --offline with a cached copy") from None
    _copy_verified(Path(local), remote, dest, progress)


def _fetch(remote: RemoteFile, *, entry_name: str | None, offline: bool | None, progress: Progress,
           timeout: float) -> Path:
    dest = _cached_path(remote)
    corrupt = False
    if dest.is_file():
        if _verified(dest, remote.sha256):
            return dest
        dest.unlink()  # corrupted on disk: never serve it
        corrupt = True
    if is_offline(offline):
        state = "was corrupted in the cache (deleted)" if corrupt else "is not cached"
        what = f"{entry_name} ({remote.filename})" if entry_name else f"{remote.source}"
        how = f"run `vitedit pull {entry_name}`" if entry_name else "fetch it without --offline"
        raise DownloadError(
            f"{what} {state} and offline mode is on (HF_HUB_OFFLINE/VITEDIT_OFFLINE/--offline); {how} "
            f"on a machine with network access, or copy the file to {dest}")
    scheme = _scheme(remote.source)
    try:
        if scheme in ("http", "https"):
            _download_http(remote, dest, progress, timeout)
        elif scheme == "hf":
            _download_hf(remote, dest, progress)
        else:  # file
            _copy_verified(_local_path_from_file_url(remote.source), remote, dest, progress)
    except DownloadError:
        _remove_empty_parents(dest, cache_dir())
        raise
    _VERIFIED.add(_stat_key(dest, remote.sha256))
    return dest


def fetch_file(remote: RemoteFile, *, offline: bool | None = None, progress: Progress = None,
               timeout: float = 30.0) -> Path:
    """Return ``<cache_dir>/artifacts/<sha[:2]>/<sha>/<filename>``, downloading and verifying if needed.

    A cached copy is re-hashed on first use in each process; one that fails is deleted and fetched
    again (or, offline, reported). Raises DownloadError on network failure, digest mismatch, or
    offline mode with nothing cached.
    """
    return _fetch(remote, entry_name=None, offline=offline, progress=progress, timeout=timeout)


def _entry_dir(entry: RegistryEntry) -> Path:
    """A folder keyed by the entry's file digests, so a changed entry never reuses stale files."""
    key = hashlib.sha256("\n".join(f"{f.filename}:{f.sha256}" for f in entry.files).encode()).hexdigest()[:16]
    return cache_dir() / "entries" / entry.name / key


def _place(src: Path, dest: Path, sha256: str) -> None:
    """Put verified ``src`` at ``dest`` (hard link, else copy), atomically."""
    if dest.is_file() and _verified(dest, sha256):
        return
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not supported
            shutil.copyfile(src, tmp)
    _VERIFIED.add(_stat_key(dest, sha256))


def fetch_entry(entry: RegistryEntry, *, offline: bool | None = None, progress: Progress = None,
                timeout: float = 30.0) -> Path:
    """Fetch all files of ``entry`` and place them side by side; return the ``.safetensors`` path."""
    folder = _entry_dir(entry)
    for remote in entry.files:
        cached = _fetch(remote, entry_name=entry.name, offline=offline, progress=progress, timeout=timeout)
        _place(cached, folder / remote.filename, remote.sha256)
    return folder / entry.main_file.filename


def _filename_from_url(url: str) -> str:
    from urllib.parse import unquote, urlparse

    if _scheme(url) == "hf":
        return url.rstrip("/").rsplit("/", 1)[-1]
    return unquote(urlparse(url).path).rstrip("/").rsplit("/", 1)[-1]


def resolve(name_or_url: str, *, sha256: str | None = None, offline: bool | None = None,
            progress: Progress = None) -> Path:
    """Turn what the user typed into a local path.

    Order: a URL (``https://``, ``http://``, ``hf://``, ``file://``; needs ``sha256``) is fetched; an
    existing local path is returned as is; a registry name has all its files fetched side by side
    and its ``.safetensors`` path returned. Anything else raises DownloadError listing known names.
    """
    if _scheme(name_or_url) is not None:
        if not sha256:
            raise DownloadError(f"{name_or_url} was given without a digest; pass --sha256 HEX "
                                "(integrity checking is mandatory for downloads)")
        if not _SHA256_RE.match(sha256):
            raise UsageError(f"--sha256 {sha256!r} is not 64 hex characters; pass the file's full sha256 digest")
        remote = RemoteFile(name_or_url, sha256, _filename_from_url(name_or_url))
        return fetch_file(remote, offline=offline, progress=progress)

    local = Path(name_or_url).expanduser()
    if local.exists():
        return local

    registry = load_registry()
    entry = registry.get(name_or_url)
    if entry is None:
        known = (f"known names: {', '.join(sorted(registry))}" if registry
                 else "the registry lists no artifacts yet")
        raise DownloadError(f"{name_or_url!r} is not a local path or a registry name ({known}); pass a local "
                            ".safetensors path, a URL with --sha256 HEX, or add it to "
                            f"{user_registry_path()}")
    return fetch_entry(entry, offline=offline, progress=progress)
