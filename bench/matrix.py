"""``bench/eval.py --matrix``: the paper's evaluation matrix timed three ways, each command a process of its own.

``evaluate.py test`` with the runs of a sub-batch stacked into one ``generate`` (the default), the same with
``--model.stack_runs false`` (one ``generate`` per run), and the paper's runner (``bench/paper_runner.py``: one
prompt at a time). Wall time includes the start-up (imports, model loading); the work is the evaluation after the
models are loaded (``meta.json``'s ``elapsed_seconds``, the runner's loop). Prints a Markdown table, the records'
agreement (stacked vs per run: every field; project vs runner: the answers).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (42, 123, 456)
# pair -> (sender, receiver, max_new_tokens, relay_max_new_tokens): the tiny pair answers as configs/eval/tiny.yaml
# does (random weights run every answer to its end), the organisms with the paper's decoding.
PAIRS = {
    "tiny": ("tiny-neox", "tiny-neox-large", 16, 24),
    "organisms": ("organism:sender", "organism:receiver", 64, 128),
}


def translators(pair: str, sender: str, receiver: str, folder: Path) -> list[str]:
    """One translator checkpoint per seed: random linear maps for the tiny pair, the demo's cached ones (those
    recorded with these organisms) for the organisms."""
    import pytorch_lightning as pl
    import torch

    from activation_transfer.io import cache_root
    from activation_transfer.models.frozen_lm import ModelRef, load_ref
    from activation_transfer.translators.loading import check_translator_matches, load_translator
    from lightning_modules.translator import TranslatorModule

    s, r = load_ref(ModelRef(sender, layer=0.67)), load_ref(ModelRef(receiver, layer=0.67))
    out = []
    for i, seed in enumerate(SEEDS):
        if pair == "tiny":
            torch.manual_seed(i)
            module = TranslatorModule(
                s.identity()["hidden_size"], r.identity()["hidden_size"], sender=s.identity(), receiver=r.identity()
            )
            trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
            trainer.strategy.connect(module)
            path = folder / f"translator-{seed}.ckpt"
            trainer.save_checkpoint(str(path), weights_only=True)
            out.append(str(path))
            continue
        for path in sorted((cache_root() / "translators").glob(f"demo-seed{seed}-*.ckpt")):
            try:
                check_translator_matches(load_translator(path), s.identity(), r.identity())
            except ValueError:
                continue
            out.append(str(path))
            break
        else:
            raise SystemExit(f"no cached demo translator for seed {seed} matches the organisms (run make demo once)")
    return out


def timed(cmd: list[str], env: dict, code: Path = ROOT) -> float:
    # Each command runs for seconds to minutes with its output captured: a line before and after shows progress.
    name = " ".join(Path(c).name if i < 2 else c for i, c in enumerate(cmd[:3]))
    print(f"[matrix] running {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"[matrix] {name}: {wall:.1f} s", file=sys.stderr, flush=True)
    return wall


def project(pair: str, ckpts: list[str], root: Path, stack: bool, args, env: dict, code: Path = ROOT) -> dict:
    sender, receiver, new, relay = PAIRS[pair]
    cmd = [sys.executable, "evaluate.py", "test", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    cmd += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir"]
    cmd += [str(root), "--model.sender.name", sender, "--model.receiver.name", receiver, "--model.report", "false"]
    cmd += ["--model.translator_ckpt", json.dumps(ckpts), "--model.stack_runs", str(stack).lower()]
    cmd += ["--model.generation.max_new_tokens", str(new), "--model.generation.relay_max_new_tokens", str(relay)]
    cmd += ["--data.source", "synthetic", "--data.num_samples", str(args.num_prompts)]
    cmd += ["--data.batch_size", str(args.batch_size)]
    wall = timed(cmd, env, code)
    (run_dir,) = [p.parent for p in root.glob("*/meta.json")]
    meta = json.loads((run_dir / "meta.json").read_text())
    records = {}
    for path in sorted((run_dir / "records").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            records[(r["condition"], r["seed"], r["sample_id"])] = r
    return {"wall": wall, "work": meta["invocations"][-1]["elapsed_seconds"], "records": records}


def paper(pair: str, ckpts: list[str], folder: Path, args, env: dict) -> dict:
    from activation_transfer.models.frozen_lm import resolve_name

    sender, receiver, new, relay = PAIRS[pair]
    out = folder / "paper.json"
    cmd = [sys.executable, "bench/paper_runner.py", "--sender", resolve_name(sender), "--receiver"]
    cmd += [resolve_name(receiver), "--translators", *ckpts, "--seeds", *map(str, SEEDS), "--out", str(out)]
    cmd += ["--num-prompts", str(args.num_prompts), "--max-new-tokens", str(new), "--relay-max-new-tokens", str(relay)]
    wall = timed(cmd, env)
    got = json.loads(out.read_text())
    return {"wall": wall, "work": got["work_seconds"], "answers": got["answers"]}


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return f"{model}, {os.cpu_count()} cores, commit {commit.strip()}"


def spread(values: list[float]) -> tuple[float, str]:
    """The median of ``values`` and its text: ``"13.1"``, or with several values ``"13.1 (12.8-14.0)"`` (range)."""
    mid = statistics.median(values)
    return mid, f"{mid:.1f}" if len(values) == 1 else f"{mid:.1f} ({min(values):.1f}-{max(values):.1f})"


def bench_pair(pair: str, args, env: dict) -> list[str]:
    import cli.organisms  # noqa: F401 (registers organism: names; never trains)

    folder = Path(tempfile.mkdtemp(prefix=f"bench-matrix-{pair}-"))
    ckpts = translators(pair, *PAIRS[pair][:2], folder)
    # --repeat: rounds of every command in turn (each round in fresh folders, so nothing is resumed), so that a
    # slow spell of a shared machine hits every command; the table gives medians and ranges.
    rounds = []
    for i in range(args.repeat):
        base = folder / f"round{i}"
        base.mkdir()
        got = {"runner": paper(pair, ckpts, base, args, env)}
        got["per_run"] = project(pair, ckpts, base / "per_run", False, args, env)
        got["stacked"] = project(pair, ckpts, base / "stacked", True, args, env)
        if args.baseline:  # the stacked command of another checkout (e.g. the branch point), in the same round
            got["before"] = project(pair, ckpts, base / "before", True, args, env, Path(args.baseline).resolve())
        rounds.append(got)
    first = rounds[0]
    runner, stacked = first["runner"], first["stacked"]
    same = all(r["per_run"]["records"] == r["stacked"]["records"] == stacked["records"] for r in rounds)
    differ = total = 0
    for key, text in runner["answers"].items():
        condition, seed, sid = key.split("|")
        rec = stacked["records"].get((condition, int(seed), sid)) or stacked["records"][(condition, None, sid)]
        differ, total = differ + (rec["prediction"] != text), total + 1
    runs = len({k[:2] for k in stacked["records"]})
    med = {name: {kind: spread([r[name][kind] for r in rounds]) for kind in ("wall", "work")} for name in first}
    paper_wall, paper_work = med["runner"]["wall"][0], med["runner"]["work"][0]
    rows = [
        f"| {pair} | paper's runner (one prompt at a time, {len(SEEDS) * 11} runs) | {med['runner']['wall'][1]} | "
        f"{med['runner']['work'][1]} | 1.0x | 1.0x |",
    ]
    commands = [("evaluate.py, one generate per run", "per_run"), ("evaluate.py, stacked runs", "stacked")]
    if args.baseline:
        commands.insert(1, (f"evaluate.py at {args.baseline}, stacked runs", "before"))
    for label, name in commands:
        (wall, wall_text), (work, work_text) = med[name]["wall"], med[name]["work"]
        rows.append(
            f"| {pair} | {label} ({runs} runs) | {wall_text} | {work_text} | "
            f"{paper_wall / wall:.1f}x | {paper_work / work:.1f}x |"
        )
    per_run, stacked_m = med["per_run"], med["stacked"]
    notes = [
        f"{pair}: stacked vs per run {per_run['work'][0] / stacked_m['work'][0]:.2f}x on the work, "
        f"{per_run['wall'][0] / stacked_m['wall'][0]:.2f}x wall; records identical (every round): {same}; answers "
        f"differing from the paper's runner: {differ}/{total}",
    ]
    if args.baseline:
        before_same = all(r["before"]["records"] == stacked["records"] for r in rounds)
        work_x, wall_x = (med["before"][k][0] / stacked_m[k][0] for k in ("work", "wall"))
        notes.append(
            f"{pair}: stacked, this checkout vs {args.baseline}: {work_x:.2f}x on the work, {wall_x:.2f}x wall; "
            f"records identical: {before_same}"
        )
    return rows + notes


def main(args, rest: list[str]) -> None:
    if rest:
        raise SystemExit(f"unrecognized arguments: {' '.join(rest)}")
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "WANDB_MODE": "disabled"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    lines = []
    for pair in args.pair:
        if pair not in PAIRS:
            raise SystemExit(f"--matrix --pair takes {', '.join(PAIRS)}, got {pair}")
        lines += bench_pair(pair, args, env)
    rounds = f"; median (range) of {args.repeat} rounds" if args.repeat > 1 else ""
    print(
        f"machine: {machine()}; {threads} thread(s) per process; {args.num_prompts} prompts, batch {args.batch_size}"
        f"{rounds}"
    )
    print("| pair | command | wall s | work s | wall: paper / this | work: paper / this |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(line for line in lines if line.startswith("|")))
    print("\n".join(line for line in lines if not line.startswith("|")), flush=True)
