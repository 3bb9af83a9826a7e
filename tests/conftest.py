"""Test isolation: nothing writes into the repository or the home folder, no network, W&B disabled."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib
import pytest
from hypothesis import settings

matplotlib.use("Agg")
# Deterministic property tests (the same examples on every run, CI included) and no .hypothesis/ folder written
# into the repository.
settings.register_profile("project", derandomize=True, database=None)
settings.load_profile("project")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MULTIHOP_DIR = SHARED / "data" / "multihop"
PAPER_RESULTS_DIR = SHARED / "reference" / "paper_results"

# Test modules import helpers and fixtures from one another by module name (``from test_evaluate_cli import small``);
# with the tests in folders, every folder is on the path, as pytest's default import mode puts each test's own folder.
for _folder in sorted({p.parent for p in Path(__file__).parent.rglob("test_*.py")}):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# Set before anything imports transformers or Lightning (they read these at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Tests that read files made on another machine (stored tensors, locked answers, the paper's outputs). `make test`
# reruns them under another CPU's kernels (Makefile: OTHER_CPU), so an exact float comparison with such a file fails
# here, not on a newcomer's machine. A test module that reads tests/fixtures sets ``pytestmark`` itself
# (tests/test_markers.py checks it); a test that takes one of these fixtures is marked automatically.
CROSS_MACHINE_FIXTURES = ("paper_results_dir",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(CROSS_MACHINE_FIXTURES):
            item.add_marker(pytest.mark.cross_machine)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One project cache per test session (the offline tokenizer is trained once)."""
    return tmp_path_factory.mktemp("at_cache")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path, cache_dir):
    monkeypatch.setenv("ACTIVATION_TRANSFER_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "MPLCONFIGDIR"):
        d = tmp_path / "_env" / var.lower()
        d.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "_env" / "inductor"))
    yield
    # A WandbLogger in disabled mode leaves its run open; the next test's logger would reuse it (and warn).
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@pytest.fixture
def multihop_dir() -> Path:
    if not (MULTIHOP_DIR / "clean_eval.jsonl").exists():
        pytest.skip("../shared/data/multihop is absent")
    return MULTIHOP_DIR


@pytest.fixture
def paper_results_dir() -> Path:
    if not PAPER_RESULTS_DIR.is_dir():
        pytest.skip("../shared/reference/paper_results is absent")
    return PAPER_RESULTS_DIR


@pytest.fixture
def fake_demo(tmp_path, monkeypatch):
    """``make demo`` with its training faked: two organism folders, ``train_main`` writing a checkpoint that holds its
    own command line, ``eval_main`` delegating to ``fake_demo.evaluate(args)`` (set by the test). Returns a namespace
    with ``trained``/``evaluated`` (the command lines, in order), ``organisms`` and ``evaluate``."""
    from types import SimpleNamespace

    import cli.lightning_cli as cli
    from cli import demo

    state = SimpleNamespace(trained=[], evaluated=[], evaluate=None, organisms={})

    def fake_train(args):
        state.trained.append(args)
        best = Path(args[args.index("--trainer.default_root_dir") + 1]) / "checkpoints" / "best.ckpt"
        best.parent.mkdir(parents=True)
        best.write_text(" ".join(args))
        trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path=str(best)), callback_metrics={})
        return SimpleNamespace(trainer=trainer)

    def fake_eval(args):
        state.evaluated.append(args)
        return state.evaluate(args)

    for role in ("sender", "receiver"):
        state.organisms[role] = tmp_path / role
        state.organisms[role].mkdir()
        (state.organisms[role] / "model.safetensors").write_text(role)
    monkeypatch.setattr(demo, "_organisms", lambda cache_dir: state.organisms)
    # Its own cache: the demo keeps translators there by content key, and the fake organisms' content is the same in
    # every test.
    monkeypatch.setenv("ACTIVATION_TRANSFER_CACHE", str(tmp_path / "_demo_cache"))
    monkeypatch.setattr(cli, "train_main", fake_train)
    monkeypatch.setattr(cli, "eval_main", fake_eval)
    monkeypatch.setattr(sys, "argv", ["demo"])
    return state


@pytest.fixture
def bench_script():
    """Loads a script of ``bench/`` (not a package) as a module: ``bench_script("gpu_check").main([...])``."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
