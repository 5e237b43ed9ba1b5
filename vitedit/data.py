"""User image folders: finding the images, opening them robustly, turning them into tensors.

This module owns everything between "the user pointed us at a folder" and "a (N, C, H, W) batch":

* Layout. A set of failing images is ``ROOT/<class>/<images>``: one sub-folder per true class,
  named by the class label, its folder-safe spelling (:func:`safe_label_name`), a loose spelling
  (case, spaces, hyphens and punctuation ignored) or the class index. Images may sit in deeper
  sub-folders of a class folder. Unlabeled sets (e.g. the locality set) are any folder of images.
* Candidates. Hidden entries (name starting with ``.``) and known non-image junk (``.DS_Store``,
  ``Thumbs.db``, ``desktop.ini``, ``README*``, ``*.txt``, ``*.md``, ``*.json``, ``__MACOSX``
  folders) are skipped silently. Every other file is a candidate, whatever its suffix: a
  misnamed image still loads (Pillow sniffs the content) and a non-image is reported by path
  instead of vanishing.
* Opening. :func:`open_image` decodes fully, applies EXIF orientation and normalizes every Pillow
  mode (palette, alpha, CMYK, 16-bit, float, 1-bit) to ``L`` or ``RGB``. Pillow's decompression
  bomb limit is kept and enforced as an error.
* Bad images are collected, never fatal one by one: a run reports all of them at once in a
  :class:`BadImageError` (exit code 3) unless the caller asked to skip them.

No torch at import time: the functions that build tensors import it themselves.
"""

from __future__ import annotations

import difflib
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from .errors import InputDataError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "BadImage",
    "BadImageError",
    "ImageBatches",
    "ImageRef",
    "iter_batches",
    "load_tensors",
    "open_image",
    "resolve_class_folder",
    "safe_label_name",
    "scan_labeled",
    "scan_unlabeled",
]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

# Files that are never images and that file managers, zip tools or people leave in folders.
_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_JUNK_SUFFIXES = frozenset({".txt", ".md", ".json"})
_JUNK_DIRS = frozenset({"__macosx"})

# Characters not allowed in folder names on Windows, macOS or Linux.
_UNSAFE_CHARS = frozenset('/\\:*?"<>|')

# Pillow modes with an alpha band ("LAB" has an "A" band that is colour, not alpha).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# How many bad paths a BadImageError message spells out before "... and N more".
_MAX_LISTED = 10


