"""The embedding store: the contract between ``olacache`` (writes targets) and ``olatrain`` (reads them).

Modules, lowest first: ``format`` (layout names, status codes, errors), ``quant`` (int8), ``pread`` (batched
row reads), ``backend`` (what a storage format provides), ``zarr_backend`` / ``hdf5_backend``, ``store``
(``EmbeddingStore``: create/open/check/write/read) and ``reader`` (``TargetReader``, the trainer's view).
The names below are the public API; ``from olacache.store import EmbeddingStore, TargetReader`` is the usual
import.
"""

from olacache.inputs.keys import image_set_fingerprint, normalize_image_path
from olacache.store.format import (
    FAILED,
    FORMAT_VERSION,
    KINDS,
    MISSING,
    OK,
    PAD,
    CorruptChunk,
    StoreError,
    StoreLocked,
    StoreMismatch,
    inner_chunk_rows,
)
from olacache.store.quant import dequantize_int8, int8_cosines, quantize_int8
from olacache.store.reader import TargetReader
from olacache.store.store import EmbeddingStore

__all__ = [
    "PAD",
    "CorruptChunk",
    "FAILED",
    "FORMAT_VERSION",
    "KINDS",
    "MISSING",
    "OK",
    "EmbeddingStore",
    "StoreError",
    "StoreLocked",
    "StoreMismatch",
    "TargetReader",
    "dequantize_int8",
    "image_set_fingerprint",
    "inner_chunk_rows",
    "int8_cosines",
    "normalize_image_path",
    "quantize_int8",
]
