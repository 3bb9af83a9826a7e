"""The evaluation's W&B logging (``callbacks.eval_logging``): the long per-sample table, the report's tables, the
results artifact online and offline (read back from an offline run's ``.wandb`` file), no W&B-reserved key."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lightning_helpers import quiet_trainer
from test_evaluate_cli import _FakeWandbLogger, ckpt, small  # noqa: F401 (ckpt: the module-scoped fixture)
from test_train_cli import _offline_wandb, _wandb_records

from activation_transfer.models.frozen_lm import ModelRef
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.task.scoring import METRICS
from activation_transfer.translators.export import translator_sha256
from callbacks.eval_logging import SAMPLE_COLUMNS, EvalLoggingCallback, report_tables, sample_table
from callbacks.wandb_artifacts import RUN_ID_FILE
from cli.lightning_cli import eval_main


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])


def _record(sid, condition, seed, prediction, ok):
    return {
        "sample_id": sid,
        "condition": condition,
        "seed": seed,
        "gold": "X",
        "prediction": prediction,
        "hops": 2,
        "metrics": dict.fromkeys(METRICS, ok),
        "diagnostics": {},
    }


def test_sample_table_is_one_row_per_sample_condition_and_seed():
    class Sample:
        question = "Who?"

    results = {
        "b__seed1": [_record("s2", "b", 1, "no", False), _record("s1", "b", 1, "X", True)],
        "a__deterministic": [_record("s1", "a", None, "X", True)],  # s2 dropped by a strict run: no row
    }
    columns, rows = sample_table(results, {"s1": Sample()})
    assert columns == list(SAMPLE_COLUMNS) and len(columns) == 7 + len(METRICS)
    assert [(r[0], r[1], r[2]) for r in rows] == [("s1", "a", None), ("s1", "b", 1), ("s2", "b", 1)]
    assert rows[0][3] == "Who?" and rows[2][3] is None  # question text, when the sample is known
    assert rows[2][5] == "no" and rows[2][7:] == [False] * len(METRICS)


def test_fake_logger_gets_long_table_report_tables_and_artifact(tmp_path, ckpt):  # noqa: F811
    import wandb

    from datamodules.multihop_qa import MultiHopQADataModule
    from lightning_modules.injection_eval import InjectionEvalModule

    fake, cb = _FakeWandbLogger(), EvalLoggingCallback()
    module = InjectionEvalModule(
        ModelRef("tiny-neox"),
        ModelRef("tiny-neox-large"),
        translator_ckpt=ckpt,
        conditions=["no_inject", "additive"],
        seeds=[42],
        generation=GenerationSettings(max_new_tokens=3),
        report_resamples=50,
    )
    trainer = quiet_trainer(tmp_path, logger=fake, callbacks=[cb])
    trainer.test(module, datamodule=MultiHopQADataModule(num_samples=4, batch_size=4), verbose=False)
    columns, rows = fake.tables["eval/samples"]
    assert columns == list(SAMPLE_COLUMNS) and len(rows) == 4 * 2  # 4 samples x (no_inject, additive seed 42)
    assert {(r[1], r[2]) for r in rows} == {("no_inject", None), ("additive", 42)}
    assert all(r[3].endswith("?") for r in rows)
    assert {"eval/tables/summary", "eval/tables/comparisons", "eval/tables/equivalence"} <= set(fake.tables)
    summary_cols, summary = fake.tables["eval/tables/summary"]
    assert summary_cols[:4] == ["condition", "runs", "n", "metric"] and len(summary) == 2 * len(METRICS)
    comparison_cols, comparisons = fake.tables["eval/tables/comparisons"]
    assert {"condition", "baseline", "delta", "permutation_p", "pooled_mcnemar_p"} <= set(comparison_cols)
    assert comparisons
    for key, (cols, data) in fake.tables.items():
        wandb.Table(columns=cols, data=data)  # what WandbLogger.log_table builds: types must be consistent
        assert not any(part.startswith("_") for part in key.split("/"))
    # One image per key (W&B warns through the root logger when one key holds images of different sizes).
    report_keys = {k for k in fake.images if k.startswith("eval/report/")}
    pngs = {p.stem for p in (module.run_dir / "report").glob("*.png")}
    assert "eval/by_condition" in fake.images and pngs and report_keys == {f"eval/report/{s}" for s in pngs}
    assert all(len(fake.images[k]) == 1 for k in report_keys)
    # Lineage: the local checkpoint is a used `model` artifact holding a checksummed file:// reference to it.
    (used,) = fake.run.used
    # Named by the translator's identity (its weights' digest, the same for a .ckpt and its exported folder); the
    # reference's own checksum is the file's.
    identity = translator_sha256(ckpt)
    assert (used.type, used.name) == ("model", f"translator-{identity[:12]}")
    (ref,) = used.manifest.entries.values()
    assert ref.ref == Path(ckpt).resolve().as_uri() and ref.digest and used.metadata["sha256"] == identity
    (art,) = fake.run.artifacts
    assert art.type == "eval_results" and art.name == f"{module.run_dir.name}-results"
    names = set(art.manifest.entries)
    assert {"meta.json", "report/summary.json", "records/additive__seed42.jsonl"} <= names
    lines = (module.run_dir / "records" / "no_inject__deterministic.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    by_hand = sum(r["metrics"]["word_boundary_contains"] for r in recs) / len(recs)
    assert len(recs) == 4 and art.metadata["eval/no_inject/word_boundary_contains"] == by_hand
    # The per-run metric table: one row per condition x seed x metric, each value that run's accuracy.
    columns, rows = fake.tables["eval/metrics"]
    assert columns == ["condition", "seed", "metric", "value", "n"] and len(rows) == 2 * len(METRICS)
    assert ["no_inject", None, "word_boundary_contains", by_hand, 4] in rows


def test_report_tables_skip_absent_files(tmp_path):
    assert report_tables(tmp_path) == {}
    (tmp_path / "comparisons.json").write_text("[]")  # no baseline pairs: no table
    (tmp_path / "equivalence.json").write_text(json.dumps([{"condition": "a", "margin": 0.05, "runs": [1, 2]}]))
    assert report_tables(tmp_path) == {"equivalence": (["condition", "margin", "runs"], [["a", 0.05, "[1, 2]"]])}


def test_reserved_keys_are_refused():
    with pytest.raises(ValueError, match="W&B reserves"):
        EvalLoggingCallback(table_key="eval/_samples")


def test_offline_evaluation_logs_tables_and_the_results_artifact(tmp_path, ckpt, monkeypatch, request):  # noqa: F811
    from wandb.proto import wandb_internal_pb2

    _offline_wandb(monkeypatch, request)
    cli = eval_main(small(tmp_path, ckpt, "--model.conditions", "[no_inject, additive]", "--model.seeds", "[42]"))
    import wandb

    # An offline run's finish() returns before W&B's service has written the last records; teardown waits for it.
    wandb.teardown()
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    (record_file,) = run_dir.glob("run-*.wandb")
    artifacts, history_keys = [], set()
    for data in _wandb_records(record_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "artifact":
            artifacts.append(rec.artifact)
        elif kind == "history":
            history_keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    # W&B itself stores each logged table as a `run_table` artifact; ours is the one `eval_results`.
    (art,) = [a for a in artifacts if a.type == "eval_results"]
    assert art.name == f"{cli.model.run_dir.name}-results"
    paths = {entry.path for entry in art.manifest.contents}
    assert {"meta.json", "config.yaml", "records/no_inject__deterministic.jsonl", "report/comparisons.json"} <= paths
    # A logged table or image is a history entry `<key>/_type` (plus its path, size, ...) pointing to a media file.
    media = {k.removesuffix("/_type") for k in history_keys if k.endswith("/_type")}
    assert {"eval/samples", "eval/tables/summary", "eval/tables/comparisons", "eval/by_condition"} <= media
    # Tables land as files of the run; none under W&B's own names (config.yaml, wandb-summary.json, ...).
    table_files = {p.relative_to(run_dir / "files").as_posix() for p in (run_dir / "files").rglob("*.table.json")}
    assert any(name.startswith("media/table/eval/samples") for name in table_files), table_files
    assert "eval/metrics" in media and "eval/no_inject/word_boundary_contains" in history_keys
    assert not any("condition=" in k for k in history_keys)
    # Lineage offline: the checkpoint as a `model` artifact of one checksummed file:// reference, recorded with
    # use_after_commit (W&B refuses use_artifact offline; `wandb sync` replays this record as the use).
    (used,) = [a for a in artifacts if a.type == "model"]
    assert used.name == f"translator-{translator_sha256(ckpt)[:12]}" and used.use_after_commit
    (ref,) = used.manifest.contents
    assert ref.ref == Path(ckpt).resolve().as_uri() and ref.digest
    # The run folder names its W&B run, which a resumed evaluation resumes instead of opening a second one.
    run_id = run_dir.name.rsplit("-", 1)[1]
    assert json.loads((cli.model.run_dir / RUN_ID_FILE).read_text()) == {"activation-transfer": run_id}


def _run_records(run_dir: Path):
    from wandb.proto import wandb_internal_pb2

    (record_file,) = run_dir.glob("run-*.wandb")
    for data in _wandb_records(record_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        yield rec


def test_a_resumed_evaluation_resumes_its_wandb_run(tmp_path, ckpt, monkeypatch, request):  # noqa: F811
    import wandb

    _offline_wandb(monkeypatch, request)
    args = small(tmp_path, ckpt, "--model.conditions", "[no_inject]")
    first = eval_main(args)
    wandb.teardown()
    second = eval_main(args)  # the same command again: nothing left to compute, the run folder is the same
    wandb.teardown()
    assert second.model.run_dir == first.model.run_dir
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one W&B run id, two sessions
    resumes = [[rec.run.resume for rec in _run_records(r) if rec.WhichOneof("record_type") == "run"] for r in runs]
    assert resumes == [[False], [True]]  # the run record of the second session says it resumes the first
    # A new run folder (other conditions' samples) gets a run of its own.
    eval_main(small(tmp_path, ckpt, "--model.conditions", "[no_inject]", "--data.num_samples", "5"))
    wandb.teardown()
    assert len({r.name.rsplit("-", 1)[1] for r in (tmp_path / "wandb" / "wandb").glob("offline-run-*")}) == 2


def _logged(run_dir: Path) -> tuple[list[tuple[int, set[str]]], list[str]]:
    """An offline session's history rows (step, keys without W&B's own ``_*``) and its artifacts' types."""
    history, artifacts = [], []
    for rec in _run_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            keys = {item.key or "/".join(item.nested_key) for item in rec.history.item}
            history.append((rec.history.step.num, {k.split("/_")[0] for k in keys if not k.startswith("_")}))
        elif kind == "artifact":
            artifacts.append(rec.artifact.type)
    return history, artifacts