@dataclass(frozen=True)
class BadImage:
    """A file that could not be used as an image, with a short human reason."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ImageRef:
    """One candidate image: its path, class index (None if unlabeled) and class folder on disk."""

    path: Path
    label: int | None
    folder: str | None


class BadImageError(InputDataError):
    """One or more images cannot be loaded. ``.bad`` lists every one of them.

    Construct with a list of :class:`BadImage`, or with ``(path, reason)`` for a single file.
    """

    def __init__(self, bad: Sequence[BadImage] | os.PathLike | str, reason: str | None = None):
        if reason is not None:
            bad = [BadImage(Path(bad), reason)]  # type: ignore[arg-type]
        self.bad: list[BadImage] = list(bad)  # type: ignore[arg-type]
        super().__init__(_bad_message(self.bad))

    def __reduce__(self):  # rebuild from .bad, not from the message (pickling, multiprocessing)
        return (type(self), (self.bad,))


def _bad_message(bad: Sequence[BadImage]) -> str:
    n = len(bad)
    if n == 1:
        b = bad[0]
        return (f"cannot load image {b.path}: {b.reason}; fix or remove this file, "
                "or pass --skip-bad-images to continue without it")
    lines = [f"{n} images cannot be loaded; fix or remove these files, "
             "or pass --skip-bad-images to continue without them:"]
    lines += [f"  {b.path}: {b.reason}" for b in bad[:_MAX_LISTED]]
    if n > _MAX_LISTED:
        lines.append(f"  ... and {n - _MAX_LISTED} more")
    return "\n".join(lines)


# --------------------------------------------------------------------------- class folder names


def safe_label_name(label: str) -> str:
    """Folder-safe spelling of a class label.

    Rule: each of ``/ \\ : * ? " < > |`` and each control character becomes ``_``; then leading
    and trailing spaces and dots are stripped (Windows drops them silently). A label with nothing
    left becomes ``_``. ``'T-shirt/top' -> 'T-shirt_top'``.
    """
    chars = ("_" if c in _UNSAFE_CHARS or unicodedata.category(c) == "Cc" else c for c in label)
    return "".join(chars).strip(" .") or "_"


def _normalize(name: str) -> str:
    """Loose form for matching: NFC (macOS stores names decomposed), case-folded, letters/digits only."""
    return "".join(c for c in unicodedata.normalize("NFC", name).casefold() if c.isalnum())


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _unique(indices: list[int], name: str, labels: Sequence[str], how: str, where: str) -> int | None:
    """The single class index in ``indices``; None if empty; an error if they disagree."""
    distinct = sorted(set(indices))
    if not distinct:
        return None
    if len(distinct) > 1:
        shown = ", ".join(f"{i} {labels[i]!r}" for i in distinct)
        raise InputDataError(f"class folder {name!r}{where} matches several labels {how} ({shown}); "
                             f"rename it to the class index instead, e.g. {distinct[0]}")
    return distinct[0]


def _resolve(name: str, labels: Sequence[str], where: str = "") -> int:
    key = _nfc(name)
    # 1. the exact label
    for i, label in enumerate(labels):
        if _nfc(label) == key:
            return i
    # 2. its folder-safe spelling
    found = _unique([i for i, lab in enumerate(labels) if _nfc(safe_label_name(lab)) == key],
                    name, labels, "by folder-safe spelling", where)
    if found is not None:
        return found
    # 3. loose match: case, spaces, underscores, hyphens and punctuation ignored
    loose = _normalize(name)
    if loose:
        found = _unique([i for i, lab in enumerate(labels) if _normalize(lab) == loose],
                        name, labels, "ignoring case and punctuation", where)
        if found is not None:
            return found
    # 4. a class index
    if key.isascii() and key.isdecimal():
        index = int(key)
        if index < len(labels):
            return index
        raise InputDataError(f"class folder {name!r}{where} is class index {index}, but the model has "
                             f"only {len(labels)} classes (0..{len(labels) - 1}); rename the folder")
    raise InputDataError(f"class folder {name!r}{where} matches no class label; "
                         f"{_suggest(loose, labels)}, or name the folder by class index "
                         f"0..{len(labels) - 1}")


def _suggest(loose: str, labels: Sequence[str]) -> str:
    first_index: dict[str, int] = {}
    for i, label in enumerate(labels):
        first_index.setdefault(_normalize(label), i)
    close = difflib.get_close_matches(loose, list(first_index), n=3, cutoff=0.6) if loose else []
    if close:
        names = ", ".join(repr(safe_label_name(labels[first_index[c]])) for c in close)
        return f"did you mean {names}? Rename it to a label"
    some = ", ".join(repr(safe_label_name(label)) for label in labels[:5])
    more = ", ..." if len(labels) > 5 else ""
    return f"rename it to a label ({some}{more})"


def resolve_class_folder(name: str, labels: Sequence[str]) -> int:
    """Map a class sub-folder name to a class index.

    Tried in order: the exact label; its :func:`safe_label_name` spelling; a loose match that
    ignores case, spaces, underscores, hyphens and punctuation (``'ankle-boot'`` finds
    ``'Ankle boot'``); a decimal class index ``0..len(labels)-1``. Raises ``InputDataError`` when
    a loose match is ambiguous or nothing matches (suggesting up to three close labels).
    """
    return _resolve(name, labels)


# --------------------------------------------------------------------------- scanning folders


def _is_skipped(name: str, is_dir: bool) -> bool:
    if name.startswith("."):  # hidden, including .DS_Store and macOS "._x.png" resource forks
        return True
    lower = name.casefold()
    if is_dir:
        return lower in _JUNK_DIRS
    return (lower in _JUNK_NAMES or lower.startswith("readme")
            or os.path.splitext(lower)[1] in _JUNK_SUFFIXES)


def _list_dir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise InputDataError(f"cannot read folder {folder} (permission denied); "
                             "give your user read access to it") from None
    except OSError as e:
        raise InputDataError(f"cannot read folder {folder} ({e.strerror or e}); "
                             "check that the folder is reachable") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _walk(folder: Path, seen: set[str]) -> Iterator[Path]:
    """Every candidate file under ``folder`` (recursive, symlinks followed, loops cut)."""
    for entry in _list_dir(folder):
        is_dir = _is_dir(entry)
        if _is_skipped(entry.name, is_dir):
            continue
        path = Path(entry.path)
        if is_dir:
            real = os.path.realpath(path)
            if real not in seen:  # a symlink back up the tree would otherwise recurse forever
                seen.add(real)
                yield from _walk(path, seen)
        else:
            yield path  # regular file, broken symlink or anything else: open_image judges it


def _check_root(root: Path, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        hint = " (it is a broken symlink)" if root.is_symlink() else ""
        raise InputDataError(f"{what} {root} does not exist{hint}; check the path")
    if not root.is_dir():
        raise InputDataError(f"{what} {root} is a file, not a folder; pass the folder that holds the images")
    return root


def scan_labeled(root: Path, labels: Sequence[str]) -> list[ImageRef]:
    """Find the images of a ``ROOT/<class>/<images>`` set, sorted by class index then path.

    Class folders are resolved with :func:`resolve_class_folder`; files in deeper sub-folders
    belong to the class folder they are under; two folders naming the same class are merged.
    Returns candidates only: whether each file is a readable image is decided when it is loaded.
    """
    root = _check_root(root, "image folder")
    class_dirs: list[tuple[int, str, Path]] = []
    top_images: list[str] = []
    for entry in _list_dir(root):
        is_dir = _is_dir(entry)
        if _is_skipped(entry.name, is_dir):
            continue
        if is_dir:
            index = _resolve(entry.name, labels, where=f" in {root}")
            class_dirs.append((index, entry.name, Path(entry.path)))
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            top_images.append(entry.name)
        # other loose files at the top level (e.g. labels.csv) belong to no class: ignored
    example = safe_label_name(labels[0]) if labels else "<label>"
    if top_images:
        shown = ", ".join(top_images[:3]) + (", ..." if len(top_images) > 3 else "")
        raise InputDataError(
            f"{len(top_images)} image file(s) lie directly in {root} ({shown}) instead of in class "
            f"sub-folders; move each into a sub-folder named after its true class, "
            f"e.g. {root / example}/")
    if not class_dirs:
        raise InputDataError(f"image folder {root} is empty; put the images in one sub-folder per "
                             f"true class, e.g. {root / example / 'img001.png'}")
    seen = {os.path.realpath(root)}
    refs = [ImageRef(path, index, name)
            for index, name, folder in class_dirs
            for path in _walk(folder, seen | {os.path.realpath(folder)})]
    if not refs:
        names = ", ".join(name for _, name, _ in class_dirs[:5])
        raise InputDataError(f"the class folders in {root} ({names}) hold no image files; "
                             "put each image in the folder of its true class")
    refs.sort(key=lambda r: (r.label, str(r.path)))
    return refs


def scan_unlabeled(root: Path) -> list[ImageRef]:
    """Every candidate file under ``root`` (recursive, label None), sorted by path."""
    root = _check_root(root, "image folder")
    refs = [ImageRef(path, None, None) for path in _walk(root, {os.path.realpath(root)})]
    if not refs:
        raise InputDataError(f"image folder {root} holds no image files; put the images in it "
                             "(sub-folders are searched too)")
    refs.sort(key=lambda r: str(r.path))
    return refs


# --------------------------------------------------------------------------- opening one image


def _precheck(path: Path) -> str | None:
    """Reason the path cannot be an image before Pillow sees it (or None)."""
    try:
        if path.is_symlink() and not path.exists():
            return f"broken symlink (points to {os.readlink(path)})"
        if not path.exists():
            return "file not found"
        if path.is_dir():
            return "is a folder, not an image"
        if not path.is_file():  # a FIFO or device would block or never end
            return "not a regular file"
        if path.stat().st_size == 0:
            return "zero-byte file"
    except PermissionError:
        return "cannot read file (permission denied)"
    except OSError as e:
        return f"cannot read file ({e.strerror or e})"
    return None


def _bomb_reason(exc: Exception) -> str:
    from PIL import Image

    # Pillow's message: "Image size (N pixels) exceeds limit of M pixels, ..."; it names no W x H.
    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{m.group(1)} pixels" if m else str(exc)
    return f"image too large ({size} > limit {Image.MAX_IMAGE_PIXELS})"


def _high_bit_depth_to_l(img: "Image.Image") -> "Image.Image":
    """16-bit / 32-bit integer / float single-channel image -> 8-bit ``L``, scaled, not clipped."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img)  # (H, W)
    if img.mode == "F":
        # Float images carry no range. Treat [0, 1] data as normalized, anything else as 0..255.
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        a8 = np.clip(np.rint(a * scale), 0, 255)
    else:
        # 'I;16*' spans 0..65535; 'I' (int32) is clipped to that range first. 65535 / 255 = 257.
        a8 = np.rint(np.clip(a.astype(np.float64), 0, 65535) / 257.0)
    return Image.fromarray(a8.astype(np.uint8), mode="L")


