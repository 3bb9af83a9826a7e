"""The KV channel of the split demo, beside the slot channel: the same held-out questions, one table of both.

1. Layer-subset sweep on *validation* questions (``split_demo.SELECTION_SEED``, never the evaluation seed): one KV
   projector (``configs/train/kv_functional_demo.yaml``, the first demo seed) per subset of receiver layers (all,
   first half, second half, every other); the subset whose ``kv_functional`` is highest (the fewest layers of ties:
   fewer bytes) is used after. Written as ``kv_layer_sweep.json``.
2. One projector per evaluation seed at that subset (the first seed's is the sweep's; cached by content key like
   every demo translator), the KV protocol on the held-out questions (``configs/eval/kv_demo.yaml``).
3. The split demo's two controls in KV form, a projector per seed each, each evaluated in a run of its own:
   ``kv_functional_lexical`` (trained and read on the sender's token embeddings) and ``kv_functional_mismatched``
   (trained on contexts swapped between samples).
4. ``two_channel.json`` and its table: per condition of all those runs, accuracy, the fraction of the receiver_alone ->
   skyline gap recovered (``report.gap``: question-clustered bootstrap), the clustered CI of the difference from
   ``receiver_alone`` and bytes per question (the records' ``bytes_sent``: KV entries or slot vectors at their dtype,
   the relay's text; older slot records: slot_count x hidden x 4), and the clustered CIs of the ``CONTRASTS``:
   ``kv_functional - slots_functional`` (the headline), then in each channel the functional translator minus its
   lexical control (what the sender computed beyond which tokens its context held).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from activation_transfer.io import write_json

ROOT = Path(__file__).resolve().parents[1]
KV_TRAIN_CONFIG = ROOT / "configs" / "train" / "kv_functional_demo.yaml"
KV_EVAL_CONFIG = ROOT / "configs" / "eval" / "kv_demo.yaml"
KV_SWEEP_CONDITIONS = ("receiver_alone", "skyline", "kv_self", "kv_functional")
# The headline comparison of the two channels (both trained through the frozen receiver).
HEADLINE = ("kv_functional", "slots_functional")
# What each channel carries beyond token identity: the functional translator against its lexical control.
CONTRASTS = (
    HEADLINE,
    ("slots_functional", "slots_functional_lexical"),
    ("kv_functional", "kv_functional_lexical"),
)
SLOT_BYTES = 4  # a slot vector is written as fp32 hidden states
# The KV controls: each trained and evaluated with the split demo's control of the same kind's arguments and site.
KV_CONTROLS = {
    "kv_functional_lexical": "slots_functional_lexical",
    "kv_functional_mismatched": "slots_functional_mismatched",
}


def layer_subsets(num_layers: int) -> dict[str, list[int] | None]:
    """The sweep's receiver-layer subsets (None: every layer)."""
    half = num_layers // 2
    return {
        "all": None,
        "first_half": list(range(half)),
        "second_half": list(range(half, num_layers)),
        "every_other": list(range(0, num_layers, 2)),
    }


def projector(
    out: Path, organisms: dict, seed: int, layers: list[int] | None, translator, steps=None, control=()
) -> Path:
    """The KV projector of one seed and layer subset, trained through the demo's cached ``translator`` (``control``:
    a control's extra training arguments)."""
    extra = ["--data.init_args.shuffle_seed", str(seed), *control]
    if layers is not None:
        extra += ["--model.init_args.layers", json.dumps(layers)]
    return translator(out, organisms, seed, KV_TRAIN_CONFIG, extra, steps=steps)


def kv_eval_args(
    root: Path,
    ckpts: list[Path],
    *,
    seeds: list[int],
    layers: list[int] | None,
    num_samples: int | None,
    conditions: list[str] | None = None,
    generator_seed: int | None = None,
    site: str = "block",
) -> list[str]:
    """The command line of a KV evaluation into ``root``: one projector per seed, its layers, optional conditions,
    question generator seed (None: the config's, the held-out questions) and sender site."""
    args = ["test", "-c", str(KV_EVAL_CONFIG), "--model.seeds", json.dumps(seeds)]
    args += ["--model.functional_translator_ckpt", json.dumps([str(c) for c in ckpts])]
    if layers is not None:
        args += ["--model.kv_layers", json.dumps(layers)]
    if site != "block":
        args += ["--model.sender_site", site]
    if conditions:
        args += ["--model.conditions", json.dumps(conditions)]
    if generator_seed is not None:
        args += ["--data.generator_seed", str(generator_seed)]
    args += ["--trainer.default_root_dir", str(root), "--trainer.logger", "false"]
    return args + (["--data.num_samples", str(num_samples)] if num_samples else [])


