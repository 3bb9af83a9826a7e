"""Mutation check: do the tests catch a small slip in the scoring, statistics, conditions, hooks, slots, records, store?

    .venv/bin/python bench/mutations.py              # every mutation (a few minutes on 2 cores)
    .venv/bin/python bench/mutations.py --list       # the mutations and the tests that must catch each
    .venv/bin/python bench/mutations.py -k bootstrap # only the mutations whose name contains "bootstrap"

Each entry of :data:`MUTATIONS` is a realistic slip (an index off by one, a mean over padding, a missing rescale, a
swapped sign) plus the tests that must catch it, tried in a temporary copy of the tree (how: :func:`main`). Add a
mutation whenever a bug slipped past the tests: the entry documents which test guards which line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

S = "activation_transfer/report/stats.py"
T = "activation_transfer/report/tost.py"
G = "activation_transfer/report/gap.py"
C = "activation_transfer/injection/conditions.py"
INJ = "activation_transfer/injection/prefill_hook.py"
SRC = "activation_transfer/injection/sources.py"
SL = "activation_transfer/injection/slots.py"
R = "activation_transfer/report/records.py"
SC = "activation_transfer/task/scoring.py"
ST = "datamodules/activation_store.py"
SF = "datamodules/store_format.py"
HK = "activation_transfer/models/hooks.py"
STORE_GPT2 = (
    "tests/datamodules/test_activation_store.py::test_extraction_of_a_learned_position_model_equals_each_document_alone"
)


@dataclass(frozen=True)
class Mutation:
    """One slip: replace ``old`` (exactly once in ``file``) by ``new``; ``tests`` must then fail."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


def _m(name: str, file: str, old: str, new: str, *tests: str) -> Mutation:
    return Mutation(name, file, old, new, tests)


# The canary: breaks the scorer outright. If this one is not caught, the tests did not import the copy.
CANARY = _m(
    "canary-broken-scorer",
    SC,
    "    _check(prediction, gold)\n    return {name: METRIC_FUNCTIONS[name](prediction, gold) for name in METRICS}",
    "    raise RuntimeError('mutation canary')",
    "tests/activation_transfer/task/test_scoring.py",
)