def _to_l_or_rgb(img: "Image.Image") -> "Image.Image":
    """Any Pillow mode -> ``L`` or ``RGB`` (alpha composited onto white)."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_l(img)
    if mode == "1":
        return img.convert("L")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # Alpha is composited onto WHITE, not black: the images users fix are mostly product shots
        # and scans on white, where transparent areas mean "paper", and black would invent edges.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("L", "RGB"):
        return img
    return img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...


def open_image(path: Path, channels: int) -> "Image.Image":
    """Open ``path`` fully and return it upright in mode ``L`` (channels=1) or ``RGB`` (channels=3).

    EXIF orientation is applied. Pillow's ``MAX_IMAGE_PIXELS`` limit is enforced as an error (its
    warning band too). Any failure raises :class:`BadImageError` naming the file and the reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    reason = _precheck(path)
    if reason is not None:
        raise BadImageError(path, reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: truncation shows up here, not at first use
                upright = ImageOps.exif_transpose(img)
                out = _to_l_or_rgb(upright)
                if channels == 1 and out.mode != "L":
                    out = out.convert("L")
                elif channels == 3 and out.mode != "RGB":
                    out = out.convert("RGB")
                if out is img:
                    out = img.copy()  # detach from the file we are about to close
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(path, _bomb_reason(e)) from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (cannot identify image file)") from None
    except PermissionError:
        raise BadImageError(path, "cannot read file (permission denied)") from None
    except MemoryError:
        raise BadImageError(path, "image too large (out of memory while decoding)") from None
    except Exception as e:  # noqa: BLE001 - Pillow decoders raise many types on corrupt input
        # OSError ("image file is truncated"), SyntaxError ("broken PNG file"), struct.error,
        # ValueError, IndexError, EOFError, ... all mean the same thing to the user.
        detail = str(e).strip() or type(e).__name__
        raise BadImageError(path, f"truncated or corrupt image ({detail})") from None
    return out


# --------------------------------------------------------------------------- images -> tensors


def _check_tensor(t: "torch.Tensor", ref: ImageRef, channels: int, shape: tuple | None) -> None:
    if t.ndim != 3 or t.shape[0] != channels:
        raise ValueError(f"transform returned shape {tuple(t.shape)} for {ref.path}; "
                         f"expected ({channels}, H, W)")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"transform returned shape {tuple(t.shape)} for {ref.path} but {shape} "
                         "for earlier images; use a transform that resizes to a fixed size")


