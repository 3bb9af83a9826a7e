"""The KV channel of the split demo: the layer subset is chosen on validation questions, the table of both channels
holds the numbers a direct computation from the records gives."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from activation_transfer.report.stats import derive_seed
from activation_transfer.task.generator import EVAL_SEED
from cli import kv_demo, split_demo

IDS = [f"q{i}" for i in range(12)]
SEEDS = (42, 123, 456)
HIDDEN = 8
# Questions each condition gets right (per seed for the seeded ones): the table is computed from these.
RIGHT = {
    "receiver_alone": set(IDS[:2]),
    "skyline": set(IDS[:10]),
    "slots_functional": {42: set(IDS[:3]), 123: set(IDS[:4]), 456: set(IDS[1:4])},
    "slots_zero": set(IDS[:2]) | {"q11"},
    "slots_functional_lexical": {42: set(IDS[:2]), 123: set(IDS[:3]), 456: set(IDS[1:3])},
    "kv_self": set(IDS[:10]),
    "kv_functional": {42: set(IDS[:8]), 123: set(IDS[:9]), 456: set(IDS[2:9])},
    "kv_zero": set(IDS[1:3]),
    "kv_functional_lexical": {42: set(IDS[:5]), 123: set(IDS[1:5]), 456: set(IDS[:4])},
    "kv_functional_mismatched": {42: set(IDS[:2]), 123: set(IDS[1:3]), 456: set(IDS[:3])},
}
# kv_functional per layer subset on the validation questions: every_other and all tie, every_other has fewer layers.
SWEEP = {"all": 0.5, "first_half": 0.25, "second_half": 0.125, "every_other": 0.5}


def opt(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def write_run(run_dir: Path, conditions: list[str], kv_layers: int | None = None) -> Path:
    """Records of ``conditions`` (RIGHT) in an evaluation run folder; kv records carry bytes_sent, slot records
    slot_count (a question's prefix/slot count: 3 + its index)."""
    (run_dir / "records").mkdir(parents=True)
    for cond in conditions:
        right = RIGHT[cond]
        rows = []
        for seed in SEEDS if isinstance(right, dict) else (None,):
            for i, q in enumerate(IDS):
                ok = q in (right[seed] if seed else right)
                diag = {"slot_count": 3 + i} if cond.startswith("slots") else {}
                if cond.startswith("kv"):
                    diag = {"bytes_sent": (3 + i) * kv_layers * 2 * HIDDEN * 4, "prefix_len": 3 + i}
                rows.append(
                    {
                        "sample_id": q,
                        "condition": cond,
                        "seed": seed,
                        "gold": "Peru",
                        "prediction": "Peru" if ok else "Chile",
                        "diagnostics": diag,
                    }
                )
        (run_dir / "records" / f"{cond}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def fake_kv_eval(args):
    """A KV evaluation: the sweep's runs write a summary (kv_functional per SWEEP subset), the held-out run records."""
    root = Path(opt(args, "--trainer.default_root_dir"))
    if opt(args, "--data.generator_seed") is not None:
        name = root.name
        conds = {"receiver_alone": 0.1, "skyline": 0.8, "kv_self": 0.75, "kv_functional": SWEEP[name]}
        summary = {"conditions": {c: {"n": 12, "word_boundary_contains": {"mean": v}} for c, v in conds.items()}}
        (root / "run" / "report").mkdir(parents=True)
        (root / "run" / "report" / "summary.json").write_text(json.dumps(summary))
        return SimpleNamespace(model=SimpleNamespace(run_dir=root / "run"))
    layers = json.loads(opt(args, "--model.kv_layers") or "[0, 1, 2, 3]")
    conds = json.loads(opt(args, "--model.conditions") or "null") or [
        "receiver_alone",
        "skyline",
        "kv_self",
        "kv_functional",
        "kv_zero",
    ]
    return SimpleNamespace(model=SimpleNamespace(run_dir=write_run(root / "run", conds, len(layers))))


def test_choose_subset_takes_the_best_kv_functional_and_the_fewest_layers_of_ties() -> None:
    rows = [{"subset": n, "num_layers": k, "kv_functional": SWEEP[n]} for n, k in zip(SWEEP, (4, 2, 2, 2))]
    assert kv_demo.choose_subset(rows)["subset"] == "every_other"
    assert kv_demo.layer_subsets(4) == {
        "all": None,
        "first_half": [0, 1],
        "second_half": [2, 3],
        "every_other": [0, 2],
    }
    with pytest.raises(ValueError, match="empty"):
        kv_demo.choose_subset([])


def _bootstrap_ci(deltas: np.ndarray, seed: int) -> tuple[float, float]:
    """The question-clustered percentile bootstrap written out: resample questions, 10,000 draws."""
    means = np.sort(deltas[np.random.default_rng(seed).integers(0, deltas.size, size=(10_000, deltas.size))].mean(1))
    return float(means[int(0.025 * 9_999)]), float(means[int(0.975 * 9_999)])


def test_kv_step_sweeps_on_validation_questions_and_prints_the_records_numbers(
    tmp_path: Path, monkeypatch, capsys, fake_demo
) -> None:
    from cli import demo

    monkeypatch.setenv("ACTIVATION_TRANSFER_DEMO_JOBS", "1")  # the fakes live in this process
    fake_demo.evaluate = fake_kv_eval
    monkeypatch.setattr(kv_demo, "receiver_hidden", lambda folder: HIDDEN)
    monkeypatch.setattr(split_demo, "receiver_blocks", lambda folder: 4)
    split_run = write_run(tmp_path / "split" / "run", ["receiver_alone", "skyline", "slots_functional", "slots_zero"])
    (split_run / "report").mkdir()
    # A slot control's run of its own, as the split demo's step 9 writes it.
    lexical_run = write_run(tmp_path / "split" / "lexical", ["slots_functional_lexical"])
    out = tmp_path / "demo"
    split_demo.kv_channel(out, fake_demo.organisms, list(SEEDS), None, demo._translator, split_run, None, [lexical_run])

    sweep, held_out, controls = fake_demo.evaluated[:4], fake_demo.evaluated[4], fake_demo.evaluated[5:]
    # The sweep reads only validation questions; one projector (the first seed) per subset, with its layers.
    assert {opt(a, "--data.generator_seed") for a in sweep} == {str(split_demo.SELECTION_SEED)} != {str(EVAL_SEED)}
    assert [opt(a, "--model.kv_layers") for a in sweep] == [None, "[0, 1]", "[2, 3]", "[0, 2]"]
    assert all(opt(a, "--model.seeds") == "[42]" for a in sweep)
    assert [opt(t, "--model.init_args.layers") for t in fake_demo.trained[:4]] == [None, "[0, 1]", "[2, 3]", "[0, 2]"]
    # The held-out run: the config's questions, the chosen subset, one projector per seed (the sweep's seed-42 one
    # reused from the cache).
    assert opt(held_out, "--data.generator_seed") is None and opt(held_out, "--model.kv_layers") == "[0, 2]"
    assert len(fake_demo.trained) == 6 + 2 * len(SEEDS)
    used = [Path(c).read_text() for c in json.loads(opt(held_out, "--model.functional_translator_ckpt"))]
    assert all(f"--seed_everything {s} " in u and "--model.init_args.layers [0, 2]" in u for s, u in zip(SEEDS, used))
    # The controls: a projector per seed trained with the split control's option, at the chosen subset, each
    # evaluated in a run of its own at its sender site.
    assert [json.loads(opt(a, "--model.conditions")) for a in controls] == [[c] for c in kv_demo.KV_CONTROLS]
    assert [opt(a, "--model.sender_site") for a in controls] == ["embeddings", None]
    assert all(opt(a, "--model.kv_layers") == "[0, 2]" and opt(a, "--data.generator_seed") is None for a in controls)
    for args, option in zip(controls, ("--model.init_args.sender_site embeddings", "mismatched_contexts true")):
        used = [Path(c).read_text() for c in json.loads(opt(args, "--model.functional_translator_ckpt"))]
        assert all(f"--seed_everything {s} " in u and option in u and "layers [0, 2]" in u for s, u in zip(SEEDS, used))
    assert all(f"--data.init_args.mismatch_seed {s}" in u for s, u in zip(SEEDS, used))

    # The table, against a direct computation from the records.
    def acc(cond: str) -> float:
        right = RIGHT[cond]
        runs = [right[s] for s in SEEDS] if isinstance(right, dict) else [right]
        return float(np.mean([len(r) / len(IDS) for r in runs]))

    table = json.loads((split_run / "report" / "two_channel.json").read_text())
    rows = {r["condition"]: r for r in table["rows"]}
    kv_conds = ["kv_functional", "kv_self", "kv_zero"]  # the KV run's record files, in name order
    controls = list(kv_demo.KV_CONTROLS)  # then the controls' runs
    slots = ["slots_functional", "slots_zero", "slots_functional_lexical"]
    assert list(rows) == ["receiver_alone", "skyline", *slots, *kv_conds, *controls]
    mean_count = np.mean([3 + i for i in range(len(IDS))])
    for cond, row in rows.items():
        assert row["accuracy"] == pytest.approx(acc(cond), abs=1e-12)
        if isinstance(RIGHT[cond], dict):  # one run per seed: their sample SD; a single run has none
            sd = np.std([len(RIGHT[cond][s]) / len(IDS) for s in SEEDS], ddof=1)
            assert row["accuracy_sd"] == pytest.approx(sd, abs=1e-12)
        else:
            assert row["accuracy_sd"] is None
        gap = (acc(cond) - acc("receiver_alone")) / (acc("skyline") - acc("receiver_alone"))
        if cond not in ("receiver_alone", "skyline"):
            assert row["gap_fraction"] == pytest.approx(gap, abs=1e-12)
            assert row["gap_ci"][0] <= row["gap_fraction"] <= row["gap_ci"][1]
        expected_bytes = {"kv": mean_count * 2 * 2 * HIDDEN * 4, "slots": mean_count * HIDDEN * 4, "text": None}
        assert row["bytes_per_question"] == pytest.approx(expected_bytes[row["channel"]])
        assert row["channel"] == {"receiver_alone": "text", "skyline": "text"}.get(cond, cond.split("_")[0])
    # The contrasts: per question, one condition's run-mean minus the other's, with the clustered CI; the headline
    # (kv_functional - slots_functional) first, then each channel's functional translator minus its lexical control.
    printed = capsys.readouterr().out
    pairs = [(c["condition"], c["baseline"]) for c in table["contrasts"]]
    assert pairs == list(kv_demo.CONTRASTS) and table["headline"] == table["contrasts"][0]
    for contrast in table["contrasts"]:
        a, b = contrast["condition"], contrast["baseline"]
        per_q = np.array(
            [np.mean([q in RIGHT[a][s] for s in SEEDS]) - np.mean([q in RIGHT[b][s] for s in SEEDS]) for q in IDS]
        )
        assert contrast["delta"] == pytest.approx(per_q.mean(), abs=1e-12) and contrast["n"] == len(IDS)
        low, high = _bootstrap_ci(per_q, derive_seed(0, f"{a}|{b}|two_channel"))
        assert (contrast["ci_low"], contrast["ci_high"]) == pytest.approx((low, high), abs=1e-12)
        # each seed's translators paired: their own difference on all questions (the spread the CI leaves out)
        per_seed = [(len(RIGHT[a][s]) - len(RIGHT[b][s])) / len(IDS) for s in SEEDS]
        assert contrast["per_run"] == pytest.approx(per_seed, abs=1e-12)
        seeds = " / ".join(f"{d:+.3f}" for d in per_seed)
        assert (
            f"{a} - {b}: {per_q.mean():+.3f} [{low:+.3f}, {high:+.3f}] (question-clustered 95% CI, n={len(IDS)}; "
            f"per seed {seeds})" in printed
        )
    kv = rows["kv_functional"]
    cell = f"{acc('kv_functional'):.3f} ± {kv['accuracy_sd']:.3f}"
    line = f"| kv | kv_functional | {cell} | {kv['gap_fraction']:+.3f} [{kv['gap_ci'][0]:+.3f}, "
    assert line in printed
    assert "| every_other ([0, 2]) (chosen) | 0.100 | 0.800 | 0.750 | 0.500 |" in printed
    sweep_json = json.loads((split_run / "report" / "kv_layer_sweep.json").read_text())
    assert sweep_json["selection_generator_seed"] == split_demo.SELECTION_SEED and sweep_json["projector_seed"] == 42
