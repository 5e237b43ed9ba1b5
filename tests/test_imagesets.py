"""The image sets' rule (vitedit/imagesets.py): the preserve set shares no folder and no image with any
set an edit is measured on, and every path that edits and measures gets the same checks."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import CLASSES, write_images
from vitedit.errors import InputDataError, UsageError
from vitedit.imagesets import (CHECK, LOCALITY, PRESERVE, ImageSet, benchmark_sets, check_apart, check_disjoint,
                               scan_set, set_folder)

LOADED = SimpleNamespace(name="not-the-default", labels=CLASSES)  # no bundled sets


@pytest.fixture
def folders(tmp_path):
    return {"check": write_images(tmp_path / "check", {"cat": 3, "dog": 3}, seed=11),
            "locality": write_images(tmp_path / "locality", {"a": 4}, seed=12),
            "group": write_images(tmp_path / "group", {"ship": 3}, seed=13),
            "preserve": write_images(tmp_path / "preserve", {"x": 5}, seed=14)}


def _sets(folders, preserve=None):
    return dict(check=folders["check"], locality=folders["locality"], preserve=preserve or folders["preserve"])


def test_set_folder_is_the_given_one_else_the_bundled_one_and_none_when_off(tmp_path):
    assert set_folder(str(tmp_path), Path("/bundled")) == tmp_path
    assert set_folder(None, Path("/bundled")) == Path("/bundled")
    assert set_folder(None, None) is None
    assert set_folder(tmp_path, Path("/bundled"), off=True) is None


def test_apart_sets_pass_and_scanning_keeps_every_image(folders):
    groups = {"g": scan_set("failures (g)", folders["group"], CLASSES)}
    sets = benchmark_sets(LOADED, groups, **_sets(folders))
    assert len(sets.check.refs) == 6 and len(sets.locality.refs) == 4 and len(sets.preserve.refs) == 5
    assert sets.groups["g"].name == "failures (g)" and sets.check.name == CHECK and sets.preserve.name == PRESERVE


@pytest.mark.parametrize("which", ["check", "locality", "group"])
def test_a_preserve_folder_inside_a_measured_folder_is_a_usage_error(folders, which):
    inner = {"check": folders["check"] / "cat", "group": folders["group"] / "ship"}.get(which, folders[which]) / "in"
    write_images(inner, {"x": 2}, seed=20)  # a class folder's sub-folder: its images count for that class
    groups = {"g": scan_set("failures (g)", folders["group"], CLASSES)}
    with pytest.raises(UsageError, match="must not be the ones it is measured on"):
        benchmark_sets(LOADED, groups, **_sets(folders, preserve=inner))


@pytest.mark.parametrize("which,name", [("check", "check set (--check)"), ("locality", "locality set (--locality)"),
                                        ("group", "failures (g)")])
def test_an_image_in_both_preserve_and_a_measured_set_is_named(folders, which, name):
    first = sorted(folders[which].rglob("*.png"))[0]
    shutil.copyfile(first, folders["preserve"] / "x" / "copy.png")
    groups = {"g": scan_set("failures (g)", folders["group"], CLASSES)}
    with pytest.raises(InputDataError, match="is the same image as") as err:
        benchmark_sets(LOADED, groups, **_sets(folders))
    assert f"{first} in the {name} is the same image as" in str(err.value)


def test_without_a_preserve_set_nothing_is_checked(folders):
    same = benchmark_sets(LOADED, {}, check=folders["check"], locality=folders["check"], preserve=folders["check"],
                          with_preserve=False)
    assert same.preserve is None


def test_folders_are_compared_before_contents_and_unread_sets_are_skipped(folders):
    first = sorted(folders["check"].rglob("*.png"))[0]
    shutil.copyfile(first, folders["preserve"] / "x" / "copy.png")
    preserve = scan_set(PRESERVE, folders["preserve"])
    check = scan_set(CHECK, folders["check"], CLASSES)
    with pytest.raises(UsageError):  # the same folder wins over the shared image found first
        check_apart(preserve, [check, ImageSet(LOCALITY, folders["preserve"], [])])
    with pytest.raises(InputDataError):
        check_apart(preserve, [check, ImageSet("tensors", None, [])])


def test_the_mapping_form_keeps_its_messages(folders):
    preserve = scan_set(PRESERVE, folders["preserve"])
    with pytest.raises(UsageError, match=r"--preserve .* is the check set folder .* \(or contains it\)"):
        check_disjoint(folders["preserve"], preserve.refs, {"check set": (folders["preserve"] / "x", [])})
    check_disjoint(folders["preserve"], preserve.refs, {"check set": (folders["check"], [])})


def test_the_experiment_module_still_exports_check_disjoint():
    from vitedit.jobs import experiment

    assert experiment.check_disjoint is check_disjoint
