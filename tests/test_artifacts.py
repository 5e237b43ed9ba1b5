"""Paths that result files record: relative to the working directory (or a given root) when inside it."""

from __future__ import annotations

from pathlib import Path

from vitedit.artifacts import portable_path


def test_an_absolute_path_inside_the_working_directory_is_recorded_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "build" / "fashion" / "test-images") == "build/fashion/test-images"
    assert portable_path(str(tmp_path / "x.json")) == "x.json"
    assert portable_path(tmp_path) == "."


def test_relative_paths_stay_as_given_and_outside_paths_stay_absolute(tmp_path, monkeypatch):
    inside, outside = tmp_path / "repo", tmp_path / "elsewhere"
    inside.mkdir()
    monkeypatch.chdir(inside)
    assert portable_path(Path("build/x")) == "build/x"
    assert portable_path(outside / "y") == str(outside / "y")
    # An explicit root, as a script run from another folder passes its repository's root.
    assert portable_path(inside / "build" / "z", root=inside) == "build/z"
    assert portable_path(outside / "z", root=inside) == str(outside / "z")
