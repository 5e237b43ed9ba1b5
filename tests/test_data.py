"""Tests for vitedit.data: folder layout, robust image opening, images -> tensors.

Every image is generated in tmp_path at test time; nothing binary is committed, nothing is fetched.
"""

from __future__ import annotations

import os
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitedit.data import (
    IMAGE_SUFFIXES,
    BadImage,
    BadImageError,
    ImageBatches,
    ImageRef,
    iter_batches,
    load_tensors,
    open_image,
    resolve_class_folder,
    safe_label_name,
    scan_labeled,
    scan_unlabeled,
)
from vitedit.errors import InputDataError

# Fashion-MNIST's labels: one has a slash, one a space.
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(H, W[, C]) uint8 PIL image -> (C, H, W) float in [0, 1] (torchvision's to_tensor, minus its import time)."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def save(path: Path, img: Image.Image | None = None, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if img is None:
        img = Image.new("RGB", (8, 8), (10, 20, 30))
    img.save(path, format=fmt, **kw)
    return path


def noise(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def truncated(path: Path, fmt: str) -> Path:
    save(path, noise(), fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height but holds one empty IDAT: tiny on disk, a bomb to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def reason_of(path: Path, channels: int = 3) -> str:
    with pytest.raises(BadImageError) as info:
        open_image(path, channels)
    err = info.value
    assert err.exit_code == 3
    assert [b.path for b in err.bad] == [path]
    assert str(path) in str(err) and "--skip-bad-images" in str(err)
    return err.bad[0].reason


# --------------------------------------------------------------------------- names


def test_image_suffixes_are_lowercase_with_dot():
    assert {".png", ".jpg", ".jpeg", ".webp", ".tiff", ".pgm"} <= IMAGE_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)


@pytest.mark.parametrize("label, safe", [
    ("T-shirt/top", "T-shirt_top"),
    ("Ankle boot", "Ankle boot"),
    ('a\\b:c*d?e"f<g>h|i', "a_b_c_d_e_f_g_h_i"),
    ("tab\there", "tab_here"),
    ("  .hidden name. ", "hidden name"),
    ("...", "_"),
    ("été", "été"),
])
def test_safe_label_name(label, safe):
    assert safe_label_name(label) == safe


@pytest.mark.parametrize("folder, index", [
    ("Ankle boot", 9),        # exact
    ("T-shirt_top", 0),       # folder-safe spelling
    ("ankle-boot", 9),        # loose: case and hyphen
    ("ANKLE_BOOT", 9),
    ("tshirt top", 0),        # loose: punctuation dropped
    ("3", 3),                 # class index
    ("0", 0),
])
def test_resolve_class_folder(folder, index):
    assert resolve_class_folder(folder, LABELS) == index


def test_resolve_prefers_exact_label_over_index():
    assert resolve_class_folder("3", ["zero", "one", "3"]) == 2


def test_resolve_matches_decomposed_unicode_from_macos():
    nfd = unicodedata.normalize("NFD", "été")
    assert nfd != "été"
    assert resolve_class_folder(nfd, ["hiver", "été"]) == 1


def test_resolve_unknown_suggests_closest_label_and_index_names():
    with pytest.raises(InputDataError) as info:
        resolve_class_folder("Ankel bot", LABELS)
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert "'Ankel bot'" in msg and "did you mean" in msg and "'Ankle boot'" in msg
    assert "0..9" in msg


def test_resolve_unknown_suggests_safe_spelling():
    with pytest.raises(InputDataError, match="'T-shirt_top'"):
        resolve_class_folder("T-shrt top", LABELS)


def test_resolve_index_out_of_range_says_how_many_classes():
    with pytest.raises(InputDataError, match=r"index 10.*only 10 classes \(0\.\.9\)"):
        resolve_class_folder("10", LABELS)


def test_resolve_ambiguous_loose_match_names_both_and_the_fix():
    with pytest.raises(InputDataError) as info:
        resolve_class_folder("ab", ["a b", "A-B", "c"])
    msg = str(info.value)
    assert "several labels" in msg and "'a b'" in msg and "'A-B'" in msg and "class index" in msg


# --------------------------------------------------------------------------- scan_labeled


def test_scan_labeled_full_layout(tmp_path):
    root = tmp_path / "FAILURES"
    save(root / "Ankle boot" / "été 1.png")
    save(root / "Ankle boot" / "a.jpg")
    save(root / "T-shirt_top" / "x.png")
    save(root / "3" / "b.png")
    save(root / "bag" / "sub" / "deeper" / "d.png")        # nested: still class Bag
    save(root / "bag" / "mislabelled.dat", fmt="PNG")        # unknown suffix: a candidate
    (root / "bag" / ".DS_Store").write_bytes(b"\0junk")
    (root / "bag" / "README.md").write_text("notes")
    (root / "bag" / "readme").write_text("notes")
    (root / "bag" / "notes.txt").write_text("notes")
    (root / "bag" / "meta.json").write_text("{}")
    (root / "bag" / "Thumbs.db").write_bytes(b"x")
    save(root / "bag" / ".hidden.png")
    save(root / "bag" / ".cache" / "y.png")                  # hidden folder
    save(root / "__MACOSX" / "bag" / "z.png")                # zip junk folder
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "README.txt").write_text("how to")
    (root / "labels.csv").write_text("a,b")                  # loose non-image at top: ignored
    target = save(tmp_path / "elsewhere" / "real.png")
    (root / "Sneaker").mkdir()
    (root / "Sneaker" / "link.png").symlink_to(target)
    (root / "Sneaker" / "broken.png").symlink_to(tmp_path / "gone.png")

    refs = scan_labeled(root, LABELS)

    got = [(r.label, r.folder, r.path.relative_to(root).as_posix()) for r in refs]
    assert got == [
        (0, "T-shirt_top", "T-shirt_top/x.png"),
        (3, "3", "3/b.png"),
        (7, "Sneaker", "Sneaker/broken.png"),
        (7, "Sneaker", "Sneaker/link.png"),
        (8, "bag", "bag/mislabelled.dat"),
        (8, "bag", "bag/sub/deeper/d.png"),
        (9, "Ankle boot", "Ankle boot/a.jpg"),
        (9, "Ankle boot", "Ankle boot/été 1.png"),
    ]
    assert all(isinstance(r, ImageRef) for r in refs)


def test_scan_labeled_missing_root(tmp_path):
    with pytest.raises(InputDataError, match=r"nope does not exist; check the path") as info:
        scan_labeled(tmp_path / "nope", LABELS)
    assert info.value.exit_code == 3


def test_scan_labeled_root_is_a_file(tmp_path):
    f = save(tmp_path / "one.png")
    with pytest.raises(InputDataError, match="is a file, not a folder; pass the folder"):
        scan_labeled(f, LABELS)


def test_scan_labeled_empty_root(tmp_path):
    (tmp_path / "README.md").write_text("only junk")
    with pytest.raises(InputDataError) as info:
        scan_labeled(tmp_path, LABELS)
    msg = str(info.value)
    assert f"{tmp_path} is empty" in msg and "one sub-folder per true class" in msg
    assert str(tmp_path / "T-shirt_top") in msg


def test_scan_labeled_images_at_top_level(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.jpg")
    save(tmp_path / "Bag" / "c.png")
    with pytest.raises(InputDataError) as info:
        scan_labeled(tmp_path, LABELS)
    msg = str(info.value)
    assert "2 image file(s) lie directly in" in msg and str(tmp_path) in msg
    assert "a.png" in msg and "b.jpg" in msg
    assert "move each into a sub-folder named after its true class" in msg


def test_scan_labeled_unknown_class_folder_names_path_and_suggestion(tmp_path):
    save(tmp_path / "Ankel boot" / "a.png")
    with pytest.raises(InputDataError) as info:
        scan_labeled(tmp_path, LABELS)
    msg = str(info.value)
    assert f"'Ankel boot' in {tmp_path}" in msg and "'Ankle boot'" in msg and "0..9" in msg


def test_scan_labeled_class_folders_without_images(tmp_path):
    (tmp_path / "Bag").mkdir()
    (tmp_path / "Coat" / "README.md").parent.mkdir()
    (tmp_path / "Coat" / "README.md").write_text("x")
    with pytest.raises(InputDataError) as info:
        scan_labeled(tmp_path, LABELS)
    msg = str(info.value)
    assert "Bag, Coat" in msg and "hold no image files" in msg and "folder of its true class" in msg


def test_scan_labeled_merges_two_spellings_of_one_class(tmp_path):
    save(tmp_path / "T-shirt_top" / "a.png")
    save(tmp_path / "0" / "b.png")
    refs = scan_labeled(tmp_path, LABELS)
    assert [r.label for r in refs] == [0, 0]
    assert {r.folder for r in refs} == {"T-shirt_top", "0"}


def test_scan_labeled_survives_symlink_loop(tmp_path):
    save(tmp_path / "Bag" / "a.png")
    (tmp_path / "Bag" / "loop").symlink_to(tmp_path / "Bag", target_is_directory=True)
    refs = scan_labeled(tmp_path, LABELS)
    assert [r.path.name for r in refs] == ["a.png"]


# --------------------------------------------------------------------------- scan_unlabeled


def test_scan_unlabeled_recursive_and_sorted(tmp_path):
    save(tmp_path / "b.png")
    save(tmp_path / "a" / "z.png")
    save(tmp_path / "a" / ".hidden.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "README").write_text("x")
    refs = scan_unlabeled(tmp_path)
    assert [r.path.relative_to(tmp_path).as_posix() for r in refs] == ["a/z.png", "b.png"]
    assert all(r.label is None and r.folder is None for r in refs)


def test_scan_unlabeled_missing_and_empty(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        scan_unlabeled(tmp_path / "nope")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(InputDataError, match=r"holds no image files; put the images in it"):
        scan_unlabeled(tmp_path)


# --------------------------------------------------------------------------- open_image: good files


def test_png_with_jpg_suffix_loads(tmp_path):
    p = save(tmp_path / "really_png.jpg", Image.new("RGB", (5, 4), (1, 2, 3)), "PNG")
    img = open_image(p, 3)
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (1, 2, 3)


def test_unicode_and_space_path_loads(tmp_path):
    p = save(tmp_path / "Ankle boot" / "été 1.png")
    assert open_image(p, 3).size == (8, 8)


def test_channels_one_and_three(tmp_path):
    p = save(tmp_path / "c.png", Image.new("RGB", (2, 2), (255, 255, 255)))
    assert open_image(p, 1).mode == "L" and open_image(p, 1).getpixel((0, 0)) == 255
    g = save(tmp_path / "g.png", Image.new("L", (2, 2), 77))
    assert open_image(g, 3).getpixel((1, 1)) == (77, 77, 77)
    with pytest.raises(ValueError, match="channels"):
        open_image(p, 4)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    p = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=95)
    img = open_image(p, 3)
    assert img.mode == "RGB"
    r, g, b = img.getpixel((4, 4))
    assert r > 230 and g < 25 and b < 25  # CMYK (0, 255, 255, 0) is red


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[65535, 32896], [0, 257]], dtype=np.uint16)
    p = save(tmp_path / "deep.png", Image.fromarray(a))
    assert Image.open(p).mode == "I;16"
    img = open_image(p, 1)
    # 65535 / 257 = 255, 32896 / 257 = 128, 257 / 257 = 1
    assert img.mode == "L" and np.asarray(img).tolist() == [[255, 128], [0, 1]]
    assert open_image(p, 3).getpixel((1, 0)) == (128, 128, 128)


def test_32bit_int_is_clipped_to_16bit_then_scaled(tmp_path):
    a = np.array([[-5, 70000], [32896, 65535]], dtype=np.int32)
    p = save(tmp_path / "int.tif", Image.fromarray(a))
    assert Image.open(p).mode == "I"
    assert np.asarray(open_image(p, 1)).tolist() == [[0, 255], [128, 255]]


def test_float_image_in_unit_range_and_in_byte_range(tmp_path):
    unit = save(tmp_path / "unit.tif", Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32)))
    assert np.asarray(open_image(unit, 1)).tolist() == [[0, 64, 255]]  # x 255, rounded
    byte = save(tmp_path / "byte.tif", Image.fromarray(np.array([[0.0, 100.0, 300.0]], np.float32)))
    assert np.asarray(open_image(byte, 1)).tolist() == [[0, 100, 255]]  # clipped at 255


