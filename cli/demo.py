"""``make demo``: the paper's whole experiment offline, on the two model organisms, in minutes on a CPU.

1. Organisms: ``organism:sender`` and ``organism:receiver`` (``configs/organisms/*.yaml``), trained once
   and cached.
2. Translators: one per seed of the evaluation (42, 123, 456), as the paper trained them: ``train.py fit -c
   configs/train/demo.yaml --seed_everything S --data.seed S`` (activations extracted once and cached, so each seed
   costs only translator training). Each checkpoint is kept under ``<out>/translator/seed<S>-<key>/`` with a key
   hashing the config, the organisms and the seed, and reused.
3. Evaluation: ``evaluate.py test -c configs/eval/demo.yaml --model.translator_ckpt '[ckpt42, ckpt123, ckpt456]'``
   over every condition (seed ``seeds[i]`` uses checkpoint ``i``); the run folder resumes, and a finished one is
   kept in the cache by content (``cli/eval_cache.py``): a warm demo only loads its records. One shared checkpoint
   would make the translator conditions one computation written per seed, which the report counts as one run.
4. Report: the table is printed with the folder of plots; W&B runs are offline unless ``WANDB_MODE`` says
   otherwise (``wandb sync <folder>/wandb/offline-run-*`` uploads them later).
5. The split-context protocol on the same organisms (``split_demo.py``): a ``slots_self`` layer sweep on validation
   questions, aligned and functional translators per seed at the chosen block, every split condition, the fraction
   of the gap recovered; ``--skip-split`` leaves it out.
6. The commands that run each step on its own, with the paths this run wrote, printed last for copying.

Usage: ``python -m cli.demo [--out runs/demo] [--num-samples 300] [--skip-split]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from activation_transfer.io import atomic_output, cache_root
from activation_transfer.models.weights import folder_sha256

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = ROOT / "configs" / "train" / "demo.yaml"
EVAL_CONFIG = ROOT / "configs" / "eval" / "demo.yaml"
# Bumped when the same config and organisms train other weights, so a warm cache does not serve the old ones (2,
# 2026-12-05: the built-in corpus holds the evaluation set out, the linear schedule ends at its floor).
TRAINING_CODE_VERSION = 2


def shown(path: str | Path) -> str:
    """``path`` as a command typed in the current folder would name it: relative when it lies below, else as is."""
    if not os.path.isabs(path):
        return str(path)
    rel = os.path.relpath(path)  # not resolved: .venv/bin/python stays the venv's link
    return str(path) if rel.startswith("..") else rel


class Steps:
    """The commands a demo run executed, under titled sections, printed last so each step can be rerun on its own.

    A command is recorded whether the step ran or was reused from the cache: it names the paths this run used.
    """

    def __init__(self) -> None:
        self.sections: list[tuple[str, list[str]]] = []

    def section(self, title: str, *notes: str) -> None:
        """Start a section; later commands go under ``title`` (and one comment line per note)."""
        self.sections.append((title, [f"#    {note}" for note in notes]))

    def add(self, script: str, args: list[str]) -> None:
        """Record ``python <script> <args>``; absolute paths below the current folder are shown relative to it."""
        exe = shown(sys.executable)  # the project's .venv/bin/python when run from the repository
        words = [
            exe if not Path(exe).is_absolute() else "python",
            shown(ROOT / script),
            *(shown(a) if os.path.isabs(a) else a for a in args),
        ]
        self.sections[-1][1].append(shlex.join(words))

    def report(self, run_dir: Path) -> None:
        """Record the report.py command that rewrites an evaluation run's own report from its records."""
        self.add("report.py", [str(run_dir), "--out", str(run_dir / "report")])

    def text(self) -> str:
        """The sections as shell lines: an environment line, then ``# title`` and its commands."""
        env = {
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
            "ACTIVATION_TRANSFER_CACHE": str(cache_root()),
        }
        lines = ["export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())]
        for title, commands in self.sections:
            lines += [f"# {title}", *commands]
        return "\n".join(lines)


def _organisms(cache_dir: str | None) -> dict[str, Path]:
    from cli.organisms import ensure_organisms

    out = {}
    for role in ("sender", "receiver"):
        t0 = time.perf_counter()
        out[role] = ensure_organisms([f"organism:{role}"], cache_dir)[f"organism:{role}"]
        info = json.loads((out[role] / "organism.json").read_text())
        print(
            f"[demo] organism {role}: {out[role]} ({time.perf_counter() - t0:.0f} s here; trained in "
            f"{info.get('train_seconds')} s)",
            flush=True,
        )
    return out


def organism_steps(steps: Steps, out: Path, organisms: dict[str, Path]) -> None:
    """The organisms' commands: each recipe trained into a folder of its own (the cached one is left alone)."""
    cached = [f"{role}: {shown(folder)}" for role, folder in organisms.items()]
    steps.section("1. model organisms: the demo uses the cached ones below; these train the same recipes anew", *cached)
    for role in organisms:
        config = ROOT / "configs" / "organisms" / f"{role}.yaml"
        steps.add("organism.py", ["fit", "-c", str(config), "--export_dir", str(out / "organisms" / role)])


def _translator(
    out: Path,
    organisms: dict[str, Path],
    seed: int,
    config: Path = TRAIN_CONFIG,
    extra: list[str] | None = None,
    steps: Steps | None = None,
) -> Path:
    """Train the translator of one seed with ``config`` (+ ``extra`` arguments), or reuse the one trained with the
    same config, organisms, seed and arguments. The training command is recorded in ``steps`` either way."""
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
            "training_code": TRAINING_CODE_VERSION,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    folder = out / "translator" / f"seed{seed}-{key}"
    ckpt = folder / "translator.ckpt"
    args = ["fit", "-c", str(config), "--trainer.default_root_dir", str(folder), *extra]
    if steps is not None:
        steps.add("train.py", args)
    # Beside the organisms, by the same content key: a fresh clone (or `make clean`) reuses it instead of training.
    cached = cache_root() / "translators" / f"{config.stem}-seed{seed}-{key}.ckpt"
    if not ckpt.exists() and cached.is_file():
        with atomic_output(ckpt) as tmp:
            shutil.copyfile(cached, tmp)
        print(f"[demo] reusing translator {ckpt} (from the cache, {cached})", flush=True)
        return ckpt
    if ckpt.exists():
        print(f"[demo] reusing translator {ckpt}", flush=True)
        return ckpt
    from cli.lightning_cli import train_main

    cli = train_main(args)
    best = cli.trainer.checkpoint_callback.best_model_path
    if not best:
        raise RuntimeError(f"translator training in {folder} saved no checkpoint")
    for target in (ckpt, cached):  # each appears only once complete: an interrupted run retrains
        with atomic_output(target) as tmp:
            shutil.copyfile(best, tmp)
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    print(f"[demo] translator seed {seed} ({config.name}) {ckpt}: {metrics}", flush=True)
    return ckpt


def eval_args(out: Path, ckpts: list[Path], seeds: list[int], num_samples: int | None) -> list[str]:
    """The evaluation's command line: one translator checkpoint per seed, in the order of ``--model.seeds``."""
    args = [
        "test",
        "-c",
        str(EVAL_CONFIG),
        "--model.seeds",
        json.dumps(seeds),
        "--model.translator_ckpt",
        json.dumps([str(c) for c in ckpts]),
        "--trainer.default_root_dir",
        str(out / "eval"),
    ]
    return args + (["--data.num_samples", str(num_samples)] if num_samples else [])


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (translator, evaluation, report)")
    parser.add_argument("--cache-dir", default=None, help="project cache (default $ACTIVATION_TRANSFER_CACHE)")
    parser.add_argument("--num-samples", type=int, default=None, help="evaluation questions (default: config)")
    parser.add_argument("--skip-split", action="store_true", help="run only the paper protocol")
    args = parser.parse_args(argv)
    # Every step tests `if num_samples`: 0 silently ran the configs' 300 questions, and a negative count reached
    # evaluate.py only after the organisms and translators were trained (minutes on a cold cache).
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples} (leave it out for the configs' count)")
    from cli.parser import usage_errors

    with usage_errors("demo"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from cli.console import setup_logging
    from cli.train_ahead import demo_jobs

    demo_jobs()  # checked now: the split demo reads it only after the paper's evaluation (minutes on a cold cache)

    setup_logging()  # progress lines of organism and translator training, cache hits

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")  # no API key needed; `wandb sync` uploads later
    if args.cache_dir:
        os.environ["ACTIVATION_TRANSFER_CACHE"] = args.cache_dir
    out = Path(args.out)
    start = time.perf_counter()

    organisms = _organisms(args.cache_dir)
    steps = Steps()
    organism_steps(steps, out, organisms)
    from lightning_modules.injection_eval import DEFAULT_SEEDS

    seeds = list(DEFAULT_SEEDS)
    t = time.perf_counter()
    steps.section("2. one translator per seed (the demo copies each best checkpoint to <root>/translator.ckpt)")
    ckpts = [_translator(out, organisms, seed, steps=steps) for seed in seeds]
    print(f"[demo] translator step ({len(ckpts)} seeds): {time.perf_counter() - t:.0f} s", flush=True)

    from cli.eval_cache import cached_eval

    t = time.perf_counter()
    steps.section("3. the paper's conditions, seed i with translator i (rerun: resumes the run folder)")
    paper_eval = eval_args(out, ckpts, seeds, args.num_samples)
    steps.add("evaluate.py", paper_eval)
    run_dir = cached_eval(paper_eval, organisms)  # a warm demo loads the records of an identical evaluation
    print(f"[demo] evaluation step: {time.perf_counter() - t:.0f} s", flush=True)
    steps.section("4. the report of those records (tables, CIs, McNemar, TOST, plots)")
    steps.report(run_dir)

    # evaluate.py's own summary (the per-condition table, run and report folders) has been printed above.
    print(f"\n[demo] run folder: {run_dir}")
    print(f"[demo] report and plots: {run_dir / 'report'}")
    wandb_dirs = sorted(str(p) for p in out.rglob("offline-run-*"))
    if wandb_dirs:
        print(f"[demo] W&B offline runs (upload with `wandb sync <dir>`): {len(wandb_dirs)} under {out}")
    if not args.skip_split:
        from cli.split_demo import gap_lines, run_split, subgroup_lines

        split_dir = run_split(out, organisms, seeds, args.num_samples, _translator, steps)
        print("\n".join(subgroup_lines(json.loads((split_dir / "report" / "subgroups.json").read_text()))))
        lines = gap_lines(split_dir / "report")
        if lines:
            print("[demo] fraction of the receiver_alone -> skyline gap recovered (95% bootstrap CI over questions):")
            print("\n".join(lines))
        print(f"[demo] split report and plots: {split_dir / 'report'}")
    print("\n[demo] each step on its own: the commands this run executed, with the paths it wrote (run them from")
    print(f"[demo] {Path.cwd()}; docs/usage.md explains each)")
    print(steps.text())
    print(f"\n[demo] total wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
