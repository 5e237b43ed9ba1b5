"""One self-contained HTML page that shows what an edit fixed and what else it changed.

This module owns the page and nothing else: the pipeline measures, this renders. The page is a
single file with every image inlined as a ``data:image/png;base64`` URI, inline CSS, no JavaScript
and no external URL of any kind, so it reads the same offline, attached to an issue or mailed. A
``Content-Security-Policy`` meta tag (``img-src data:``, no scripts) makes the browser refuse
anything that would reach out, should a future change slip one in.

Input: ``render_report(data, out)`` takes a plain dict (JSON-serialisable apart from ``Path``
values). Every key is optional except that unknown top-level keys are refused (a typo would
otherwise drop a section silently)::

    {
      "title": "vitedit edit report: shirt",
      "command": "vitedit demo",                  # the command that made it
      "provenance": {"model": ..., "weights_sha256": ..., "vitedit_version": ..., ...},
                                                  # str/number values, shown as a table in order
      "figures": {"success": 1.0, "generalization": 0.86, "locality": 0.95,
                  "accuracy_before": 0.91, "accuracy_after": 0.905, "accuracy_drop": 0.5,
                  "flip_rate": 0.012, "sparsity": 0.05, "units_edited": 154, ...},
      "plots": ["/path/tradeoff.png", ...],       # PNG files, inlined as they are
      "labels": ["T-shirt/top", "Trouser", ...],  # class index -> name
      "galleries": [
        {"key": "edit", "title": "Edit images", "description": "...", "total": 10,
         "items": [{"path": "/abs/x.png", "label": 6, "before": 0, "after": 6}, ...]},
        ...                                       # keys are unique; total defaults to len(items)
      ],
      "per_class": [{"class": "Shirt", "images": 100, "before": 0.61, "after": 0.64}, ...],
      "edits": [{"index": 1, "failures": "/x/shirt", "sparsity": 0.05, ...}, ...],
      "notes": ["no locality set was given ..."],
    }

Figures: ``None`` shows as "n/a". Values in [0, 1] named ``success``, ``generalization``,
``locality``, ``flip_rate`` or ``accuracy_*`` show as percentages; ``accuracy_drop`` is in
percentage points (before minus after, as in ``vitedit.evaluate``). The same formatting applies to
the edits table. The summary line at the top reads the figures; its image counts come from
``figures["edit_images"]`` / ``figures["held_out_failures"]`` when given, else from the totals of
the ``edit`` gallery and of ``fixed`` + ``still_wrong``.

Item labels (``label``, ``before``, ``after``) are class indices into ``labels`` or class names;
``label`` may be ``None`` when the true class is unknown (locality images). A gallery with more
items than ``max_per_gallery`` shows a seeded random sample, in the items' own order, and says
"showing 64 of 540". Thumbnails are resized so the longer side is 72 px (nearest-neighbour when
enlarging, so 28x28 images stay crisp); an image that cannot be read becomes a placeholder box
marked "unreadable" and is counted in the returned summary. A missing or non-PNG plot is an
``InputDataError``: a plot is the pipeline's own output, so its absence is a bug to surface.

The page is streamed into a temporary file beside ``out`` and renamed into place only when
complete (``vitedit.artifacts.atomic_path``), so a failure leaves any previous report intact.
"""

from __future__ import annotations

import base64
import html
import io
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .artifacts import atomic_path
from .errors import InputDataError, UsageError

THUMB_SIDE = 72  # px, the longer side of every thumbnail
_KNOWN_KEYS = ("title", "command", "provenance", "figures", "plots", "labels", "galleries",
               "per_class", "edits", "notes")
_PERCENT_KEYS = ("success", "generalization", "locality", "flip_rate")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Placeholder thumbnail: a light grey box; the caption carries the word "unreadable".
_PLACEHOLDER_KEY = object()