def test_a_rerun_logs_only_what_its_wandb_run_does_not_hold(tmp_path, ckpt, monkeypatch, request, capsys):  # noqa: F811
    import wandb

    from callbacks.wandb_ledger import LEDGER_FILE

    _offline_wandb(monkeypatch, request)
    args = small(tmp_path, ckpt, "--model.conditions", "[no_inject, additive]", "--model.seeds", "[42]")
    first = eval_main(args)
    wandb.teardown()
    capsys.readouterr()
    eval_main(args)  # everything reused: the resumed W&B run already holds it all
    wandb.teardown()
    one, two = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    history, artifacts = _logged(one)
    assert len(history) == 9 and artifacts.count("eval_results") == 1 and "model" in artifacts
    # The second session used to log all 9 rows again (steps 0-8) and a second eval_results version.
    assert _logged(two) == ([], [])
    run_id = json.loads((first.model.run_dir / RUN_ID_FILE).read_text())["activation-transfer"]
    assert f"W&B run {run_id} already holds these results; nothing logged again" in capsys.readouterr().out
    # A condition added to the folder: only its metrics are new, the tables and the results have changed; offline
    # W&B counts a resumed run's steps from 0, so the rows go after the first session's, not over them.
    eval_main(small(tmp_path, ckpt, "--model.conditions", "[no_inject, additive, replace]", "--model.seeds", "[42]"))
    wandb.teardown()
    assert "logged only the" in capsys.readouterr().out
    (three,) = set((tmp_path / "wandb" / "wandb").glob("offline-run-*")) - {one, two}
    more, artifacts = _logged(three)
    assert min(step for step, _ in more) == max(step for step, _ in history) + 1
    metrics = more[0][1] - {"epoch", "trainer/global_step"}
    assert metrics and all(k.startswith("eval/replace/") for k in metrics)
    tables = {"eval/samples", "eval/metrics", "eval/tables/summary", "eval/by_condition"}
    assert tables <= set().union(*(keys for _, keys in more))
    # W&B's own run_table artifacts hold the tables; the translator's use was recorded by the first session.
    assert [a for a in artifacts if a != "run_table"] == ["eval_results"]
    ledger = json.loads((first.model.run_dir / LEDGER_FILE).read_text())
    assert ledger[f"activation-transfer/{run_id}"]["step"] == max(step for step, _ in more) + 1


