"""Every ```python block of README.md and docs/*.md runs as written and prints what the text says it prints.

The blocks of a document run in order in one namespace, as a reader would run them, from a folder that holds what
``make demo`` leaves under ``runs/demo/`` (built here at small scale through the demo's own functions): the
organisms are the reduced ones of tests/test_end_to_end.py (trained once per test session into the session's cache,
shared with that module), standing in for ``organism:sender``/``organism:receiver``; one translator is trained the
demo's way with a smaller corpus; the evaluation runs ``no_inject`` and ``replace`` on the first held-out questions.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
from test_end_to_end import REDUCED

from activation_transfer.models import frozen_lm
from activation_transfer.task.generator import EVAL_SEED, generate_samples
from activation_transfer.task.scoring import MAIN_METRIC

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The documents whose python blocks a test below runs; any other document with a python block fails the first test.
TESTED = {"docs/using_translators.md"}
NUM_EVAL = 3
# A smaller corpus and run than configs/train/demo.yaml: seconds, and still a translator between the organisms.
SMALL_TRAINING = ["--data.corpus.builtin_samples", "400", "--trainer.max_epochs", "2", "--model.warmup_steps", "10"]


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```$", path.read_text(), flags=re.S | re.M)


def run_blocks(path: Path) -> list[str]:
    """Execute a document's python blocks in one namespace; each block's printed output, in order."""
    namespace: dict = {"__name__": "__doc_blocks__"}
    outputs = []
    for i, block in enumerate(python_blocks(path)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"{path.name}[python block {i}]", "exec"), namespace)
        outputs.append(out.getvalue())
    return outputs


def test_every_python_block_is_in_a_tested_document() -> None:
    with_blocks = {str(p.relative_to(ROOT)) for p in DOCS if python_blocks(p)}
    assert with_blocks <= TESTED, f"python blocks in {sorted(with_blocks - TESTED)} are not run by tests/test_docs.py"
    assert "docs/using_translators.md" in with_blocks


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, cache_dir):
    """A folder holding ``runs/demo/{translator,eval}`` as ``make demo`` writes them, made by the demo's functions at
    small scale, with ``organism:`` names resolving to the reduced organisms; the current folder while in use."""
    from cli import demo, organisms
    from cli.lightning_cli import eval_main

    work = tmp_path_factory.mktemp("docs")
    folders = {}
    real_ensure = organisms.ensure_organism
    with pytest.MonkeyPatch.context() as mp:
        # A module fixture runs before conftest's function-scoped isolation: set what it would, here.
        # LightningCLI warns (an error here) when sys.argv holds pytest's own arguments besides `args`.
        for var, value in {
            "ACTIVATION_TRANSFER_CACHE": str(cache_dir),
            "WANDB_MODE": "disabled",
            "WANDB_DIR": str(work / "_wandb"),
        }.items():
            mp.setenv(var, value)
        mp.setattr(sys, "argv", ["docs"])
        for role, overrides in REDUCED.items():
            folders[role] = real_ensure(str(organisms.organism_config(role)), str(cache_dir), overrides.split())
        # `organism:<role>` stands for the reduced organism: in the CLIs' explicit training step and in name lookups.
        mp.setattr(
            organisms, "ensure_organism", lambda config, cache_dir=None, overrides=None: folders[Path(config).stem]
        )
        mp.setitem(frozen_lm._RESOLVERS, organisms.ORGANISM_PREFIX, lambda role, cache_dir=None: str(folders[role]))
        mp.chdir(work)
        out = Path("runs/demo")
        ckpt = demo._translator(out, folders, 42, extra=SMALL_TRAINING)
        conditions = ["--model.conditions", '["no_inject", "replace"]', "--data.batch_size", "1"]
        run_dir = eval_main(demo.eval_args(out, [ckpt], [42], NUM_EVAL) + conditions).model.run_dir
        yield {"ckpt": ckpt, "run_dir": run_dir}


def _records(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted((run_dir / "records").glob("*.jsonl"))
        for line in p.read_text().split("\n")
        if line
    ]


def test_using_translators_runs_and_prints_what_it_says(demo_folder) -> None:
    ckpt, run_dir = demo_folder["ckpt"], demo_folder["run_dir"]
    loaded, exported, again, injected, frame = run_blocks(ROOT / "docs" / "using_translators.md")

    # Load: the run's seed-42 translator, found through meta.json, and the models it was trained on.
    assert loaded.split() == [str(ckpt), "organism:sender", "->", "organism:receiver"]
    # The exported folder of the training run translates exactly as the checkpoint.
    (best,) = (ckpt.parent / "checkpoints").glob("best-*.ckpt")
    assert exported.split() == [best.stem, "True"]
    # Export by hand: the files the text lists, written where the block says.
    assert again.strip() == "['README.md', 'config.json', 'model.safetensors']"
    assert sorted(p.name for p in Path("exported/demo-translator-seed42").iterdir()) == ast.literal_eval(again)

    # Inject once: the evaluation's own answers to the same question (no_inject, and replace with seed 42's translator).
    sample = generate_samples(1, EVAL_SEED)[0]
    recorded = {r["condition"]: r["prediction"] for r in _records(run_dir) if r["sample_id"] == sample.sample_id}
    no_inject, replace = recorded["no_inject"], recorded["replace"]
    assert (
        injected.strip() == f"{sample.sample_id} gold: {sample.answer!r} no_inject: {no_inject!r} replace: {replace!r}"
    )

    # pandas: the accuracy of each condition, computed here from the record files themselves.
    by_condition: dict[str, list[bool]] = {}
    for r in _records(run_dir):
        by_condition.setdefault(r["condition"], []).append(bool(r["metrics"][MAIN_METRIC]))
    assert ast.literal_eval(frame) == {c: round(sum(v) / len(v), 3) for c, v in by_condition.items()}
    assert sum(map(len, by_condition.values())) == 2 * NUM_EVAL


def test_the_pythia_walkthrough_reports_the_folder_it_evaluated_into() -> None:
    # Step 3 reads runs/pythia/eval/eval-<hash>: step 2 must write there, not into its config's own default root.
    import yaml

    text = (ROOT / "docs" / "usage.md").read_text()
    block = text.split("## Real Pythia", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").splitlines()
    (train,) = [c.strip() for c in commands if c.strip().startswith("python train.py")]
    (evaluate,) = [c.strip() for c in commands if c.strip().startswith("python evaluate.py")]
    (report,) = [c.strip() for c in commands if c.strip().startswith("python report.py")]
    root = re.search(r"--trainer\.default_root_dir (\S+)", evaluate)
    config = yaml.safe_load((ROOT / re.search(r"-c (\S+)", evaluate)[1]).read_text())
    root = root[1] if root else config["trainer"]["default_root_dir"]
    assert report.split()[2] == f"{root}/eval-<hash>"
    # ...and step 2 evaluates the checkpoints step 1 wrote, one per seed.
    trained = re.search(r"--trainer\.default_root_dir (\S+)", train)[1]
    for seed in (42, 123, 456):
        assert trained.replace("$seed", str(seed)) + "/checkpoints/best-<e>-<s>.ckpt" in evaluate
