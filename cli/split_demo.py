"""The split-context half of ``make demo``: does the receiver use what the sender knows? (docs/conditions.md).

1. Layer sweep on *validation* questions (generator seed :data:`SELECTION_SEED`, never the evaluation seed): for
   every receiver block, ``receiver_alone``, ``skyline``, ``slots_self`` (the receiver's own context states written
   into the slots: the ceiling of the injection site) and ``slots_zero``. The block where ``slots_self`` is highest
   is the injection block of everything after; the sweep (accuracies with their 95% CIs over questions) is written as
   ``slots_self_layer_sweep.json``/``.png``/``.svg``.
2. Translators at that block, one per evaluation seed: the offline-aligned one (``configs/train/demo.yaml``, the
   receiver block overridden) and the functional one, trained through the frozen receiver
   (``configs/train/functional_demo.yaml``). Cached like the paper demo's (key: config, organisms, arguments); the
   functional ones, the controls' and the KV sweep's train side by side first (``cli/train_ahead.py``).
3. Evaluation of every split condition on the held-out questions (``configs/eval/split_demo.yaml``), three
   translator seeds; the report compares with ``receiver_alone`` and ``skyline`` and writes the fraction of the gap
   recovered with its bootstrap CI (``gap_recovered.json``).
4. Controls that say what crossed (docs/conditions.md), each with a functional translator per seed (cached alike):
   ``slots_functional_lexical`` (trained and read on the sender's token embeddings) and
   ``slots_functional_mismatched`` (trained on contexts swapped between samples), each evaluated in a run of its
   own; then the same questions with counterfactual contexts (the gold answer replaced by another entity of its
   type). ``subgroups.json`` in the report: accuracy by hops and by candidates (entities of the answer's type in the
   context) with question-clustered CIs, and per condition how often an answer follows the new context or keeps the
   old answer.
5. The KV channel on the same held-out questions (``cli/kv_demo.py``): a layer-subset sweep of KV projectors on the
   validation questions, one projector per seed at the chosen subset, the KV protocol, and one table of both
   channels (accuracy, gap recovered, clustered CIs, bytes per question: ``two_channel.json``).
"""

from __future__ import annotations

import functools
import json
import sys
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
# The control translators: the functional config with these arguments (and the seed's own mismatch seed).
CONTROL_TRAINING = {
    "slots_functional_lexical": ["--model.init_args.sender_site", "embeddings"],
    "slots_functional_mismatched": ["--data.init_args.mismatched_contexts", "true"],
}
CONTROL_SITE = {"slots_functional_lexical": "embeddings", "slots_functional_mismatched": "block"}


def control_training(name: str, seed: int) -> list[str]:
    """A control's extra training arguments for one seed (the mismatched one swaps contexts with the seed's own
    derangement); the KV demo's controls read the same."""
    mismatch = (
        ["--data.init_args.mismatch_seed", str(seed)] if "mismatched_contexts" in CONTROL_TRAINING[name][0] else []
    )
    return [*CONTROL_TRAINING[name], *mismatch]


# The conditions evaluated again on counterfactual contexts (with the two controls, in their own runs).
COUNTERFACTUAL_CONDITIONS = ("receiver_alone", "skyline", "slots_self", "slots_translated", "slots_functional")


