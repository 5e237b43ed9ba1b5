"""The HTML report: one offline file, every image inlined, counts right, strings escaped, atomic write.

The structural tests parse the page with the stdlib HTML parser; the browser tests load it in
headless Chromium (skipped when no Chromium is installed) and check what it renders.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import write_images
from vitedit import html_report
from vitedit.errors import InputDataError, UsageError
from vitedit.html_report import THUMB_SIDE, render_report

EVIL = '<script>alert("x")</script>&'
EVIL_FILE = """<script>alert('x')&"q".png"""  # no "/" in a file name
LABELS = ["cat", "dog", "T-shirt/top", EVIL]
CAP = 8  # small cap so the fixture's galleries are sampled


class _Page(HTMLParser):
    """Collects every tag's attributes, the text, and the <style> contents."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.style: list[str] = []
        self._in_style = False
        self._in_count = False
        self.counts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._in_style = tag == "style"
        self._in_count = tag == "p" and attrs.get("class") == "count"

    def handle_endtag(self, tag):
        self._in_style = self._in_count = False

    def handle_data(self, data):
        (self.style if self._in_style else self.text).append(data)
        if self._in_count:
            self.counts.append(data)

    def imgs(self, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == "img" and (cls is None or cls in (a.get("class") or "").split())]

    def thumbs_per_gallery(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.imgs("thumb"):
            out[a["data-gallery"]] = out.get(a["data-gallery"], 0) + 1
        return out


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def decode_png(src: str):
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    img = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    assert img.format == "PNG"
    img.load()
    return img


def assert_offline(text: str, page: _Page) -> None:
    """No URL that would reach outside the file: no http(s)://, no //host, no @import, no url()."""
    assert not re.search(r"https?:", text, re.IGNORECASE)
    assert "@import" not in text.lower()
    assert not re.search(r"url\s*\(", "".join(page.style), re.IGNORECASE)
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base"), tag
        for name, value in attrs.items():
            value = (value or "").strip()
            assert not value.startswith("//"), (tag, name, value[:60])
            if name in ("src", "href", "srcset", "poster", "action", "formaction", "background"):
                assert value.startswith("data:image/png;base64,"), (tag, name, value[:60])
            if name == "style":
                assert "url(" not in value.lower()


def _gray_images(root: Path, n: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(5)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"gray_{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28)).astype(np.uint8), mode="L").save(p)
        paths.append(p)
    return paths


@pytest.fixture
def plot_png(tmp_path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(20, 180), (120, 60), (300, 30)], fill=(9, 105, 218), width=3)
    draw.rectangle([20, 20, 300, 180], outline="black")
    path = tmp_path / "plots" / "tradeoff.png"
    path.parent.mkdir()
    img.save(path)
    return path


@pytest.fixture
def report_data(tmp_path, plot_png) -> dict:
    rgb = sorted(write_images(tmp_path / "imgs", {"cat": 6, "dog": 6, "T-shirt_top": 5}, seed=0).rglob("*.png"))
    gray = _gray_images(tmp_path / "gray", 4)
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    evil = tmp_path / "imgs" / EVIL_FILE  # a path that would break out of an attribute
    shutil.copy(rgb[0], evil)

    def items(paths, label_of=lambda i: i % 3, after_of=lambda i: i % 3):
        return [{"path": str(p), "label": label_of(i), "before": (i + 1) % 4, "after": after_of(i)}
                for i, p in enumerate(paths)]

    edit = items(rgb[:6] + [broken, evil])                                # 8 items, cap not reached
    fixed = items(rgb + gray)                                             # 21 items -> sampled
    still_wrong = items(gray[:3], after_of=lambda i: (i + 1) % 3)         # wrong after: red
    collateral = items(rgb[::2], label_of=lambda i: 3, after_of=lambda i: 0)   # label is EVIL
    locality = [{"path": p, "label": None, "before": 0, "after": 1} for p in gray]  # Path values
    return {
        "title": "vitedit edit report: shirt",
        "command": "vitedit demo --failures ./shirt",
        "provenance": {"model": "vitedit/fashion-vit", "weights_sha256": "558c" + "0" * 60,
                       "hypernet": "shipped (sha256 1244...)", "vitedit_version": "0.1.0",
                       "created": "2026-12-01T22:00:00Z", "seed": 0},
        "figures": {"success": 1.0, "generalization": 0.86, "locality": 0.95, "accuracy_before": 0.91,
                    "accuracy_after": 0.905, "accuracy_drop": 0.5, "flip_rate": 0.012, "sparsity": 0.05,
                    "objective": "local", "units_edited": 154, "steps": 120, "margin": None},
        "plots": [plot_png],
        "labels": LABELS,
        "galleries": [
            {"key": "edit", "title": "Edit images", "description": "the failures the edit was fitted on",
             "total": len(edit), "items": edit},
            {"key": "fixed", "title": "Held-out failures now fixed", "total": 140, "items": fixed},
            {"key": "still_wrong", "title": "Held-out failures still wrong", "items": still_wrong},
            {"key": "collateral_check", "title": "Collateral: check images whose prediction changed",
             "total": len(collateral), "items": collateral},
            {"key": "collateral_locality", "title": "Collateral: locality images that changed",
             "total": 4, "items": locality},
        ],
        "per_class": [{"class": "cat", "images": 100, "before": 0.61, "after": 0.64},
                      {"class": EVIL, "images": 50, "before": 0.9, "after": 0.88},
                      {"class": "dog", "images": 80, "before": 0.5, "after": 0.5}],
        "edits": [{"index": 1, "failures": "/x/shirt", "sparsity": 0.05, "generalization": 0.86,
                   "accuracy_drop": 0.4},
                  {"index": 2, "failures": "/x/<coat>", "sparsity": 0.1, "note": "second edit"}],
        "notes": ["no locality set was given; locality uses the check set", EVIL],
    }


def expected_counts(data: dict, cap: int) -> dict[str, int]:
    return {g["key"]: min(len(g["items"]), cap) for g in data["galleries"]}


def test_page_is_self_contained_and_counts_match(tmp_path, report_data):
    out = tmp_path / "out" / "report.html"
    summary = render_report(report_data, out, max_per_gallery=CAP)
    text = out.read_text(encoding="utf-8")
    page = parse(text)

    assert summary["path"] == str(out) and summary["bytes"] == out.stat().st_size
    assert summary["thumbnails"] == expected_counts(report_data, CAP)
    assert summary["totals"] == {"edit": 8, "fixed": 140, "still_wrong": 3, "collateral_check": 9,
                                 "collateral_locality": 4}
    assert summary["unreadable"] == {"edit": 1, "fixed": 0, "still_wrong": 0, "collateral_check": 0,
                                     "collateral_locality": 0}
    assert_offline(text, page)
    imgs = page.imgs()
    assert len(imgs) == sum(expected_counts(report_data, CAP).values()) + 1  # + the plot
    for a in imgs:
        decode_png(a["src"])
    assert len(page.imgs("plot")) == 1
    assert page.thumbs_per_gallery() == expected_counts(report_data, CAP)
    # Every gallery states its full count.
    counts = " | ".join(page.counts)
    assert "showing 8 of 140 images" in counts and "showing all 8 images" in counts
    for g in report_data["galleries"]:
        assert f"{g.get('total', len(g['items'])):,} images" in counts
    # Only sampled galleries show a subset; the shown items keep the items' order.
    fixed = [int(a["data-item"]) for a in page.imgs("thumb") if a["data-gallery"] == "fixed"]
    assert fixed == sorted(fixed) and len(set(fixed)) == CAP and max(fixed) < 21


def test_header_figures_and_tables(tmp_path, report_data):
    out = tmp_path / "report.html"
    render_report(report_data, out, max_per_gallery=CAP)
    page = parse(out.read_text(encoding="utf-8"))
    body = " ".join(page.text)
    assert ("fixed 100% of the 8 edit images and 86% of 143 held-out failures; "
            "check accuracy 91.0% \u2192 90.5% (\u22120.50 points), 1.2% of predictions changed") in body
    for shown in ("95.0%", "0.50 points", "0.05", "154", "n/a", "local", "vitedit demo --failures ./shirt",
                  "558c" + "0" * 60, "2026-12-01T22:00:00Z"):
        assert shown in body, shown
    # Per-class: change in points, highlighted up / down; an unchanged class is not highlighted.
    rows = [a.get("class") for t, a in page.tags if t == "tr"]
    assert "up" in rows and "down" in rows
    assert "+3.00" in body and "\u22122.00" in body and "+0.00" not in body and "\u22120.00" not in body
    # Edits table: union of the rows' keys, formatted like the figures.
    assert "note" in body and "second edit" in body and "0.40 points" in body and "/x/<coat>" in body
    assert "no locality set was given; locality uses the check set" in body
    # Caption colours: after-label green when it is the true label, red when not, plain when unknown.
    spans = [a.get("class") for t, a in page.tags if t == "span"]
    assert "good" in spans and "bad" in spans
    assert "true unknown \u00b7 before cat \u2192 after dog" in body  # locality: label unknown


def test_intervals_show_in_the_summary_and_the_figures(tmp_path, report_data):
    report_data["figures"].update(accuracy_drop_ci95=[-0.2, 1.2], flip_rate_ci95=[0.006, 0.021])
    out = tmp_path / "report.html"
    render_report(report_data, out, max_per_gallery=CAP)
    body = " ".join(parse(out.read_text(encoding="utf-8")).text)
    assert ("check accuracy 91.0% \u2192 90.5% (\u22120.50 points, 95% CI of the drop \u22120.20 to 1.20 points)"
            in body)
    assert "0.6% to 2.1%" in body


def test_strings_are_escaped(tmp_path, report_data):
    out = tmp_path / "report.html"
    render_report(report_data, out, max_per_gallery=64)
    text = out.read_text(encoding="utf-8")
    page = parse(text)
    assert "<script" not in text.lower()
    assert not [t for t, _ in page.tags if t == "script"]
    body = " ".join(page.text)
    assert EVIL in body  # shown literally, as text: class name, per-class row, note
    titles = [a["title"] for t, a in page.tags if t == "figure" and "title" in a]
    assert any(t.endswith(EVIL_FILE) for t in titles)  # the path survives in its attribute


def test_thumbnails_resized_gray_stays_gray_and_crisp(tmp_path, report_data):
    from PIL import Image

    out = tmp_path / "report.html"
    render_report(report_data, out, max_per_gallery=64)
    page = parse(out.read_text(encoding="utf-8"))
    figures = {a["title"]: None for t, a in page.tags if t == "figure" and "title" in a}
    thumbs = [a for a in page.imgs("thumb") if a["data-gallery"] == "collateral_locality"]
    assert len(thumbs) == 4 and len(figures) > 4
    sources = [Path(it["path"]) for it in report_data["galleries"][4]["items"]]
    for a, src in zip(thumbs, sources):
        img = decode_png(a["src"])
        assert img.mode == "L" and img.size == (THUMB_SIDE, THUMB_SIDE)
        assert (int(a["width"]), int(a["height"])) == img.size
        # Nearest-neighbour enlarging only repeats pixels: no value appears that the source lacks.
        assert set(np.unique(np.asarray(img))) <= set(np.unique(np.asarray(Image.open(src))))
    rgb = [a for a in page.imgs("thumb") if a["data-gallery"] == "collateral_check"]
    assert all(decode_png(a["src"]).mode == "RGB" and decode_png(a["src"]).size == (72, 72) for a in rgb)
    # The unreadable file became a placeholder, not a crash.
    unreadable = [a for t, a in page.tags if t == "figure" and "unreadable" in a.get("class", "")]
    assert len(unreadable) == 1 and unreadable[0]["title"].endswith("broken.png")
    assert "unreadable" in " ".join(page.text)


def test_deterministic_sampling(tmp_path, report_data):
    a, b, c = tmp_path / "a.html", tmp_path / "b.html", tmp_path / "c.html"
    render_report(report_data, a, max_per_gallery=CAP, seed=3)
    render_report(report_data, b, max_per_gallery=CAP, seed=3)
    render_report(report_data, c, max_per_gallery=CAP, seed=4)
    assert a.read_bytes() == b.read_bytes()

    def shown(path):
        return [x["data-item"] for x in parse(path.read_text(encoding="utf-8")).imgs("thumb")
                if x["data-gallery"] == "fixed"]

    assert shown(a) != shown(c)  # 8 of 21: two seeds picking the same set is a 1 in 203,490 chance


def test_large_gallery_stays_small(tmp_path):
    # 5,000 items cycling over 50 noise images (the least compressible case); only 64 are shown.
    paths = sorted(write_images(tmp_path / "big", {"a": 25, "b": 25}, seed=7, size=64).rglob("*.png"))
    items = [{"path": str(paths[i % 50]), "label": i % 2, "before": 1, "after": i % 2} for i in range(5000)]
    data = {"title": "big", "labels": ["a", "b"], "galleries": [{"key": "big", "total": 5000, "items": items}]}
    out = tmp_path / "big.html"
    summary = render_report(data, out)
    page = parse(out.read_text(encoding="utf-8"))
    assert summary["thumbnails"] == {"big": 64} and page.thumbs_per_gallery() == {"big": 64}
    assert "showing 64 of 5,000 images" in " ".join(page.counts)
    assert out.stat().st_size < 4_000_000, out.stat().st_size


def test_write_is_atomic(tmp_path, report_data, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("previous report", encoding="utf-8")
    real, calls = html_report._thumbnail, []

    def flaky(path):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("disk went away mid-render")
        return real(path)

    monkeypatch.setattr(html_report, "_thumbnail", flaky)
    with pytest.raises(RuntimeError, match="mid-render"):
        render_report(report_data, out)
    assert out.read_text(encoding="utf-8") == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.html"]
    monkeypatch.setattr(html_report, "_thumbnail", real)
    render_report(report_data, out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.html"]


def test_bad_input_raises_before_writing(tmp_path, report_data):
    out = tmp_path / "r" / "report.html"
    missing = dict(report_data, plots=[tmp_path / "nope.png"])
    with pytest.raises(InputDataError, match=r"plot .*nope\.png not found"):
        render_report(missing, out)
    notpng = tmp_path / "plot.png"
    notpng.write_text("GIF89a")
    with pytest.raises(InputDataError, match="not a PNG"):
        render_report(dict(report_data, plots=[notpng]), out)
    with pytest.raises(InputDataError, match="unknown key 'gallery'"):
        render_report(dict(report_data, gallery=[]), out)
    twice = dict(report_data, galleries=report_data["galleries"][:1] * 2)
    with pytest.raises(InputDataError, match="appears twice"):
        render_report(twice, out)
    short = dict(report_data, galleries=[dict(report_data["galleries"][0], total=2)])
    with pytest.raises(InputDataError, match="total 2 but 8 items"):
        render_report(short, out)
    bad_label = dict(report_data, labels=["cat"])
    with pytest.raises(InputDataError, match="names only 1 classes"):
        render_report(bad_label, out)
    with pytest.raises(UsageError, match="max_per_gallery"):
        render_report(report_data, out, max_per_gallery=-1)
    with pytest.raises(UsageError, match="is a folder"):
        render_report(report_data, tmp_path)
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_minimal_data_and_zero_cap(tmp_path):
    out = tmp_path / "r.html"
    items = [{"path": "/does/not/exist.png", "label": 0, "before": 0, "after": 0}]
    summary = render_report({"galleries": [{"key": "g", "items": items}]}, out, max_per_gallery=0)
    assert summary["thumbnails"] == {"g": 0} and summary["totals"] == {"g": 1}
    page = parse(out.read_text(encoding="utf-8"))
    assert page.imgs() == [] and "showing 0 of 1 images" in " ".join(page.counts)
    summary = render_report({"galleries": [{"key": "g", "items": items}]}, out)
    assert summary["unreadable"] == {"g": 1}  # missing file: placeholder
    assert parse(out.read_text(encoding="utf-8")).thumbs_per_gallery() == {"g": 1}


def test_import_is_cheap():
    code = "import sys, vitedit.html_report; print('PIL' in sys.modules, 'torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------- browser


def _browser() -> str:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser"):
        if found := shutil.which(name):
            return found
    pytest.skip("no Chromium installed (apt-get install -y chromium); skipping the browser check")


def _run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]
    try:
        return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{browser} did not finish within 60 s")


def test_browser_renders_page(tmp_path, report_data):
    from PIL import Image

    browser = _browser()
    out = tmp_path / "report.html"
    render_report(report_data, out, max_per_gallery=CAP)
    url = out.resolve().as_uri()

    shot = tmp_path / "shot.png"
    res = _run_browser(browser, tmp_path / "profile1", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.exists(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    arr = np.asarray(img)
    assert arr.std() > 20, "screenshot is blank"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 200  # text, tables and thumbnails, not a flat page

    res = _run_browser(browser, tmp_path / "profile2", "--dump-dom", url)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = parse(res.stdout)
    assert dom.thumbs_per_gallery() == expected_counts(report_data, CAP)
    assert len(dom.imgs("plot")) == 1
    assert not [t for t, _ in dom.tags if t == "script"]