def sweep_projectors(out: Path, organisms: dict, seed: int, num_layers: int, translator, steps=None) -> list[Path]:
    """The sweep's projectors (seed ``seed``), one per layer subset, in :func:`layer_subsets` order."""
    return [projector(out, organisms, seed, layers, translator, steps) for layers in layer_subsets(num_layers).values()]


def choose_subset(rows: list[dict]) -> dict:
    """The sweep row with the highest ``kv_functional``; of ties, the one with the fewest layers (fewer bytes)."""
    if not rows:
        raise ValueError("the KV layer sweep is empty")
    best = max(r["kv_functional"] for r in rows)
    return min((r for r in rows if r["kv_functional"] == best), key=lambda r: r["num_layers"])


def kv_layer_sweep(out: Path, organisms: dict, seed: int, num_layers: int, num_samples, translator, steps, split):
    """One projector (seed ``seed``) per subset, evaluated on the validation questions (``split.SELECTION_SEED``,
    read by ``split._accuracies``: the split demo's); one row per subset."""
    from cli.lightning_cli import eval_main

    rows = []
    ckpts = sweep_projectors(out, organisms, seed, num_layers, translator, steps)
    for (name, layers), ckpt in zip(layer_subsets(num_layers).items(), ckpts, strict=True):
        args = kv_eval_args(
            out / "kv_sweep" / name,
            [ckpt],
            seeds=[seed],
            layers=layers,
            num_samples=num_samples,
            conditions=list(KV_SWEEP_CONDITIONS),
            generator_seed=split.SELECTION_SEED,
        )
        if steps is not None:
            steps.add("evaluate.py", args)
        n = num_layers if layers is None else len(layers)
        row = {"subset": name, "layers": layers, "num_layers": n, "projector": str(ckpt)}
        rows.append({**row, **split._accuracies(eval_main(args).model.run_dir)})
    return rows


def kv_sweep_table(rows: list[dict], chosen: str) -> str:
    """Markdown table of the sweep, the chosen subset marked."""
    head = "| subset (layers) | " + " | ".join(KV_SWEEP_CONDITIONS) + " |\n|---|" + "---|" * len(KV_SWEEP_CONDITIONS)
    lines = []
    for r in rows:
        name = f"{r['subset']} ({'all' if r['layers'] is None else r['layers']})"
        mark = " (chosen)" if r["subset"] == chosen else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{r[c]:.3f}" for c in KV_SWEEP_CONDITIONS) + " |")
    return "\n".join([head, *lines])


def _runs(groups: dict, cond: str, ids: list[str]) -> list[np.ndarray]:
    from activation_transfer.report.load import sort_runs
    from activation_transfer.task.scoring import MAIN_METRIC

    return [np.array([groups[cond][r][i][MAIN_METRIC] for i in ids]) for r in sort_runs(groups[cond])]


def clustered_difference(groups: dict, cond: str, base: str, label: str) -> dict:
    """Mean paired difference ``cond - base`` over their common questions with the question-clustered 95% CI
    (``report.clustered.question_bootstrap_ci``); a single-run side is repeated for every run of the other."""
    from activation_transfer.report.clustered import question_bootstrap_ci
    from activation_transfer.report.stats import clustered_deltas, derive_seed

    ids = sorted(set.intersection(*(set(r) for c in (cond, base) for r in groups[c].values())))
    c_runs, b_runs = _runs(groups, cond, ids), _runs(groups, base, ids)
    if len(b_runs) == 1:
        b_runs = b_runs * len(c_runs)
    elif len(c_runs) == 1:
        c_runs = c_runs * len(b_runs)
    low, high = question_bootstrap_ci(c_runs, b_runs, seed=derive_seed(0, label))
    # The CI resamples questions for these translators; the paired runs' own differences show how much it would
    # move with other ones (one per seed, in seed order).
    per_run = [float(np.mean(c, dtype=float) - np.mean(b, dtype=float)) for c, b in zip(c_runs, b_runs)]
    delta = float(clustered_deltas(c_runs, b_runs).mean())
    return {"delta": delta, "ci_low": low, "ci_high": high, "n": len(ids), "per_run": per_run}


def bytes_per_question(records: list[dict], hidden: int) -> dict[str, float]:
    """Mean bytes sent per question by condition: a record's ``bytes_sent`` (KV and split records), else, for a slot
    record written before split records carried it, slot_count x hidden x 4; conditions with neither are absent."""
    sums: dict[str, list[float]] = {}
    for r in records:
        d = r.get("diagnostics") or {}
        if "bytes_sent" in d:
            sums.setdefault(r["condition"], []).append(float(d["bytes_sent"]))
        elif r["condition"].startswith("slots"):
            sums.setdefault(r["condition"], []).append(float(d.get("slot_count", 0) * hidden * SLOT_BYTES))
    return {c: float(np.mean(v)) for c, v in sums.items()}


