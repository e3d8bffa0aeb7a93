"""One image decoder for the cache build and the trainer, so teachers and the base encoder see the same pixels.

``load_rgb`` returns a fully decoded 8-bit RGB ``PIL.Image`` or raises ``ImageError(path, reason)``.

Decisions (each differs from, or pins down, what LLaVA's bare ``Image.open(p).convert("RGB")`` does):

- EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo tagged "rotate 90" is seen upright,
  as a person (and the caption writer) saw it. LLaVA ignores the tag, so the model would see it sideways.
- Transparency (RGBA, LA, PA, palette or RGB/L with a ``transparency`` key, premultiplied modes) is
  composited over WHITE. A bare ``convert("RGB")`` drops alpha and exposes whatever RGB happens to sit under
  transparent pixels: often black, sometimes leftover garbage from the editor, so two visually identical
  images can give different features. White is what a browser / document viewer shows, which is how the web
  images and screenshots in LLaVA-style data were looked at when captioned (dark text or logos on a
  transparent background stay legible; over black they would vanish). The colour is ``ALPHA_BACKGROUND``.
- 16-bit grayscale ("I;16*", and "I" which older Pillow versions use for 16-bit PNG) is scaled by 1/257 with
  rounding, mapping 0..65535 onto 0..255 exactly; Pillow's own conversion clips (everything above 255 becomes
  white). The scale is fixed by the mode, never by the image's content, so dark and bright images of one
  dataset are treated alike. Float images ("F") are taken as 0..255 and clipped, as Pillow does.
- 1-bit, grayscale, palette, CMYK, YCbCr: Pillow's ``convert("RGB")`` (CMYK with Pillow's naive formula;
  embedded ICC profiles are ignored, as LLaVA and the CLIP preprocessing do).
- Failures are errors, never silently "repaired": missing file, zero-byte file, not an image, truncated or
  corrupt data (the whole image is decoded with ``load()``; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set,
  which would pad a truncated JPEG with grey), and decompression bombs (more than ``Image.MAX_IMAGE_PIXELS``
  pixels — Pillow only *warns* up to twice that limit; here the warning level is already an error), and extreme
  strips: an aspect ratio beyond ``MAX_ASPECT_RATIO``. The pixel limit alone does not bound memory: a 476-byte
  1x100000 PNG holds 1e5 pixels, but a shortest-edge resize (CLIP's 224/336) turns it into 224 x 22.4M pixels
  (~15 GB). With the ratio capped at 100 the largest such intermediate at 336 px is 336 x 33,600 (~34 MB).
  Both checks run on the header, before any pixel is decoded.

Images named relative to a root go through ``load_under_root``: the file is looked up as written, then in NFC
and NFD (macOS writes NFD names; the store's keys are NFC), and must resolve, after following symlinks, to a
file inside the root (a symlink to ``/etc/hostname`` is refused unless the caller allows outside targets).
"""

from __future__ import annotations

import io
import os
import unicodedata
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

MAX_ASPECT_RATIO = 100
"""Longest side / shortest side above which an image is refused (see the module docstring); 400x6 is fine."""

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageError(Exception):
    """An image that cannot be used; ``path`` and a short ``reason`` (also recorded in a store's errors)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        # pass both to Exception so the error pickles across DataLoader / multiprocessing workers
        super().__init__(os.fspath(path), reason)
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode the image file at ``path`` to an 8-bit RGB image (see the module docstring for the rules)."""
    return _load_file(os.fspath(path), os.fspath(path))


def resolve_under_root(root: str | os.PathLike[str], rel: str, *, allow_outside: bool = False) -> tuple[str, str]:
    """Find ``root/rel`` on disk -> (real path to open, the path as found under the root, for messages).

    The name is tried as written, then in NFC and NFD. Raises ``ImageError`` naming the full path tried when no
    spelling exists ("missing file"), or when the file resolves (through symlinks) outside the root and
    ``allow_outside`` is False."""
    root_s = os.path.abspath(os.fspath(root))
    first = os.path.join(root_s, rel)
    found = None
    for cand in dict.fromkeys((rel, unicodedata.normalize("NFC", rel), unicodedata.normalize("NFD", rel))):
        p = os.path.join(root_s, cand)
        if os.path.lexists(p):  # False (not an exception) for unencodable names and NULs
            found = p
            break
    if found is None:
        raise ImageError(first, "missing file")
    real = os.path.realpath(found)
    if not allow_outside:
        root_real = os.path.realpath(root_s)
        if os.path.commonpath([root_real, real]) != root_real:
            raise ImageError(found, f"outside the image root {root_real}: resolves to {real} (a symlink?); "
                                    "allow it explicitly (--allow-outside-root) if that is intended")
    return real, found


