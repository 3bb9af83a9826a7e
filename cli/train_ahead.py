"""The split demo's functional and KV trainings side by side: each is seeded by its own command line and cached by
content key, so they can train at once, each in a process of its own with its share of the cores, before the demo's
steps ask for them one after another (and find each in the cache, its command recorded as before).

On 2 cores two trainings at one thread each take about half the time of one after the other at two threads (the
organisms' matrices are too small for a second thread to pay). ``ACTIVATION_TRANSFER_DEMO_JOBS`` sets how many run at
once (1: none ahead, the demo trains in its own process as before).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from activation_transfer.errors import UsageError

JOBS_ENV = "ACTIVATION_TRANSFER_DEMO_JOBS"
MAX_JOBS = 4  # each training holds its own models and data (about 1 GB on the organisms)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def demo_jobs() -> int:
    """Trainings at once: ``$ACTIVATION_TRANSFER_DEMO_JOBS``, else the cores (at most :data:`MAX_JOBS`).

    Raises:
        ValueError: The variable is not an integer >= 1 (one line naming it).
    """
    value = os.environ.get(JOBS_ENV, "").strip()
    if not value:
        return max(1, min(MAX_JOBS, cores()))
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{JOBS_ENV}={value!r}: set it to the number of trainings to run at once (>= 1)")
    return int(value)


def _train(job: tuple) -> str:
    """One training in a worker process, at ``threads`` intra-op threads."""
    import torch

    translator, threads, args = job
    torch.set_num_threads(threads)
    return str(translator(*args))


def train_ahead(translator: Callable, plans: Sequence[Callable], jobs: int) -> list[tuple]:
    """Train every translator the ``plans`` ask for, ``jobs`` at a time in worker processes; returns what they asked.

    Args:
        translator: The demo's cached trainer, ``translator(out, organisms, seed, config, extra, steps=None)``: a
            module-level function (a worker imports it by name).
        plans: Functions ``plan(t)`` that call ``t`` as the demo's steps call ``translator`` (a stand-in ``t``
            records the calls and trains nothing).
        jobs: Trainings at once; 1 trains nothing ahead.
    """
    wanted: list[tuple] = []

    def record(out, organisms, seed, config, extra=None, steps=None) -> Path:
        wanted.append((out, organisms, seed, config, list(extra or [])))
        return Path(out) / "planned"

    for plan in plans:
        plan(record)
    if jobs <= 1 or len(wanted) <= 1:
        return wanted
    workers = min(jobs, len(wanted))
    threads = max(1, cores() // workers)
    # spawn: a fresh interpreter per worker (a forked one would inherit the parent's torch thread pools).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_train, [(translator, threads, args) for args in wanted], chunksize=1)
    return wanted


__all__ = ["JOBS_ENV", "demo_jobs", "train_ahead"]