def _accuracies(run_dir: Path) -> dict:
    """Accuracy per condition (the report's summary), its 95% CI over questions (``ci``) and the number of questions."""
    conditions = json.loads((run_dir / "report" / "summary.json").read_text())["conditions"]
    return {
        **{cond: entry[METRIC]["mean"] for cond, entry in conditions.items()},
        "ci": {c: [e[METRIC]["ci_low"], e[METRIC]["ci_high"]] for c, e in conditions.items() if "ci_low" in e[METRIC]},
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


def sweep_plot(rows: list[dict], chosen: int) -> dict[str, bytes]:
    """slots_self and slots_zero per receiver block with 95% CIs, receiver_alone and skyline as horizontal lines, the
    chosen block marked: ``{"png": ..., "svg": ...}``."""
    from activation_transfer.report.split_plots import plot_layer_sweep

    return plot_layer_sweep(rows, chosen, lines=SWEEP_CONDITIONS[2:], flat=SWEEP_CONDITIONS[:2], metric=METRIC)


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

    def functional_at_block(t, name: str | None = None, steps=None) -> list[Path]:
        """The functional translators per seed at the chosen block (``name``: a control's)."""
        args = ["--model.init_args.receiver_model.layer", block, "--data.init_args.shuffle_seed"]
        extra = (lambda s: control_training(name, s)) if name else (lambda s: [])
        return [t(out, organisms, s, FUNCTIONAL_CONFIG, [*args, str(s), *extra(s)], steps=steps) for s in seeds]

    from cli import kv_demo
    from cli.train_ahead import demo_jobs, train_ahead

    # Every functional and KV training whose command is known now, side by side (cli/train_ahead.py).
    plans = [functional_at_block, *(functools.partial(functional_at_block, name=n) for n in CONTROL_TRAINING)]
    plans.append(lambda t: kv_demo.sweep_projectors(out, organisms, seeds[0], num_layers, t))
    train_ahead(translator, plans, demo_jobs())
    section(f"6. split protocol: aligned, then functional translators per seed at receiver block {chosen}")
    aligned = [
        translator(out, organisms, s, ALIGNED_CONFIG, ["--data.receiver_model.layer", block], steps=steps)
        for s in seeds
    ]
    functional = functional_at_block(translator, steps=steps)
    print(
        f"[demo] split translators ({len(seeds)} aligned + {len(seeds)} functional, receiver block {chosen}): "
        f"{time.perf_counter() - t:.0f} s",
        flush=True,
    )

    t = time.perf_counter()
    split_eval = functools.partial(split_eval_args, seeds=seeds, block=block, num_samples=num_samples)
    args = split_eval(out / "eval_split", aligned=aligned, functional=functional)
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
    for fmt, data in sweep_plot(rows, chosen).items():
        atomic_write(report / f"slots_self_layer_sweep.{fmt}", data)

    t = time.perf_counter()
    section(f"8. split protocol: the control translators per seed at receiver block {chosen}")
    controls = {name: functional_at_block(translator, name, steps) for name in CONTROL_TRAINING}
    print(f"[demo] control translators ({len(controls)} x {len(seeds)}): {time.perf_counter() - t:.0f} s", flush=True)

    t = time.perf_counter()
    section("9. split protocol: the controls, then every condition again on counterfactual contexts")
    runs: dict[str, list[Path]] = {"original": [run_dir], "counterfactual": []}
    for cf in (False, True):
        plans = [
            (
                split_eval(
                    out / "eval_split_controls" / f"{name}{'-cf' if cf else ''}",
                    functional=ckpts,
                    conditions=[name],
                    site=CONTROL_SITE[name],
                    counterfactual=cf,
                )
            )
            for name, ckpts in controls.items()
        ]
        if cf:
            conds = list(COUNTERFACTUAL_CONDITIONS)
            main = split_eval(out / "eval_split_cf", aligned, functional, conditions=conds, counterfactual=True)
            plans.insert(0, main)
        for eval_args in plans:
            if steps is not None:
                steps.add("evaluate.py", eval_args)
            runs["counterfactual" if cf else "original"].append(cached_eval(eval_args, organisms))
    print(f"[demo] control and counterfactual evaluations: {time.perf_counter() - t:.0f} s", flush=True)
    write_json(report / "subgroups.json", subgroup_summary(runs))
    kv_channel(out, organisms, seeds, num_samples, translator, run_dir, steps, runs["original"][1:])
    return run_dir


def kv_channel(
    out: Path, organisms: dict[str, Path], seeds: list[int], num_samples, translator, run_dir, steps=None, controls=()
):
    """Steps 10-12 (``cli/kv_demo.py``): the KV channel on the split evaluation's questions; prints the table of
    both channels (with the slot controls' runs ``controls``)."""
    from cli.kv_demo import run_kv, two_channel_lines

    module = sys.modules[__name__]
    table = run_kv(out, organisms, seeds, num_samples, translator, run_dir, steps, module, list(controls))
    print("[demo] both channels on the held-out questions (gap: receiver_alone -> skyline; CIs cluster questions):")
    print("\n".join(two_channel_lines(table)), flush=True)


def split_eval_args(
    root: Path,
    aligned: list[Path] | None = None,
    functional: list[Path] | None = None,
    *,
    seeds: list[int],
    block: str,
    num_samples: int | None,
    conditions: list[str] | None = None,
    site: str = "block",
    counterfactual: bool = False,
) -> list[str]:
    """The command line of a split evaluation at receiver block ``block`` into ``root``: the given translators (one
    per seed), conditions (default: the config's), sender site and data (counterfactual contexts or not)."""
    args = ["test", "-c", str(SPLIT_EVAL_CONFIG), "--model.seeds", json.dumps(seeds), "--model.receiver.layer", block]
    for option, ckpts in (("translator_ckpt", aligned), ("functional_translator_ckpt", functional)):
        if ckpts:
            args += [f"--model.{option}", json.dumps([str(c) for c in ckpts])]
    if conditions:
        args += ["--model.conditions", json.dumps(conditions)]
    if site != "block":
        args += ["--model.sender_site", site]
    if counterfactual:
        args += ["--data.counterfactual", "true"]
    args += ["--trainer.default_root_dir", str(root)]
    return args + (["--data.num_samples", str(num_samples)] if num_samples else [])


def subgroup_summary(runs: dict[str, list[Path]]) -> dict:
    """What ``subgroups.json`` holds: accuracy overall, by hops and by candidates on the original questions (every
    condition of the runs ``runs["original"]``), and the counterfactual rates of the runs ``runs["counterfactual"]``."""
    from activation_transfer.report.subgroups import counterfactual_rows, read_records, subgroup_rows

    original = read_records(runs["original"])
    return {
        "metric": METRIC,
        "runs": {k: [str(p) for p in v] for k, v in runs.items()},
        **{field: subgroup_rows(original, field) for field in ("all", "hops", "candidates")},
        "counterfactual": counterfactual_rows(read_records(runs["counterfactual"])),
    }


def subgroup_lines(summary: dict) -> list[str]:
    """The demo's printout of ``subgroups.json``: the split table with the controls, the counterfactual rates, the
    two-candidate table and the receiver's full-prompt (skyline) accuracy on two-candidate questions."""
    from activation_transfer.report.subgroups import counterfactual_markdown, subgroup_markdown

    two = [r for r in summary["candidates"] if r["value"] == 2]
    sky = next((r for r in two if r["condition"] == "skyline"), None)
    sky_line = (
        "no two-candidate questions"
        if sky is None
        else (f"{sky['accuracy']:.3f} [{sky['ci_low']:.3f}, {sky['ci_high']:.3f}] on {sky['n']} questions")
    )
    return [
        "[demo] split conditions with the controls (accuracy, 95% CI resampling questions with their seeds):",
        subgroup_markdown(summary["all"]),
        "[demo] by hops:",
        subgroup_markdown(summary["hops"]),
        "[demo] by candidates (entities of the answer's type in the context):",
        subgroup_markdown(summary["candidates"]),
        "[demo] two-candidate questions:",
        subgroup_markdown(two),
        f"[demo] receiver full prompt (skyline) on two-candidate questions: {sky_line}",
        "[demo] counterfactual contexts (gold answer replaced by another entity of its type):",
        counterfactual_markdown(summary["counterfactual"]),
    ]


def gap_lines(report: Path) -> list[str]:
    """One line per condition of ``gap_recovered.json``: fraction of the receiver_alone -> skyline gap, 95% CI."""
    path = report / "gap_recovered.json"
    if not path.exists():
        return []
    lines = []
    for row in json.loads(path.read_text()):
        frac = "undefined" if row["fraction"] is None else f"{row['fraction']:+.3f}"
        ci = "" if row["fraction"] is None else " CI unbounded"
        if row["ci_low"] is not None:
            ci = f" [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        lines.append(f"  {row['condition']:<28} {frac}{ci}  (n={row['n']}, runs={row['runs']})")
    return lines
