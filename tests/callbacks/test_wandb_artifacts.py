"""W&B artifacts: the translator as a ``model`` artifact of an offline training run (read back from the run's
``.wandb`` record file), and ``wandb:`` translator references resolved through a run (fake online, real refusals)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_train_cli import TINY, _linear_store, _offline_wandb, _run_args, _wandb_records

from activation_transfer.io import sha256_file
from activation_transfer.translators.export import from_pretrained
from activation_transfer.translators.loading import is_online, load_translator, resolve_translator_ref
from callbacks.model_artifact import TranslatorArtifactCallback
from callbacks.wandb_artifacts import recording_runs, wandb_runs
from cli.lightning_cli import train_main


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _artifact_records(run_dir: Path) -> list:
    """The ``artifact`` records of an offline run: name, type, aliases, metadata and the manifest of its files.

    An offline run keeps each logged artifact as one record in ``run-<id>.wandb`` (the W&B datastore, which
    ``wandb sync`` replays); the staged file copies it points to live under ``WANDB_DATA_DIR/artifacts/staging``.
    """
    from wandb.proto import wandb_internal_pb2

    (record_file,) = run_dir.glob("run-*.wandb")
    out = []
    for data in _wandb_records(record_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "artifact":
            out.append(rec.artifact)
    return out


def test_offline_training_logs_the_translator_as_a_model_artifact(tmp_path, monkeypatch, request):
    import wandb

    _offline_wandb(monkeypatch, request)
    _linear_store(tmp_path / "store", n=600)
    cli = train_main(
        [
            "fit",
            "-c",
            TINY,
            *_run_args(tmp_path),
            "--data.sender_model",
            "null",
            "--data.receiver_model",
            "null",
            "--data.store_dir",
            str(tmp_path / "store"),
            "--trainer.max_epochs",
            "1",
            "--trainer.log_every_n_steps",
            "2",
        ]
    )
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, TranslatorArtifactCallback)]
    # The exported folder sits next to the best checkpoint and translates exactly as it does.
    assert cb.exported == best.with_suffix("")
    x = torch.randn(4, 12)
    assert torch.equal(from_pretrained(cb.exported).translate(x), load_translator(best).translate(x))

    # An offline run's finish() returns before W&B's service has written the last records; teardown waits for it.
    wandb.teardown()
    (run_dir,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    art, last = _artifact_records(run_dir)  # two versions of one artifact: the best checkpoint, then the last
    run_id = run_dir.name.rsplit("-", 1)[1]
    # W&B adds `latest` to each version it logs: it ends on the last checkpoint's.
    assert (art.type, art.name, sorted(art.aliases)) == ("model", f"translator-{run_id}", ["best", "latest"])
    assert (last.type, last.name, sorted(last.aliases)) == ("model", art.name, ["last", "latest"])
    assert cb.logged == [art.name, f"{art.name}:last"]
    last_ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    (entry,) = last.manifest.contents
    assert entry.path == "last.ckpt" and Path(entry.local_path).read_bytes() == last_ckpt.read_bytes()
    assert json.loads(last.metadata)["checkpoint_sha256"] == sha256_file(last_ckpt)
    meta = json.loads(art.metadata)
    assert (meta["sender_dim"], meta["receiver_dim"], meta["loss"], meta["normalize"]) == (12, 16, "cosine", True)
    assert meta["checkpoint"] == best.name and meta["metrics"]["best/val/loss"] > 0
    assert "final/val/cos_norm" in meta["metrics"]
    paths = {entry.path: entry.local_path for entry in art.manifest.contents}
    assert {best.name, "exported/model.safetensors", "exported/config.json", "exported/README.md"} == set(paths)
    # The staged copy is the checkpoint's bytes: what `wandb sync` would upload.
    assert Path(paths[best.name]).read_bytes() == best.read_bytes()


def _history_steps(record_file: Path) -> list[int]:
    from wandb.proto import wandb_internal_pb2

    steps = []
    for data in _wandb_records(record_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            steps += [int(items["trainer/global_step"])] if "trainer/global_step" in items else []
    return steps


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_training_resumed_from_last_ckpt_continues_its_wandb_run(tmp_path, monkeypatch, request):
    import wandb

    _offline_wandb(monkeypatch, request)
    _linear_store(tmp_path / "store", n=600)
    args = ["fit", "-c", TINY, *_run_args(tmp_path), "--data.sender_model", "null", "--data.receiver_model", "null"]
    args += ["--data.store_dir", str(tmp_path / "store"), "--trainer.log_every_n_steps", "2"]
    train_main([*args, "--trainer.max_epochs", "1"])
    wandb.teardown()
    train_main([*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    wandb.teardown()
    first, resumed = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    # One W&B run (and one translator-<run id> artifact), not a second run that starts over.
    assert first.name.rsplit("-", 1)[1] == resumed.name.rsplit("-", 1)[1]
    (first_file,), (resumed_file,) = first.glob("run-*.wandb"), resumed.glob("run-*.wandb")
    assert min(_history_steps(resumed_file)) > max(_history_steps(first_file))


class _FakeArtifact:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.roots = files, []

    def download(self, root):
        self.roots.append(root)
        for name, data in self.files.items():
            (Path(root) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(root) / name).write_bytes(data)
        return root


class _FakeRun:
    offline, disabled = False, False

    def __init__(self, files):
        self.used, self.artifact = [], _FakeArtifact(files)

    def use_artifact(self, name):
        self.used.append(name)
        return self.artifact


def test_wandb_refs_are_used_and_downloaded_under_the_root(tmp_path):
    run = _FakeRun({"best-00-9.ckpt": b"ckpt", "exported/config.json": b"{}", "exported/model.safetensors": b""})
    path = resolve_translator_ref("wandb:me/proj/translator-abc:best", run, tmp_path / "out")
    assert run.used == ["me/proj/translator-abc:best"]  # use_artifact: the evaluation's lineage
    assert Path(path) == tmp_path / "out" / "artifacts" / "me-proj-translator-abc-best" / "best-00-9.ckpt"
    assert Path(path).read_bytes() == b"ckpt"
    # Local paths pass through untouched, whatever the run.
    assert resolve_translator_ref("runs/x/best.ckpt", None, tmp_path) == "runs/x/best.ckpt"
    # Without a checkpoint the exported folder is the translator; two checkpoints are ambiguous.
    only_export = _FakeRun({"exported/config.json": b"{}", "exported/model.safetensors": b""})
    assert resolve_translator_ref("wandb:t:v0", only_export, tmp_path / "o2").endswith("exported")
    with pytest.raises(ValueError, match="exactly one translator checkpoint"):
        resolve_translator_ref("wandb:t:v1", _FakeRun({"a.ckpt": b"", "b.ckpt": b""}), tmp_path / "o3")


@pytest.mark.parametrize("mode", ["offline", "disabled", "none"])
def test_wandb_refs_without_an_online_run_fail_with_one_clear_message(tmp_path, mode):
    run = None if mode == "none" else _FakeRun({})
    if run is not None:
        run.offline, run.disabled = mode == "offline", mode == "disabled"
    assert not is_online(run)
    with pytest.raises(ValueError, match="only an online W&B run can download") as err:
        resolve_translator_ref("wandb:me/proj/translator-abc:best", run, tmp_path)
    assert "wandb artifact get me/proj/translator-abc:best --root" in str(err.value)
    assert "local .ckpt path" in str(err.value) and not (tmp_path / "artifacts").exists()


def test_a_real_offline_run_is_refused(tmp_path, monkeypatch, request):
    import wandb

    _offline_wandb(monkeypatch, request)
    run = wandb.init(project="p", dir=str(tmp_path))
    try:
        with pytest.raises(ValueError, match="an offline W&B run"):
            resolve_translator_ref("wandb:p/translator-x:best", run, tmp_path)
    finally:
        run.finish()


def test_runs_of_the_trainer_by_mode():
    class Logger:
        def __init__(self, run):
            self.experiment = run

        def log_table(self, **kwargs):
            pass

    class Trainer:
        loggers = [Logger(_FakeRun({})), Logger(_FakeRun({})), Logger(object())]  # the last: a rank>0 dummy

    Trainer.loggers[1].experiment.disabled = True
    Trainer.loggers[0].experiment.log_artifact = lambda art: None
    Trainer.loggers[1].experiment.log_artifact = lambda art: None
    assert wandb_runs(Trainer) == [Trainer.loggers[0].experiment, Trainer.loggers[1].experiment]
    assert recording_runs(Trainer) == [Trainer.loggers[0].experiment]


def test_a_run_folder_killed_while_storing_its_wandb_run_id_still_resumes(tmp_path, monkeypatch, request):
    import wandb

    from callbacks.wandb_artifacts import RUN_ID_FILE, RunFolderWandbLogger

    _offline_wandb(monkeypatch, request)
    folder, real = tmp_path / "eval-x", {m: getattr(Path, m) for m in ("write_text", "write_bytes")}

    def killed(method):  # the process dies half-way through writing the file
        def write(self, data, *args, **kwargs):
            real[method](self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt

        return write

    for method in real:
        monkeypatch.setattr(Path, method, killed(method))
    with pytest.raises(KeyboardInterrupt):
        RunFolderWandbLogger(project="p", save_dir=str(tmp_path)).start(folder)
    wandb.finish()
    for method, fn in real.items():
        monkeypatch.setattr(Path, method, fn)
    # The resume used to fail on the torn file (a JSONDecodeError naming no file) at every later try.
    run = RunFolderWandbLogger(project="p", save_dir=str(tmp_path)).start(folder)
    assert json.loads((folder / RUN_ID_FILE).read_text()) == {"p": run.id}
    wandb.finish()
    (folder / RUN_ID_FILE).write_text('{"p": "ab')  # damaged by something else: one line naming the file
    with pytest.raises(ValueError, match=f"{folder / RUN_ID_FILE} is not the JSON object .* delete it"):
        RunFolderWandbLogger(project="p", save_dir=str(tmp_path)).start(folder)


def test_the_run_ledger_keeps_what_each_wandb_run_holds_item_by_item(tmp_path):
    from callbacks.wandb_ledger import LEDGER_FILE, RunLedger, value_digest

    ledger, calls = RunLedger(tmp_path, "p/run1"), []
    assert ledger.once("eval/a", value_digest(0.5), lambda: calls.append("a"))
    assert ledger.new({"eval/b": value_digest(1.0)})  # the process dies before it logs b
    # A rerun's ledger holds what was logged, item by item, and nothing for another run (a deleted run id file).
    again = RunLedger(tmp_path, "p/run1")
    assert not again.once("eval/a", value_digest(0.5), lambda: calls.append("a twice"))
    assert again.once("eval/b", value_digest(1.0), lambda: calls.append("b"))
    assert again.once("eval/a", value_digest(0.75), lambda: calls.append("a changed"))
    assert calls == ["a", "b", "a changed"] and RunLedger(tmp_path, "p/run2").items == {}
    assert again.summary() == "W&B run run1 already held 1 of the logged items; logged only the 2 new or changed ones"
    assert value_digest(object()) is None and again.new({"eval/x": None})  # no digest: logged every time
    (tmp_path / LEDGER_FILE).write_text('{"p/run1": {"ite')  # torn by something else: logged again, no error
    assert RunLedger(tmp_path, "p/run1").items == {} and RunLedger().once("k", "d", lambda: calls.append("k"))
