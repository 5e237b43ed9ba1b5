"""Typed errors: every failure a user can cause or fix is a ``VitEditError`` subclass.

Each class carries the process exit code the CLI uses for it (documented in docs/cli.md), and its
message names the problem and the fix in one line. The CLI (``vitedit.cli.main``) is the only place
that turns these into output; library code only raises.
"""

from __future__ import annotations


class VitEditError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(VitEditError):
    """An option value is invalid (bad sparsity, unknown locator, malformed block list, ...)."""

    exit_code = 2


class InputDataError(VitEditError):
    """Images or folders given by the user cannot be used (bad files, empty folder, unknown class)."""

    exit_code = 3


class ModelError(VitEditError):
    """The model cannot be loaded or is not a supported ViT (missing weights, unknown name, ...)."""

    exit_code = 4


class UnsupportedModelError(ModelError):
    """The model loaded but has no editable ViT MLP blocks."""


class ArtifactError(VitEditError):
    """A saved artifact (hypernetwork, scores, patch, workspace) is corrupt or for another model."""

    exit_code = 5


class DownloadError(VitEditError):
    """An artifact could not be fetched or failed its integrity check (also: offline, not cached)."""

    exit_code = 6


class VerificationError(VitEditError):
    """A check of our own output failed (e.g. ONNX logits differ from PyTorch beyond tolerance)."""

    exit_code = 7


class WorkspaceError(VitEditError):
    """The workspace is missing a step's output, or another vitedit process holds its lock."""

    exit_code = 8
