"""Benchmark the pair stream and translator training: pairs/s and peak memory on a store larger than the buffer.

    python bench/train.py --sender-dim 32 --receiver-dim 48 --rows 200000 --buffer 50000
    python bench/train.py --sender-dim 768 --receiver-dim 1024 --rows 40000 --buffer 10000

Peak memory is the largest growth of the resident set (sampled every 10 batches) while streaming a synthetic store
(four times the shuffle buffer above), printed next to the sizes of the store and of one buffer: it follows the buffer.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time

import torch
import torch.nn.functional as F

from datamodules.activation_pairs import PairStream
from datamodules.store_format import write_pairs_store
from lightning_modules.translator import TranslatorModule


def rss_mb() -> float:
    """Current resident set size (Linux /proc), sampled during streaming: ru_maxrss would be a lifetime high-water
    mark including imports."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(folder: str, args) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.sender_dim, generator=g)
    w = torch.randn(args.receiver_dim, args.sender_dim, generator=g)
    write_pairs_store(folder, x, F.normalize(x, dim=-1) @ w.T, shard_rows=args.shard_rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sender-dim", type=int, default=32)
    p.add_argument("--receiver-dim", type=int, default=48)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--buffer", type=int, default=None, help="shuffle buffer rows (default rows/4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-rows", type=int, default=16384)
    args = p.parse_args()
    buffer = args.buffer or args.rows // 4
    row_bytes = 4 * (args.sender_dim + args.receiver_dim)
    with tempfile.TemporaryDirectory() as d:
        # Build the store in a child process: ru_maxrss is a high-water mark, and the in-memory arrays used to
        # write it would otherwise hide the streaming peak.
        child = mp.get_context("fork").Process(target=_build, args=(d, args))
        child.start()
        child.join()
        base = rss_mb()
        ds = PairStream(
            d, 0, args.rows, batch_size=args.batch_size, shuffle=True, seed=0, chunk_rows=64, shuffle_buffer=buffer
        )
        t0, n, peak = time.perf_counter(), 0, 0.0
        for i, b in enumerate(ds):
            n += len(b["index"])
            if i % 10 == 0:
                peak = max(peak, rss_mb() - base)
        stream_s = time.perf_counter() - t0
        m = TranslatorModule(args.sender_dim, args.receiver_dim)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        t0, k = time.perf_counter(), 0
        for b in ds:
            loss = m._loss(m.translate(b["sender"]), F.normalize(b["receiver"], dim=-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            k += len(b["index"])
        train_s = time.perf_counter() - t0
    print(
        f"store {args.rows} rows x ({args.sender_dim}+{args.receiver_dim}) fp32 = {args.rows * row_bytes / 2**20:.0f}"
        f" MiB; shuffle buffer {buffer} rows = {buffer * row_bytes / 2**20:.0f} MiB"
    )
    print(
        f"stream only: {n / stream_s:.0f} pairs/s; stream + linear translator step (batch {args.batch_size}): "
        f"{k / train_s:.0f} pairs/s"
    )
    print(f"peak RSS growth while streaming: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