def render_report(data: dict, out: str | os.PathLike, *, max_per_gallery: int = 64, seed: int = 0) -> dict:
    """Write the report page for ``data`` (schema in the module docstring) to ``out``, atomically.

    Returns ``{"path", "bytes", "thumbnails": {key: shown}, "totals": {key: total},
    "unreadable": {key: placeholders shown}}``. Same data and seed -> byte-identical page.
    """
    if isinstance(max_per_gallery, bool) or not isinstance(max_per_gallery, int) or max_per_gallery < 0:
        raise UsageError(f"max_per_gallery must be a whole number >= 0, got {max_per_gallery!r}; "
                         "pass e.g. 64 (0 shows counts only)")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"report path {out} is a folder; give a file name such as {out / 'report.html'}")
    report = _validate(data)
    # Choose the thumbnails before writing anything: a bad input fails with no temporary file made.
    shown = {g["key"]: _sample(g, max_per_gallery, seed) for g in report["galleries"]}
    thumbs = _ThumbnailCache()
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for chunk in _page(report, shown, thumbs, seed):
            f.write(chunk)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "thumbnails": {key: len(idx) for key, idx in shown.items()},
        "totals": {g["key"]: g["total"] for g in report["galleries"]},
        "unreadable": {key: thumbs.unreadable.get(key, 0) for key in shown},
    }


# ---------------------------------------------------------------------------------------- input


def _validate(data: Any) -> dict:
    """Check the shape of ``data`` and return it with defaults filled in (the input is not mutated)."""
    if not isinstance(data, Mapping):
        raise InputDataError(f"report data must be a dict, got {type(data).__name__}; build it as the "
                             "vitedit.html_report docstring shows")
    unknown = [k for k in data if k not in _KNOWN_KEYS]
    if unknown:
        raise InputDataError(f"report data has unknown key {unknown[0]!r}; expected some of "
                             f"{', '.join(_KNOWN_KEYS)}")
    r = {
        "title": str(data.get("title") or "vitedit report"),
        "command": data.get("command"),
        "provenance": _mapping(data, "provenance"),
        "figures": _mapping(data, "figures"),
        "plots": [_path(p, f"plots[{i}]") for i, p in enumerate(_sequence(data, "plots"))],
        "labels": [str(x) for x in _sequence(data, "labels")],
        "per_class": [_row(data, "per_class", i, x) for i, x in enumerate(_sequence(data, "per_class"))],
        "edits": [_row(data, "edits", i, x) for i, x in enumerate(_sequence(data, "edits"))],
        "notes": [str(x) for x in _sequence(data, "notes")],
        "galleries": [],
    }
    for p in r["plots"]:
        _check_plot(p)
    seen = set()
    for i, g in enumerate(_sequence(data, "galleries")):
        g = _row(data, "galleries", i, g)
        key = g.get("key")
        if not isinstance(key, str) or not key:
            raise InputDataError(f"galleries[{i}] needs a non-empty string 'key' (e.g. 'edit')")
        if key in seen:
            raise InputDataError(f"gallery key {key!r} appears twice; give each gallery its own key")
        seen.add(key)
        items = [_row(data, f"galleries[{i}].items", j, it) for j, it in enumerate(g.get("items") or [])]
        for j, it in enumerate(items):
            if not isinstance(it.get("path"), (str, os.PathLike)):
                raise InputDataError(f"gallery {key!r} item {j} has no 'path'; give the image file path")
            for field in ("label", "before", "after"):
                _class_name(r["labels"], it.get(field), f"gallery {key!r} item {j} {field!r}")
        total = g.get("total", len(items))
        if isinstance(total, bool) or not isinstance(total, int) or total < len(items):
            raise InputDataError(f"gallery {key!r} has total {total!r} but {len(items)} items; total counts "
                                 "all images of the group, so it must be a whole number >= len(items)")
        r["galleries"].append({"key": key, "title": str(g.get("title") or key),
                               "description": str(g.get("description") or ""), "total": total, "items": items})
    return r


