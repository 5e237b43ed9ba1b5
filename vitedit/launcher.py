"""The ``vitedit`` console script: answers ``vitedit``, ``vitedit --help`` and ``vitedit --version``
without importing typer, and hands every other command line to ``vitedit.cli.main``.

Importing typer costs more than starting the interpreter, so a typer CLI cannot print its help in
under 3x ``python -c pass`` (docs/performance.md). The top-level help is therefore served from
``help.txt``: typer's own rendering of ``vitedit --help``, stored with the checksum of the ``cli.py``
it was rendered from. It is used only when it is exactly what typer would print: the recorded checksum
matches ``cli.py`` as it is now (any edit of a command falls back to typer until the file is
regenerated) and the terminal is at least 80 columns wide (click formats help at
``min(columns, 80) - 2``, so every width from 80 up gives the same text). Regenerate it with
``python -c "import vitedit.launcher as l; l.write_help()"``; ``tests/test_cli.py`` checks it is
current.
"""

from __future__ import annotations

import os
import sys

HELP_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "help.txt")
CLI_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli.py")
HELP_MIN_COLUMNS = 80  # click's default max_content_width: wider terminals render the same text
PROG = "vitedit"       # the program name help.txt was rendered with
HEADER = "# vitedit help for cli.py crc32 "


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args == ["--version"]:
        from . import __version__

        sys.stdout.write(f"vitedit {__version__}\n")
        return
    if args in ([], ["--help"]):
        text = cached_help()
        if text is not None:
            if args:
                sys.stdout.write(text)
                return
            sys.stderr.write(text)  # no arguments: the help, on stderr, exit 2 (typer's no_args_is_help)
            sys.exit(2)
    from .cli import main as cli_main

    cli_main(argv)


def cached_help() -> str | None:
    """``help.txt`` with this run's program name, or ``None`` when typer must render the help."""
    if _columns() < HELP_MIN_COLUMNS:
        return None
    try:
        with open(HELP_FILE, encoding="utf-8") as f:
            header, text = f.read().split("\n", 1)
    except (OSError, ValueError):
        return None
    if header != HEADER + _cli_checksum() or not text.startswith(f"Usage: {PROG} "):
        return None
    return f"Usage: {_program_name()} " + text[len(f"Usage: {PROG} "):]


def render_help() -> str:
    """What typer prints for ``vitedit --help`` at 80 columns (imports typer and the whole CLI)."""
    import contextlib
    import io

    from .cli import main as cli_main

    out = io.StringIO()
    saved_argv, saved_columns = sys.argv, os.environ.get("COLUMNS")
    sys.argv, os.environ["COLUMNS"] = [PROG], str(HELP_MIN_COLUMNS)
    try:
        with contextlib.redirect_stdout(out):
            try:
                cli_main(["--help"])
            except SystemExit as e:
                if e.code not in (0, None):
                    raise
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    return out.getvalue()


def write_help() -> None:
    """Regenerate ``help.txt`` from the current ``cli.py`` (a development step; see the module docstring)."""
    from .artifacts import write_text

    write_text(HELP_FILE, HEADER + _cli_checksum() + "\n" + render_help())


def _cli_checksum() -> str:
    """CRC-32 of ``cli.py``: it only has to notice an edit, and zlib imports in a fraction of hashlib's time."""
    import zlib

    with open(CLI_FILE, "rb") as f:
        return f"{zlib.crc32(f.read()):08x}"


def _columns() -> int:
    """Terminal columns as ``shutil.get_terminal_size`` (which click uses) reports them, without shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _program_name() -> str:
    """The name click puts after ``Usage:``: the script's file name, or ``python -m vitedit``."""
    main_module = sys.modules.get("__main__")
    package = getattr(main_module, "__package__", None)
    if not package:
        return os.path.basename(sys.argv[0])
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    module = package if name == "__main__" else f"{package}.{name}"
    return f"python -m {module.lstrip('.')}"