# fmt: off
MUTATIONS: tuple[Mutation, ...] = (
    # ---- statistics: bootstrap, McNemar, TOST, degradation, run SD, gap
    _m("bootstrap-lower-index-plus-one", S,
       "return float(values[int(round(q * (b - 1), 9))]),",
       "return float(values[int(round(q * (b - 1), 9)) + 1]),",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("bootstrap-upper-index-over-B", S,
       "float(values[int(round((1.0 - q) * (b - 1), 9))])",
       "float(values[int(round((1.0 - q) * b, 9))])",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("bootstrap-uniform-over-levels", S,
       "draws = rng.multinomial(n, counts / n, size=resamples)",
       "draws = rng.multinomial(n, np.full(uniq.size, 1.0 / uniq.size), size=resamples)",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("mcnemar-no-continuity-correction", S,
       "chi2 = max(abs(gained - lost) - 1, 0) ** 2 / total",
       "chi2 = abs(gained - lost) ** 2 / total",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("compare-paired-gained-lost-swapped", S,
       "gained, lost = int((pooled > 0).sum()), int((pooled < 0).sum())",
       "lost, gained = int((pooled > 0).sum()), int((pooled < 0).sum())",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("run-sd-population", S,
       "(_stats.stdev(vals) if len(vals) > 1 else None)",
       "(_stats.pstdev(vals) if len(vals) > 1 else None)",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("derive-seed-seven-hex-digits", S,
       'hexdigest()[:8], 16)',
       'hexdigest()[:7], 16)',
       "tests/activation_transfer/report/test_statistics.py"),
    _m("tost-se-population-sd", T,
       "d.std(ddof=1) / math.sqrt(d.size)",
       "d.std(ddof=0) / math.sqrt(d.size)",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("tost-ci-two-sided-z", T,
       "z = float(stats.norm.ppf(1.0 - alpha))",
       "z = float(stats.norm.ppf(1.0 - alpha / 2))",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("tost-p-min-of-tails", T,
       "p = max(p_lower, p_upper)",
       "p = min(p_lower, p_upper)",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("degradation-wrong-tail", T,
       "return _upper_tail(-mean, se)",
       "return _upper_tail(mean, se)",
       "tests/activation_transfer/report/test_statistics.py"),
    _m("gap-divides-by-ceiling", G,
       'row["fraction"] = (row["acc_condition"] - floor) / gap',
       'row["fraction"] = (row["acc_condition"] - floor) / ceiling',
       "tests/activation_transfer/report/test_gap.py"),
    _m("gap-ci-leaves-undefined-resamples-out", G,
       "lo, hi = percentile_ci(ratios, GAP_CONFIDENCE)",
       "lo, hi = percentile_ci(ratios[defined], GAP_CONFIDENCE)",
       "tests/activation_transfer/report/test_gap.py"),
    _m("gap-fraction-on-every-sample", G,
       "if dropped and ids:",
       "if False:",
       "tests/activation_transfer/report/test_gap.py"),
    # ---- conditions
    _m("masked-norm-mean-over-padding", C,
       "return (norms * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)",
       "return (norms * m).sum(dim=1) / m.shape[1]",
       "tests/activation_transfer/injection/test_conditions.py"),
    _m("same-norm-random-unscaled", C,
       '"same_norm_random": ConditionSpec("same_norm_random", "rescaled", SOURCE_RANDOM, alpha=1.0)',
       '"same_norm_random": ConditionSpec("same_norm_random", "replace", SOURCE_RANDOM, alpha=1.0)',
       "tests/activation_transfer/injection/test_conditions.py"),
    _m("rescaled-blend-weights-swapped", C,
       "alpha * c + (1.0 - alpha) * h.float()",
       "alpha * h.float() + (1.0 - alpha) * c",
       "tests/activation_transfer/injection/test_conditions.py"),
    _m("additive-records-unscaled-norm", C,
       "injected = add.norm(dim=-1)",
       "injected = source.float().norm(dim=-1)",
       "tests/activation_transfer/injection/test_conditions.py"),
    _m("injection-writes-pads", C,
       "return torch.where(m[..., None], new.to(h.dtype), h), injected",
       "return new.to(h.dtype), injected",
       "tests/activation_transfer/injection/test_conditions.py"),
    _m("derangement-previous-donor", C,
       "donors[sid] = ids[(k + 1) % len(ids)]",
       "donors[sid] = ids[(k - 1) % len(ids)]",
       "tests/activation_transfer/injection/test_conditions.py"),
    # ---- hooks, injection, sources
    _m("capture-ignores-left-padding-positions", SRC,
       "return capture_hidden(model, path, ids, mask, position_ids=position_ids(mask))",
       "return capture_hidden(model, path, ids, mask)",
       "tests/activation_transfer/injection/test_injection.py"),
    _m("position-ids-off-by-one", SRC,
       "pos = mask.long().cumsum(-1) - 1",
       "pos = mask.long().cumsum(-1)",
       "tests/activation_transfer/injection/test_injection.py"),
    _m("block-hook-drops-the-rewrite", HK,
       "return None if new is None else with_hidden(output, new)",
       "return None",
       "tests/activation_transfer/injection/test_injection.py"),
    _m("receiver-norm-over-padding", INJ,
       "self.receiver_norm_mean = masked_norm_mean(h, mask).cpu()",
       "self.receiver_norm_mean = h.float().norm(dim=-1).mean(dim=1).cpu()",
       "tests/activation_transfer/injection/test_injection.py"),
    _m("injection-hook-fires-on-decoding-steps", INJ,
       "        return self.calls > 1\n",
       "        return self.calls > 2\n",
       "tests/activation_transfer/injection/test_injection.py"),
    _m("left-grid-left-aligned", SRC,
       "grid[i, width - len(r) :] = r.to(device=device, dtype=dtype)",
       "grid[i, : len(r)] = r.to(device=device, dtype=dtype)",
       "tests/activation_transfer/injection/test_injection.py"),
    # ---- slots
    _m("slots-last-takes-first", SL,
       "return states[-self.k :]",
       "return states[: self.k]",
       "tests/activation_transfer/injection/test_slots.py"),
    _m("slots-pooled-sum", SL,
       "return states.mean(dim=0, keepdim=True).expand(self.k, -1)",
       "return states.sum(dim=0, keepdim=True).expand(self.k, -1)",
       "tests/activation_transfer/injection/test_slots.py"),
    _m("slot-mask-shifted", SL,
       "slot_mask[i, start : start + int(k)] = 1",
       "slot_mask[i, start + 1 : start + int(k) + 1] = 1",
       "tests/activation_transfer/injection/test_slots.py"),
    # ---- records
    _m("record-scored-gold-vs-prediction", R,
       '"metrics": score(prediction, sample.answer),',
       '"metrics": score(sample.answer, prediction),',
       "tests/activation_transfer/report/test_records.py"),
    _m("records-unsorted", R,
       'ordered = sorted(records, key=lambda r: r["sample_id"])',
       "ordered = list(records)",
       "tests/activation_transfer/report/test_records.py"),
    _m("torn-line-tolerated-anywhere", R,
       "if tolerate_torn_tail and i == len(lines):",
       "if tolerate_torn_tail:",
       "tests/activation_transfer/report/test_records.py"),
    # ---- scoring
    _m("word-boundary-left-lookbehind-dropped", SC,
       'pattern = r"(?<!\\w)" + re.escape(normalize_answer(gold)) + r"(?!\\w)"',
       'pattern = re.escape(normalize_answer(gold)) + r"(?!\\w)"',
       "tests/activation_transfer/task/test_scoring.py"),
    _m("legacy-contains-case-sensitive", SC,
       "return gold.strip().lower() in prediction.lower()",
       "return gold.strip().lower() in prediction",
       "tests/activation_transfer/task/test_scoring.py"),
    _m("first-answer-span-last-line", SC,
       'first_line = lines[0].strip().lower() if lines else ""',
       'first_line = lines[-1].strip().lower() if lines else ""',
       "tests/activation_transfer/task/test_scoring.py"),
    # ---- activation store
    _m("store-keeps-padding-rows", ST,
       "keep = mask.bool()",
       "keep = torch.ones_like(mask, dtype=torch.bool)",
       "tests/datamodules/test_activation_store.py::test_extraction_pairs_tokens_exactly"),
    _m("store-extracts-left-padded", ST,
       'tok.padding_side = "right"  # real tokens keep positions',
       'tok.padding_side = "left"  # real tokens keep positions',
       STORE_GPT2),
    _m("store-read-rows-cross-shard-skips-a-row", SF,
       "starts[i] = cut\n",
       "starts[i] = cut + 1\n",
       STORE_GPT2),
)
# fmt: on


def check_snippets(mutations) -> list[str]:
    """Every snippet occurs exactly once in its file; returns the problems (empty when all are fine)."""
    problems = []
    names = [m.name for m in mutations]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"mutation name {name!r} is used twice")
    for m in mutations:
        path = ROOT / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        n = path.read_text(encoding="utf-8").count(m.old)
        if n != 1:
            where = "not found" if n == 0 else f"found {n} times"
            problems.append(f"{m.name}: snippet {m.old!r} {where} in {m.file} (update the snippet to the new code)")
        if m.old == m.new:
            problems.append(f"{m.name}: the replacement equals the snippet")
        if not m.tests:
            problems.append(f"{m.name}: names no test")
    return problems


def copy_tree(dest: Path) -> Path:
    """Copy the files git knows (tracked and untracked-not-ignored) into ``dest/<name>``; link ``../shared``."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    tree = dest / ROOT.name
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / rel)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (dest / "shared").symlink_to(shared, target_is_directory=True)
    return tree


def _env(tree: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(tree),
        PYTHONDONTWRITEBYTECODE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_tests(tree: Path, tests, timeout: float) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--no-header", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = -1, f"timed out after {timeout:.0f} s\n{err.stdout or ''}"
    return rc, time.perf_counter() - t0, text


def check_imports_copy(tree: Path) -> str | None:
    code = "import activation_transfer.task.scoring as m, datamodules.store_format as d; print(m.__file__, d.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True)
    files = proc.stdout.split()
    inside = all(Path(f).resolve().is_relative_to(tree.resolve()) for f in files)
    if proc.returncode != 0 or len(files) != 2 or not inside:
        return f"the copy's Python imports {files or proc.stderr.strip()[-300:]}, not the copy under {tree}"
    return None


def apply(tree: Path, m: Mutation) -> str:
    """Patch the copy; returns the original text (to restore)."""
    path = tree / m.file
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(m.old, m.new, 1), encoding="utf-8")
    return text


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    """Run the mutations; exit 0 if all are caught, 1 if any survived, 2 on a harness error.

    Each mutation is ``(file, exact source snippet, replacement)`` plus the test files or node ids that must catch
    it. The script

    1. checks that every snippet occurs exactly once in its file (a refactor that moves or rewrites the code makes
       the script fail right there, naming the mutation: update the snippet, never drop the mutation silently);
    2. copies the tracked tree once into a temporary folder (the working tree is never edited) and links
       ``../shared`` beside it, so the tests that read the shared data find it;
    3. checks that Python run in the copy imports the copy's modules, not the editable install's, and that a
       deliberately broken canary mutation is caught (otherwise every result below would be meaningless);
    4. per mutation: patches the copy, runs ``python -m pytest -x -q <tests>`` there (``PYTHONPATH`` and the working
       folder are the copy, bytecode writing is off so no stale ``.pyc`` can hide a patch), restores the file;
    5. prints caught/survived per mutation and a summary, and exits 1 if any mutation survived (2 on a harness
       error: a snippet not found, the unmutated tests failing, a test id that does not exist).

    A mutation counts as caught when pytest exits 1 (a test failed); any other non-zero exit (a collection error, an
    unknown node id, no tests collected) is a harness error, not a catch. ``--baseline`` first runs every named test
    on the unmutated copy (they must pass).

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-k", dest="select", default="", help="only the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--baseline", action="store_true", help="first run every named test on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (default 600)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output tail of every run")
    args = parser.parse_args(argv)

    problems = check_snippets((CANARY, *MUTATIONS))
    if problems:
        print("mutation snippets out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if args.select in m.name]
    if not chosen:
        print(f"no mutation name contains {args.select!r}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.file}\n{'':45s} caught by {' '.join(m.tests)}")
        return 0

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        tree = copy_tree(Path(tmp))
        error = check_imports_copy(tree)
        if error:
            print(f"harness error: {error}", file=sys.stderr)
            return 2
        if args.baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            rc, secs, text = run_tests(tree, tests, args.timeout * 3)
            print(f"baseline (unmutated, {len(tests)} test selections): rc {rc}, {secs:.1f} s", flush=True)
            if rc != 0:
                print(f"harness error: the unmutated tests do not pass\n{_tail(text)}", file=sys.stderr)
                return 2
        results: list[tuple[Mutation, str]] = []
        for m in (CANARY, *chosen):
            original = apply(tree, m)
            try:
                rc, secs, text = run_tests(tree, m.tests, args.timeout)
            finally:
                (tree / m.file).write_text(original, encoding="utf-8")
            verdict = {0: "SURVIVED", 1: "caught"}.get(rc, "ERROR")
            print(f"{verdict:8s} {secs:6.1f} s  {m.name}  ({m.file} -> {' '.join(m.tests)})", flush=True)
            if verdict != "caught" or args.verbose:
                print(_tail(text), flush=True)
            if m is CANARY:
                if verdict != "caught":
                    print(
                        "harness error: the canary mutation was not caught, so the tests do not run the copy's "
                        "code; no result below would mean anything",
                        file=sys.stderr,
                    )
                    return 2
                continue
            results.append((m, verdict))
    wall = time.perf_counter() - t_start
    caught = sum(v == "caught" for _, v in results)
    survived = [m.name for m, v in results if v == "SURVIVED"]
    errors = [m.name for m, v in results if v == "ERROR"]
    print(
        f"\n{caught}/{len(results)} mutations caught in {wall:.0f} s wall"
        + (f"; survived: {', '.join(survived)}" if survived else "")
        + (f"; harness errors (pytest exit not 0/1): {', '.join(errors)}" if errors else "")
    )
    if errors:
        return 2
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