def two_channel(split_run: Path, kv_runs: list[Path], hidden: int, slot_runs: list[Path] = ()) -> dict:
    """The rows of both channels on the same questions: the split run's conditions (its ``receiver_alone`` and
    ``skyline`` are the baselines of every row), the slot controls' runs (``slot_runs``), then the KV runs' own
    conditions (the KV run, its controls' runs); and the ``CONTRASTS`` whose two conditions are there."""
    from activation_transfer.report.analysis import condition_accuracy
    from activation_transfer.report.gap import GAP_LOW, gap_recovered
    from activation_transfer.report.load import collapse_repeated_runs, group_records, load_records
    from activation_transfer.report.stats import run_mean_sd
    from activation_transfer.report.subgroups import read_records
    from activation_transfer.task.scoring import MAIN_METRIC

    baselines = ("receiver_alone", "skyline")
    controls = [r for r in load_records(list(slot_runs)) if r.condition not in baselines]
    kv_only = [r for r in load_records(kv_runs) if r.condition not in baselines]
    records = load_records([split_run]) + controls + kv_only
    groups = collapse_repeated_runs(group_records(records), records).groups
    gaps = {row["condition"]: row for row in gap_recovered(groups)}
    kv_names = {r.condition for r in kv_only}
    extra = {r.condition for r in controls} | kv_names
    raw = read_records([split_run]) + [r for r in read_records([*slot_runs, *kv_runs]) if r["condition"] in extra]
    sent = bytes_per_question(raw, hidden)
    acc = condition_accuracy(groups)
    rows = []
    for cond in groups:
        gap = gaps.get(cond, {})
        row = {
            "channel": "kv" if cond in kv_names else ("slots" if cond.startswith("slots") else "text"),
            "condition": cond,
            "accuracy": acc[cond][MAIN_METRIC]["mean"],
            # Across the runs (one per seed's translator); None for a single run.
            "accuracy_sd": run_mean_sd(list(acc[cond][MAIN_METRIC]["per_run"].values()))[1],
            "runs": len(groups[cond]),
            "gap_fraction": gap.get("fraction"),
            "gap_ci": [gap.get("ci_low"), gap.get("ci_high")],
            # nl_relay's figure is its text; older text records carry none.
            "bytes_per_question": sent.get(cond),
        }
        if cond != GAP_LOW and GAP_LOW in groups:
            row["vs_receiver_alone"] = clustered_difference(groups, cond, GAP_LOW, f"{cond}|two_channel|{GAP_LOW}")
        rows.append(row)
    out = {"metric": MAIN_METRIC, "split_run": str(split_run), "kv_runs": [str(r) for r in kv_runs], "rows": rows}
    out["contrasts"] = [
        {"condition": a, "baseline": b, **clustered_difference(groups, a, b, f"{a}|{b}|two_channel")}
        for a, b in CONTRASTS
        if a in groups and b in groups
    ]
    if all(c in groups for c in HEADLINE):
        out["headline"] = out["contrasts"][0]
    return out


def _ci(low, high) -> str:
    return "" if low is None else f" [{low:+.3f}, {high:+.3f}]"


