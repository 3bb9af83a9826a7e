"""``make demo``: the paper's whole experiment offline, on the two model organisms, in minutes on a CPU.

1. Organisms: ``organism:sender`` and ``organism:receiver`` (``configs/organisms/*.yaml``), trained once
   and cached.
2. Translators: one per seed of the evaluation (42, 123, 456), as the paper trained them: ``train.py fit -c
   configs/train/demo.yaml --seed_everything S --data.seed S`` (activations extracted once and cached, so each seed
   costs only translator training). Each checkpoint is kept under ``<out>/translator/seed<S>-<key>/`` with a key
   hashing the config, the organisms and the seed, and reused.
3. Evaluation: ``evaluate.py test -c configs/eval/demo.yaml --model.translator_ckpt '[ckpt42, ckpt123, ckpt456]'``
   over every condition (seed ``seeds[i]`` uses checkpoint ``i``); the run folder resumes. One shared checkpoint
   would make the translator conditions one computation written per seed, which the report counts as one run.
4. Report: the table is printed with the folder of plots; W&B runs are offline unless ``WANDB_MODE`` says
   otherwise (``wandb sync <folder>/wandb/offline-run-*`` uploads them later).
5. The split-context protocol on the same organisms (``split_demo.py``): a ``slots_self`` layer sweep on validation
   questions, aligned and functional translators per seed at the chosen block, every split condition, the fraction
   of the gap recovered; ``--skip-split`` leaves it out.

Usage: ``python -m cli.demo [--out runs/demo] [--num-samples 300] [--skip-split]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from activation_transfer.io import atomic_output
from activation_transfer.models.weights import folder_sha256

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = ROOT / "configs" / "train" / "demo.yaml"
EVAL_CONFIG = ROOT / "configs" / "eval" / "demo.yaml"


def _organisms(cache_dir: str | None) -> dict[str, Path]:
    from cli.organisms import ensure_organisms

    out = {}
    for role in ("sender", "receiver"):
        t0 = time.perf_counter()
        out[role] = ensure_organisms([f"organism:{role}"], cache_dir)[f"organism:{role}"]
        info = json.loads((out[role] / "organism.json").read_text())
        print(f"[demo] organism {role}: {out[role]} ({time.perf_counter() - t0:.0f} s here; trained in "
              f"{info.get('train_seconds')} s)", flush=True)  # fmt: skip
    return out


def _translator(out: Path, organisms: dict[str, Path], seed: int, config: Path = TRAIN_CONFIG,
                extra: list[str] | None = None) -> Path:  # fmt: skip
    """Train the translator of one seed with ``config`` (+ ``extra`` arguments), or reuse the one trained with the
    same config, organisms, seed and arguments."""
    # The aligned translator's pair stream shuffles with data.seed; the functional config's caller seeds its data.
    seeding = ["--data.seed", str(seed)] if config == TRAIN_CONFIG else []
    extra = ["--seed_everything", str(seed), *seeding, *(extra or [])]
    key_src = json.dumps(
        # The organisms' content, not their folder names: a retrained organism (other thread count, new recipe
        # code) keeps its folder name, and a translator of the old weights must not be reused with the new ones.
        {
            "config": config.read_text(),
            "extra": extra,
            "organisms": {k: folder_sha256(v) for k, v in organisms.items()},
        },  # fmt: skip
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    folder = out / "translator" / f"seed{seed}-{key}"
    ckpt = folder / "translator.ckpt"
    if ckpt.exists():
        print(f"[demo] reusing translator {ckpt}", flush=True)
        return ckpt
    from cli.lightning_cli import train_main

    cli = train_main(["fit", "-c", str(config), "--trainer.default_root_dir", str(folder), *extra])
    best = cli.trainer.checkpoint_callback.best_model_path
    if not best:
        raise RuntimeError(f"translator training in {folder} saved no checkpoint")
    with atomic_output(ckpt) as tmp:  # the key file appears only once complete: an interrupted run retrains
        shutil.copyfile(best, tmp)
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    print(f"[demo] translator seed {seed} ({config.name}) {ckpt}: {metrics}", flush=True)
    return ckpt


def eval_args(out: Path, ckpts: list[Path], seeds: list[int], num_samples: int | None) -> list[str]:
    """The evaluation's command line: one translator checkpoint per seed, in the order of ``--model.seeds``."""
    args = ["test", "-c", str(EVAL_CONFIG), "--model.seeds", json.dumps(seeds),
            "--model.translator_ckpt", json.dumps([str(c) for c in ckpts]),
            "--trainer.default_root_dir", str(out / "eval")]  # fmt: skip
    return args + (["--data.num_samples", str(num_samples)] if num_samples else [])


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (translator, evaluation, report)")
    parser.add_argument("--cache-dir", default=None, help="project cache (default $ACTIVATION_TRANSFER_CACHE)")
    parser.add_argument("--num-samples", type=int, default=None, help="evaluation questions (default: config)")
    parser.add_argument("--skip-split", action="store_true", help="run only the paper protocol")
    args = parser.parse_args(argv)
    from cli.console import setup_logging

    setup_logging()  # progress lines of organism and translator training, cache hits

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")  # no API key needed; `wandb sync` uploads later
    if args.cache_dir:
        os.environ["ACTIVATION_TRANSFER_CACHE"] = args.cache_dir
    out = Path(args.out)
    start = time.perf_counter()

    organisms = _organisms(args.cache_dir)
    from lightning_modules.injection_eval import DEFAULT_SEEDS

    seeds = list(DEFAULT_SEEDS)
    t = time.perf_counter()
    ckpts = [_translator(out, organisms, seed) for seed in seeds]
    print(f"[demo] translator step ({len(ckpts)} seeds): {time.perf_counter() - t:.0f} s", flush=True)

    from cli.lightning_cli import eval_main

    t = time.perf_counter()
    cli = eval_main(eval_args(out, ckpts, seeds, args.num_samples))
    module = cli.model
    print(f"[demo] evaluation step: {time.perf_counter() - t:.0f} s", flush=True)

    # evaluate.py's own summary (the per-condition table, run and report folders) has been printed above.
    print(f"\n[demo] run folder: {module.run_dir}")
    print(f"[demo] report and plots: {module.run_dir / 'report'}")
    wandb_dirs = sorted(str(p) for p in out.rglob("offline-run-*"))
    if wandb_dirs:
        print(f"[demo] W&B offline runs (upload with `wandb sync <dir>`): {len(wandb_dirs)} under {out}")
    if not args.skip_split:
        from cli.split_demo import gap_lines, run_split

        split_dir = run_split(out, organisms, seeds, args.num_samples, _translator)
        lines = gap_lines(split_dir / "report")
        if lines:
            print("[demo] fraction of the receiver_alone -> skyline gap recovered (95% bootstrap CI over questions):")
            print("\n".join(lines))
        print(f"[demo] split report and plots: {split_dir / 'report'}")
    print(f"[demo] total wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