def _mapping(data: Mapping, key: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise InputDataError(f"report data {key!r} must be a dict of name -> value, got {type(value).__name__}")
    return dict(value)


def _sequence(data: Mapping, key: str) -> list:
    value = data.get(key) or []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InputDataError(f"report data {key!r} must be a list, got {type(value).__name__}")
    return list(value)


def _row(data: Mapping, where: str, i: int, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise InputDataError(f"report data {where}[{i}] must be a dict, got {type(value).__name__}")
    return dict(value)


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise InputDataError(f"report data {where} must be a file path, got {type(value).__name__}")
    return Path(value)


def _check_plot(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_PNG_SIGNATURE))
    except FileNotFoundError:
        raise InputDataError(f"plot {path} not found; rerun the step that draws it or drop it from 'plots'") from None
    except OSError as e:
        raise InputDataError(f"plot {path} cannot be read ({e.strerror}); check its permissions") from None
    if head != _PNG_SIGNATURE:
        raise InputDataError(f"plot {path} is not a PNG file; save plots as .png to inline them")


def _class_name(labels: list[str], value: Any, where: str = "label") -> str | None:
    """Class index or name -> display name; None stays None (unknown)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputDataError(f"{where} must be a class index, a class name or None, got {value!r}")
    if not labels:
        return f"class {value}"
    if not 0 <= value < len(labels):
        raise InputDataError(f"{where} is class {value} but 'labels' names only {len(labels)} classes; "
                             "pass the model's full label list")
    return labels[value]


def _sample(gallery: dict, cap: int, seed: int) -> list[int]:
    """Indices of the items to show: all of them, or ``cap`` drawn with a seeded RNG, kept in order."""
    n = len(gallery["items"])
    if n <= cap:
        return list(range(n))
    # A string seed is hashed with SHA-512 by ``random`` (not Python's salted hash), so this is
    # reproducible across runs, and galleries of equal size do not show the same positions.
    rng = random.Random(f"{seed}:{gallery['key']}")
    return sorted(rng.sample(range(n), cap))


# ----------------------------------------------------------------------------------- thumbnails


class _ThumbnailCache:
    """PNG data URIs of thumbnails, one encoding per distinct file (galleries often share images)."""

    def __init__(self) -> None:
        self._uris: dict[Any, tuple[str, int, int]] = {}
        self.unreadable: dict[str, int] = {}

    def get(self, path: str | os.PathLike, gallery: str) -> tuple[str, int, int] | None:
        """``(uri, width, height)`` or None when the image cannot be read (caller shows a placeholder)."""
        key = os.fspath(path)
        if key not in self._uris:
            self._uris[key] = _thumbnail(Path(path))
        if self._uris[key] is None:
            self.unreadable[gallery] = self.unreadable.get(gallery, 0) + 1
        return self._uris[key]

    def placeholder(self) -> tuple[str, int, int]:
        if _PLACEHOLDER_KEY not in self._uris:
            from PIL import Image

            self._uris[_PLACEHOLDER_KEY] = _data_uri(Image.new("L", (THUMB_SIDE, THUMB_SIDE), 224))
        return self._uris[_PLACEHOLDER_KEY]


def _thumbnail(path: Path) -> tuple[str, int, int] | None:
    """Longer side -> THUMB_SIDE: Lanczos when shrinking, nearest-neighbour when enlarging."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG: decode at reduced size (no-op otherwise)
            img.load()
            img = _display_mode(img)
    # PIL reports broken files as OSError (incl. UnidentifiedImageError), ValueError or, for some
    # damaged PNG chunks, SyntaxError; a decompression bomb is its own class.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    w, h = img.size
    scale = THUMB_SIDE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    return _data_uri(img)


def _display_mode(img):
    """Grayscale stays grayscale (smaller PNGs); alpha is kept; everything else becomes RGB."""
    if img.mode in ("L", "RGB", "RGBA", "LA"):
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA")
    return img.convert("RGB")


def _data_uri(img) -> tuple[str, int, int]:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height


# --------------------------------------------------------------------------------------- format


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_percent(key: str) -> bool:
    return key in _PERCENT_KEYS or (key.startswith("accuracy_") and key != "accuracy_drop")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def format_value(key: str, value: Any) -> str:
    """How a figure (or an edits-table cell) named ``key`` reads on the page (plain text, unescaped)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "accuracy_drop" and _is_number(value):
        return f"{value:.2f} points"
    if key.endswith("_ci95") and isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)):
        if key == "accuracy_drop_ci95":
            return f"{value[0]:.2f} to {value[1]:.2f} points"
        return f"{format_value(key[:-5], value[0])} to {format_value(key[:-5], value[1])}"
    if _is_percent(key) and _is_number(value) and 0 <= value <= 1:
        return _pct(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_line(report: dict) -> str:
    """The one sentence at the top: what was fixed and what it cost (plain text, unescaped)."""
    fig = report["figures"]
    totals = {g["key"]: g["total"] for g in report["galleries"]}

    def frac(key: str) -> float | None:
        v = fig.get(key)
        return v if _is_number(v) and 0 <= v <= 1 else None

    def whole_pct(v: float) -> str:  # "100%", "86%", but "86.3%" when not whole
        return _pct(v, 0) if abs(100 * v - round(100 * v)) < 1e-9 else _pct(v)

    parts = []
    n_edit = fig.get("edit_images", totals.get("edit"))
    n_held = fig.get("held_out_failures")
    if n_held is None and "fixed" in totals and "still_wrong" in totals:
        n_held = totals["fixed"] + totals["still_wrong"]
    fixed = []
    if (s := frac("success")) is not None:
        fixed.append(f"fixed {whole_pct(s)} of the {_count(n_edit, 'edit image')}" if n_edit is not None
                     else f"fixed {whole_pct(s)} of the edit images")
    if (g := frac("generalization")) is not None:
        held = f"{whole_pct(g)} of {_count(n_held, 'held-out failure')}" if n_held is not None \
            else f"{whole_pct(g)} of the held-out failures"
        fixed.append(("and " if fixed else "fixed ") + held)
    if fixed:
        parts.append(" ".join(fixed))
    before, after = frac("accuracy_before"), frac("accuracy_after")
    if before is not None and after is not None:
        drop = fig.get("accuracy_drop")
        drop = drop if _is_number(drop) else 100 * (before - after)
        change = f"{-drop:+.2f} points".replace("-", "\u2212")
        if isinstance(ci := fig.get("accuracy_drop_ci95"), (list, tuple)) and len(ci) == 2:
            change += f", 95% CI of the drop {format_value('accuracy_drop_ci95', ci)}".replace("-", "\u2212")
        cost = f"check accuracy {_pct(before)} \u2192 {_pct(after)} ({change})"
        if (flip := frac("flip_rate")) is not None:
            cost += f", {_pct(flip)} of predictions changed"
        parts.append(cost)
    elif (flip := frac("flip_rate")) is not None:
        parts.append(f"{_pct(flip)} of check predictions changed")
    if (loc := frac("locality")) is not None:
        parts.append(f"locality {_pct(loc)}")
    return "; ".join(parts)


def _count(n: Any, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}" if _is_number(n) else f"{n} {noun}s"


# ----------------------------------------------------------------------------------------- page

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-soft: #f6f8fa;
        --good: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1200px; padding: 24px 32px 48px; color: var(--fg); background: #fff;
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 6px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p { margin: 4px 0; }
code { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
.summary { font-size: 16px; margin: 10px 0; padding: 10px 14px; background: var(--bg-soft);
           border-left: 4px solid #0969da; border-radius: 4px; }
.command { color: var(--muted); }
.meta { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 0 32px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; padding-left: 12px; }
.kv th { font-weight: normal; white-space: nowrap; }
.good { color: var(--good); font-weight: 600; }
.bad { color: var(--bad); font-weight: 600; }
.muted, .description { color: var(--muted); }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots figure { margin: 0; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(108px, 1fr)); gap: 10px 8px;
        margin-top: 8px; }
.item { margin: 0; text-align: center; }
.frame { width: 76px; height: 76px; margin: 0 auto; display: flex; align-items: center;
         justify-content: center; background: var(--bg-soft); border: 1px solid var(--line); }
img.thumb { display: block; image-rendering: pixelated; }
.item figcaption { font-size: 11px; line-height: 1.3; margin-top: 3px; overflow-wrap: anywhere; }
.unreadable .frame { color: var(--bad); font-size: 11px; position: relative; }
.unreadable .frame span { position: absolute; }
tr.up td.change { color: var(--good); font-weight: 600; }
tr.down td.change { color: var(--bad); font-weight: 600; }
tr.up { background: #dafbe1; }
tr.down { background: #ffebe9; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

# No network, no scripts: only inline styles and data: images may load.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _page(report: dict, shown: dict[str, list[int]], thumbs: _ThumbnailCache, seed: int) -> Iterator[str]:
    """The page, in chunks, top to bottom."""
    title = _esc(report["title"])
    yield ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
           '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
           f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n")
    yield f"<header>\n<h1>{title}</h1>\n"
    if line := summary_line(report):
        yield f'<p class="summary">{_esc(line)}</p>\n'
    if report["command"]:
        yield f'<p class="command">made by <code>{_esc(report["command"])}</code></p>\n'
    yield "</header>\n"
    if report["figures"] or report["provenance"]:
        yield '<div class="meta">\n'
        if report["figures"]:
            yield "<section>\n<h2>Figures</h2>\n"
            yield _kv_table({k: format_value(k, v) for k, v in report["figures"].items()})
            yield "</section>\n"
        if report["provenance"]:
            yield "<section>\n<h2>Provenance</h2>\n"
            yield _kv_table({k: format_value(k, v) for k, v in report["provenance"].items()}, code=True)
            yield "</section>\n"
        yield "</div>\n"
    if report["plots"]:
        yield '<section>\n<h2>Plots</h2>\n<div class="plots">\n'
        for p in report["plots"]:
            uri = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")
            yield (f'<figure><img class="plot" src="{uri}" alt="{_esc(p.name)}">'
                   f"<figcaption>{_esc(p.name)}</figcaption></figure>\n")
        yield "</div>\n</section>\n"
    for g in report["galleries"]:
        yield from _gallery(g, shown[g["key"]], report["labels"], thumbs, seed)
    if report["per_class"]:
        yield _per_class(report["per_class"])
    if report["edits"]:
        yield "<section>\n<h2>Edits in this model</h2>\n"
        yield _table(report["edits"], lambda k, v: format_value(k, v))
        yield "</section>\n"
    if report["notes"]:
        yield "<section>\n<h2>Notes</h2>\n<ul>\n"
        yield "".join(f"<li>{_esc(n)}</li>\n" for n in report["notes"])
        yield "</ul>\n</section>\n"
    version = report["provenance"].get("vitedit_version")
    yield f'<footer>vitedit{" " + _esc(version) if version else ""} edit report</footer>\n</body>\n</html>\n'


def _kv_table(rows: dict[str, str], code: bool = False) -> str:
    cell = (lambda v: f"<code>{_esc(v)}</code>") if code else _esc
    body = "".join(f"<tr><th>{_esc(k.replace('_', ' '))}</th><td>{cell(v)}</td></tr>\n" for k, v in rows.items())
    return f'<table class="kv">\n{body}</table>\n'


def _table(rows: list[dict], fmt: Callable[[str, Any], str]) -> str:
    """A table with the union of the rows' keys as columns, in order of first appearance."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in columns)
    # A key a row lacks is left blank; a value of None reads "n/a".
    body = "".join("<tr>" + "".join(f"<td>{_esc(fmt(c, row[c])) if c in row else ''}</td>" for c in columns)
                   + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _gallery(g: dict, indices: list[int], labels: list[str], thumbs: _ThumbnailCache,
             seed: int) -> Iterator[str]:
    key = _esc(g["key"])
    total = g["total"]
    if len(indices) == total:
        count = f"showing all {total:,} images"
    else:
        count = f"showing {len(indices):,} of {total:,} images"
        if len(indices) < len(g["items"]):
            count += f" (a random sample, seed {seed})"

    yield f'<section class="gallery" id="gallery-{key}">\n<h2>{_esc(g["title"])}</h2>\n'
    if g["description"]:
        yield f'<p class="description">{_esc(g["description"])}</p>\n'
    yield f'<p class="count">{count}</p>\n<div class="grid">\n'
    for i in indices:
        item = g["items"][i]
        got = thumbs.get(item["path"], g["key"])
        unreadable = got is None
        uri, w, h = thumbs.placeholder() if unreadable else got
        caption = _caption(item, labels)
        path = _esc(os.fspath(item["path"]))
        alt = "unreadable image" if unreadable else caption["text"]
        yield (f'<figure class="item{" unreadable" if unreadable else ""}" title="{path}">'
               f'<div class="frame"><img class="thumb" data-gallery="{key}" data-item="{i}" '
               f'src="{uri}" width="{w}" height="{h}" alt="{_esc(alt)}">'
               f'{"<span>unreadable</span>" if unreadable else ""}</div>'
               f'<figcaption>{caption["html"]}</figcaption></figure>\n')
    yield "</div>\n</section>\n"


def _caption(item: dict, labels: list[str]) -> dict[str, str]:
    """"true X · before Y → after Z"; the after-label green when right, red when wrong (if X known)."""
    true, before, after = (_class_name(labels, item.get(f)) for f in ("label", "before", "after"))
    after_cls = ""
    if true is not None and after is not None:
        after_cls = "good" if after == true else "bad"
    shown = [x if x is not None else "unknown" for x in (true, before, after)]
    text = f"true {shown[0]} \u00b7 before {shown[1]} \u2192 after {shown[2]}"
    after_html = f'<span class="{after_cls}">{_esc(shown[2])}</span>' if after_cls else _esc(shown[2])
    markup = (f"true {_esc(shown[0])} \u00b7 before {_esc(shown[1])} \u2192 after {after_html}")
    return {"text": text, "html": markup}


def _per_class(rows: list[dict]) -> str:
    body = []
    for row in rows:
        before, after = row.get("before"), row.get("after")
        change, cls = "n/a", ""
        if _is_number(before) and _is_number(after):
            points = 100 * (after - before)
            # Highlight any change visible at two decimals; no change reads "0.00", unsigned.
            cls = "up" if points >= 0.005 else "down" if points <= -0.005 else ""
            change = f"{points:+.2f}".replace("-", "\u2212") if cls else "0.00"
        images = row.get("images")
        cells = (f'<td>{_esc(row.get("class", ""))}</td>'
                 f'<td class="num">{_esc(format_value("images", images))}</td>'
                 f'<td class="num">{_esc(_acc(before))}</td><td class="num">{_esc(_acc(after))}</td>'
                 f'<td class="num change">{_esc(change)}</td>')
        attr = f' class="{cls}"' if cls else ""
        body.append(f"<tr{attr}>{cells}</tr>\n")
    return ("<section>\n<h2>Per-class check accuracy</h2>\n<table>\n"
            '<tr><th>class</th><th class="num">images</th><th class="num">before</th>'
            '<th class="num">after</th><th class="num">change (points)</th></tr>\n'
            + "".join(body) + "</table>\n</section>\n")


def _acc(value: Any) -> str:
    return _pct(value) if _is_number(value) and 0 <= value <= 1 else format_value("", value)