def two_channel_lines(table: dict) -> list[str]:
    """The demo's printout of ``two_channel.json``: one markdown table and the contrasts (the headline first)."""
    lines = [
        "| channel | condition | accuracy (± SD over seeds) | gap recovered [95% CI] | - receiver_alone [95% CI] "
        "| bytes/question |",
        "|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        frac = "" if r["gap_fraction"] is None else f"{r['gap_fraction']:+.3f}{_ci(*r['gap_ci'])}"
        v = r.get("vs_receiver_alone")
        diff = "" if v is None else f"{v['delta']:+.3f}{_ci(v['ci_low'], v['ci_high'])}"
        sent = "" if r["bytes_per_question"] is None else f"{r['bytes_per_question']:.0f}"
        sd = "" if r.get("accuracy_sd") is None else f" ± {r['accuracy_sd']:.3f}"
        cells = [r["channel"], r["condition"], f"{r['accuracy']:.3f}{sd}", frac, diff, sent]
        lines.append("| " + " | ".join(cells) + " |")
    for h in table.get("contrasts", []):
        seeds = " / ".join(f"{d:+.3f}" for d in h.get("per_run", []))
        lines.append(
            f"[demo] {h['condition']} - {h['baseline']}: {h['delta']:+.3f}{_ci(h['ci_low'], h['ci_high'])} "
            f"(question-clustered 95% CI, n={h['n']}; per seed {seeds})"
        )
    return lines


def control_projectors(out: Path, organisms: dict, seeds, layers, split, name: str, translator, steps=None):
    """One KV control's projectors (``KV_CONTROLS``), one per seed at ``layers``, trained with the split control's
    arguments (the mismatched one with the seed's own mismatch seed)."""
    control = KV_CONTROLS[name]
    return [projector(out, organisms, s, layers, translator, steps, split.control_training(control, s)) for s in seeds]


def kv_control(out: Path, organisms: dict, seeds, num_samples, translator, steps, split, name: str, chosen: dict):
    """One KV control: its projectors (:func:`control_projectors`) evaluated in a run of its own at its sender site;
    returns the run folder."""
    from cli.lightning_cli import eval_main

    base = KV_CONTROLS[name]
    ckpts = control_projectors(out, organisms, seeds, chosen["layers"], split, name, translator, steps)
    args = kv_eval_args(
        out / "eval_kv_controls" / name,
        ckpts,
        seeds=seeds,
        layers=chosen["layers"],
        num_samples=num_samples,
        conditions=[name],
        site=split.CONTROL_SITE[base],
    )
    if steps is not None:
        steps.add("evaluate.py", args)
    return eval_main(args).model.run_dir


def receiver_hidden(folder: Path) -> int:
    """The receiver's hidden size, read from its config (what a slot vector holds)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(folder)).hidden_size)


def run_kv(
    out: Path,
    organisms: dict,
    seeds: list[int],
    num_samples,
    translator,
    split_run: Path,
    steps,
    split,
    slot_runs: list[Path] = (),
) -> dict:
    """Sweep, projectors per seed, the KV evaluation and ``two_channel.json`` (in the split run's report, with the
    slot controls' runs ``slot_runs``); returns the two-channel table. ``split`` is the split demo's module (passed
    in: it imports this one)."""
    from cli.lightning_cli import eval_main

    selection_seed = split.SELECTION_SEED

    def section(title: str) -> None:
        if steps is not None:
            steps.section(title)

    t = time.perf_counter()
    section(f"10. KV protocol: layer-subset sweep on validation questions (generator seed {selection_seed})")
    num_layers = split.receiver_blocks(organisms["receiver"])
    rows = kv_layer_sweep(out, organisms, seeds[0], num_layers, num_samples, translator, steps, split)
    chosen = choose_subset(rows)
    print(
        f"[demo] KV layer-subset sweep on validation questions (generator seed {selection_seed}, projector seed "
        f"{seeds[0]}), {time.perf_counter() - t:.0f} s:\n{kv_sweep_table(rows, chosen['subset'])}",
        flush=True,
    )

    t = time.perf_counter()
    from cli.train_ahead import demo_jobs, train_ahead

    # The other seeds' projectors and the controls', side by side (cli/train_ahead.py).
    layers = chosen["layers"]
    plans = [lambda t: [projector(out, organisms, s, layers, t) for s in seeds[1:]]]
    plans += [lambda t, n=n: control_projectors(out, organisms, seeds, layers, split, n, t) for n in KV_CONTROLS]
    train_ahead(translator, plans, demo_jobs())
    section(f"11. KV protocol: one projector per seed at layers {chosen['subset']}, the held-out questions")
    # The first seed's projector at the chosen subset is the sweep's own.
    ckpts = [Path(chosen["projector"])]
    ckpts += [projector(out, organisms, s, chosen["layers"], translator, steps) for s in seeds[1:]]
    args = kv_eval_args(out / "eval_kv", ckpts, seeds=seeds, layers=chosen["layers"], num_samples=num_samples)
    if steps is not None:
        steps.add("evaluate.py", args)
    kv_run = eval_main(args).model.run_dir
    print(f"[demo] KV projectors and evaluation: {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    section(f"12. KV protocol: the control projectors per seed at layers {chosen['subset']}, each in a run of its own")
    runs = [kv_run] + [
        kv_control(out, organisms, seeds, num_samples, translator, steps, split, name, chosen) for name in KV_CONTROLS
    ]
    print(f"[demo] KV control projectors and evaluations: {time.perf_counter() - t:.0f} s", flush=True)
    table = two_channel(split_run, runs, receiver_hidden(organisms["receiver"]), slot_runs)
    report = split_run / "report"
    sweep = {"selection_generator_seed": selection_seed, "projector_seed": seeds[0], "chosen": chosen, "rows": rows}
    write_json(report / "kv_layer_sweep.json", sweep)
    write_json(report / "two_channel.json", table)
    return table
