"""Cost of the per-row non-finite check on targets read from a store (olatrain.data.skips.nonfinite_rows).

One batch of 32 depth-sized fp16 targets (32 x 576 x 1024, 38 MB), one CPU thread (what a DataLoader worker
uses), three rounds of 10 calls each. Measured side by side with the alternatives and a plain copy of the batch
(the least any per-batch pass over the data costs), so the numbers read as ratios:

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_nonfinite_rows.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from olatrain.data.skips import nonfinite_rows


def main() -> None:
    torch.set_num_threads(1)
    g = torch.randn(32, 576, 1024).half()
    bits = g.numpy().view(np.uint16).reshape(32, -1)
    fns = {
        "nonfinite_rows (per-row bits)": lambda: nonfinite_rows(g),
        "whole-batch bits": lambda: (bits & 0x7FFF).max(1) >= 0x7C00,
        "torch.isfinite": lambda: torch.isfinite(g.flatten(1)).all(1),
        "copy of the batch": lambda: g.clone(),
    }
    for _ in range(3):
        res = {}
        for name, f in fns.items():
            f()
            t = time.perf_counter()
            for _ in range(10):
                f()
            res[name] = (time.perf_counter() - t) / 10 * 1e3
        print(" | ".join(f"{k} {v:.1f} ms" for k, v in res.items()))


if __name__ == "__main__":
    main()
