"""Several processes (``accelerate launch --num_processes N``): who am I, which batches are mine, and how
results come back together in order.

Work that is a list of items (sample seeds, reference images) is split in whole batches: batch ``b`` goes
to process ``b % N``. Each batch is computed exactly as a single process would compute it (same items,
same batch size), and :func:`gather_batches` puts the results back in batch order on every process, so
an FID over N processes equals the single-process FID for the same seeds, bit for bit on one device type.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cpu: bool) -> Dist:
    """Join the process group that ``accelerate launch`` set up (gloo on CPU, nccl on GPUs)."""
    if launched():
        from accelerate import PartialState

        PartialState(cpu=cpu)
    return current()


def current() -> Dist:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size())
    return Dist()


def batch_ranges(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


def my_batches(n: int, batch_size: int, dist: Dist) -> list[tuple[int, int]]:
    """The [lo, hi) item ranges this process computes: batch b belongs to process b % world."""
    return [r for b, r in enumerate(batch_ranges(n, batch_size)) if b % dist.world == dist.rank]


def gather_batches(local: Sequence[Any], dist: Dist) -> list[Any]:
    """Every process's per-batch results (in :func:`my_batches` order) -> all results in batch order,
    on every process."""
    if dist.world == 1:
        return list(local)
    import torch.distributed as td

    parts: list[list[Any]] = [None] * dist.world  # type: ignore[list-item]
    td.all_gather_object(parts, list(local))
    return [parts[b % dist.world][b // dist.world] for b in range(sum(map(len, parts)))]
