r"""Organisms that select (issue 19, item 3): train candidate organism recipes long on one GPU, in one short call.

On two-candidate questions the CPU-trained organisms are a coin flip between the two chains (docs/organisms.md): the
runs that fit a CPU core stop before the plateau ends. This script trains each variant below from its recipe
(``configs/organisms/<role>.yaml`` plus the variant's overrides) with ``python -m cli.organisms``' shipping path,
several variants at once on the one GPU, and judges them on validation questions only (generator seed 777, never a
training or evaluation seed). Per variant it writes, under ``--out``:

- ``<variant>/<role>.safetensors`` and ``<variant>/manifest.json``: shippable weights, keyed by the hash of the
  recipe with ``recipe_overrides`` (result.json: the overrides without the time guard, and with the length that
  ``FitStepsToTime`` chose in place of that callback, when the schedule finished;
  write them into the recipe and copy both files to ``cli/organism_weights/`` to ship them: the hash is of the
  resolved config, so it then matches);
- ``<variant>/result.json``: steps reached, training time, validation accuracy (all questions, two candidates, the
  other candidate's share) and the held-out figure (EVAL_SEED), which is reported, never used to choose.

Then one table and ``gpu_organisms.json``. On the GPU image run it through ``bench/gpu_organisms.sh`` (installs the
carried wheels). Dry run on CPU, seconds per variant:

    python bench/gpu_organisms.py --dry-run --out /tmp/gpu_organisms --variants receiver-4x128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: run from anywhere, no install needed

# Validation questions (never a training, validation-during-training or evaluation seed).
VALIDATION_SEED = 777
GOAL = 0.85

# What every variant shares: 200k distinct training questions, bf16 autocast, validation every 1,000 steps.
# --max-seconds stops a slow machine before the call's limit; a variant that stops early says so (steps < max_steps):
# its cosine schedule did not finish and the recipe with its overrides would not give its weights.
LONG = [
    "--trainer.accelerator=auto",
    "--trainer.precision=bf16-mixed",
    "--trainer.val_check_interval=1000",
    "--data.num_train_samples=200000",
    "--data.num_workers=2",
]


def schedule(batch: int, lr: float, steps: int, warmup: int) -> list[str]:
    return [
        f"--data.batch_size={batch}",
        f"--model.lr={lr}",
        f"--trainer.max_steps={steps}",
        f"--model.warmup_steps={warmup}",
    ]


# The session of 2026-12-04 (H200, docs/organisms.md, runs M): at 256 questions a step a variant made about 40 steps
# a second (2 or 4 variants at once, the same rate: the step's Python, not the GPU, sets it), so 20k steps did not fit
# one call, and the time guard stopped every schedule part-way (nothing shippable); two-candidate validation accuracy
# was still rising at 9.4k steps (0.72). The default variants take 1,024 questions a step (a step of more questions
# should cost about the same) and let callbacks.time_budget.FitStepsToTime choose their length from the pace of steps
# 200-800 of their warm-up, so each schedule ends inside --max-seconds whatever the pace (max_steps is only a
# ceiling); the chosen length becomes the recipe (recipe_overrides): the run took the steps of a plain run of that
# length. Two of them compile the training step into CUDA graphs, which remove the per-op Python overhead that set
# the pace (one sequence length, no trimming of padding: one graph); model.compile stays out of the recipe's hash.
# Not yet run on a GPU: the eager variants are the fallback if compiling fails there.
SENDER_4X96 = ["--model.num_layers=4"]
COMPILED = ["--model.compile=reduce-overhead", "--data.trim_padding=false"]
FITTED = ("receiver-4x128-b1024-fitted", "receiver-4x128-b1024-fitted-compiled", "sender-4x96-b1024-fitted")
FITTED += ("sender-4x96-b1024-fitted-compiled",)
# name: (role, overrides on top of LONG). Sizes stay within the 20 MB of shipped weights for a sender and a receiver.
VARIANTS = {
    "receiver-4x128-b1024-fitted": ("receiver", schedule(1024, 0.004, 60000, 1000)),
    "receiver-4x128-b1024-fitted-compiled": ("receiver", [*schedule(1024, 0.004, 60000, 1000), *COMPILED]),
    "sender-4x96-b1024-fitted": ("sender", [*schedule(1024, 0.004, 60000, 1000), *SENDER_4X96]),
    "sender-4x96-b1024-fitted-compiled": ("sender", [*schedule(1024, 0.004, 60000, 1000), *SENDER_4X96, *COMPILED]),
    # Fixed schedules (2026-12-04; not run: the next session was lent no GPU).
    "receiver-4x128-b512": ("receiver", schedule(512, 0.003, 10000, 500)),
    "receiver-4x128-b1024": ("receiver", schedule(1024, 0.004, 6000, 300)),
    "sender-4x96-b512": ("sender", [*schedule(512, 0.003, 10000, 500), *SENDER_4X96]),
    "sender-4x96-b1024": ("sender", [*schedule(1024, 0.004, 6000, 300), *SENDER_4X96]),
    # The runs of 2026-12-04 (their schedules did not finish in one call).
    "receiver-4x128": ("receiver", schedule(256, 0.002, 20000, 500)),
    "receiver-6x192": (
        "receiver",
        [
            *schedule(256, 0.002, 20000, 500),
            "--model.num_layers=6",
            "--model.hidden_size=192",
            "--model.num_heads=6",
            "--model.intermediate_size=768",
        ],
    ),
    "sender-2x96": ("sender", schedule(256, 0.002, 20000, 500)),
    "sender-4x96": ("sender", [*schedule(256, 0.002, 20000, 500), *SENDER_4X96]),
}
DEFAULT_VARIANTS = list(FITTED)
# The dry run: the same path on CPU, a few steps, a few questions.
DRY = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--data.batch_size=8",
    "--data.num_train_samples=200",
    "--data.num_val_samples=16",
]


def overrides_of(name: str, dry_run: bool, max_seconds: int | None = None) -> tuple[str, list[str]]:
    """The role and the full override list of a variant (``max_seconds``: the training's time limit, if any)."""
    role, extra = VARIANTS[name]
    limit = [] if max_seconds is None else [f"--trainer.max_time=00:00:{max_seconds // 60:02d}:{max_seconds % 60:02d}"]
    if name in FITTED and max_seconds is not None:
        # Measured inside the warm-up (1,000 steps) but late: the compiling variants load the GPU only after their
        # first minute, so 20% of the time is kept for a slower pace then. The dry run measures steps 2-4 of its 6.
        window = {"measure_from": 200, "measure_to": 800, "margin": 0.8}
        if dry_run:
            window = {"measure_from": 2, "measure_to": 4, "round_to": 2}
        fit = {"class_path": "callbacks.time_budget.FitStepsToTime", "init_args": {"seconds": max_seconds, **window}}
        limit.append(f"--trainer.callbacks=[{json.dumps(fit)}]")
    # The dry run's small schedule comes last, so it wins over the variant's (the last of a key wins).
    return role, [*extra, *DRY, *limit] if dry_run else [*LONG, *limit, *extra]


def run_variant(name: str, out: Path, dry_run: bool, max_seconds: int | None = None) -> dict:
    """Train one variant through the shipping path, then decode validation and held-out questions."""
    import torch

    from activation_transfer.task.organism_eval import evaluate_organism
    from callbacks.time_budget import RECORD
    from cli.organisms import organism_config, organism_dir, record_shipped, ship_organism

    role, overrides = overrides_of(name, dry_run, max_seconds)
    config = str(organism_config(role))
    folder = out / name
    start = time.perf_counter()
    entry = ship_organism(config, str(out / "cache"), overrides, shipped_dir=folder)
    train_s = time.perf_counter() - start
    trained = organism_dir(config, str(out / "cache"), overrides)
    max_steps = int([o.split("=")[1] for o in overrides if o.startswith("--trainer.max_steps=")][-1])
    fitted = [json.loads(f.read_text()) for f in (trained / "training").rglob(RECORD)]
    chosen = fitted[0]["max_steps"] if fitted else max_steps
    # The recipe to ship: the overrides without the time guard, which did not act when the schedule finished (training
    # repeats on one GPU: runs M gave the same curve twice), and with the length FitStepsToTime chose in place of the
    # callback, so the manifest is keyed by that recipe's hash. A variant stopped by the guard has no recipe that
    # makes its weights: it is reported, not shippable.
    finished = entry["global_step"] == chosen
    guards = ("--trainer.max_time=", "--trainer.callbacks=")
    recipe = None
    if finished:
        recipe = [o for o in overrides if not o.startswith(guards)]
        recipe += [f"--trainer.max_steps={chosen}"] if fitted else []
    if recipe is not None and recipe != overrides:
        entry["config_hash"] = organism_dir(config, str(out / "cache"), recipe).name.rpartition("-")[2]
        record_shipped(folder, role, entry)
    # The validation curve (every val_check_interval steps) comes back with the weights; the cache stays behind.
    for curve in (trained / "training").rglob("metrics.csv"):
        shutil.copy(curve, folder / "metrics.csv")
    questions = (24, 24) if dry_run else (600, 300)
    val = evaluate_organism(trained, num_samples=questions[0], seed=VALIDATION_SEED)
    held_out = evaluate_organism(trained, num_samples=questions[1])
    result = {
        "variant": name,
        "role": role,
        "overrides": overrides,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "train_seconds": round(train_s, 1),
        "global_step": entry["global_step"],
        "max_steps": chosen,
        "max_steps_ceiling": max_steps,
        "fit_steps_to_time": fitted[0] if fitted else None,
        "recipe_overrides": recipe,
        "config_hash": entry["config_hash"],
        "sha256": entry["sha256"],
        "weights_mb": round((folder / entry["file"]).stat().st_size / 2**20, 2),
        "val_during_training": {k: v for k, v in (entry.get("final_metrics") or {}).items() if k.startswith("val/")},
        "validation": {
            "seed": VALIDATION_SEED,
            "n": val["n"],
            "all": val["word_boundary_contains"],
            "two_candidates": val["two_candidates"],
            "by_hops": val["by_hops"],
        },
        "held_out": {
            "n": held_out["n"],
            "all": held_out["word_boundary_contains"],
            "two_candidates": held_out["two_candidates"],
        },
    }
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(results: list[dict]) -> str:
    """One Markdown row per variant; the choice is made on the validation columns."""
    lines = [
        "| variant | steps | steps/s | train s | MB | val all | val two candidates (other) | held-out all "
        "| held-out two |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |  |  |  |  |  |  |  |")
            continue
        v, h = r["validation"], r["held_out"]
        pace = (r.get("fit_steps_to_time") or {}).get("steps_per_s", "")  # measured in the warm-up, side by side
        lines.append(
            f"| {r['variant']} | {r['global_step']}/{r['max_steps']} | {pace} | {r['train_seconds']:.0f} "
            f"| {r['weights_mb']} "
            f"| {v['all']:.3f} | {v['two_candidates']['word_boundary_contains']:.3f} "
            f"({v['two_candidates']['other_candidate']:.3f}) | {h['all']:.3f} "
            f"| {h['two_candidates']['word_boundary_contains']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a new folder for the variants' weights, results and the table")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--parallel", type=int, default=4, help="variants trained at once, each in its own process")
    p.add_argument(
        "--max-seconds",
        type=int,
        default=None,
        help="stop each variant's training after this many seconds (Lightning max_time; left out of the shipped recipe "
        "when the schedule finished first)",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, a few steps: checks the script")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: run the one variant given
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.one:
        run_variant(args.variants[0], out, args.dry_run, args.max_seconds)
        return 0
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} is not empty: give a new folder (a cached organism there would be reused, not trained)")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    if args.parallel <= 1:
        results = [run_variant(name, out, args.dry_run, args.max_seconds) for name in args.variants]
    else:
        # One process per variant: small models leave the GPU mostly idle, and Python's per-step overhead is per
        # process. Each child gets its share of the CPU threads (decoding the questions runs on the CPU).
        threads = max(1, (os.cpu_count() or 1) // min(args.parallel, len(args.variants)))
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        pending = list(args.variants)
        running: dict[str, subprocess.Popen] = {}
        start, reported = time.perf_counter(), 0
        while pending or running:
            while pending and len(running) < args.parallel:
                name = pending.pop(0)
                cmd = [sys.executable, __file__, "--one", "--out", str(out), "--variants", name]
                cmd += [] if args.max_seconds is None else ["--max-seconds", str(args.max_seconds)]
                log = (out / f"{name}.log").open("w")
                running[name] = subprocess.Popen(
                    cmd + (["--dry-run"] if args.dry_run else []), stdout=log, stderr=log, env=env
                )
                print(f"started {name}", flush=True)
            time.sleep(2)
            if int(time.perf_counter() - start) // 60 > reported:  # a line a minute: each child logs to its file
                reported = int(time.perf_counter() - start) // 60
                print(f"[{reported} min] running: {', '.join(running)} (logs: {out}/<variant>.log)", flush=True)
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    print(f"finished {name} (exit {proc.returncode})", flush=True)
        for name in args.variants:
            path = out / name / "result.json"
            results.append(
                json.loads(path.read_text()) if path.exists() else {"variant": name, "error": f"see {name}.log"}
            )
    text = table(results)
    print(text)
    (out / "gpu_organisms.json").write_text(json.dumps({"goal": GOAL, "results": results}, indent=2) + "\n")
    (out / "gpu_organisms.md").write_text(text + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
