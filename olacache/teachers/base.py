"""The frozen-teacher contract (docs/method.md §3).

A :class:`Teacher` turns RGB PIL images into a fixed-shape float32 target per image. It is split in two
halves on purpose:

* :meth:`Teacher.preprocessor` returns a small picklable callable (an :class:`ImagePipeline`, ``pipeline.py``)
  that holds no weights, so the build can run decoding/resizing in DataLoader worker processes;
* :meth:`Teacher.forward` runs the frozen network on a batch of already-preprocessed pixels.

Every teacher is loaded with the library's ``from_pretrained`` from a *source* (a local directory or a Hub id).
The tiny presets (random weights, real architecture class, real token geometry) are written by
:meth:`Teacher.save_tiny` and are loaded through exactly the same path as the real checkpoints.

:meth:`Teacher.spec` and :meth:`Teacher.identity` (``identity.py``) are what a store records and compares on
resume: two teachers with equal spec and identity produce identical targets (same code, same device kind).
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from .identity import (
    PRESET_FILE,
    hub_revision,
    is_local_source,
    load_json_config,
    read_preset_marker,
    weights_sha256,
    write_preset_marker,
)
from .pipeline import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImagePipeline, interpolation_name

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
    kind: ClassVar[str | None] = None
    """``"spatial"`` (a (tokens, C) grid) or ``"global"`` (one (1, C) vector): how the trainer shapes this
    teacher's task tokens and predictor queries (docs/method.md §3.4). Recorded in the store column; None
    derives it from :attr:`target_shape` (more than one token = spatial)."""

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

    @property
    def target_kind(self) -> str:
        """:attr:`kind`, or the kind its target shape implies."""
        if self.kind is not None:
            if self.kind not in ("spatial", "global"):
                raise ValueError(f"teacher {self.name!r}: kind must be 'spatial' or 'global', got {self.kind!r}")
            return self.kind
        shape = self.target_shape
        return "spatial" if len(shape) >= 2 and shape[0] > 1 else "global"

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
