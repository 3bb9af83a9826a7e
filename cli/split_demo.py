"""The split-context half of ``make demo``: does the receiver use what the sender knows? (docs/conditions.md).

1. Layer sweep on *validation* questions (generator seed :data:`SELECTION_SEED`, never the evaluation seed): for
   every receiver block, ``receiver_alone``, ``skyline``, ``slots_self`` (the receiver's own context states written
   into the slots: the ceiling of the injection site) and ``slots_zero``. The block where ``slots_self`` is highest
   is the injection block of everything after; the sweep is written as ``slots_self_layer_sweep.json``/``.png``.
2. Translators at that block, one per evaluation seed: the offline-aligned one (``configs/train/demo.yaml``, the
   receiver block overridden) and the functional one, trained through the frozen receiver
   (``configs/train/functional_demo.yaml``). Cached like the paper demo's (key: config, organisms, arguments).
3. Evaluation of every split condition on the held-out questions (``configs/eval/split_demo.yaml``), three
   translator seeds; the report compares with ``receiver_alone`` and ``skyline`` and writes the fraction of the gap
   recovered with its bootstrap CI (``gap_recovered.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from activation_transfer.io import atomic_write, write_json
from activation_transfer.task.scoring import MAIN_METRIC

ROOT = Path(__file__).resolve().parents[1]
SPLIT_EVAL_CONFIG = ROOT / "configs" / "eval" / "split_demo.yaml"
ALIGNED_CONFIG = ROOT / "configs" / "train" / "demo.yaml"
FUNCTIONAL_CONFIG = ROOT / "configs" / "train" / "functional_demo.yaml"
# Validation questions of the functional translator (QATrainingDataModule.val_seed): the layer is chosen on them.
SELECTION_SEED = 2
SWEEP_CONDITIONS = ("receiver_alone", "skyline", "slots_self", "slots_zero")
METRIC = MAIN_METRIC  # the sweep and the choice read the paper's main metric


def _accuracies(run_dir: Path) -> dict:
    """Accuracy per condition (the report's summary) and the number of questions."""
    conditions = json.loads((run_dir / "report" / "summary.json").read_text())["conditions"]
    return {
        **{cond: entry[METRIC]["mean"] for cond, entry in conditions.items()},
        "n": min(entry["n"] for entry in conditions.values()),
    }


def choose_layer(sweep: list[dict]) -> int:
    """The block whose ``slots_self`` accuracy is highest (the shallowest of ties): where the site carries most."""
    if not sweep:
        raise ValueError("the layer sweep is empty")
    best = max(row["slots_self"] for row in sweep)
    return min(row["layer"] for row in sweep if row["slots_self"] == best)


def receiver_blocks(folder: Path) -> int:
    """How many blocks the receiver has, read from its config (the weights are not needed to plan the sweep)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(folder)).num_hidden_layers)


def layer_sweep(out: Path, num_layers: int, num_samples: int | None, steps=None, organisms=None) -> list[dict]:
    """``SWEEP_CONDITIONS`` at every receiver block on the validation questions; one row per block. Each command is
    recorded in ``steps`` (the demo's ``Steps``) when given; ``organisms`` key the evaluation cache."""
    from cli.eval_cache import cached_eval

    rows = []
    for layer in range(num_layers):
        args = [
            "test",
            "-c",
            str(SPLIT_EVAL_CONFIG),
            "--model.conditions",
            json.dumps(list(SWEEP_CONDITIONS)),
            "--model.receiver.layer",
            str(layer),
            "--data.generator_seed",
            str(SELECTION_SEED),
            "--trainer.default_root_dir",
            str(out / "sweep" / f"block{layer}"),
            "--trainer.logger",
            "false",
        ]
        if num_samples:
            args += ["--data.num_samples", str(num_samples)]
        if steps is not None:
            steps.add("evaluate.py", args)
        rows.append({"layer": layer, **_accuracies(cached_eval(args, organisms))})
    return rows


def sweep_table(rows: list[dict], chosen: int) -> str:
    """Markdown table of the sweep, the chosen block marked."""
    head = "| receiver block | " + " | ".join(SWEEP_CONDITIONS) + " |\n|---|" + "---|" * len(SWEEP_CONDITIONS)
    lines = [
        f"| {r['layer']}{' (chosen)' if r['layer'] == chosen else ''} | "
        + " | ".join(f"{r[c]:.3f}" for c in SWEEP_CONDITIONS)
        + " |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def sweep_plot(rows: list[dict], chosen: int) -> bytes:
    """slots_self and slots_zero per receiver block, with receiver_alone and skyline as horizontal lines."""
    from activation_transfer.report.plots import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    layers = [r["layer"] for r in rows]
    for cond, style in (("slots_self", "o-"), ("slots_zero", "s--")):
        ax.plot(layers, [r[cond] for r in rows], style, label=cond)
    for cond, color in (("receiver_alone", "grey"), ("skyline", "black")):
        ax.axhline(rows[0][cond], color=color, lw=0.8, ls=":", label=cond)
    ax.axvline(chosen, color="tab:green", lw=0.8, alpha=0.5)
    ax.set_xticks(layers)
    ax.set_xlabel("receiver block written (slots)")
    ax.set_ylabel(f"{METRIC} (validation questions)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return figure_png(fig)


def run_split(
    out: Path, organisms: dict[str, Path], seeds: list[int], num_samples: int | None, translator, steps=None
) -> Path:
    """Steps 1-3; returns the split evaluation's run folder. ``translator`` is the demo's cached trainer; ``steps``
    (the demo's ``Steps``), when given, records every command with the paths it used."""
    from cli.eval_cache import cached_eval

    def section(title: str) -> None:
        if steps is not None:
            steps.section(title)

    t = time.perf_counter()
    num_layers = receiver_blocks(organisms["receiver"])
    section(f"5. split protocol: slots_self layer sweep on validation questions (generator seed {SELECTION_SEED})")
    rows = layer_sweep(out, num_layers, num_samples, steps, organisms)
    chosen = choose_layer(rows)
    print(
        f"[demo] slots_self layer sweep on validation questions (generator seed {SELECTION_SEED}), "
        f"{time.perf_counter() - t:.0f} s:\n{sweep_table(rows, chosen)}",
        flush=True,
    )

    t = time.perf_counter()
    block = str(chosen)
    section(f"6. split protocol: aligned, then functional translators per seed at receiver block {chosen}")
    aligned = [
        translator(out, organisms, s, ALIGNED_CONFIG, ["--data.receiver_model.layer", block], steps=steps)
        for s in seeds
    ]
    functional = [
        translator(
            out,
            organisms,
            s,
            FUNCTIONAL_CONFIG,
            ["--model.init_args.receiver_model.layer", block, "--data.init_args.shuffle_seed", str(s)],
            steps=steps,
        )
        for s in seeds
    ]
    print(
        f"[demo] split translators ({len(seeds)} aligned + {len(seeds)} functional, receiver block {chosen}): "
        f"{time.perf_counter() - t:.0f} s",
        flush=True,
    )

    t = time.perf_counter()
    args = [
        "test",
        "-c",
        str(SPLIT_EVAL_CONFIG),
        "--model.seeds",
        json.dumps(seeds),
        "--model.receiver.layer",
        block,
        "--model.translator_ckpt",
        json.dumps([str(c) for c in aligned]),
        "--model.functional_translator_ckpt",
        json.dumps([str(c) for c in functional]),
        "--trainer.default_root_dir",
        str(out / "eval_split"),
    ]
    if num_samples:
        args += ["--data.num_samples", str(num_samples)]
    section("7. split protocol: every split condition on the held-out questions, then its report")
    if steps is not None:
        steps.add("evaluate.py", args)
    run_dir = cached_eval(args, organisms)
    if steps is not None:
        steps.report(run_dir)
    print(f"[demo] split evaluation step: {time.perf_counter() - t:.0f} s", flush=True)
    report = run_dir / "report"
    sweep = {"selection_generator_seed": SELECTION_SEED, "metric": METRIC, "chosen_layer": chosen, "rows": rows}
    write_json(report / "slots_self_layer_sweep.json", sweep)
    atomic_write(report / "slots_self_layer_sweep.png", sweep_plot(rows, chosen))
    return run_dir


def gap_lines(report: Path) -> list[str]:
    """One line per condition of ``gap_recovered.json``: fraction of the receiver_alone -> skyline gap, 95% CI."""
    path = report / "gap_recovered.json"
    if not path.exists():
        return []
    lines = []
    for row in json.loads(path.read_text()):
        frac = "undefined" if row["fraction"] is None else f"{row['fraction']:+.3f}"
        ci = "" if row["fraction"] is None else f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        lines.append(f"  {row['condition']:<28} {frac}{ci}  (n={row['n']}, runs={row['runs']})")
    return lines
