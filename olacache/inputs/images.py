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
  pixels — Pillow only *warns* up to twice that limit; here the warning level is already an error).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

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
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ImageError(p, "missing file") from None
    except OSError as e:
        raise ImageError(p, f"cannot stat: {e.strerror or e}") from None
    if not os.path.isfile(p):
        raise ImageError(p, "not a regular file")
    if st.st_size == 0:
        raise ImageError(p, "zero-byte file")
    try:
        fh = open(p, "rb")  # closed by _decode
    except OSError as e:
        raise ImageError(p, f"unreadable: {e.strerror or e}") from None
    return _decode(fh, p)


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
