"""Regenerate the bundled sample under examples/ from scikit-image's public-domain/CC0 photos.

The committed files are the output of this script; it is kept so the sample is reproducible and its
odd cases (grayscale, RGBA, palette+transparency, CMYK, 16-bit, EXIF rotation, 1x1, extreme aspect,
unicode and nested paths) are documented in one place. Run: python examples/make_sample.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import skimage.data as skd
from PIL import Image

HERE = Path(__file__).parent
IMG = HERE / "images"

# name -> (loader, licence line from scikit-image's docstrings)
PHOTOS = {
    "astronaut": (skd.astronaut, "public domain (NASA)"),
    "camera": (skd.camera, "CC0 (Lav Varshney)"),
    "chelsea": (skd.chelsea, "CC0 (Stefan van der Walt)"),
    "coffee": (skd.coffee, "CC0 (Rachel Michetti)"),
    "horse": (skd.horse, "CC0 (Andreas Preuss)"),
    "rocket": (skd.rocket, "public domain (SpaceX)"),
    "hubble": (skd.hubble_deep_field, "public domain (NASA)"),
    "retina": (skd.retina, "CC0 1.0"),
    "brick": (skd.brick, "CC0 (CC0Textures)"),
    "grass": (skd.grass, "CC0 (CC0Textures)"),
    "gravel": (skd.gravel, "CC0 (CC0Textures)"),
    "clock": (skd.clock, "public domain (Stefan van der Walt)"),
    "cell": (skd.cell, "CC0"),
}


def _small(arr: np.ndarray, longest: int = 192) -> Image.Image:
    if arr.dtype == bool:
        arr = (arr * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    im.thumbnail((longest, longest))
    return im


def make_images() -> dict[str, str]:
    IMG.mkdir(parents=True, exist_ok=True)
    lic: dict[str, str] = {}
    ims = {n: _small(f()) for n, (f, _) in PHOTOS.items()}
    plain = {
        "astronaut.jpg": ims["astronaut"], "chelsea.jpg": ims["chelsea"], "coffee.jpg": ims["coffee"],
        "rocket.jpg": ims["rocket"], "hubble.jpg": ims["hubble"], "retina.jpg": ims["retina"],
        "grass.png": ims["grass"], "gravel.png": ims["gravel"],
        "camera.png": ims["camera"],  # grayscale (L)
        "brick.png": ims["brick"],  # grayscale
        "cell.png": ims["cell"],  # grayscale
        "clock.png": ims["clock"],
    }
    for name, im in plain.items():
        im.save(IMG / name)
        lic[name] = PHOTOS[name.split(".")[0]][1]
    ims["horse"].convert("1").save(IMG / "horse_1bit.png")  # 1-bit
    lic["horse_1bit.png"] = PHOTOS["horse"][1]
    # RGBA in a nested folder
    (IMG / "nested" / "deep").mkdir(parents=True, exist_ok=True)
    rgba = ims["chelsea"].convert("RGBA")
    a = np.array(rgba)
    a[..., 3] = np.linspace(40, 255, a.shape[1], dtype=np.uint8)[None, :]
    Image.fromarray(a).save(IMG / "nested" / "deep" / "chelsea_rgba.png")
    lic["nested/deep/chelsea_rgba.png"] = PHOTOS["chelsea"][1]
    # palette with a transparent index
    pal = ims["coffee"].convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    pal.save(IMG / "coffee_palette_trns.png", transparency=0)
    lic["coffee_palette_trns.png"] = PHOTOS["coffee"][1]
    # CMYK JPEG
    ims["astronaut"].convert("CMYK").save(IMG / "astronaut_cmyk.jpg")
    lic["astronaut_cmyk.jpg"] = PHOTOS["astronaut"][1]
    # 16-bit grayscale
    cam16 = (np.array(ims["camera"]).astype(np.uint16) * 257)
    Image.fromarray(cam16).save(IMG / "camera_16bit.png")
    lic["camera_16bit.png"] = PHOTOS["camera"][1]
    # EXIF-rotated (orientation 6: the viewer must rotate 90 degrees clockwise)
    ex = Image.Exif()
    ex[0x0112] = 6
    ims["rocket"].save(IMG / "rocket_exif_rot.jpg", exif=ex)
    lic["rocket_exif_rot.jpg"] = PHOTOS["rocket"][1]
    # 1x1 and extreme aspect ratio
    ims["chelsea"].resize((1, 1)).save(IMG / "one_pixel.png")
    lic["one_pixel.png"] = PHOTOS["chelsea"][1]
    ims["hubble"].resize((400, 6)).save(IMG / "strip_400x6.jpg")
    lic["strip_400x6.jpg"] = PHOTOS["hubble"][1]
    # unicode file name
    ims["coffee"].save(IMG / "café ☕.jpg")
    lic["café ☕.jpg"] = PHOTOS["coffee"][1]
    return lic


def conv(*turns: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def make_annotations() -> list[dict]:
    cap = "Describe the image briefly.\n<image>"
    s: list[dict] = []
    captions = {
        "astronaut.jpg": "An astronaut in a white suit poses in front of an American flag.",
        "chelsea.jpg": "A ginger cat with green eyes looks to the side.",
        "coffee.jpg": "A cup of coffee on a saucer with a spoon, seen from above.",
        "rocket.jpg": "A rocket stands on the launch pad against a blue sky.",
        "hubble.jpg": "A field of distant galaxies scattered across dark space.",
        "retina.jpg": "A photograph of a human retina with branching blood vessels.",
        "grass.png": "A close-up texture of green grass blades.",
        "gravel.png": "A close-up texture of grey gravel stones.",
        "camera.png": "A black and white photo of a man with a camera on a tripod.",
        "brick.png": "A grey brick wall with regular mortar lines.",
        "cell.png": "A microscope image of a single cell.",
        "clock.png": "A wall clock photographed at an angle.",
        "horse_1bit.png": "A black silhouette of a horse on a white background.",
        "nested/deep/chelsea_rgba.png": "A cat whose picture fades to transparent on the left.",
        "coffee_palette_trns.png": "A coffee cup drawn with a small colour palette.",
        "astronaut_cmyk.jpg": "An astronaut portrait stored in CMYK colours.",
        "camera_16bit.png": "A high bit-depth grayscale photo of a cameraman.",
        "rocket_exif_rot.jpg": "A rocket on its pad, stored sideways with a rotation tag.",
        "one_pixel.png": "A single orange pixel.",
        "strip_400x6.jpg": "A very thin horizontal strip of a star field.",
        "café ☕.jpg": "A cup of coffee on a saucer in a café.",
    }
    for i, (img, c) in enumerate(captions.items()):
        s.append({"id": f"cap-{i:03d}", "image": img, "conversations": conv(cap if i % 2 else "<image>\nWhat is in this picture?", c)})
    # multi-turn samples; the <image> placeholder sits mid-text in one (the loader moves it to the front)
    s.append({"id": "mt-000", "image": "./chelsea.jpg", "conversations": conv(
        "<image>\nWhat animal is this?", "It is a cat.",
        "What colour is its fur?", "Its fur is ginger with darker stripes.",
        "Is it looking at the camera?", "No, it is looking to the side.")})
    s.append({"id": "mt-001", "image": "coffee.jpg", "conversations": conv(
        "What is on the saucer? <image>", "A spoon rests on the saucer next to the cup.",
        "Is the cup full?", "Yes, it is filled with coffee.")})
    s.append({"id": "mt-002", "image": "astronaut.jpg", "conversations": conv(
        "<image>\nWhat is the person wearing?", "A white space suit with patches.",
        "What is behind them?", "A flag and a model of a spacecraft.")})
    s.append({"id": "mt-003", "image": "rocket.jpg", "conversations": conv(
        "<image>\nHow many rockets are there?", "There is one rocket.",
        "What is the weather like?", "Clear and sunny.")})
    # text-only sample
    s.append({"id": "txt-000", "conversations": conv(
        "What is the capital of France?", "The capital of France is Paris.",
        "And of Italy?", "Rome.")})
    # duplicate id (LLaVA data has these) sharing an image with another sample
    s.append({"id": "cap-001", "image": "chelsea.jpg", "conversations": conv(
        "<image>\nIs this a dog?", "No, it is a cat.")})
    return s


if __name__ == "__main__":
    lic = make_images()
    ann = make_annotations()
    (HERE / "sample.json").write_text(json.dumps(ann, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["Images in examples/images are derived (downscaled, converted) from scikit-image's bundled",
             "sample data; the licence of each original, as scikit-image documents it:", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(lic.items())]
    (HERE / "images" / "LICENSE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lic)} images, {len(ann)} samples")
