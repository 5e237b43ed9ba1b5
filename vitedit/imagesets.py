"""Every image set an edit meets, which folder each one is, and the rule that ties them together.

An edit is fitted on the *failures* (its edit images) and on the *preserve* set (ordinary images it is
trained to leave alone); it is measured on the *generalization* set (held-out failures, or a folder),
the *check* set (labeled: accuracy drop and flip rate) and the *locality* set (unlabeled: top-1
predictions unchanged). The rule: the preserve set shares no folder and no image with any set an edit
is measured on, failures included. A preserve image among the measured ones would be fitted to stay
unchanged and then counted as unchanged, and the measurement would flatter the edit.

This module resolves each set's folder (given, the embedded model's bundled one, or switched off),
scans it and enforces the rule, for every path that edits and measures: apply and report
(``jobs.experiment``), ``vitedit-lab compare`` and ``vitedit-lab stack``. Reading the images
stays with each path (apply and report stream them in batches, the benchmarks hold them in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from .artifacts import sha256_file
from .errors import InputDataError, UsageError
from .models import DEFAULT_ASSETS, DEFAULT_MODEL

if TYPE_CHECKING:
    import torch

    from .data import ImageRef
    from .models import LoadedModel

# The names errors give each set (the flag that chose it, where there is one).
PRESERVE = "preserve set"
CHECK = "check set (--check)"
LOCALITY = "locality set (--locality)"
GENERALIZATION = "generalization set"
FAILURES = "failures"


@dataclass(frozen=True)
class ImageSet:
    """One set as scanned: the name errors call it, its folder (None: not read from a folder), its images."""

    name: str
    folder: Path | None
    refs: Sequence["ImageRef"]


def _default_asset_dir(loaded: "LoadedModel", name: str) -> Path | None:
    if loaded.name == DEFAULT_MODEL and (DEFAULT_ASSETS / name).is_dir():
        return DEFAULT_ASSETS / name
    return None


def default_locality_dir(loaded: "LoadedModel") -> Path | None:
    """The embedded model's sensitive set (locality)."""
    return _default_asset_dir(loaded, "sensitive")


def default_preserve_dir(loaded: "LoadedModel") -> Path | None:
    """The embedded model's preserve set: 1,000 in-distribution training images."""
    return _default_asset_dir(loaded, "preserve")


def default_check_dir(loaded: "LoadedModel") -> Path | None:
    """The embedded model's check set: its 1,000-image in-distribution test sample (labeled)."""
    return _default_asset_dir(loaded, "test")


def set_folder(given: Path | str | None, bundled: Path | None, off: bool = False) -> Path | None:
    """A set's folder: ``given``, else the model's bundled one (None when it has none); None when ``off``."""
    if off:
        return None
    return Path(given) if given is not None else bundled


def scan_set(name: str, folder: Path, labels: Sequence[str] | None = None) -> ImageSet:
    """The images of ``folder``: by class folder when ``labels`` (the model's class names) are given,
    else every image under it."""
    from .data import scan_labeled, scan_unlabeled

    refs = scan_labeled(folder, labels) if labels is not None else scan_unlabeled(folder)
    return ImageSet(name, Path(folder), refs)


def check_apart(preserve: ImageSet, measured: Iterable[ImageSet]) -> None:
    """Refuse a preserve set that is, or shares images with, a set that is measured.

    The same folder (or one inside the other) is a ``UsageError``; an image file with the same
    content in both is an ``InputDataError`` naming it. Folders are compared first, for every set.
    """
    measured = list(measured)
    root = Path(preserve.folder).resolve()
    for other in measured:
        if other.folder is None:
            continue
        there = Path(other.folder).resolve()
        if there == root or root in there.parents or there in root.parents:
            raise UsageError(f"--preserve {preserve.folder} is the {other.name} folder {other.folder} (or contains "
                             "it): the images an edit is fitted to keep must not be the ones it is measured on; pass "
                             "another folder")
    hashes = {sha256_file(r.path): r.path for r in preserve.refs}
    for other in measured:
        for r in other.refs:
            digest = sha256_file(r.path)
            if digest in hashes:
                raise InputDataError(f"{r.path} in the {other.name} is the same image as {hashes[digest]} in the "
                                     "preserve set; remove it from one of them (the sets must not overlap)")


def check_disjoint(preserve_dir: Path, preserve_refs: Sequence["ImageRef"], measured: dict) -> None:
    """``check_apart`` with the measured sets as a mapping: name -> (folder or None, refs)."""
    check_apart(ImageSet(PRESERVE, preserve_dir, preserve_refs),
                [ImageSet(name, folder, refs) for name, (folder, refs) in measured.items()])


@dataclass(frozen=True)
class BenchmarkSets:
    """The sets of a benchmark run on the embedded default, scanned and checked apart: the failure
    groups taking part, the check and locality sets, and the preserve set (None when no editor of
    the run reads it)."""

    groups: dict[str, ImageSet]
    check: ImageSet
    locality: ImageSet
    preserve: ImageSet | None


def failure_group(loaded: "LoadedModel", group: str, folder: Path) -> ImageSet:
    """A bundled failure group (``vitedit examples``), by class folder."""
    return scan_set(f"{FAILURES} ({group})", Path(folder), loaded.labels)


def benchmark_sets(loaded: "LoadedModel", groups: dict[str, ImageSet], *, check: Path | None = None,
                   locality: Path | None = None, preserve: Path | None = None,
                   with_preserve: bool = True) -> BenchmarkSets:
    """The run's sets: the failure ``groups`` (group -> set) and the check, locality and
    (``with_preserve``) preserve sets, the given folders or the model's bundled ones, with the preserve
    set checked apart from every other set."""
    check_set = scan_set(CHECK, set_folder(check, default_check_dir(loaded)), loaded.labels)
    locality_set = scan_set(LOCALITY, set_folder(locality, default_locality_dir(loaded)))
    preserve_set = None
    if with_preserve:
        preserve_set = scan_set(PRESERVE, set_folder(preserve, default_preserve_dir(loaded)))
        check_apart(preserve_set, [check_set, locality_set, *groups.values()])
    return BenchmarkSets(dict(groups), check_set, locality_set, preserve_set)


def read_set(image_set: ImageSet, loaded: "LoadedModel",
             progress: Callable[[str, int, int], None], what: str) -> tuple["torch.Tensor", list["ImageRef"]]:
    """Every image of the set in memory, (N, C, H, W), with its refs; a bad image is an error."""
    from .data import load_tensors

    x, good, _ = load_tensors(image_set.refs, loaded.transform, loaded.channels,
                              progress=lambda d, t: progress(what, d, t))
    return x, good