def test_palette_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.putpixel((0, 0), 0)  # transparent index
    img.putpixel((1, 0), 1)
    p = save(tmp_path / "pal.png", img, transparency=0)
    out = open_image(p, 3)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)


def test_plain_palette_gif(tmp_path):
    p = save(tmp_path / "pal.gif", Image.new("RGB", (4, 4), (255, 0, 0)).convert("P"))
    assert open_image(p, 3).getpixel((2, 2)) == (255, 0, 0)


def test_rgba_and_la_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    out = open_image(save(tmp_path / "rgba.png", img), 3)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white, not red/black
    assert out.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))  # half black over white
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (50, 255)])
    assert np.asarray(open_image(save(tmp_path / "la.png", la), 1)).tolist() == [[255, 50]]


def test_one_bit_image(tmp_path):
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    out = open_image(save(tmp_path / "bw.png", img), 3)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    # Stored 20 wide x 10 tall: red top-left quadrant (x < 10, y < 5), blue elsewhere.
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :] = (0, 0, 255)
    a[:5, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    p = save(tmp_path / "rot.jpg", Image.fromarray(a), quality=95, subsampling=0, exif=exif.tobytes())
    img = open_image(p, 3)
    assert img.size == (10, 20)
    # Stored (x, y) -> shown (9 - y, x): the red quadrant is now the top-right one.
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    px = np.asarray(img).astype(int)  # (H, W, 3)
    assert np.abs(px[3, 8] - red).max() < 40
    assert np.abs(px[3, 1] - blue).max() < 40
    assert np.abs(px[16, 8] - blue).max() < 40


def test_symlink_to_image_is_followed(tmp_path):
    target = save(tmp_path / "real.png")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert open_image(link, 3).size == (8, 8)


# --------------------------------------------------------------------------- open_image: bad files


def test_truncated_jpeg_and_png(tmp_path):
    for name, fmt in [("t.jpg", "JPEG"), ("t.png", "PNG")]:
        reason = reason_of(truncated(tmp_path / name, fmt))
        assert reason.startswith("truncated or corrupt image (")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.touch()
    assert reason_of(p) == "zero-byte file"


def test_text_file_named_png(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello, I am not an image\n")
    assert reason_of(p) == "not an image (cannot identify image file)"


def test_broken_symlink(tmp_path):
    p = tmp_path / "broken.png"
    p.symlink_to(tmp_path / "gone.png")
    assert reason_of(p).startswith("broken symlink (points to ")


def test_decompression_bomb_at_pillows_default_limit(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    p = png_header_only(tmp_path / "bomb.png", 40000, 40000)
    assert p.stat().st_size < 100
    reason = reason_of(p)
    assert reason == f"image too large (1600000000 pixels > limit {limit})"
    assert Image.MAX_IMAGE_PIXELS == limit  # guard left Pillow's setting alone


@pytest.mark.parametrize("size", [(40, 40), (300, 300)])  # warning band (1x..2x limit), error band
def test_decompression_bomb_lowered_limit(tmp_path, monkeypatch, size):
    p = save(tmp_path / "big.png", Image.new("1", size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "too large" in reason_of(p)


def test_bad_image_error_single_and_list_forms(tmp_path):
    one = BadImageError(tmp_path / "a.png", "zero-byte file")
    assert one.bad == [BadImage(tmp_path / "a.png", "zero-byte file")]
    assert isinstance(one, InputDataError) and one.exit_code == 3
    many = BadImageError([BadImage(tmp_path / f"{i:02d}.png", "zero-byte file") for i in range(12)])
    msg = str(many)
    assert msg.splitlines()[0] == ("12 images cannot be loaded; fix or remove these files, "
                                   "or pass --skip-bad-images to continue without them:")
    assert str(tmp_path / "09.png") in msg and str(tmp_path / "10.png") not in msg
    assert msg.splitlines()[-1] == "  ... and 2 more"
    import pickle
    assert pickle.loads(pickle.dumps(many)).bad == many.bad


# --------------------------------------------------------------------------- images -> tensors


@pytest.fixture
def mixed(tmp_path):
    """Three good images and three bad ones, interleaved: (refs, good_paths, bad_paths)."""
    good = [save(tmp_path / f"g{i}.png", Image.new("RGB", (6, 4), (i * 50, 0, 0))) for i in range(3)]
    empty = tmp_path / "b0.png"
    empty.touch()
    text = tmp_path / "b1.png"
    text.write_text("nope")
    cut = truncated(tmp_path / "b2.jpg", "JPEG")
    bad = [empty, text, cut]
    order = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    return [ImageRef(p, 1, "x") for p in order], good, bad


def test_load_tensors_lists_every_bad_image(mixed):
    refs, _, bad = mixed
    with pytest.raises(BadImageError) as info:
        load_tensors(refs, to_tensor, 3)
    assert [b.path for b in info.value.bad] == bad
    msg = str(info.value)
    assert all(str(p) in msg for p in bad) and "--skip-bad-images" in msg
    assert info.value.exit_code == 3


def test_load_tensors_skip_bad_returns_good_ones(mixed):
    refs, good, bad = mixed
    calls = []
    x, good_refs, bad_list = load_tensors(refs, to_tensor, 3, skip_bad=True,
                                          progress=lambda d, t: calls.append((d, t)))
    assert x.shape == (3, 3, 4, 6) and x.dtype == torch.float32
    assert [r.path for r in good_refs] == good
    assert [b.path for b in bad_list] == bad
    assert [b.reason for b in bad_list][:2] == ["zero-byte file", "not an image (cannot identify image file)"]
    # tensor[i] comes from good_refs[i]: red channel i * 50 / 255
    torch.testing.assert_close(x[:, 0, 0, 0], torch.tensor([0.0, 50.0, 100.0]) / 255)
    assert calls == [(i, 6) for i in range(1, 7)]


def test_load_tensors_grayscale(tmp_path):
    p = save(tmp_path / "a.png")
    x, _, _ = load_tensors([ImageRef(p, None, None)], to_tensor, 1)
    assert x.shape == (1, 1, 8, 8)


def test_load_tensors_nothing_good(tmp_path):
    p = tmp_path / "e.png"
    p.touch()
    with pytest.raises(InputDataError, match=r"none of the 1 images could be loaded .*e\.png: zero-byte file"):
        load_tensors([ImageRef(p, 0, "a")], to_tensor, 3, skip_bad=True)
    with pytest.raises(InputDataError, match="no images to load"):
        load_tensors([], to_tensor, 3)


def test_load_tensors_rejects_transform_without_fixed_size(tmp_path):
    refs = [ImageRef(save(tmp_path / "a.png", Image.new("RGB", (4, 4))), 0, "a"),
            ImageRef(save(tmp_path / "b.png", Image.new("RGB", (5, 5))), 0, "a")]
    with pytest.raises(ValueError, match="fixed size"):
        load_tensors(refs, to_tensor, 3)


def test_image_batches_match_load_tensors(mixed):
    refs, good, bad = mixed
    with pytest.raises(BadImageError) as info:
        ImageBatches(refs, to_tensor, 3, batch_size=2)
    assert [b.path for b in info.value.bad] == bad

    batches = ImageBatches(refs, to_tensor, 3, batch_size=2, skip_bad=True)
    assert len(batches) == 2 and [b.path for b in batches.bad] == bad
    out = list(batches)
    assert [t.shape[0] for t, _ in out] == [2, 1]
    assert [r.path for _, rs in out for r in rs] == good
    full, _, _ = load_tensors(refs, to_tensor, 3, skip_bad=True)
    torch.testing.assert_close(torch.cat([t for t, _ in out]), full)
    again = list(iter_batches(refs, to_tensor, 3, 3, skip_bad=True))
    assert len(again) == 1 and again[0][0].shape == (3, 3, 4, 6)


def test_image_batches_image_breaking_after_check(tmp_path):
    p = save(tmp_path / "a.png")
    batches = ImageBatches([ImageRef(p, 0, "a")], to_tensor, 3, batch_size=4)
    os.truncate(p, 0)
    with pytest.raises(BadImageError, match="zero-byte file"):
        list(batches)


def test_scan_then_load_end_to_end(tmp_path):
    root = tmp_path / "FAILURES"
    save(root / "Ankle boot" / "été 1.png")
    save(root / "bag" / "misnamed.dat", fmt="PNG")  # content sniffed: loads
    (root / "bag" / "x.png").write_text("text")
    (root / "bag" / "broken.png").symlink_to(tmp_path / "gone.png")
    refs = scan_labeled(root, LABELS)
    x, good, bad = load_tensors(refs, to_tensor, 3, skip_bad=True)
    assert x.shape == (2, 3, 8, 8)
    assert [(r.label, r.path.name) for r in good] == [(8, "misnamed.dat"), (9, "été 1.png")]
    assert {b.path.name: b.reason.split(" (")[0] for b in bad} == {
        "broken.png": "broken symlink", "x.png": "not an image"}


def test_import_does_not_pull_torch_or_pillow():
    import subprocess
    import sys

    code = ("import sys, vitedit.data; "
            "print(sorted(m for m in ('torch', 'PIL', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
