"""The workspace: the folder (default ``./.vitedit``) where one editing job keeps its state.

Files (each written atomically; tensors as safetensors + JSON sidecar):
- ``workspace.json``: the model (name, weights file, weight hash), sites, locator, failure folder,
  every loaded image with its base prediction, the failing images (absolute path, label, sha256;
  re-read in batches by later steps), the skipped bad images, the split seed;
- ``scores.safetensors``: per-image unit scores from ``locate``;
- ``patch.safetensors`` and ``edited.safetensors`` from ``apply``; ``apply.json``;
- ``report.json`` (and the plot) from ``report``; ``lock`` while a command runs.

A workspace belongs to one model: opening it with another model (name or weight hash) is refused.
Two vitedit processes on one workspace are prevented with an exclusive lock on ``lock``. A command
that fails before writing anything leaves no folder behind (``Workspace.lock``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .artifacts import read_json, write_json
from .errors import WorkspaceError

DEFAULT_WORKSPACE = Path(".vitedit")
STATE = "workspace.json"


class Workspace:
    def __init__(self, root: Path | str = DEFAULT_WORKSPACE) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def exists(self) -> bool:
        return (self.root / STATE).exists()

    def state(self) -> dict:
        if not self.exists:
            raise WorkspaceError(f"no vitedit workspace at {self.root}; run `vitedit locate FAILURES` first "
                                 "(or pass --workspace DIR)")
        return read_json(self.root / STATE, "workspace state")

    def save_state(self, state: dict) -> None:
        write_json(self.root / STATE, state)

    def require(self, name: str, step: str) -> Path:
        p = self.root / name
        if not p.exists():
            raise WorkspaceError(f"{p} not found; run `vitedit {step}` first")
        return p

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the workspace for the duration of one command.

        A command that fails before writing anything leaves nothing behind: if this lock created the
        folder (and any missing parents) and, on exit, the folder holds only the lock file, both are
        removed. An existing workspace is never removed.
        """
        import fcntl

        created = [p for p in (self.root, *self.root.parents) if not p.exists()]  # innermost first
        lock_path = self.root / "lock"
        while True:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkspaceError(f"another vitedit command is using the workspace {self.root}; wait for it to "
                                     "finish or pass a different --workspace") from None
            if _same_file(fd, lock_path):
                break
            # The holder we waited on removed the (empty) workspace after we opened its lock file; the
            # lock we got is on a deleted file and keeps nobody out. Start again on the live path.
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            try:
                if created and _only_lock(self.root):
                    lock_path.unlink()  # still holding the lock: a newcomer sees the file vanish and retries
                    for folder in created:
                        try:
                            folder.rmdir()
                        except OSError:  # not empty (someone else wrote there) or already gone
                            break
            finally:
                os.close(fd)  # closing the descriptor releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _only_lock(root: Path) -> bool:
    try:
        return [p.name for p in root.iterdir()] == ["lock"]
    except OSError:
        return False
