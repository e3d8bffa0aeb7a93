"""Which samples rank r trains on at step s: deterministic, rank-sharded, resumable batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from olatrain.data.errors import DataError


class _BatchIndices(list):
    """A rank's index list for one step; carries its position to ``__getitems__`` (pickles with attrs)."""

    epoch: int = 0
    step: int = 0


class StepBatchSampler(Sampler[list[int]]):
    """Infinite, deterministic, rank-sharded batches addressed by global step.

    With N = ``n`` samples, B = per-rank ``batch_size``, W = ``world_size``, G = B * W:

    - epoch e's order is ``perm_e = np.random.default_rng([seed, e]).permutation(N)`` (``arange(N)`` when
      ``shuffle=False``);
    - ``drop_last=True``: ``steps_per_epoch = N // G``; step s is global batch ``k = s % steps_per_epoch`` of
      epoch ``e = s // steps_per_epoch``, i.e. ``perm_e[k*G : (k+1)*G]`` (the last ``N % G`` samples of each
      epoch's order are not used in that epoch);
    - ``drop_last=False``: the orders of epochs 0, 1, 2, ... are concatenated into one stream and step s is
      ``stream[s*G : (s+1)*G]`` (a batch may straddle two epochs; nothing is dropped or padded);
    - rank r takes the contiguous block ``global_batch[r*B : (r+1)*B]``.

    So at every step the ranks' batches are disjoint, their union is the global batch, and concatenating them
    in rank order (what ``all_gather`` returns) equals, element for element, the batch a single process with
    ``batch_size = B*W`` gets at that step — the DDP-vs-single-process equivalence the tests rely on.
    Iteration starts at ``start_step`` (resume) without touching earlier batches and never ends.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.n, self.batch_size, self.rank, self.world_size = int(n), int(batch_size), int(rank), int(world_size)
        self.shuffle, self.seed, self.start_step, self.drop_last = shuffle, int(seed), int(start_step), drop_last
        self.global_batch_size = self.batch_size * self.world_size
        if self.n == 0:
            raise DataError("the dataset is empty (no samples left to train on)")
        if drop_last and self.n < self.global_batch_size:
            raise DataError(
                f"{self.n} samples cannot fill one global batch of {self.global_batch_size} "
                f"({self.batch_size} per rank x {self.world_size} ranks) with drop_last; use a smaller batch"
            )
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Steps per pass over the data (fractional with drop_last=False)."""
        if self.drop_last:
            return self.n // self.global_batch_size
        return self.n / self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        p = self._perm_cache.get(epoch)
        if p is None:
            if self.shuffle:
                p = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            else:
                p = np.arange(self.n)
            if len(self._perm_cache) >= 2:  # a batch spans at most two epochs
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = p
        return p

    def global_batch(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch of the batch's first sample, the G sample indices of global step ``step``)."""
        g = self.global_batch_size
        if self.drop_last:
            spe = self.n // g
            epoch, k = divmod(step, spe)
            return epoch, self.permutation(epoch)[k * g : (k + 1) * g]
        start = step * g
        epoch, off = divmod(start, self.n)
        first = epoch
        parts = []
        need = g
        while need > 0:
            chunk = self.permutation(epoch)[off : off + need]
            parts.append(chunk)
            need -= len(chunk)
            epoch, off = epoch + 1, 0
        return first, np.concatenate(parts)

    def indices(self, step: int) -> _BatchIndices:
        epoch, gb = self.global_batch(step)
        out = _BatchIndices(int(x) for x in gb[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
        out.epoch, out.step = epoch, step
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.indices(step)
            step += 1
