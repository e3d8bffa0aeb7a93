"""What a shard's values become on disk: range-checked float16, or int8 with a per-vector absmax scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from olacache.store.format import FAILED, OK, PAD, row_problem


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 per vector along the LAST axis -> (q int8 like x, scale float32 x.shape[:-1]).
    An all-zero vector gets scale 1 so dequantisation never divides by or multiplies with 0/NaN."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.rint(x / scale[..., None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 * scale -> float16 (computed in float32; the range was checked at write time)."""
    out = q.astype(np.float32)
    out *= scale[..., None]
    return out.astype(np.float16)


def int8_cosines(values: np.ndarray) -> np.ndarray:
    """Per-image cosine between float32 targets and their int8 round trip (the store's quantiser)."""
    q, scale = quantize_int8(values)
    rec = dequantize_int8(q, scale).astype(np.float32)
    a = values.reshape(len(values), -1).astype(np.float64)
    b = rec.reshape(len(values), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)


def encode_shard(
    values: np.ndarray, status: np.ndarray, errors: Sequence[str], n: int, shape: tuple[int, ...], dtype: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[str]]:
    """Validate one shard's rows and encode them -> (data, int8 scale or None, status, error per row).

    ``values`` float (n, *shape) for the shard's n rows; ``status`` OK/FAILED per row; ``errors`` a reason per row. Rows not OK are
    stored as zeros. Rows whose values are non-finite or exceed the float16 range become FAILED with the reason
    (int8 columns dequantise to float16, so the same range applies). Bad arguments raise ValueError."""
    values = np.asarray(values)
    if values.shape != (n, *shape):
        raise ValueError(f"values shape {values.shape} != {(n, *shape)}")
    if values.dtype.kind != "f":
        raise ValueError(f"values must be floating, got {values.dtype}")
    st = np.array(status, dtype=np.uint8, copy=True).reshape(-1)
    if st.shape != (n,):
        raise ValueError(f"status shape {st.shape} != ({n},)")
    if not np.isin(st, (OK, FAILED, PAD)).all():
        raise ValueError(f"status entries must be OK ({OK}), FAILED ({FAILED}) or PAD ({PAD}, the padding rows of "
                         "an extended store); a shard is written whole")
    errs = [str(e) for e in errors]
    if len(errs) != n:
        raise ValueError(f"{len(errs)} error strings for {n} rows")

    for i in np.nonzero(st == OK)[0]:
        why = row_problem(values[i])
        if why is not None:
            st[i], errs[i] = FAILED, why
    for i in range(n):
        if st[i] in (OK, PAD):
            errs[i] = ""
        elif not errs[i]:
            errs[i] = "failed (no reason given)"

    ok = st == OK
    scale: np.ndarray | None = None
    if dtype == "float16":
        if ok.all():
            data = values.astype(np.float16, copy=False)
        else:
            data = np.zeros((n, *shape), dtype=np.float16)
            for i in np.nonzero(ok)[0]:
                data[i] = values[i]
    else:
        data = np.zeros((n, *shape), dtype=np.int8)
        scale = np.ones((n, *shape[:-1]), dtype=np.float32)
        # Per row keeps the float32 temporaries at one image, not one shard.
        for i in np.nonzero(ok)[0]:
            data[i], scale[i] = quantize_int8(values[i])
    return data, scale, st, errs