def _none_loaded(bad: Sequence[BadImage]) -> InputDataError:
    shown = "; ".join(f"{b.path}: {b.reason}" for b in bad[:3])
    more = f"; ... and {len(bad) - 3} more" if len(bad) > 3 else ""
    return InputDataError(f"none of the {len(bad)} images could be loaded ({shown}{more}); "
                          "fix or replace them")


def load_tensors(
    refs: Sequence[ImageRef],
    transform: Callable[["Image.Image"], "torch.Tensor"],
    channels: int,
    *,
    skip_bad: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple["torch.Tensor", list[ImageRef], list[BadImage]]:
    """Open and transform every image and stack them into one (N, C, H, W) tensor.

    All images are tried before deciding: if any is bad and ``skip_bad`` is False, one
    :class:`BadImageError` lists every bad file. Otherwise returns ``(tensor, good_refs, bad)``
    with ``good_refs[i]`` the source of ``tensor[i]``. The dtype is whatever ``transform``
    returns (float for the model's transform). ``progress(done, total)`` follows each image.
    """
    import torch

    if not refs:
        raise InputDataError("no images to load; check that the image folder holds image files")
    tensors: list[torch.Tensor] = []  # each (C, H, W)
    good: list[ImageRef] = []
    bad: list[BadImage] = []
    shape: tuple | None = None
    for done, ref in enumerate(refs, start=1):
        try:
            img = open_image(ref.path, channels)
        except BadImageError as e:
            bad.extend(e.bad)
        else:
            t = transform(img)
            _check_tensor(t, ref, channels, shape)
            shape = tuple(t.shape)
            tensors.append(t)
            good.append(ref)
        if progress is not None:
            progress(done, len(refs))
    if bad and not skip_bad:
        raise BadImageError(bad)
    if not good:
        raise _none_loaded(bad)
    return torch.stack(tensors), good, bad  # (N, C, H, W)


class ImageBatches:
    """Bounded-memory batches over a large image set: ``for x, refs in ImageBatches(...)``.

    Construction checks every image once (decode and discard, one at a time) so that bad files
    are known before any work starts: with ``skip_bad`` False they raise one
    :class:`BadImageError`; otherwise ``.bad`` lists them and ``.refs`` holds the good ones.
    Iterating re-opens ``batch_size`` images at a time and yields ``(x, refs)`` with ``x`` of
    shape (B, C, H, W). ``progress(done, total)`` follows each image of the checking pass.
    An image that breaks between the check and its batch raises :class:`BadImageError`.
    """

    def __init__(
        self,
        refs: Sequence[ImageRef],
        transform: Callable[["Image.Image"], "torch.Tensor"],
        channels: int,
        batch_size: int,
        *,
        skip_bad: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not refs:
            raise InputDataError("no images to load; check that the image folder holds image files")
        self.transform = transform
        self.channels = channels
        self.batch_size = batch_size
        self.refs: list[ImageRef] = []
        self.bad: list[BadImage] = []
        for done, ref in enumerate(refs, start=1):
            try:
                open_image(ref.path, channels)
            except BadImageError as e:
                self.bad.extend(e.bad)
            else:
                self.refs.append(ref)
            if progress is not None:
                progress(done, len(refs))
        if self.bad and not skip_bad:
            raise BadImageError(self.bad)
        if not self.refs:
            raise _none_loaded(self.bad)

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.refs) // self.batch_size)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", list[ImageRef]]]:
        import torch

        shape: tuple | None = None
        for start in range(0, len(self.refs), self.batch_size):
            chunk = self.refs[start:start + self.batch_size]
            tensors = []  # each (C, H, W)
            for ref in chunk:
                t = self.transform(open_image(ref.path, self.channels))
                _check_tensor(t, ref, self.channels, shape)
                shape = tuple(t.shape)
                tensors.append(t)
            yield torch.stack(tensors), chunk  # (B, C, H, W)


def iter_batches(
    refs: Sequence[ImageRef],
    transform: Callable[["Image.Image"], "torch.Tensor"],
    channels: int,
    batch_size: int,
    skip_bad: bool = False,
) -> Iterator[tuple["torch.Tensor", list[ImageRef]]]:
    """Shorthand for ``iter(ImageBatches(...))``; bad images are checked before the first batch."""
    return iter(ImageBatches(refs, transform, channels, batch_size, skip_bad=skip_bad))
