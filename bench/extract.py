"""Benchmark activation extraction: tokens/s for a sender/receiver pair on the built-in corpus.

python bench/extract.py --sender tiny-neox --receiver tiny-neox-large --samples 200
python bench/extract.py --sender pythia-160m-shape --receiver pythia-410m-shape --samples 8 --max-length 48
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from activation_transfer.models.frozen_lm import ModelRef, load_ref
from datamodules.activation_store import extract_store
from datamodules.corpora import CorpusSpec, load_corpus
from datamodules.store_format import ref_spec, store_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sender", default="tiny-neox")
    p.add_argument("--receiver", default="tiny-neox-large")
    p.add_argument("--layer", type=float, default=0.67)
    p.add_argument("--samples", type=int, default=200, help="built-in corpus documents")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s, r = ModelRef(args.sender, layer=args.layer), ModelRef(args.receiver, layer=args.layer)
    t0 = time.perf_counter()
    sender, receiver = load_ref(s), load_ref(r)
    load_s = time.perf_counter() - t0
    corpus = load_corpus(CorpusSpec(builtin_samples=args.samples))
    spec = store_spec(ref_spec(s), ref_spec(r), corpus.fingerprint, args.max_length)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        m = extract_store(sender, receiver, corpus, d, spec, batch_size=args.batch_size)
        dt = time.perf_counter() - t0
    print(
        f"sender={args.sender} ({m['layers']['sender']}, d={m['dims']['sender']}) "
        f"receiver={args.receiver} ({m['layers']['receiver']}, d={m['dims']['receiver']})"
    )
    print(
        f"model load {load_s:.1f}s; extracted {m['num_tokens']} tokens in {dt:.2f}s: "
        f"{m['num_tokens'] / dt:.0f} tokens/s (threads={torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
