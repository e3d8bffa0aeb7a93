"""Annotation loading: LLaVA JSON, JSONL, image directories; malformed input names file and entry/line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from olacache.inputs.annotations import AnnotationError, load_annotations, unique_images

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.json"


def conv(q: str = "<image>\nWhat?", a: str = "A cat.") -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_bundled_sample():
    samples = load_annotations(SAMPLE)
    assert len(samples) == 27
    ids = [s["id"] for s in samples]
    assert ids.count("cap-001") == 2  # duplicate ids are kept (LLaVA data has them)
    text_only = [s for s in samples if "image" not in s]
    assert [s["id"] for s in text_only] == ["txt-000"]
    imgs = unique_images(samples)
    assert imgs == sorted(imgs)
    # "./chelsea.jpg" (mt-000) and "chelsea.jpg" are one row; every other image path is distinct
    assert "chelsea.jpg" in imgs and "./chelsea.jpg" not in imgs
    assert len(imgs) == 21
    assert "nested/deep/chelsea_rgba.png" in imgs and "café ☕.jpg" in imgs


def test_json_and_jsonl_agree(tmp_path):
    data = [
        {"id": "a", "image": "x/a.jpg", "conversations": conv()},
        {"id": 7, "image": "./x/a.jpg", "conversations": conv()},  # int id, same image
        {"conversations": conv("Hi", "Hello.")},  # no id, text-only
    ]
    pj = tmp_path / "d.json"
    pj.write_text(json.dumps(data))
    pl = tmp_path / "d.jsonl"
    pl.write_text("\n".join(json.dumps(d) for d in data) + "\n\n")  # a blank line is fine
    a, b = load_annotations(pj), load_annotations(pl)
    assert [s["id"] for s in a] == ["a", "7", "2"]
    assert [s["id"] for s in b] == ["a", "7", "line3"]
    assert [s.get("image") for s in a] == [s.get("image") for s in b]
    assert unique_images(a) == unique_images(b) == ["x/a.jpg"]


def test_jsonl_detected_by_content(tmp_path):
    p = tmp_path / "data.txt"  # neither .json nor .jsonl
    p.write_text(json.dumps({"id": "a", "image": "a.jpg", "conversations": conv()}) + "\n"
                 + json.dumps({"id": "b", "conversations": conv("Q", "A")}) + "\n")
    assert [s["id"] for s in load_annotations(p)] == ["a", "b"]


def test_missing_conversations_become_empty(tmp_path):
    p = tmp_path / "imgs.json"
    p.write_text(json.dumps([{"image": "a.jpg"}]))
    assert load_annotations(p) == [{"image": "a.jpg", "id": "0", "conversations": []}]


@pytest.mark.parametrize(
    ("content", "name", "pattern"),
    [
        ('{"a": 1,\n "b": 2}', "d.json", r"top level is a JSON object"),
        ('"hello"', "d.json", r"top level is a JSON string"),
        ("", "d.json", r"empty"),
        ('[{"id": "a", "conversations": []},\n {"id": "b" "x"}]', "d.json", r"invalid JSON at line 2, column"),
        ('[{"id": "a"}, 5]', "d.json", r"entry 1: expected a sample object, got a JSON number"),
        ('[{"id": "a", "image": ["x.jpg", "y.jpg"]}]', "d.json", r"entry 0 \(id 'a'\): 'image' must be a string.*multi-image"),
        ('[{"id": "a", "image": 3}]', "d.json", r"entry 0 \(id 'a'\): 'image' must be a string"),
        ('[{"id": "a", "image": " "}]', "d.json", r"entry 0 \(id 'a'\): 'image' is an empty string"),
        ('[{"id": "a", "conversations": "hi"}]', "d.json", r"entry 0 \(id 'a'\): 'conversations' must be a list"),
        ('[{"id": "a", "conversations": ["hi"]}]', "d.json", r"conversations\[0\] must be an object"),
        ('[{"id": "a", "conversations": [{"from": "user", "value": "x"}]}]', "d.json",
         r"conversations\[0\]\['from'\] must be one of \['gpt', 'human', 'system'\], got 'user'"),
        ('[{"id": "a", "conversations": [{"from": "gpt"}]}]', "d.json", r"\['value'\] must be a string, got nothing"),
        ('[{"id": "a", "conversations": [{"from": "gpt", "value": 1}]}]', "d.json", r"\['value'\] must be a string"),
        ('[{"id": [1]}]', "d.json", r"entry 0: 'id' must be a string or number"),
        ('{"id": "a"}\n{"id": "b", "image": 1}\n', "d.jsonl", r"line 2 \(id 'b'\): 'image' must be a string"),
        ('{"id": "a"}\n\n{"id": "b",\n', "d.jsonl", r"line 3: invalid JSON at column"),
        ('{"id": "a"}\n[1, 2]\n', "d.jsonl", r"line 2: expected a sample object, got a JSON list"),
    ],
)
def test_malformed(tmp_path, content, name, pattern):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(AnnotationError, match=pattern) as ei:
        load_annotations(p)
    assert str(p) in str(ei.value)  # every message names the file


def test_not_utf8_and_missing(tmp_path):
    p = tmp_path / "bad.json"
    p.write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(AnnotationError, match="not valid UTF-8 at byte 9"):
        load_annotations(p)
    with pytest.raises(AnnotationError, match="not found"):
        load_annotations(tmp_path / "nope.json")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": "a"}]).encode())
    assert load_annotations(bom)[0]["id"] == "a"


def test_directory(tmp_path):
    root = tmp_path / "imgs"
    for rel in ["b.png", "a/x.JPG", "a/deep/y.webp", "notes.txt", ".hidden.png", ".cache/z.png", "ü ☕.jpeg"]:
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    samples = load_annotations(root)
    assert [s["id"] for s in samples] == ["a/deep/y.webp", "a/x.JPG", "b.png", "ü ☕.jpeg"]
    assert all(s["image"] == s["id"] and s["conversations"] == [] for s in samples)
    assert unique_images(samples) == sorted(s["id"] for s in samples)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotationError, match="no image files"):
        load_annotations(tmp_path / "empty")


def test_directory_of_bundled_images():
    samples = load_annotations(ROOT / "examples" / "images")
    assert len(samples) == 21
    assert "nested/deep/chelsea_rgba.png" in [s["image"] for s in samples]


def test_unique_images_rejects_bad_path():
    with pytest.raises(AnnotationError, match="sample id 'evil'.*'../x.jpg'"):
        unique_images([{"id": "evil", "image": "../x.jpg"}])
    assert unique_images([{"id": "a", "image": "d\\e.jpg"}, {"id": "b", "image": "d/./e.jpg"}, {"id": "c"}]) == ["d/e.jpg"]


def test_no_torch_import():
    code = (
        "import sys, olacache.inputs.annotations as a; a.unique_images(a.load_annotations(sys.argv[1])); "
        "assert 'torch' not in sys.modules, 'olacache.inputs.annotations imported torch'"
    )
    subprocess.run([sys.executable, "-c", code, str(SAMPLE)], check=True, cwd=ROOT)
