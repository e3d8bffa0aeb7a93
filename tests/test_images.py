"""load_rgb: every odd-but-valid image decodes to the same well-defined 8-bit RGB; every bad one is an ImageError."""

from __future__ import annotations

import io
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from olacache.inputs.images import ALPHA_BACKGROUND, ImageError, decode_rgb, load_rgb

IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def arr(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(np.int32)


# ----------------------------------------------------------------------------------------------- bundled files


def test_bundled_plain_and_unicode():
    for name in ["astronaut.jpg", "café ☕.jpg", "camera.png", "cell.png"]:
        im = load_rgb(IMAGES / name)
        assert im.mode == "RGB" and im.size[0] > 1
    gray = arr(load_rgb(IMAGES / "camera.png"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_bundled_16bit_scales_not_clips():
    # camera_16bit.png = camera.png * 257, so /257 must give back the 8-bit photo exactly
    a16 = arr(load_rgb(IMAGES / "camera_16bit.png"))
    a8 = arr(load_rgb(IMAGES / "camera.png"))
    assert np.array_equal(a16, a8)
    assert a16.max() < 255 or a16.min() > 0 or a16.std() > 20  # not a clipped near-white image


def test_bundled_palette_transparency_on_white():
    with Image.open(IMAGES / "coffee_palette_trns.png") as src:
        assert src.mode == "P"
        idx = np.asarray(src)
        trns = src.info["transparency"]
        pal_rgb = np.asarray(src.convert("RGB")).astype(np.int32)
    out = arr(load_rgb(IMAGES / "coffee_palette_trns.png"))
    hole = idx == trns
    assert hole.any() and (~hole).any()
    assert (out[hole] == ALPHA_BACKGROUND).all()
    assert np.array_equal(out[~hole], pal_rgb[~hole])


def test_bundled_rgba_composited_on_white():
    path = IMAGES / "nested" / "deep" / "chelsea_rgba.png"
    with Image.open(path) as src:
        rgba = np.asarray(src).astype(np.float64)
    out = arr(load_rgb(path))
    a = rgba[..., 3:4] / 255.0
    expect = rgba[..., :3] * a + 255.0 * (1 - a)
    assert np.abs(out - expect).max() <= 1  # alpha_composite rounding
    assert out[:, 0].mean() > rgba[:, 0, :3].mean() + 20  # the faded left edge is lighter, not darker


def test_bundled_cmyk():
    out = arr(load_rgb(IMAGES / "astronaut_cmyk.jpg"))
    ref = arr(load_rgb(IMAGES / "astronaut.jpg"))
    assert out.shape == ref.shape
    assert np.abs(out - ref).mean() < 25  # same picture (JPEG + naive CMYK round trip), not inverted


def test_bundled_exif_rotation():
    with Image.open(IMAGES / "rocket_exif_rot.jpg") as src:
        assert src.getexif().get(0x0112) == 6 and src.size == (192, 128)
    out = load_rgb(IMAGES / "rocket_exif_rot.jpg")
    assert out.size == (128, 192)  # orientation 6: rotated 90 degrees clockwise -> width/height swapped
    ref = load_rgb(IMAGES / "rocket.jpg").transpose(Image.Transpose.ROTATE_270)
    assert np.abs(arr(out) - arr(ref)).mean() < 6  # the same pixels, turned upright (JPEG noise aside)


def test_bundled_1bit_tiny_and_strip():
    horse = arr(load_rgb(IMAGES / "horse_1bit.png"))
    assert set(np.unique(horse)) <= {0, 255} and len(np.unique(horse)) == 2
    assert load_rgb(IMAGES / "one_pixel.png").size == (1, 1)
    assert load_rgb(IMAGES / "strip_400x6.jpg").size == (400, 6)


# ----------------------------------------------------------------------------------------------- generated


def save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_modes(tmp_path):
    g = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert np.array_equal(arr(load_rgb(save(tmp_path, "l.png", g)))[..., 1], np.asarray(g))

    # 16-bit: 65535 -> 255, 32768 -> 128 (rounded), 257*k -> k
    v16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = arr(load_rgb(save(tmp_path, "i16.png", Image.fromarray(v16))))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    # 32-bit "I" images (older Pillow's 16-bit PNG mode) use the same 16-bit scale
    i32 = Image.fromarray(np.array([[0, 257 * 200, 65535]], dtype=np.int32), mode="I")
    assert arr(load_rgb(save(tmp_path, "i32.tif", i32)))[0, :, 0].tolist() == [0, 200, 255]
    f = Image.fromarray(np.array([[-5.0, 10.4, 300.0]], dtype=np.float32), mode="F")
    assert arr(load_rgb(save(tmp_path, "f.tif", f)))[0, :, 0].tolist() == [0, 10, 255]

    la = Image.fromarray(np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8), mode="LA")
    assert arr(load_rgb(save(tmp_path, "la.png", la)))[0, :, 0].tolist() == [255, 0, 177]  # 100*128/255 + 255*127/255

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque pixel kept; fully transparent black becomes white
    out = arr(load_rgb(save(tmp_path, "t.png", Image.fromarray(rgba, "RGBA"))))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == list(ALPHA_BACKGROUND)

    # RGB PNG with a tRNS colour key: the keyed colour is transparent -> background
    rgb = Image.fromarray(np.array([[[1, 2, 3], [9, 9, 9]]], dtype=np.uint8))
    out = arr(load_rgb(save(tmp_path, "key.png", rgb, transparency=(1, 2, 3))))
    assert out[0, 0].tolist() == list(ALPHA_BACKGROUND) and out[0, 1].tolist() == [9, 9, 9]

    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # pure red in CMYK
    out = arr(load_rgb(save(tmp_path, "c.tif", cmyk)))
    assert out[0, 0].tolist() == [255, 0, 0]

    # tall strips load up to the 100:1 bound; 1x5000 (aspect 5000) is refused since issue 7: its 336-px
    # shortest-edge resize alone would take 1.7 GB (test_extreme_strip_is_refused_from_the_header)
    assert load_rgb(save(tmp_path, "tall.png", Image.new("RGB", (2, 200), (3, 4, 5)))).size == (2, 200)
    with pytest.raises(ImageError, match="aspect ratio"):
        load_rgb(save(tmp_path, "tall5000.png", Image.new("RGB", (1, 5000), (3, 4, 5))))
    assert load_rgb(save(tmp_path, "gif.gif", Image.new("P", (4, 4)))).mode == "RGB"


def test_exif_orientation_generated(tmp_path):
    a = np.zeros((4, 6, 3), np.uint8)
    a[0, 0] = 255  # a white top-left marker
    ex = Image.Exif()
    ex[0x0112] = 3  # rotate 180
    p = save(tmp_path, "r.png", Image.fromarray(a), exif=ex.tobytes())
    out = arr(load_rgb(p))
    assert out.shape == (4, 6, 3) and out[-1, -1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_bytes_equal_file():
    p = IMAGES / "coffee_palette_trns.png"
    assert np.array_equal(arr(decode_rgb(p.read_bytes(), "x.png")), arr(load_rgb(p)))


# ----------------------------------------------------------------------------------------------- failures


def reason(path) -> str:
    with pytest.raises(ImageError) as ei:
        load_rgb(path)
    assert ei.value.path == str(path) and str(path) in str(ei.value)
    return ei.value.reason


def test_missing_empty_dir_notimage(tmp_path):
    assert reason(tmp_path / "nope.jpg") == "missing file"
    (tmp_path / "zero.png").write_bytes(b"")
    assert reason(tmp_path / "zero.png") == "zero-byte file"
    (tmp_path / "d.jpg").mkdir()
    assert reason(tmp_path / "d.jpg") == "not a regular file"
    (tmp_path / "t.jpg").write_text("this is not an image")
    assert reason(tmp_path / "t.jpg").startswith("not an image")
    with pytest.raises(ImageError, match="zero-byte"):
        decode_rgb(b"", "mem")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    r = reason(p)
    assert r.startswith(("truncated", "corrupt")), r
    # header intact but the pixel data garbage
    bad = bytearray(data)
    bad[len(bad) // 2 :] = b"\x00" * (len(bad) - len(bad) // 2)
    p2 = tmp_path / f"garbage.{fmt.lower()}"
    p2.write_bytes(bytes(bad))
    if fmt == "PNG":  # a JPEG with zeroed entropy data may still decode (to garbage); PNG checks CRCs
        assert reason(p2).startswith(("truncated", "corrupt"))


@pytest.mark.parametrize("side", [12, 20])  # 144 px: Pillow's warning band; 400 px: Pillow's error band
def test_decompression_bomb(tmp_path, monkeypatch, side):
    p = save(tmp_path, "big.png", Image.new("RGB", (side, side)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert reason(p).startswith("decompression bomb")
    # the warnings filter is restored afterwards (the error escalation is local to load_rgb)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.warn("x", Image.DecompressionBombWarning, stacklevel=1)
    assert len(rec) == 1


def test_error_pickles():
    e = pickle.loads(pickle.dumps(ImageError("a/b.jpg", "zero-byte file")))
    assert isinstance(e, ImageError) and e.path == "a/b.jpg" and e.reason == "zero-byte file"
    assert str(e) == "a/b.jpg: zero-byte file"


# ----------------------------------------------------------------------------------------------- bounds, roots


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (3, 1000)])
def test_extreme_strip_is_refused_from_the_header(tmp_path, size):
    """A tiny file whose shortest-edge resize would need gigabytes: refused before any pixel is decoded."""
    import tracemalloc

    p = save(tmp_path, "strip.png", Image.new("L", size))
    tracemalloc.start()
    try:
        r = reason(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.startswith("extreme aspect ratio") and f"{size[0]}x{size[1]}" in r
    assert peak < 20_000_000  # no decode, no resize
    assert load_rgb(IMAGES / "strip_400x6.jpg").size == (400, 6)  # 66:1 stays valid


def test_load_under_root_contains_symlinks_and_finds_nfd(tmp_path):
    import unicodedata

    from olacache.inputs.images import load_under_root

    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(IMAGES / "chelsea.jpg", root / "cat.jpg")
    shutil.copy(IMAGES / "coffee.jpg", tmp_path / "outside.jpg")
    (root / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "dirlink").symlink_to(tmp_path)
    (root / "inner.jpg").symlink_to(root / "cat.jpg")
    nfd = unicodedata.normalize("NFD", "é.jpg")
    shutil.copy(IMAGES / "camera.png", root / nfd)
    assert load_under_root(root, "inner.jpg").size == load_rgb(root / "cat.jpg").size
    assert load_under_root(root, unicodedata.normalize("NFC", "é.jpg")).size == load_rgb(IMAGES / "camera.png").size
    for rel in ("escape.jpg", "dirlink/outside.jpg"):
        with pytest.raises(ImageError) as ei:
            load_under_root(root, rel)
        assert "outside the image root" in ei.value.reason and str(tmp_path / "outside.jpg") in ei.value.reason
        assert load_under_root(root, rel, allow_outside=True).size == load_rgb(tmp_path / "outside.jpg").size
    with pytest.raises(ImageError) as ei:
        load_under_root(root, "nope.jpg")
    assert ei.value.reason == "missing file" and ei.value.path == str(root / "nope.jpg")
