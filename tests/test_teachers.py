"""Teachers: tiny presets, target definitions, batching, identity/spec, registry. Offline, CPU, seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import olacache.teachers as reg
from olacache.teachers import TEACHERS, load_teacher, register_teacher, resolve_source, tiny_source
from olacache.teachers.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESET_FILE,
    ImagePipeline,
    Teacher,
    weights_sha256,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"
NAMES = ["depth", "seg", "gen"]


@pytest.fixture(scope="module", autouse=True)
def olakit_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private tiny-preset cache for this module, so it exercises building and never touches ~/.cache."""
    cache = tmp_path_factory.mktemp("olakit_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OLAKIT_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield cache


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # one square, one landscape: different content and aspect ratio (squash vs crop paths differ)
    return [Image.open(IMAGES / n).convert("RGB") for n in ("astronaut.jpg", "chelsea.jpg")]


@pytest.fixture(scope="module")
def teachers(olakit_cache) -> dict[str, Teacher]:
    return {n: load_teacher(n) for n in NAMES}


def _np_normalize(img: Image.Image, mean, std) -> torch.Tensor:
    x = (np.asarray(img, dtype=np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))


# ----------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", NAMES)
def test_tiny_preset_builds_once_with_marker(name: str, olakit_cache: Path) -> None:
    path = tiny_source(name)
    assert path == olakit_cache / "tiny" / f"{name}-v1"
    assert json.loads((path / PRESET_FILE).read_text()) == {"preset": "tiny", "random_init": True, "seed": 0}
    if name == "gen":  # the unCLIP repo layout, not the whole pipeline
        assert (path / "image_encoder" / "config.json").is_file()
        assert (path / "feature_extractor" / "preprocessor_config.json").is_file()
        assert not (path / "unet").exists()
    else:
        assert (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file()
    mtime = (path / PRESET_FILE).stat().st_mtime_ns
    assert tiny_source(name) == path and (path / PRESET_FILE).stat().st_mtime_ns == mtime  # not rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.parametrize("name", NAMES)
def test_tiny_preset_is_deterministic(name: str, tmp_path: Path) -> None:
    TEACHERS[name].save_tiny(tmp_path / "again", seed=0)
    sub = TEACHERS[name].weights_subfolder or ""
    assert weights_sha256(tmp_path / "again" / sub) == weights_sha256(tiny_source(name) / sub)
    TEACHERS[name].save_tiny(tmp_path / "other", seed=1)
    assert weights_sha256(tmp_path / "other" / sub) != weights_sha256(tiny_source(name) / sub)


def test_tiny_source_race_loser_uses_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Simulate another process publishing while we build: our rename fails and we return its preset."""
    monkeypatch.setenv("OLAKIT_CACHE", str(tmp_path))
    cls = TEACHERS["gen"]
    real = cls.save_tiny.__func__
    calls = []

    def racing_save_tiny(klass, out_dir, seed=0):
        calls.append(out_dir)
        real(klass, out_dir, seed)
        if len(calls) == 1:
            tiny_source("gen")  # the "other process" wins the race

    monkeypatch.setattr(cls, "save_tiny", classmethod(racing_save_tiny))
    path = tiny_source("gen")
    assert len(calls) == 2 and (path / PRESET_FILE).is_file()
    assert [p.name for p in path.parent.iterdir()] == ["gen-v1"]  # loser's temp dir removed


# ----------------------------------------------------------------------------------------------- per teacher


EXPECTED_SHAPES = {"depth": (576, 32), "seg": (576, 128), "gen": (1, 32)}
EXPECTED_INPUT = {"depth": (336, 336), "seg": (800, 800), "gen": (224, 224)}


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_finite_and_batch_invariant(name: str, teachers, images) -> None:
    t = teachers[name]
    assert t.target_shape == EXPECTED_SHAPES[name]
    assert t.input_size == EXPECTED_INPUT[name]
    pre = t.preprocessor()
    pixels = torch.stack([pre(im) for im in images])
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, *EXPECTED_INPUT[name])
    out = t.forward(pixels)
    assert (
        out.shape == (2, *EXPECTED_SHAPES[name]) and out.dtype == torch.float32 and out.device.type == "cpu"
    )
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # two different images, two different targets
    singles = torch.cat([t.forward(pixels[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(out, singles, rtol=1e-4, atol=1e-5)  # the build batches; results must not care
    torch.testing.assert_close(t(images), out)  # convenience path == preprocess + stack + forward
    assert not out.is_inference()  # usable as a loss target with autograd (online-targets adapter)


@pytest.mark.parametrize("name", NAMES)
def test_teacher_is_frozen_eval_fp32(name: str, teachers) -> None:
    m = teachers[name].model
    assert not m.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in m.parameters())
    assert teachers[name].precision == "fp32"


@pytest.mark.parametrize("name", NAMES)
def test_identity_random_init_and_stable_hash(name: str, teachers) -> None:
    ident = teachers[name].identity()
    assert set(ident) == {"source", "weights_sha256", "random_init"}
    assert ident["random_init"] is True
    assert ident["source"] == str(tiny_source(name))
    assert len(ident["weights_sha256"]) == 64
    again = load_teacher(name, source=ident["source"])
    assert again.identity() == ident
    assert again.spec() == teachers[name].spec()


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_json_and_describes_preprocessing(name: str, teachers) -> None:
    spec = teachers[name].spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["teacher"] == name and spec["target_shape"] == list(EXPECTED_SHAPES[name])
    pp = spec["preprocess"]
    assert pp["channel_order"] == "RGB" and pp["output_size"] == list(EXPECTED_INPUT[name])
    assert {"steps", "mean", "std", "rescale"} <= set(pp)
    assert spec["precision"] == "fp32"


@pytest.mark.parametrize("name", NAMES)
def test_preprocessor_pickles_and_rejects_non_rgb(name: str, teachers, images) -> None:
    pre = teachers[name].preprocessor()
    clone = pickle.loads(pickle.dumps(pre))
    assert not any(isinstance(v, torch.nn.Module) for v in vars(clone).values())
    torch.testing.assert_close(clone(images[1]), pre(images[1]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="RGB"):
        pre(images[1].convert("RGBA"))


def test_bf16_autocast_precision_is_recorded_and_close(teachers, images) -> None:
    """The CUDA default (bf16 autocast) exercised on CPU: recorded in spec, float32 out, close to fp32."""
    bf16 = load_teacher("depth", options={"precision": "bf16"})
    assert bf16.spec()["precision"] == "bf16-autocast" and bf16.spec() != teachers["depth"].spec()
    out, ref = bf16(images), teachers["depth"](images)
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.99
    with pytest.raises(ValueError, match="precision"):
        load_teacher("gen", options={"precision": "fp16"})


# ----------------------------------------------------------------------------------------------- depth


def test_depth_preprocessing_is_squash_bicubic_imagenet(teachers, images) -> None:
    img = images[1]  # landscape: squashing must not keep the aspect ratio
    ref = _np_normalize(img.resize((336, 336), Image.Resampling.BICUBIC), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(teachers["depth"].preprocessor()(img), ref, rtol=0, atol=1e-6)


def _reference_dinov2_features(backbone, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The reference's DINOv2 forward, written independently of olacache: facebookresearch/dinov2's
    interpolate_pos_encoding (bicubic, no antialias, scale_factor=((24 + 0.1) / 37, ...) from the raw 37x37
    table), then the same blocks; returns [embeddings, block0, block1, ...]."""
    emb = backbone.embeddings
    pos = emb.position_embeddings.detach().float()  # (1, 1 + 37*37, C): the module's raw table
    m = int(round((pos.shape[1] - 1) ** 0.5))
    assert m == 37
    grid = pixels.shape[-1] // 14
    patch_pos = F.interpolate(
        pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
        scale_factor=((grid + 0.1) / m, (grid + 0.1) / m),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    assert patch_pos.shape[-2:] == (grid, grid)
    pos_ref = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    x = emb.patch_embeddings(pixels)
    x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_ref
    out = [x]
    for block in backbone.encoder.layer:
        x = block(x)
        x = x[0] if isinstance(x, tuple) else x
        out.append(x)
    return out


def test_depth_target_is_mean_of_layernormed_patch_tokens(teachers, images) -> None:
    """Recompute the target independently: the reference's position-embedding interpolation, the same blocks,
    the backbone's LayerNorm on the 4 output blocks, CLS dropped, mean (fp32 tolerance)."""
    from transformers import DepthAnythingForDepthEstimation

    t = teachers["depth"]
    model = DepthAnythingForDepthEstimation.from_pretrained(tiny_source("depth"), dtype=torch.float32).eval()
    pixels = torch.stack([t.preprocessor()(im) for im in images])
    with torch.no_grad():
        hidden = _reference_dinov2_features(model.backbone, pixels)
        idx = model.config.backbone_config.out_indices
        assert len(idx) == 4 and len(hidden) == 5
        maps = [model.backbone.layernorm(hidden[i])[:, 1:, :] for i in idx]  # LayerNorm, drop CLS
        expected = torch.stack(maps).mean(0)
        # transformers' own interpolation (size=(24, 24)) is measurably different: the test has teeth
        hf_hidden = model.backbone(pixels, output_hidden_states=True).hidden_states
        hf = torch.stack([model.backbone.layernorm(hf_hidden[i])[:, 1:, :] for i in idx]).mean(0)
    assert expected.shape == (2, 576, 32)
    got = t.forward(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - hf).abs().max() > 1e-3
    assert t.spec()["target"]["blocks_0indexed"] == [i - 1 for i in idx]
    assert t.spec()["spec_version"] == 2 and "scale_factor" in t.spec()["target"]["pos_embed_interpolation"]


def test_depth_block_mapping_matches_vitl_reference() -> None:
    """HF out_indices [5, 12, 18, 24] of DA-V2-Large are the reference's blocks 4, 11, 17, 23 (0-indexed)."""
    from transformers import Dinov2Config

    from olacache.teachers.depth import blocks_from_backbone_config

    cfg = Dinov2Config(num_hidden_layers=24, out_indices=[5, 12, 18, 24])
    assert blocks_from_backbone_config(cfg) == [4, 11, 17, 23]


def test_depth_bgr_quirk(teachers, images) -> None:
    rgb = teachers["depth"]
    bgr = load_teacher("depth", options={"bgr_quirk": True})
    assert rgb.spec()["bgr_quirk"] is False and bgr.spec()["bgr_quirk"] is True
    assert bgr.spec()["preprocess"]["channel_order"] == "BGR"
    assert bgr.spec() != rgb.spec() and bgr.identity() == rgb.identity()
    # the swap happens before normalisation (ImageNet mean/std stay in RGB order), as in the reference
    img = images[0]
    squashed = np.asarray(img.resize((336, 336), Image.Resampling.BICUBIC))
    ref = _np_normalize(
        Image.fromarray(np.ascontiguousarray(squashed[:, :, ::-1])), IMAGENET_MEAN, IMAGENET_STD
    )
    torch.testing.assert_close(bgr.preprocessor()(img), ref, rtol=0, atol=1e-6)
    assert not torch.allclose(bgr(images), rgb(images))


# ----------------------------------------------------------------------------------------------- seg


def test_seg_preprocessing_matches_oneformer_processor(teachers, images) -> None:
    """Squash to 768 (bicubic), then exactly what transformers' OneFormer image processor does (PIL path)."""
    from transformers import OneFormerImageProcessorPil

    img = images[1]
    squashed = img.resize((768, 768), Image.Resampling.BICUBIC)
    hf = OneFormerImageProcessorPil.from_pretrained(tiny_source("seg"))(
        images=[squashed], return_tensors="pt"
    )
    assert hf["pixel_values"].shape == (1, 3, 800, 800)
    torch.testing.assert_close(teachers["seg"].preprocessor()(img), hf["pixel_values"][0], rtol=0, atol=1e-5)


def test_seg_target_is_last_stage_resized_with_documented_layout(teachers, images) -> None:
    from transformers import OneFormerForUniversalSegmentation

    t = teachers["seg"]
    model = OneFormerForUniversalSegmentation.from_pretrained(tiny_source("seg"), dtype=torch.float32).eval()
    encoder = model.model.pixel_level_module.encoder
    pixels = torch.stack([t.preprocessor()(im) for im in images])
    with torch.no_grad():
        last = encoder(pixels).feature_maps[-1]
    assert last.shape == (2, 128, 25, 25)  # 800 / 32
    grid = F.interpolate(last, size=(24, 24), mode="bilinear", align_corners=False)  # (B, C, 24, 24)
    out = t.forward(pixels)
    torch.testing.assert_close(out, grid.permute(0, 2, 3, 1).reshape(2, 576, 128), rtol=1e-5, atol=1e-5)
    for b, y, x in [(0, 0, 0), (0, 0, 23), (1, 23, 0), (1, 7, 13)]:
        torch.testing.assert_close(out[b, y * 24 + x], grid[b, :, y, x], rtol=1e-5, atol=1e-5)
    assert t.spec()["target"]["stage"] == "stage4"


# ----------------------------------------------------------------------------------------------- gen


def test_gen_matches_clip_processor_and_image_embeds(teachers, images) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    t = teachers["gen"]
    src = tiny_source("gen")
    proc = CLIPImageProcessorPil.from_pretrained(src, subfolder="feature_extractor")
    hf_pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    pixels = torch.stack([t.preprocessor()(im) for im in images])
    torch.testing.assert_close(pixels, hf_pixels, rtol=0, atol=1e-5)
    assert t.spec()["preprocess"]["mean"] == list(CLIP_MEAN) and t.spec()["preprocess"]["std"] == list(
        CLIP_STD
    )
    model = CLIPVisionModelWithProjection.from_pretrained(src, subfolder="image_encoder", dtype=torch.float32)
    with torch.no_grad():
        embeds = model.eval()(pixel_values=pixels).image_embeds
    out = t.forward(pixels)
    torch.testing.assert_close(out[:, 0], embeds, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(2, 1))  # un-normalised, as unCLIP uses it


def test_teachers_never_import_diffusers(olakit_cache: Path) -> None:
    code = (
        "import sys\n"
        "from olacache.teachers import load_teacher\n"
        "load_teacher('gen')\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
    )
    env = {**os.environ, "OLAKIT_CACHE": str(olakit_cache), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)


# ----------------------------------------------------------------------------------------------- registry


def test_registry_contents_and_errors(tmp_path: Path) -> None:
    assert {"depth", "seg", "gen"} <= set(TEACHERS)
    with pytest.raises(ValueError, match=r"unknown teacher 'nope'.*depth.*gen.*seg"):
        load_teacher("nope")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny.*ola"):
        resolve_source("depth", preset="huge")
    assert resolve_source("depth", preset="ola") == "depth-anything/Depth-Anything-V2-Large-hf"
    assert resolve_source("seg", preset="ola") == "shi-labs/oneformer_coco_swin_large"
    assert resolve_source("gen", preset="ola") == "stabilityai/stable-diffusion-2-1-unclip"
    assert resolve_source("gen", preset="ola", source="/x/y") == "/x/y"  # explicit source wins
    assert resolve_source("gen") == str(tiny_source("gen"))
    with pytest.raises(ValueError, match="unknown option"):
        load_teacher("depth", options={"bgr": True})
    with pytest.raises(ValueError, match="must be a bool"):
        load_teacher("depth", options={"bgr_quirk": "yes"})
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match=r"no_such_checkpoint.*--preset tiny"):
        load_teacher("depth", source=str(missing))
    with pytest.raises(OSError, match=r"--preset tiny"):  # offline, not cached: a clear error, fast
        load_teacher("gen", preset="ola")


def _load_example_module():
    spec = importlib.util.spec_from_file_location(
        "fourth_teacher_example", ROOT / "tests" / "fourth_teacher_example.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fourth_teacher_registers_with_one_line(images) -> None:
    example = _load_example_module()
    before = dict(TEACHERS)
    try:
        register_teacher(example.VitTinyTeacher)  # the one line
        assert TEACHERS["vit_tiny"] is example.VitTinyTeacher
        register_teacher(example.VitTinyTeacher)  # idempotent
        t = load_teacher("vit_tiny")  # tiny preset built by the registry, loaded through timm local-dir:
        assert t.target_shape == (196, 192)
        out = t(images)
        assert out.shape == (2, 196, 192) and torch.isfinite(out).all()
        assert t.identity()["random_init"] is True
        pickle.loads(pickle.dumps(t.preprocessor()))

        @register_teacher  # decorator form; a name clash with another class is refused
        class Other(example.VitTinyTeacher):
            name = "vit_other"

        assert TEACHERS["vit_other"] is Other
        clash = type("Clash", (example.VitTinyTeacher,), {"name": "depth"})
        with pytest.raises(ValueError, match="already registered"):
            register_teacher(clash)
    finally:
        TEACHERS.clear()
        TEACHERS.update(before)
    assert "vit_tiny" not in reg.TEACHERS


def test_image_pipeline_validates_steps() -> None:
    with pytest.raises(ValueError, match="unknown pipeline step"):
        ImagePipeline(steps=(("flip",),), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(ValueError, match="interpolation"):
        ImagePipeline(steps=(("resize", 8, 8, "cubic"),), mean=IMAGENET_MEAN, std=IMAGENET_STD)
