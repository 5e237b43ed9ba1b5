"""The editor's config file (``--config edit.toml``): method hyper-parameters kept out of the command line.

Its keys are the field names of ``vitedit.edit.EditConfig`` (except ``objective``, which ``--editor``
picks); their values are merged over the ``--editor`` preset and the model's defaults exactly as the
flags used to be, and the resolved ``EditConfig`` is recorded in the patch's provenance
(``edit_config``). A term that is off by default as ``None`` (``nullspace_threshold``, ``stop_margin``)
takes a number or ``"off"``. Unknown keys and values of the wrong type are refused with one line
naming the key; the ranges are checked by ``EditConfig`` itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .errors import UsageError

NOT_IN_FILE = {"objective": "pick the preset with --editor instead"}


def config_keys() -> dict[str, Any]:
    """``{key: default}`` for every key the file accepts, read from ``EditConfig`` so it cannot drift."""
    from .edit import EditConfig

    return {f.name: f.default for f in dataclasses.fields(EditConfig) if f.name not in NOT_IN_FILE}


def read_edit_config(path: Path) -> dict[str, Any]:
    """The overrides a ``--config`` TOML file gives, checked key by key (``UsageError`` naming the key)."""
    return check_overrides(_load(path), str(path))


def meta_train_keys() -> dict[str, Any]:
    """``{key: default}`` for ``meta-train --config``: the ``MetaTrainConfig`` fields (``--seed`` sets the seed)."""
    from .metatrain import MetaTrainConfig

    return {f.name: f.default for f in dataclasses.fields(MetaTrainConfig) if f.name != "seed"}


def read_meta_train_config(path: Path) -> dict[str, Any]:
    """``meta-train --config``'s overrides, checked key by key like the editor's."""
    keys, source = meta_train_keys(), str(path)
    out = {}
    for key, value in _load(path).items():
        if key not in keys:
            raise UsageError(f"--config {source}: unknown key {key!r}; the keys are {', '.join(keys)}")
        out[key] = _check_value(key, value, keys[key], source)
    return out


def _load(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--config {path}: not a readable TOML file ({e})") from None
    return table


def check_overrides(table: dict[str, Any], source: str) -> dict[str, Any]:
    keys = config_keys()
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in NOT_IN_FILE:
            raise UsageError(f"--config {source}: key {key!r} is not set in the file: {NOT_IN_FILE[key]}")
        if key not in keys:
            raise UsageError(f"--config {source}: unknown key {key!r}; the keys are {', '.join(keys)} (docs/cli.md)")
        out[key] = _check_value(key, value, keys[key], source)
    return out


def _check_value(key: str, value: Any, default: Any, source: str) -> Any:
    def bad(expected: str) -> UsageError:
        return UsageError(f"--config {source}: {key} = {value!r}: give {expected}")

    if default is None:  # a term off by default: a number or "off"
        if isinstance(value, str) and value.strip().lower() == "off":
            return "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number or \"off\"")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("a whole number")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise bad(f"a value like {default!r}")