def missing_under_root(root: str | os.PathLike[str], rel: str) -> str | None:
    """The full path tried when ``root/rel`` exists in no spelling (as written, NFC, NFD), else None: the cheap
    existence check behind both wrong-image-root refusals (build and trainer)."""
    try:
        resolve_under_root(root, rel, allow_outside=True)
    except ImageError as e:
        return e.path
    return None


def load_under_root(root: str | os.PathLike[str], rel: str, *, allow_outside: bool = False) -> Image.Image:
    """``load_rgb`` for an image path relative to ``root``: NFC/NFD lookup and the containment check of
    :func:`resolve_under_root`, then the same decode. Errors name the path under the root."""
    real, found = resolve_under_root(root, rel, allow_outside=allow_outside)
    return _load_file(real, found)


def _load_file(p: str, name: str) -> Image.Image:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ImageError(name, "missing file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL or an unencodable (lone surrogate) name
        raise ImageError(name, f"cannot stat: {getattr(e, 'strerror', None) or e}") from None
    if not os.path.isfile(p):
        raise ImageError(name, "not a regular file")
    if st.st_size == 0:
        raise ImageError(name, "zero-byte file")
    try:
        fh = open(p, "rb")  # closed by _decode
    except OSError as e:
        raise ImageError(name, f"unreadable: {e.strerror or e}") from None
    return _decode(fh, name)


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Same as ``load_rgb`` for bytes already in memory (remote stores, tar members); ``name`` labels errors."""
    if not data:
        raise ImageError(name, "zero-byte file")
    return _decode(io.BytesIO(data), name)


def _decode(fh: IO[bytes], name: str) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns (and continues) between MAX_IMAGE_PIXELS and 2x that; a training image that large is a
        # mistake or an attack either way, and a warning inside a DataLoader worker is easily missed.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with fh, Image.open(fh) as im:
                # catch_warnings is process-global and not thread-safe: if a decoding thread elsewhere reset
                # the filters, the warning above would pass as a warning. Check the size ourselves too.
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and im.width * im.height > limit:
                    raise ImageError(
                        name, f"decompression bomb: {im.width}x{im.height} pixels exceeds the {limit} limit"
                    )
                short, long_ = sorted((im.width, im.height))
                if short < 1 or long_ > MAX_ASPECT_RATIO * short:
                    raise ImageError(
                        name, f"extreme aspect ratio: {im.width}x{im.height} (more than {MAX_ASPECT_RATIO}:1); "
                        "resizing it would need an unbounded amount of memory"
                    )
                im.load()  # full decode now: truncation and corrupt data surface here, not later
                return _to_rgb(im, name)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(name, f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise ImageError(name, "not an image (format not recognised)") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError, TypeError) as e:
            # Pillow reports truncation and corruption through several exception types depending on the
            # plugin (OSError "image file is truncated", SyntaxError from a broken PNG chunk, ValueError ...)
            msg = str(e) or type(e).__name__
            kind = "truncated" if "truncated" in msg.lower() or isinstance(e, EOFError) else "corrupt"
            raise ImageError(name, f"{kind} image data: {msg}") from None


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:
        # a malformed EXIF block must not discard a decodable image; both build and trainer take this same
        # branch, so they still agree on the pixels (the untransposed ones)
        out = im
    mode = out.mode
    if mode == "RGB" and "transparency" not in out.info:
        return out.copy() if out is im else out  # copy: the source image is closed on return
    if mode in _16BIT_MODES or mode == "I":
        arr = np.asarray(out, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.rint(np.asarray(out, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in out.info):
        rgba = out.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return out.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(name, f"unsupported image mode {mode!r}: {e}") from None