def test_an_invocation_without_a_report_logs_no_earlier_reports_tables(tmp_path, ckpt):  # noqa: F811
    # A rerun of the run folder for conditions without a baseline skips the report; the report/ an earlier invocation
    # wrote stays (its records are still there), but its tables were logged as this invocation's.
    from datamodules.multihop_qa import MultiHopQADataModule
    from lightning_modules.injection_eval import InjectionEvalModule

    def evaluate(conditions):
        fake = _FakeWandbLogger()
        module = InjectionEvalModule(
            ModelRef("tiny-neox"),
            ModelRef("tiny-neox-large"),
            translator_ckpt=ckpt,
            conditions=conditions,
            seeds=[42],
            generation=GenerationSettings(max_new_tokens=3),
            report_resamples=50,
        )
        trainer = quiet_trainer(tmp_path, logger=fake, callbacks=[EvalLoggingCallback()])
        trainer.test(module, datamodule=MultiHopQADataModule(num_samples=4, batch_size=4), verbose=False)
        return module, fake

    first, fake = evaluate(["no_inject", "additive"])
    assert "eval/tables/summary" in fake.tables
    second, fake = evaluate(["additive"])
    assert second.run_dir == first.run_dir and second.report_result is None
    assert (first.run_dir / "report" / "summary.json").is_file()  # the earlier report stays on disk
    assert not any(key.startswith("eval/tables/") for key in fake.tables)
    assert "eval/samples" in fake.tables  # this invocation's own tables are still logged
