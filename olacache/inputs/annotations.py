"""Load LLaVA-style annotations (JSON list, JSONL, or a bare directory of images), validated up front.

Shared by ``olacache build`` (which only needs the image paths) and ``olatrain`` (which needs the
conversations too), so both agree on what a sample is. No torch import here: the build's CPU workers and the
CLI import this module cheaply.

A sample is the LLaVA dict, kept as loaded (no copy) apart from two normalisations:
- ``id`` is always a ``str`` (LLaVA-665K mixes int and str ids; duplicates are allowed and kept);
  a missing id becomes the entry's position (``"<index>"`` for JSON, ``"line<n>"`` for JSONL).
- ``conversations`` is always a list (missing -> ``[]``: an image list made only for ``olacache build``).
A sample without ``"image"`` is text-only.

Errors name the file, the entry index (JSON, 0-based) or line number (JSONL, 1-based) and what is wrong,
and stop at the first bad entry: a half-valid dataset is not something to train on silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from olacache.inputs.keys import normalize_image_path

# extensions a directory scan picks up (lower-case); what PIL decodes in practice for photo datasets
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
ROLES = frozenset({"human", "gpt", "system"})


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the entry/line."""


def load_annotations(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load and validate samples from a LLaVA JSON list, a JSONL file, or a directory of images.

    - directory: every image file below it (recursively, hidden files/dirs skipped) becomes
      ``{"id": rel, "image": rel, "conversations": []}`` with ``rel`` the POSIX path relative to the directory,
      in sorted order (deterministic across machines).
    - ``.jsonl`` (or a name containing "jsonl", as the reference does), or content that is not a JSON list:
      one object per non-blank line.
    - otherwise a JSON list of objects.
    """
    p = Path(path)
    if p.is_dir():
        return _scan_dir(p)
    if not p.exists():
        raise AnnotationError(f"annotation file not found: {p}")
    if not p.is_file():
        raise AnnotationError(f"{p}: not a regular file or directory")
    with open(p, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM (Windows editors write one)
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{p}: not valid UTF-8 at byte {e.start}: {e.reason}") from None

    if "jsonl" in p.name.lower():
        return _parse_jsonl(p, text)
    first = text.lstrip()[:1]
    if first == "[":
        return _parse_json_list(p, text)
    if first == "{":
        # JSONL by content. A pretty-printed single JSON object also starts with "{": report that case as
        # "not a list" rather than as a confusing JSONL error on line 1.
        try:
            return _parse_jsonl(p, text)
        except AnnotationError:
            try:
                whole = json.loads(text)
            except (ValueError, RecursionError):
                whole = None
            if isinstance(whole, dict):
                raise AnnotationError(
                    f"{p}: top level is a JSON object; expected a list of samples ([{{...}}, ...]) or JSONL "
                    f"(one sample object per line)"
                ) from None
            raise
    if not first:
        raise AnnotationError(f"{p}: file is empty; expected a JSON list of samples or JSONL")
    # anything else: let the JSON parser say what it is, then complain that it is not a list
    return _parse_json_list(p, text)


def _loads(p: Path, text: str, where: str | None) -> Any:
    """json.loads with every parser failure as one AnnotationError naming the file and line: syntax errors,
    nesting deeper than the parser's recursion limit (RecursionError) and integers longer than Python's
    int-conversion limit (a ValueError that is not a JSONDecodeError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}: invalid JSON at column {e.colno}" if where else \
            f"invalid JSON at line {e.lineno}, column {e.colno}"
        raise AnnotationError(f"{p}: {at}: {e.msg}") from None
    except RecursionError:
        at = where or f"line {_deep_line(text)}"
        raise AnnotationError(f"{p}: {at}: JSON nested too deeply to parse (a sample is a flat object with a "
                              "'conversations' list)") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        m = re.search(r"\d{1000,}", text)
        at = where or (f"line {text.count(chr(10), 0, m.start()) + 1}" if m else "somewhere")
        raise AnnotationError(f"{p}: {at}: unreadable number ({str(e).split(';')[0]}); ids and values must be "
                              "short numbers or strings") from None


def _deep_line(text: str, limit: int = 500) -> int:
    """1-based line where the JSON nesting first exceeds ``limit`` (error path only: skips strings)."""
    depth, line, pos = 0, 1, 0
    for m in re.finditer(r'"(?:\\.|[^"\\])*"|[\[\]{}]', text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > limit:
                return line + text.count("\n", pos, m.start())
        elif tok in "]}":
            depth -= 1
    return line


def _parse_json_list(p: Path, text: str) -> list[dict[str, Any]]:
    data = _loads(p, text, None)
    if not isinstance(data, list):
        raise AnnotationError(
            f"{p}: top level is a JSON {_kind(data)}; expected a list of sample objects (LLaVA format) "
            f"or JSONL (name the file *.jsonl)"
        )
    for i, s in enumerate(data):
        _validate(s, p, i, False)
    return data


def _parse_jsonl(p: Path, text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        s = _loads(p, line, f"line {n}")
        _validate(s, p, n, True)
        out.append(s)
    return out


def _kind(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null", int: "number",
            float: "number"}.get(type(v), type(v).__name__)


def _validate(s: Any, p: Path, pos: int, jsonl: bool) -> None:
    """Check one sample in place. The common all-valid case takes one fast pass (665K LLaVA entries in about
    a second); the error message is only composed on failure."""
    if type(s) is dict:
        sid = s.get("id")
        img = s.get("image", "")
        conv = s.get("conversations")
        if (
            type(sid) is str
            and type(img) is str
            and type(conv) is list
            and all(
                type(t) is dict and t.get("from") in ROLES and type(t.get("value")) is str
                and (t["value"].isascii() or _is_unicode(t["value"]))
                for t in conv
            )
            and ("image" not in s or img.strip())
            and (img.isascii() or _is_unicode(img))
        ):
            return
    _validate_slow(s, p, f"line {pos}" if jsonl else f"entry {pos}", default_id=f"line{pos}" if jsonl else str(pos))


def _is_unicode(text: str) -> bool:
    """False for a str that cannot be UTF-8 encoded (a lone surrogate from a JSON "\\ud800" escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _validate_slow(s: Any, p: Path, where: str, *, default_id: str) -> None:
    if not isinstance(s, dict):
        raise AnnotationError(f"{p}: {where}: expected a sample object, got a JSON {_kind(s)}")
    sid = s.get("id")
    if sid is None:
        s["id"] = default_id
    elif not isinstance(sid, str):
        if isinstance(sid, bool) or not isinstance(sid, int | float):
            raise AnnotationError(f"{p}: {where}: 'id' must be a string or number, got a JSON {_kind(sid)}")
        s["id"] = str(sid)
    if "image" in s:
        img = s["image"]
        if not isinstance(img, str):
            hint = " (multi-image samples are not supported)" if isinstance(img, list) else ""
            raise AnnotationError(
                f"{p}: {where} (id {s['id']!r}): 'image' must be a string path relative to the image root, "
                f"got a JSON {_kind(img)}{hint}; omit the key for a text-only sample"
            )
        if not img.strip():
            raise AnnotationError(f"{p}: {where} (id {s['id']!r}): 'image' is an empty string")
        if not _is_unicode(img):
            raise AnnotationError(f"{p}: {where} (id {s['id']!r}): 'image' is not valid Unicode (a lone "
                                  f"surrogate escape such as \\ud800): {img!r}")
    conv = s.get("conversations")
    if conv is None:
        s["conversations"] = []
        return
    if not isinstance(conv, list):
        raise AnnotationError(
            f"{p}: {where} (id {s['id']!r}): 'conversations' must be a list of {{\"from\", \"value\"}} "
            f"objects, got a JSON {_kind(conv)}"
        )
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise AnnotationError(
                f"{p}: {where} (id {s['id']!r}): conversations[{j}] must be an object with 'from' and "
                f"'value', got a JSON {_kind(turn)}"
            )
        who = turn.get("from")
        if who not in ROLES:
            raise AnnotationError(
                f"{p}: {where} (id {s['id']!r}): conversations[{j}]['from'] must be one of "
                f"{sorted(ROLES)}, got {who!r}"
            )
        if not isinstance(turn.get("value"), str):
            raise AnnotationError(
                f"{p}: {where} (id {s['id']!r}): conversations[{j}]['value'] must be a string, got "
                f"{'nothing' if 'value' not in turn else 'a JSON ' + _kind(turn['value'])}"
            )
        if not _is_unicode(turn["value"]):
            raise AnnotationError(f"{p}: {where} (id {s['id']!r}): conversations[{j}]['value'] is not valid "
                                  "Unicode (a lone surrogate escape such as \\ud800)")


def _scan_dir(root: Path) -> list[dict[str, Any]]:
    rels: list[str] = []
    # os.walk over Path.rglob: it lets us prune hidden directories (.git, .ipynb_checkpoints) without
    # descending into them, which matters on big trees
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rels.append(Path(dirpath, f).relative_to(root).as_posix())
    if not rels:
        raise AnnotationError(
            f"{root}: directory holds no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    rels.sort()
    return [{"id": r, "image": r, "conversations": []} for r in rels]


def unique_images(samples: Iterable[dict[str, Any]]) -> list[str]:
    """Sorted unique normalised image paths of the samples that have an image.

    These are the rows of an embedding store built for the samples; "./a.jpg" and "a.jpg" are one row.
    """
    seen: set[str] = set()
    for s in samples:
        img = s.get("image")
        if img is None:
            continue
        try:
            seen.add(normalize_image_path(img))
        except ValueError as e:
            raise AnnotationError(f"sample id {s.get('id')!r}: bad image path {img!r}: {e}") from None
    return sorted(seen)
