"""The frozen-teacher contract, the picklable image pipeline and weight-identity hashing.

A :class:`Teacher` turns RGB PIL images into a fixed-shape float32 target per image. It is split in two
halves on purpose:

* :meth:`Teacher.preprocessor` returns a small picklable callable (an :class:`ImagePipeline`) that holds no
  weights, so the build can run decoding/resizing in DataLoader worker processes;
* :meth:`Teacher.forward` runs the frozen network on a batch of already-preprocessed pixels.

Every teacher is loaded with the library's ``from_pretrained`` from a *source* (a local directory or a Hub id).
The tiny presets (random weights, real architecture class, real token geometry) are written by
:meth:`Teacher.save_tiny` and are loaded through exactly the same path as the real checkpoints.

:meth:`Teacher.spec` and :meth:`Teacher.identity` are what a store records and compares on resume: two teachers
with equal spec and identity produce identical targets (same code, same device kind).
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESET_FILE",
    "ImagePipeline",
    "Teacher",
    "hub_revision",
    "interpolation_name",
    "is_local_source",
    "load_json_config",
    "read_preset_marker",
    "weights_sha256",
    "write_preset_marker",
]

PRESET_FILE = "olakit_preset.json"
"""Marker written next to a tiny preset's weights; ``random_init`` in :meth:`Teacher.identity` comes from it."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's integer resample codes (as stored in HF ``preprocessor_config.json`` "resample") <-> names used in specs.
_PIL_CODE_TO_NAME = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_NAME_TO_PIL = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def interpolation_name(resample: int | str) -> str:
    """Map a PIL/HF resample code (or a name) to the canonical name used in specs."""
    if isinstance(resample, str):
        name = resample.lower()
        if name not in _NAME_TO_PIL:
            raise ValueError(f"unknown interpolation {resample!r}; valid: {sorted(_NAME_TO_PIL)}")
        return name
    try:
        return _PIL_CODE_TO_NAME[int(resample)]
    except KeyError:
        raise ValueError(
            f"unknown PIL resample code {resample!r}; valid: {sorted(_PIL_CODE_TO_NAME)}"
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Image pipeline (runs in DataLoader workers: must be picklable and weight-free)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePipeline:
    """RGB PIL image -> float32 CHW tensor, as an explicit list of steps.

    Steps (applied in order, all on the uint8 image, the way the reference's PIL/HF-slow paths do it):

    * ``("resize", height, width, interp)`` — squash to an exact size (aspect ratio not kept);
    * ``("resize_shortest", edge, interp)`` — shortest side to ``edge``, long side ``int(edge * long / short)``
      (HF ``get_resize_output_image_size(default_to_square=False)`` / torchvision semantics);
    * ``("center_crop", height, width)`` — top/left offsets ``(H - h) // 2``, ``(W - w) // 2`` as in HF;
    * ``("swap_rb",)`` — RGB -> BGR channel swap (reproduces a reference quirk; see the depth teacher).

    Then ``x * rescale`` and ``(x - mean) / std`` per channel, computed in float64 and rounded once to float32
    (the reference's numpy paths are float64 too; rounding once keeps the result independent of op order),
    implemented as a 256-entry lookup table per channel.

    The dataclass is frozen and holds only tuples and floats, so it pickles cheaply into worker processes, and
    :meth:`spec` is a faithful JSON description of what it does.
    """

    steps: tuple[tuple[Any, ...], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1.0 / 255.0

    def __post_init__(self) -> None:
        for step in self.steps:
            kind = step[0]
            if kind == "resize":
                _, h, w, interp = step
                interpolation_name(interp)
                if int(h) <= 0 or int(w) <= 0:
                    raise ValueError(f"bad resize step {step}")
            elif kind == "resize_shortest":
                _, edge, interp = step
                interpolation_name(interp)
                if int(edge) <= 0:
                    raise ValueError(f"bad resize_shortest step {step}")
            elif kind == "center_crop":
                _, h, w = step
                if int(h) <= 0 or int(w) <= 0:
                    raise ValueError(f"bad center_crop step {step}")
            elif kind != "swap_rb":
                raise ValueError(f"unknown pipeline step {kind!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean/std must have 3 entries (RGB)")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the input's aspect ratio."""
        size: tuple[int, int] | None = None
        for step in self.steps:
            if step[0] in ("resize", "center_crop"):
                size = (int(step[1]), int(step[2]))
            elif step[0] == "resize_shortest":
                size = None
        return size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if image.mode != "RGB":
            # Converting here would silently pick a policy for alpha/palette/CMYK/16-bit images; the caller
            # (the image source) owns that decision and must hand over RGB.
            raise ValueError(
                f"expected an RGB PIL image, got mode {image.mode!r}; convert it before preprocessing"
            )
        swap = False
        for step in self.steps:
            kind = step[0]
            if kind == "resize":
                _, h, w, interp = step
                if image.size != (w, h):
                    image = image.resize((int(w), int(h)), resample=_NAME_TO_PIL[interpolation_name(interp)])
            elif kind == "resize_shortest":
                _, edge, interp = step
                w, h = image.size
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = int(edge), int(int(edge) * long / short)
                new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
                if (new_w, new_h) != (w, h):
                    image = image.resize((new_w, new_h), resample=_NAME_TO_PIL[interpolation_name(interp)])
            elif kind == "center_crop":
                _, ch, cw = step
                w, h = image.size
                top, left = (h - int(ch)) // 2, (w - int(cw)) // 2
                image = image.crop((left, top, left + int(cw), top + int(ch)))
            elif kind == "swap_rb":
                swap = not swap
        arr = np.asarray(image, dtype=np.uint8)
        lut = self._lut
        out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
        for c in range(3):
            # output channel c is input channel 2 - c under the BGR quirk; mean/std stay indexed by c
            np.take(lut[c], arr[:, :, 2 - c if swap else c], out=out[c])
        return torch.from_numpy(out)

    @cached_property
    def _lut(self) -> np.ndarray:
        """(3, 256) float32 table of ``(v * rescale - mean_c) / std_c``, computed in float64 and rounded once.

        Inputs are uint8, so a table lookup gives bit-for-bit the float64 result at ~6x less CPU than the
        arithmetic (this runs per image in the DataLoader workers; seg images are 800x800)."""
        v = np.arange(256, dtype=np.float64)[None, :] * self.rescale
        mean = np.asarray(self.mean, dtype=np.float64)[:, None]
        std = np.asarray(self.std, dtype=np.float64)[:, None]
        return ((v - mean) / std).astype(np.float32)

    def spec(self) -> dict[str, Any]:
        """JSON-able description; includes the channel order actually fed to the network."""
        swaps = sum(1 for s in self.steps if s[0] == "swap_rb")
        return {
            "steps": [list(s) for s in self.steps],
            "channel_order": "BGR" if swaps % 2 else "RGB",
            "rescale": self.rescale,
            "mean": list(self.mean),
            "std": list(self.std),
            "output_size": list(self.output_size) if self.output_size else None,
            "dtype": "float32",
            "layout": "CHW",
        }


# --------------------------------------------------------------------------------------------------------------
# Sources, preset markers and weight identity
# --------------------------------------------------------------------------------------------------------------


def is_local_source(source: str | os.PathLike) -> bool:
    """True if ``source`` names a local path (existing or not) rather than a Hub id like ``org/name``.

    A missing local directory must fail with a clear "no such directory" message instead of a confusing Hub
    lookup, so anything that looks like a path (absolute, ``./``, ``~``, several components, an existing path)
    counts as local.
    """
    s = os.fspath(source)
    if os.path.exists(s):
        return True
    if s.startswith((os.sep, ".", "~")) or "\\" in s or s.endswith("/"):
        return True
    return s.count("/") != 1


def write_preset_marker(out_dir: Path, seed: int) -> None:
    """Write ``olakit_preset.json`` (last, by convention: its presence means the preset is complete)."""
    (Path(out_dir) / PRESET_FILE).write_text(
        json.dumps({"preset": "tiny", "random_init": True, "seed": int(seed)}, indent=2) + "\n"
    )


def read_preset_marker(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / PRESET_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# What from_pretrained would load, in its order of preference. Hashing only these (not every *.bin/*.pth in the
# directory) keeps the hash cheap and meaningful: a Hub snapshot of OneFormer also holds the original detectron2
# .pth, and an unCLIP snapshot holds a UNet, neither of which the teacher uses.
_WEIGHT_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_HASH_CACHE: dict[tuple[Any, ...], str] = {}
_HASH_LOCK = threading.Lock()


def _files_to_hash(model_dir: Path) -> list[Path]:
    for name in _WEIGHT_CANDIDATES:
        path = model_dir / name
        if not path.is_file():
            continue
        files = [path]
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
            files += [model_dir / s for s in shards]
        break
    else:
        # Not an HF-transformers layout (e.g. timm's local-dir, or a single .pth): hash every weight file.
        files = sorted(
            p
            for p in model_dir.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".pth", ".pt")
        )
    if not files:
        raise FileNotFoundError(f"no weight files found in {model_dir}")
    # The architecture config is part of what the weights mean (layer count, out_indices, ...): hash it too.
    if (model_dir / "config.json").is_file():
        files.append(model_dir / "config.json")
    return files


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 over the weight files (and config.json) that ``from_pretrained`` loads from ``model_dir``.

    Each file contributes its relative name and size before its bytes, so renames/splits change the hash.
    Results are memoised per process on (path, size, mtime) so loading the same teacher twice hashes once.
    """
    model_dir = Path(model_dir)
    files = _files_to_hash(model_dir)
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(model_dir).as_posix()):
        rel = path.relative_to(model_dir).as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                digest.update(chunk)
    result = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = result
    return result


def hub_revision(repo_id: str, subfolder: str | None = None) -> str:
    """The commit hash of the locally cached Hub snapshot ``repo_id`` was loaded from."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    resolved = cached_file(repo_id, "config.json", subfolder=subfolder or "")
    commit = extract_commit_hash(resolved, None)
    if not commit:
        raise RuntimeError(f"could not determine the Hub revision of {repo_id!r} (resolved {resolved})")
    return commit


def load_json_config(source: str, filename: str, subfolder: str | None = None) -> dict[str, Any] | None:
    """Read a JSON config file from a local dir or the Hub cache; None when the file does not exist."""
    if is_local_source(source):
        path = Path(source).expanduser() / (subfolder or "") / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from transformers.utils.hub import cached_file

    resolved = cached_file(
        source, filename, subfolder=subfolder or "", _raise_exceptions_for_missing_entries=False
    )
    return json.loads(Path(resolved).read_text()) if resolved else None


# --------------------------------------------------------------------------------------------------------------
# The Teacher ABC
# --------------------------------------------------------------------------------------------------------------

_PRECISIONS = ("auto", "fp32", "bf16")


class Teacher(abc.ABC):
    """A frozen target encoder: ``images -> (B, *target_shape)`` float32.

    Subclasses set the class attributes, implement :meth:`save_tiny`, :meth:`_load` (build the network from
    ``self.source`` and set ``self.pipeline``), :meth:`_forward`, :attr:`target_shape` and :meth:`_target_spec`.
    Everything else (device placement, freezing, autocast, options, spec/identity, errors) lives here.

    Options: every teacher accepts ``precision`` (``"auto"``: bf16 autocast on CUDA, fp32 elsewhere; or
    ``"fp32"``/``"bf16"`` explicitly) plus its own :attr:`option_defaults`. The resolved precision is part of
    :meth:`spec`, because bf16 and fp32 targets differ and must not be silently mixed in one store column.
    """

    name: ClassVar[str]
    """Registry key and store column name."""
    default_source: ClassVar[str]
    """Hub id of the real checkpoint (preset ``ola``)."""
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    """Teacher-specific options and their defaults (validated; unknown keys are an error)."""
    weights_subfolder: ClassVar[str | None] = None
    """Where inside ``source`` the network's weights live (``image_encoder`` for unCLIP)."""
    layout: ClassVar[str] = ""
    """Human-readable meaning of the target axes, recorded in :meth:`spec`."""
    tiny_version: ClassVar[int] = 1
    """Bump when :meth:`save_tiny` changes, so cached tiny presets are rebuilt under a new directory."""
    spec_version: ClassVar[int] = 1
    """Bump when the target definition changes in a way not visible in the rest of :meth:`spec`."""

    pipeline: ImagePipeline

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.source = os.fspath(source)
        self.device = torch.device(device)
        self.options = self._resolve_options(options)
        self.precision = self._resolve_precision(self.options["precision"], self.device)
        self.local_dir: Path | None = None
        if is_local_source(self.source):
            path = Path(self.source).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"teacher {self.name!r}: checkpoint directory {str(path)!r} does not exist (or is not a "
                    f"directory). Use `--preset tiny` for a random-init tiny model, or pass a local checkpoint "
                    f"directory saved with save_pretrained (real weights: {self.default_source!r})."
                )
            self.local_dir = path
            self.source = str(path)
        try:
            model = self._load()
        except OSError as e:
            where = (
                f"local directory {self.source!r}"
                if self.local_dir
                else f"Hub id {self.source!r} (no local directory of that name either; not in the Hub cache "
                "and no network?)"
            )
            raise OSError(
                f"teacher {self.name!r}: could not load from {where}: {e}\n"
                f"Use `--preset tiny` for a random-init tiny model, or point --source at a local checkpoint dir."
            ) from e
        model.eval()
        model.requires_grad_(False)
        self.model = model.to(self.device)
        self._identity: dict[str, Any] | None = None

    # ---- construction helpers ----------------------------------------------------------------------------

    @classmethod
    def _resolve_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        defaults = {"precision": "auto", **dict(cls.option_defaults)}
        options = dict(options or {})
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"teacher {cls.name!r}: unknown option(s) {unknown}; valid: {sorted(defaults)}")
        resolved = {**defaults, **options}
        for key, default in defaults.items():
            if isinstance(default, bool) and not isinstance(resolved[key], bool):
                raise ValueError(
                    f"teacher {cls.name!r}: option {key!r} must be a bool, got {resolved[key]!r}"
                )
        return resolved

    @staticmethod
    def _resolve_precision(precision: str, device: torch.device) -> str:
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        if precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return precision

    # ---- the subclass contract ------------------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def save_tiny(cls, out_dir: Path, seed: int = 0) -> None:
        """Write the tiny preset: the REAL architecture class built from a small config with random weights
        (seeded), saved with ``save_pretrained`` (+ processor config) into ``out_dir``, then
        :func:`write_preset_marker`."""

    @abc.abstractmethod
    def _load(self) -> torch.nn.Module:
        """Load the network needed for the target from ``self.source`` (fp32, CPU) and set ``self.pipeline``.

        Raise OSError for "cannot find/read the checkpoint" (it is re-raised with a helpful message)."""

    @abc.abstractmethod
    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) on ``self.device`` -> (B, *target_shape); runs under inference mode and autocast."""

    @abc.abstractmethod
    def _target_spec(self) -> dict[str, Any]:
        """Teacher-specific part of :meth:`spec`: target module, layers, reduction, resampling."""

    @property
    @abc.abstractmethod
    def target_shape(self) -> tuple[int, ...]:
        """Per-image target shape: (576, C) for depth/seg, (1, C) for gen."""

    # ---- public API --------------------------------------------------------------------------------------

    def preprocessor(self) -> Callable[[Image.Image], torch.Tensor]:
        """Picklable, weight-free RGB PIL -> float32 CHW transform (run it in DataLoader workers)."""
        return self.pipeline

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the preprocessed pixels every image is brought to."""
        size = self.pipeline.output_size
        if size is None:
            raise RuntimeError(f"teacher {self.name!r}: pipeline output size is input-dependent")
        return size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 -> (B, *target_shape) float32 on CPU.

        Runs under ``torch.inference_mode`` with bf16 autocast when the precision is bf16. The result is cloned
        out of inference mode: inference tensors cannot be saved for backward, and the online-targets adapter
        feeds targets into losses whose gradients flow into the predictions.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"teacher {self.name!r}: expected pixels (B, 3, H, W), got {tuple(pixels.shape)}"
            )
        expected_hw = self.pipeline.output_size
        if expected_hw is not None and tuple(pixels.shape[-2:]) != expected_hw:
            raise ValueError(
                f"teacher {self.name!r}: expected {expected_hw[0]}x{expected_hw[1]} pixels from its "
                f"preprocessor(), got {tuple(pixels.shape[-2:])}"
            )
        with torch.inference_mode():
            x = pixels.to(self.device, dtype=torch.float32, non_blocking=True)
            with torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
            ):
                out = self._forward(x)
            out = out.float().cpu()
        out = out.clone()
        want = (pixels.shape[0], *self.target_shape)
        if tuple(out.shape) != want:
            raise RuntimeError(f"teacher {self.name!r}: produced {tuple(out.shape)}, expected {want}")
        return out

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """Convenience: preprocess + stack + :meth:`forward` (online-targets adapter, ``verify --recompute``)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        pre = self.preprocessor()
        return self.forward(torch.stack([pre(im) for im in images]))

    def spec(self) -> dict[str, Any]:
        """JSON-able description of everything besides the weights that determines the targets."""
        spec: dict[str, Any] = {
            "teacher": self.name,
            "spec_version": self.spec_version,
            "preprocess": self.pipeline.spec(),
            "target": self._target_spec(),
            "target_shape": list(self.target_shape),
            "layout": self.layout,
            "precision": "bf16-autocast" if self.precision == "bf16" else "fp32",
        }
        # Teacher options (e.g. depth's ``bgr_quirk``) sit at the top level: each one changes the targets.
        for key, value in sorted(self.options.items()):
            if key != "precision":
                if key in spec:
                    raise ValueError(f"teacher {self.name!r}: option {key!r} collides with a spec field")
                spec[key] = value
        # Round-trip through JSON so what callers compare equals what a store reads back (tuples -> lists).
        return json.loads(json.dumps(spec))

    def identity(self) -> dict[str, Any]:
        """``{"source", "weights_sha256", "random_init"}``; for a Hub id the hash is the cached revision."""
        if self._identity is None:
            if self.local_dir is not None:
                marker = read_preset_marker(self.local_dir)
                weights_dir = self.local_dir / (self.weights_subfolder or "")
                self._identity = {
                    "source": self.source,
                    "weights_sha256": weights_sha256(weights_dir),
                    "random_init": bool(marker and marker.get("random_init", False)),
                }
            else:
                self._identity = {
                    "source": self.source,
                    "weights_sha256": hub_revision(self.source, self.weights_subfolder),
                    "random_init": False,
                }
        return dict(self._identity)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, device={str(self.device)!r}, "
            f"target_shape={self.target_shape}, precision={self.precision!r})"
        )
