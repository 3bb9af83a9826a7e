r"""GPU check: the real commands (``train.py fit``, ``evaluate.py test``) on one GPU, timed, in one short call.

Runs in-process, through the same ``train_main``/``eval_main`` as the entry scripts, on Pythia-shaped offline presets
(random seeded weights: the timings and memory of pythia-160m -> pythia-410m, without the Hub):

1. aligned training, ``bf16-mixed``, ``--steps`` optimizer steps (activation extraction included, timed apart);
2. the paper protocol, all eleven conditions x seeds 42 123 456 on the 396 clean_eval prompts, fp32, then bf16;
3. functional training (split protocol) at ``bf16-mixed``, ``--steps`` steps;
4. the split protocol, all its conditions x 3 seeds, fp32.

It prints one table (wall time, samples/s, peak GPU memory per step) and the answer agreement of bf16 with fp32, and
writes it as JSON to ``--out``. On a machine with only torch (the GPU image), ``bench/gpu_check.sh`` installs the
carried wheels first (``bench/gpu_wheels.sh`` prepares them). Dry run on CPU, tiny presets, seconds:

    python bench/gpu_check.py --dry-run --data-dir ../shared/data/multihop --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: run from anywhere, no install needed

import torch  # noqa: E402

from cli.lightning_cli import eval_main, train_main  # noqa: E402

SIZES = {
    # name: sender, receiver, (sender block, receiver block), prompts, eval batch, new tokens, relay tokens,
    # functional batch
    "gpu": ("pythia-160m-shape", "pythia-410m-shape", (8, 16), 396, 396, 64, 128, 16),
    "dry-run": ("tiny-neox", "tiny-neox-large", (1, 2), 12, 12, 8, 8, 8),
}


class Stopwatch:
    """Wall time and peak GPU memory of one step (memory only on CUDA)."""

    def __init__(self, rows: list[dict], name: str, samples: int) -> None:
        self.rows, self.name, self.samples = rows, name, samples

    def __enter__(self) -> Stopwatch:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        row = {"step": self.name, "wall_s": round(wall, 2), "samples": self.samples}
        row["samples_per_s"] = round(self.samples / wall, 1) if wall > 0 else None
        row["peak_gib"] = round(peak, 2) if peak is not None else None
        self.rows.append(row)
        self.row = row
        print(f"[gpu_check] {self.name}: {wall:.1f} s, peak {row['peak_gib']} GiB", flush=True)

    def count(self, samples: int) -> None:
        """Set the number of samples once known (an evaluation's records), and its rate."""
        self.row["samples"] = samples
        self.row["samples_per_s"] = round(samples / self.row["wall_s"], 1) if self.row["wall_s"] > 0 else None


def answers(run_dir: Path) -> dict[tuple, str]:
    """(condition, seed, sample id) -> prediction, from a run folder's records."""
    out = {}
    for path in sorted((run_dir / "records").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[(rec["condition"], rec["seed"], rec["sample_id"])] = rec["prediction"]
    return out


def agreement(a: dict, b: dict) -> dict:
    common = sorted(set(a) & set(b))
    same = sum(a[k] == b[k] for k in common)
    return {"records": len(common), "same": same, "fraction": round(same / len(common), 4) if common else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs and gpu_check.json")
    p.add_argument("--data-dir", required=True, help="folder holding the paper's clean_eval.jsonl (SHA-256 checked)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each training (default 300)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny presets, a few prompts: checks the script")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "paper", "functional", "split"])
    args = p.parse_args(argv)
    size = "dry-run" if args.dry_run else "gpu"
    sender, receiver, (sblock, block), prompts, batch, new_tokens, relay_tokens, fbatch = SIZES[size]
    steps = min(args.steps, 4) if args.dry_run else args.steps
    accel = "cpu" if args.dry_run else "gpu"
    train_precision = "32-true" if args.dry_run else "bf16-mixed"
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):  # a run folder resumes: its records would be read, not timed
        p.error(f"--out {out} is not empty: give a new folder (runs there would be resumed, not measured)")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["ACTIVATION_TRANSFER_CACHE"] = str(out / "cache")  # cold: activations and tokenizers made here
    rows: list[dict] = []
    result = {
        "size": size,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "steps": steps,
        "rows": rows,
    }
    common_trainer = [f"--trainer.accelerator={accel}", "--trainer.devices=1", "--trainer.logger=false"]

    # 1. Aligned training: the activation store is filled first (extraction), then `steps` optimizer steps.
    ckpt = out / "aligned" / "translator.ckpt"
    train_batch = 64
    if "train" not in args.skip:
        with Stopwatch(rows, "train aligned (extract + fit)", steps * train_batch):
            train_main(
                [
                    "fit",
                    "-c",
                    "configs/train/tiny.yaml",
                    *common_trainer,
                    f"--trainer.precision={train_precision}",
                    f"--trainer.max_steps={steps}",
                    "--trainer.max_epochs=-1",
                    # Validate once, at the last step (the checkpoint monitors val/loss), whatever an epoch's length.
                    "--trainer.check_val_every_n_epoch=null",
                    f"--trainer.val_check_interval={steps}",
                    f"--trainer.default_root_dir={out / 'aligned'}",
                    f"--data.sender_model.name={sender}",
                    f"--data.receiver_model.name={receiver}",
                    f"--data.sender_model.layer={sblock}",
                    f"--data.receiver_model.layer={block}",
                    f"--data.batch_size={train_batch}",
                    "--data.corpus.builtin_samples=2000",
                ]
            )
        found = sorted((out / "aligned").rglob("*.ckpt"), key=lambda f: f.stat().st_mtime)
        ckpt = found[-1]

    def evaluate(name: str, config: str, dtype: str, extra: list[str]) -> Path:
        with Stopwatch(rows, name, 0) as watch:
            cli = eval_main(
                [
                    "test",
                    "-c",
                    config,
                    *common_trainer,
                    f"--trainer.default_root_dir={out / 'eval' / name.replace(' ', '_')}",
                    f"--model.sender.name={sender}",
                    f"--model.receiver.name={receiver}",
                    f"--model.sender.layer={sblock}",
                    f"--model.receiver.layer={block}",
                    f"--model.sender.dtype={dtype}",
                    f"--model.receiver.dtype={dtype}",
                    f"--model.generation.max_new_tokens={new_tokens}",
                    f"--model.generation.relay_max_new_tokens={relay_tokens}",
                    "--data.source=clean_eval",
                    f"--data.data_dir={args.data_dir}",
                    "--data.num_samples=null",
                    f"--data.limit={prompts}",
                    f"--data.batch_size={batch}",
                    "--model.report=false",
                    *extra,
                ]
            )
        run_dir = Path(cli.model.run_dir)
        watch.count(len(answers(run_dir)))  # records written: every (condition, seed) run x prompt
        return run_dir

    # 2. The paper protocol: every condition, the seeded ones x 3 seeds (25 runs).
    if "paper" not in args.skip:
        paper = ["--model.translator_ckpt", str(ckpt)]
        fp32 = evaluate("paper fp32", "configs/eval/tiny.yaml", "float32", paper)
        bf16 = evaluate("paper bf16", "configs/eval/tiny.yaml", "bfloat16", paper)
        result["paper_bf16_vs_fp32"] = agreement(answers(fp32), answers(bf16))

    # 3. Functional training through the frozen receiver (split protocol), `steps` steps.
    fckpt = out / "functional" / "translator.ckpt"
    if "functional" not in args.skip:
        with Stopwatch(rows, "train functional", steps * fbatch):
            train_main(
                [
                    "fit",
                    "-c",
                    "configs/train/functional_demo.yaml",
                    *common_trainer,
                    f"--trainer.precision={train_precision}",
                    f"--trainer.max_steps={steps}",
                    "--trainer.max_epochs=-1",
                    # Validate once, at the last step (the checkpoint monitors val/loss), whatever an epoch's length.
                    "--trainer.check_val_every_n_epoch=null",
                    f"--trainer.val_check_interval={steps}",
                    f"--trainer.default_root_dir={out / 'functional'}",
                    f"--model.init_args.sender_model.name={sender}",
                    f"--model.init_args.receiver_model.name={receiver}",
                    f"--model.init_args.sender_model.layer={sblock}",
                    f"--model.init_args.receiver_model.layer={block}",
                    f"--data.init_args.batch_size={fbatch}",
                    f"--data.init_args.num_train_samples={max(steps * fbatch, 64)}",
                ]
            )
        found = sorted((out / "functional").rglob("*.ckpt"), key=lambda f: f.stat().st_mtime)
        fckpt = found[-1]

    # 4. The split protocol with both translators: every condition x 3 seeds.
    if "split" not in args.skip:
        split = [
            "--model.protocol=split",
            "--model.translator_ckpt",
            str(ckpt),
            "--model.functional_translator_ckpt",
            str(fckpt),
        ]
        evaluate("split fp32", "configs/eval/tiny.yaml", "float32", split)

    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[gpu_check] {result['device']}, torch {result['torch']}, {result['threads']} CPU threads, size {size}")
    print(f"{'step':34s} {'wall s':>8s} {'samples':>8s} {'samples/s':>10s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['step']:34s} {r['wall_s']:8.1f} {r['samples']:8d} {r['samples_per_s']!s:>10s} {r['peak_gib']!s:>9s}")
    if "paper_bf16_vs_fp32" in result:
        a = result["paper_bf16_vs_fp32"]
        print(f"paper protocol, bf16 answers equal to fp32: {a['same']}/{a['records']} ({a['fraction']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
