"""Grouped records -> per-condition accuracy, paired comparisons and clustered equivalence tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from activation_transfer.report.clustered import (
    CI_METHOD,
    DEFAULT_PERMUTATIONS,
    P_METHOD,
    question_bootstrap_ci,
    sign_flip_p,
)
from activation_transfer.report.load import ReportInputError, sort_runs
from activation_transfer.report.stats import (
    bootstrap_mean_ci,
    bootstrap_run_means_ci,
    clustered_deltas,
    compare_paired,
    derive_seed,
    run_mean_sd,
)
from activation_transfer.report.tost import degradation_p, tost
from activation_transfer.task.scoring import MAIN_METRIC, METRICS

# The clustered-view bootstrap 90% CI that accompanies TOST (the paper, section 4.4, uses 10,000 resamples).
DEFAULT_TOST_RESAMPLES = 10_000
# The paper's table order: main metric, then legacy contains (its comparison metric), then the strict ones.
_PAPER_ORDER = ("word_boundary_contains", "legacy_contains", "normalized_exact_match", "exact_match")
METRIC_ORDER: tuple[str, ...] = tuple(dict.fromkeys((MAIN_METRIC, *_PAPER_ORDER, *METRICS)))
# Conditions evaluated on a subset of the samples by design: the strict shuffled control drops the samples alone in
# their prompt-length bucket (``ConditionSpec.strict`` in injection/conditions.py, which imports torch; this package
# must not).
SUBSET_CONDITIONS: tuple[str, ...] = ("shuffled_translation_strict_matched",)


def condition_accuracy(groups: Mapping[str, Mapping[str, Mapping[str, Mapping[str, bool]]]]) -> dict[str, dict]:
    """Per condition and metric: each run's accuracy and the mean of those run accuracies.

    The one definition of a condition's accuracy: the report's summary and the evaluation's logged metrics both
    read it, so they agree to the last bit.

    Args:
        groups: ``{condition: {run: {sample_id: {metric: bool}}}}``, e.g. the output of ``load.group_records``.

    Returns:
        ``{condition: {metric: {"mean": float, "per_run": {run: float}}}}`` for every metric of ``scoring.METRICS``,
        runs in seed order (``"deterministic"`` last), conditions in the order of ``groups``.
    """
    out: dict[str, dict] = {}
    for cond, runs in groups.items():
        keys = sort_runs(runs)
        out[cond] = {}
        for m in METRICS:
            per_run = {k: float(np.mean([s[m] for s in runs[k].values()])) for k in keys}
            out[cond][m] = {"mean": run_mean_sd(list(per_run.values()))[0], "per_run": per_run}
    return out


def bytes_per_question(records: Sequence) -> dict[str, float]:
    """Mean ``bytes_sent`` per question of each condition whose records carry it (``load.Record.bytes_sent``): what
    crossed from the sender, beside the accuracy it bought."""
    sent: dict[str, list[float]] = {}
    for r in records:
        if r.bytes_sent is not None:
            sent.setdefault(r.condition, []).append(float(r.bytes_sent))
    return {cond: float(np.mean(values)) for cond, values in sent.items()}


def build_summary(
    groups: Mapping, order: Sequence[str], resamples: int, seed: int, collapsed: Mapping | None = None
) -> dict[str, dict]:
    """Per condition: runs, n, and per metric the run mean, sample SD, per-run values and 95% CIs.

    ``ci_low``/``ci_high`` resample questions (each question's correctness averaged over the runs; ``ci_unit``
    ``"question"``) when every run holds the same questions. Else (e.g. runs of a strict subset that differ) they
    are the pooled CI (``ci_unit`` ``"pooled"``) when the runs are of one size, whose pooled mean is the run mean,
    and each run resampled within itself (``ci_unit`` ``"run"``) when sizes differ, so that the CI is of the mean of
    run means it is printed beside. ``pooled_ci_low``/``pooled_ci_high`` always pool runs x samples as independent
    draws (the paper's way).

    Args:
        groups: Output of ``load.group_records`` (after ``load.collapse_repeated_runs``).
        order: Conditions in report order.
        resamples: Bootstrap resamples for the accuracy CIs.
        seed: Base seed; each CI uses ``derive_seed(seed, "{condition}|accuracy|{metric}")``.
        collapsed: ``{condition: {run: [runs it stands for]}}`` from ``load.collapse_repeated_runs``; a condition
            listed there gets a ``collapsed_runs`` entry.
    """
    accuracy = condition_accuracy({cond: groups[cond] for cond in order})
    out: dict[str, dict] = {}
    for cond in order:
        runs = groups[cond]
        keys = sort_runs(runs)
        sizes = {k: len(runs[k]) for k in keys}
        entry: dict[str, Any] = {"runs": len(keys), "n": min(sizes.values())}
        if len(set(sizes.values())) > 1:
            entry["n_per_run"] = sizes
        if collapsed and cond in collapsed:
            entry["collapsed_runs"] = collapsed[cond]
        # Questions are the units when every run holds the same ones: a question's runs are resampled together.
        shared = set.intersection(*(set(runs[k]) for k in keys))
        by_question = len(shared) == max(sizes.values())
        unit = "question" if by_question else "pooled" if len(set(sizes.values())) == 1 else "run"
        ids = sorted(shared)
        for m in METRICS:
            per_run = accuracy[cond][m]["per_run"]
            pooled = np.array([s[m] for k in keys for s in runs[k].values()], dtype=np.float64)
            ci_seed = derive_seed(seed, f"{cond}|accuracy|{m}")
            plo, phi = bootstrap_mean_ci(pooled, resamples=resamples, confidence=0.95, seed=ci_seed)
            lo, hi = plo, phi
            if unit == "question":
                per_question = np.mean([[runs[k][i][m] for i in ids] for k in keys], axis=0)
                lo, hi = bootstrap_mean_ci(per_question, resamples=resamples, confidence=0.95, seed=ci_seed)
            elif unit == "run":
                scores = [[s[m] for s in runs[k].values()] for k in keys]
                lo, hi = bootstrap_run_means_ci(scores, resamples=resamples, confidence=0.95, seed=ci_seed)
            entry[m] = {
                "mean": accuracy[cond][m]["mean"],
                "sd": run_mean_sd(list(per_run.values()))[1],
                "per_run": per_run,
                "ci_low": lo,
                "ci_high": hi,
                "ci_unit": unit,
                "pooled_ci_low": plo,
                "pooled_ci_high": phi,
                "bootstrap_seed": ci_seed,
            }
        out[cond] = entry
    return out


def _pair_runs(cond: str, cond_runs: Sequence[str], base: str, base_runs: Sequence[str]) -> list[tuple[str, str]]:
    if len(base_runs) == 1:
        return [(c, base_runs[0]) for c in cond_runs]
    if len(cond_runs) == 1:
        return [(cond_runs[0], b) for b in base_runs]
    if set(cond_runs) == set(base_runs):
        return [(r, r) for r in cond_runs]
    raise ReportInputError(
        f"cannot pair the runs of {cond!r} (seeds {list(cond_runs)}) with those of baseline {base!r} "
        f"(seeds {list(base_runs)}): a multi-run baseline needs the same seeds"
    )


def _align(
    groups: Mapping, cond: str, base: str, pairs: Sequence[tuple[str, str]], intersect: bool
) -> tuple[list[str], int]:
    """Sample ids shared by every paired run; without ``intersect`` a difference is an error (but see
    :data:`SUBSET_CONDITIONS`)."""
    id_sets = [set(groups[cond][c]) for c, _ in pairs] + [set(groups[base][b]) for _, b in pairs]
    common = set.intersection(*id_sets)
    if not intersect:
        for c, b in pairs:
            ci, bi = set(groups[cond][c]), set(groups[base][b])
            if ci != bi and not (cond in SUBSET_CONDITIONS and ci < bi):
                only_c, only_b = sorted(ci - bi), sorted(bi - ci)
                raise ReportInputError(
                    f"condition {cond!r} run {c} and baseline {base!r} run {b} differ in sample ids: "
                    f"{len(only_c)} only in the condition {only_c[:3]}, {len(only_b)} only in the baseline "
                    f"{only_b[:3]}; pass --intersect (intersect=True) to compare the common ids"
                )
    if not common:
        raise ReportInputError(f"condition {cond!r} and baseline {base!r} share no sample ids")
    # Dropped = paired observations lost on either side, summed over the paired runs.
    dropped = sum(len(groups[cond][c]) - len(common) + len(groups[base][b]) - len(common) for c, b in pairs)
    return sorted(common), dropped


def _vectors(groups: Mapping, cond: str, run: str, ids: Sequence[str], metric: str) -> np.ndarray:
    samples = groups[cond][run]
    return np.fromiter((samples[i][metric] for i in ids), dtype=bool, count=len(ids))


def build_comparisons(
    groups: Mapping,
    order: Sequence[str],
    baselines: Sequence[str],
    resamples: int,
    margins: Sequence[float],
    seed: int,
    intersect: bool,
    tost_resamples: int = DEFAULT_TOST_RESAMPLES,
    collapsed: Mapping | None = None,
    permutations: int = DEFAULT_PERMUTATIONS,
) -> tuple[list[dict], list[dict], list[str]]:
    """Paired comparisons and clustered TOST for every pair.

    Each comparison's primary figures treat questions as the independent units: ``ci_low``/``ci_high`` is a
    question-clustered bootstrap CI (``clustered.question_bootstrap_ci``, seed ``bootstrap_seed``) and
    ``permutation_p`` a sign-flip permutation test on per-question mean deltas (``permutations`` draws, seed
    ``permutation_seed``). The paper's figures, which pool runs x questions as independent pairs, are kept under
    ``pooled_*`` (``pooled_n_pairs``, ``pooled_ci_low``/``pooled_ci_high``, ``pooled_mcnemar_p``), with the
    gained/lost counts.

    Pairing: a condition's runs are paired with a single-run (deterministic) baseline run by run; a multi-run baseline
    is paired by equal seed (or each of its runs with a single-run condition). Paired runs must hold the same sample
    ids; with ``intersect=True`` only the ids common to all paired runs are kept and the number dropped is reported.
    A condition of :data:`SUBSET_CONDITIONS` is compared on the samples it holds whenever they are a subset of the
    baseline's (a note says how many were dropped); any other difference needs ``intersect``.

    Args:
        groups: Output of ``load.group_records``.
        order: Conditions in report order.
        baselines: Baselines present in ``groups``.
        resamples: Bootstrap resamples of the 95% CIs (question-clustered and pooled).
        margins: TOST margins.
        seed: Base seed; the pooled CI uses ``derive_seed(seed, "{condition}|{baseline}|{metric}")``, the clustered CI
            and the permutation test that label followed by ``|questions`` and ``|sign-flip``.
        intersect: Keep only common sample ids instead of failing on a mismatch.
        tost_resamples: Resamples of the clustered bootstrap 90% CI reported next to TOST.
        collapsed: ``{condition: {run: [runs it stands for]}}`` from ``load.collapse_repeated_runs``; each
            comparison's ``collapsed_runs`` holds the entries of its condition and baseline.
        permutations: Random sign assignments of each permutation test.

    Returns:
        ``(comparisons, equivalence, notes)``.
    """
    comparisons: list[dict] = []
    equivalence: list[dict] = []
    notes: list[str] = []
    for base in baselines:
        base_runs = sort_runs(groups[base])
        for cond in order:
            if cond == base:
                continue
            pairs = _pair_runs(cond, sort_runs(groups[cond]), base, base_runs)
            ids, dropped = _align(groups, cond, base, pairs, intersect)
            if len(ids) < 2:
                # TOST and the degradation test need a standard error: no equivalence rows (a one-question smoke run
                # still gets its report).
                notes.append(f"{cond} vs {base}: 1 common sample: no equivalence (TOST) or degradation test")
            if dropped:
                why = "--intersect dropped" if intersect else "a strict-matched subset by design: dropped"
                notes.append(
                    f"{cond} vs {base}: {why} {dropped} unpaired sample observations "
                    f"({len(ids)} common samples x {len(pairs)} runs kept)"
                )
            for m in METRIC_ORDER:
                c_runs = [_vectors(groups, cond, c, ids, m) for c, _ in pairs]
                b_runs = [_vectors(groups, base, b, ids, m) for _, b in pairs]
                label = f"{cond}|{base}|{m}"
                cmp_ = compare_paired(c_runs, b_runs, resamples=resamples, seed=derive_seed(seed, label))
                clustered = clustered_deltas(c_runs, b_runs)
                q_seed = derive_seed(seed, label + "|questions")
                q_low, q_high = question_bootstrap_ci(c_runs, b_runs, resamples=resamples, seed=q_seed)
                perm_seed = derive_seed(seed, label + "|sign-flip")
                comparisons.append(
                    {
                        "condition": cond,
                        "baseline": base,
                        "metric": m,
                        "runs": cmp_.runs,
                        "n_samples": len(ids),
                        "delta": cmp_.delta,
                        # Primary: questions are the independent units (see ``clustered``).
                        "ci_low": q_low,
                        "ci_high": q_high,
                        "permutation_p": sign_flip_p(clustered, permutations, perm_seed),
                        "gained_per_run": cmp_.gained_per_run,
                        "lost_per_run": cmp_.lost_per_run,
                        "gained": cmp_.gained,
                        "lost": cmp_.lost,
                        # The paper's figures (section 4.4): runs x questions pooled as independent pairs.
                        "pooled_n_pairs": cmp_.n_pairs,
                        "pooled_ci_low": cmp_.ci_low,
                        "pooled_ci_high": cmp_.ci_high,
                        "pooled_mcnemar_p": cmp_.mcnemar_p,
                        "dropped": dropped,
                        "paired_runs": [list(p) for p in pairs],
                        "collapsed_runs": {k: collapsed[k] for k in (cond, base) if collapsed and k in collapsed},
                        "confidence": cmp_.confidence,
                        "resamples": cmp_.resamples,
                        "ci_method": CI_METHOD,
                        "bootstrap_seed": q_seed,
                        "p_method": P_METHOD,
                        "permutations": permutations,
                        "permutation_seed": perm_seed,
                        "pooled_bootstrap_seed": cmp_.bootstrap_seed,
                    }
                )
                if len(ids) < 2:
                    continue
                degr = degradation_p(clustered)
                boot_seed = derive_seed(seed, label + "|clustered")
                blo, bhi = bootstrap_mean_ci(clustered, resamples=tost_resamples, confidence=0.90, seed=boot_seed)
                for margin in margins:
                    t = tost(clustered, margin)
                    equivalence.append(
                        {
                            "condition": cond,
                            "baseline": base,
                            "metric": m,
                            "view": "clustered",
                            "delta": t.delta,
                            "ci90_low": t.ci90_low,
                            "ci90_high": t.ci90_high,
                            "margin": t.margin,
                            "p": t.p,
                            "equivalent": t.equivalent,
                            "p_lower": t.p_lower,
                            "p_upper": t.p_upper,
                            "se": t.se,
                            "n": t.n,
                            "n_differ": t.n_differ,
                            "runs": len(pairs),
                            "degradation_p": degr,
                            "bootstrap_ci90_low": blo,
                            "bootstrap_ci90_high": bhi,
                            "bootstrap_resamples": tost_resamples,
                            "bootstrap_seed": boot_seed,
                        }
                    )
    return comparisons, equivalence, notes
