"""``InjectionEvalModule``: an injection evaluation (paper arXiv 2606.03280, section 4.2) as Lightning glue.

What the receiver reads and what each condition writes belong to the protocol (``model.protocol``); this module
loads the models and translators, plans what is left in the run folder (resume), runs each pending condition x seed
batch by batch, gathers the ranks and writes records, ``meta.json``, metrics and the report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from activation_transfer.errors import UsageError
from activation_transfer.injection import conditions as cnd
from activation_transfer.injection.answering import as_pending, resolve
from activation_transfer.injection.batch_size import checked_rows, generate_rows
from activation_transfer.injection.eval_plan import EvalPlan, checkpoint_list
from activation_transfer.injection.protocols import protocol_for
from activation_transfer.injection.slots import SlotSpec, check_slots_fit
from activation_transfer.io import atomic_write, fingerprint
from activation_transfer.models.frozen_lm import ModelRef, as_ref, load_ref
from activation_transfer.models.generation import GenerationSettings
from activation_transfer.report import checked_resamples, logged_metrics, run_report
from activation_transfer.report import records as rio
from activation_transfer.run_lock import RunFolderLock
from activation_transfer.translators.loading import load_translator_for
from callbacks.eval_logging import grouped_metrics
from callbacks.wandb_artifacts import local_translator

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (42, 123, 456)
RUNNER_VERSION = 3
PAPER_GENERATION = GenerationSettings()
DEFAULT_SLOTS = SlotSpec()  # frozen, so the shared default instance is safe


class InjectionEvalModule(pl.LightningModule):
    """Evaluate cross-model activation injection on multi-hop QA (``test`` only).

    The run folder is ``<trainer.default_root_dir>/<run_name>``.

    Args:
        sender: The frozen sender model and the block whose output is translated.
        receiver: The frozen receiver model and the block whose output is rewritten.
        translator_ckpt: Translator checkpoint from ``train.py``, or a list with one checkpoint per seed (same
            order as ``seeds``). Needed only when a translator condition is selected.
        conditions: Condition names (default, or null: the protocol's own list; the paper's eleven, section 4.2,
            every split condition, or every KV condition).
        seeds: Run seeds of the non-deterministic conditions (default, or null: the paper's 42, 123, 456).
        scale: ``additive``'s injection scale.
        alpha: ``best_alpha``'s blend weight (``scale_corrected`` uses 1).
        generation: Decoding of every answer and of the relay (default: the paper's greedy settings).
        random_draw: ``same_norm_random``'s vectors: ``sequential`` (the paper's: one generator seeded by the run
            seed, drawn sample after sample in dataset order) or ``per_sample`` (one generator per sample, seeded by
            the run seed and its id, so a sample's vectors do not depend on the rest of the dataset).
        allow_mismatch: Accept a translator trained on other model names or layers (a warning instead of an error).
            Hidden sizes must always match.
        run_name: Run folder name; default ``eval-<hash>`` of the answer-determining config, so rerunning the same
            command resumes the same folder.
        report: Write the report of the finished records into ``<run_dir>/report``.
        report_resamples: Bootstrap resamples of the report.
        cache_dir: Project cache (offline tokenizer); default ``$ACTIVATION_TRANSFER_CACHE``.
        protocol: ``paper`` (both read the prompt), ``split`` (the receiver reads the question after slots) or ``kv``.
        functional_translator_ckpt: The functional translator (trained through the receiver), as ``translator_ckpt``:
            a .ckpt or exported folder, one or one per seed; read by the ``*_functional`` conditions.
        slots: The split protocol's slot scheme (``SlotSpec``: scheme, k, token_id, max_context_tokens).
        sender_site: Split and KV protocols: sender read at block or embeddings.
        kv_layers: KV protocol: receiver layers given a prefix (null: all; negative: from the end).
        stack_runs: Answer all pending runs of a sub-batch with one ``generate`` per prompt width, each row block
            with its own prefill write (False: one ``generate`` per run). The records are identical either way.
        max_generate_rows: Most rows in one stacked ``generate`` (a run is never split); ``auto``: on CUDA half the
            largest power of two that fits, probed once at test start; on CPU 2 x ``data.batch_size``.

    Attributes:
        run_dir: The run folder (set at test start).
        samples_by_id: The data module's samples by id (set at test start).
        results: Run key (``<condition>__seed<seed>``) -> its records, every run of the config (set at test end).
        summary_metrics: ``eval/<metric>/condition=<name>`` -> accuracy (set at test end; logged grouped by condition
            as ``eval/<name>/<metric>``).
        report_result: What ``run_report`` returned, or None (no report, or no baseline condition).
        resolved_config: The CLI's resolved config, written as ``config.yaml`` into the run folder (set by the CLI).
    """

    def __init__(
        self,
        sender: ModelRef,
        receiver: ModelRef,
        translator_ckpt: str | list[str] | None = None,
        conditions: Sequence[str] | None = cnd.CONDITION_NAMES,
        seeds: Sequence[int] | None = DEFAULT_SEEDS,
        scale: float = 0.01,
        alpha: float = 0.3,
        generation: GenerationSettings = PAPER_GENERATION,
        random_draw: str = "sequential",
        allow_mismatch: bool = False,
        run_name: str | None = None,
        report: bool = True,
        report_resamples: int = 5000,
        cache_dir: str | None = None,
        protocol: str = "paper",
        functional_translator_ckpt: str | list[str] | None = None,
        slots: SlotSpec = DEFAULT_SLOTS,
        sender_site: Literal["block", "embeddings"] = "block",
        kv_layers: list[int] | None = None,
        stack_runs: bool = True,
        max_generate_rows: int | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        self.sender_ref, self.receiver_ref = as_ref(sender), as_ref(receiver)
        self.slots = SlotSpec(**slots) if isinstance(slots, dict) else slots
        # What differs between protocols: ask it (each reads only its own options).
        self.protocol = protocol_for(protocol, slots=self.slots, sender_site=sender_site, layers=kv_layers)
        if getattr(self.protocol, "sender_site", "block") != sender_site:  # a protocol without the option ignored it
            raise UsageError(f"model.sender_site {sender_site} is not an option of the {protocol} protocol")
        names = tuple(conditions or ())
        if names in ((), cnd.CONDITION_NAMES):  # the default list means the protocol's default
            names = self.protocol.default_conditions
        self.specs = self.protocol.conditions(names, scale, alpha)
        self.seeds = [int(s) for s in (DEFAULT_SEEDS if seeds is None else seeds)]
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"model.seeds has duplicates: {self.seeds}")
        if not self.seeds and any(not s.deterministic for s in self.specs):
            raise UsageError("model.seeds is empty but non-deterministic conditions are selected")
        self.translator_ckpts = checkpoint_list(translator_ckpt, self.seeds, self.specs, "aligned", "translator_ckpt")
        self.functional_ckpts = checkpoint_list(
            functional_translator_ckpt, self.seeds, self.specs, "functional", "functional_translator_ckpt"
        )
        if random_draw not in cnd.RANDOM_DRAWS:
            raise UsageError(f"model.random_draw must be one of {', '.join(cnd.RANDOM_DRAWS)}, got {random_draw!r}")
        self.random_draw = random_draw
        # A copy (the default instance is shared); a dict is what hparams hold, so they rebuild the module.
        gen = generation
        self.generation = GenerationSettings(**gen) if isinstance(gen, dict) else dataclasses.replace(gen)
        self.allow_mismatch, self.run_name, self.cache_dir = allow_mismatch, run_name, cache_dir
        self.do_report, self.report_resamples = report, checked_resamples(report_resamples, "model.report_resamples")
        self.stack_runs, self.max_generate_rows = stack_runs, checked_rows(max_generate_rows)
        self.generate_rows: int | None = None  # rows per stacked generate (on_test_start), None: one per run
        self.save_hyperparameters(ignore=["sender", "receiver", "generation", "slots"], logger=False)  # see save_config
        # Plain dicts only, so hparams stay loadable with weights_only.
        self.hparams.update(
            sender=dataclasses.asdict(self.sender_ref),
            receiver=dataclasses.asdict(self.receiver_ref),
            generation=self.generation.to_dict(),
            slots=self.slots.to_dict(),
        )
        self.resolved_config: str | None = None
        # setup: the frozen models (registered as submodules so Lightning moves them) and the translators.
        self.sender = self.receiver = self.sender_model = self.receiver_model = None  # LoadedModel x2, nn.Module x2
        self.translators, self.functional_translators = torch.nn.ModuleList(), torch.nn.ModuleList()
        self.translator_info: list[dict] = []  # path and sha256 of each translator checkpoint
        self.functional_info: list[dict] = []
        # on_test_start: what this invocation computes.
        self.run_dir: Path | None = None
        self.samples_by_id, self.data_info = {}, {}
        self.run_identity: dict = {}  # everything that determines the answers; its hash is the fingerprint
        self.fingerprint: str | None = None
        self.plan: EvalPlan | None = None
        self.truncated: dict = {}  # what the protocol's inputs lose to truncation (meta.json)
        self.new_records: dict[str, list[dict]] = {}  # run key -> records generated by this rank
        self.timings: dict[str, float] = {}  # run key -> generation seconds on this rank
        self.started_at: float | None = None
        # on_test_epoch_end: results for callbacks and the CLI.
        self.results: dict[str, list[dict]] = {}
        self.summary_metrics: dict[str, float] = {}
        self.timing_by_run: dict[str, float] = {}
        self.report_result = None
        self.run_lock: RunFolderLock | None = None

    def teardown(self, stage: str) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    # ------------------------------------------------------------------------------------------------ loading

    def setup(self, stage: str) -> None:
        if self.sender is not None:
            return
        self.sender = load_ref(self.sender_ref, cache_dir=self.cache_dir)
        self.receiver = load_ref(self.receiver_ref, cache_dir=self.cache_dir)
        self.sender_model, self.receiver_model = self.sender.model, self.receiver.model
        if self.protocol.translator_slots() is not None:  # the slots are read by this protocol
            check_slots_fit(self.slots, self.receiver)
        for kind, refs, modules, info in (
            ("aligned", self.translator_ckpts, self.translators, self.translator_info),
            ("functional", self.functional_ckpts, self.functional_translators, self.functional_info),
        ):
            for ref in refs if any(s.translator_kind == kind for s in self.specs) else ():
                translator, entry = self._load_translator(ref, kind)
                modules.append(translator)
                info.append(entry)

    def _load_translator(self, ref: str, kind: str) -> tuple[torch.nn.Module, dict]:
        """One frozen translator of ``kind``, checked against the models and the protocol's slots; path and hash."""
        path = local_translator(ref, self.trainer)  # a .ckpt, an exported folder, or wandb:<...:alias>
        identities = self.sender.identity(), self.receiver.identity()
        translator = load_translator_for(
            path,
            *identities,
            self.allow_mismatch,
            self.protocol.translator_slots(),
            self.protocol.translator_kind(kind),
        )
        return translator, {"path": str(path), "ref": ref, "sha256": translator.sha256}

    # ------------------------------------------------------------------------------------------------ planning

    def config_fingerprint(self, samples) -> dict:
        """Everything that determines the answers (not the condition/seed lists: adding one reuses the folder)."""
        per_seed = max(len(self.translator_info), len(self.functional_info)) > 1
        return {
            "sender": self.sender.identity(),
            "receiver": self.receiver.identity(),
            "translators": [t["sha256"] for t in self.translator_info],
            "scale": self.hparams.scale,
            "alpha": self.hparams.alpha,
            "generation": self.generation.to_dict(),
            "random_draw": self.random_draw,
            # Bumped when the same config gives other answers or records (docs/NOTES.md, "Runner versions").
            "runner_version": RUNNER_VERSION,
            # The numerics: another precision, device type or library version gives other answers.
            "precision": str(self.trainer.precision),
            "device_type": self.device.type,
            "libraries": {k: v for k, v in rio.library_versions().items() if k in ("torch", "transformers")},
            "samples": fingerprint([(s.sample_id, s.context, s.question, s.answer, s.hops) for s in samples]),
            # Only when used, so a paper run's fingerprint (and folder) stays what it was.
            **({"functional_translators": [t["sha256"] for t in self.functional_info]} if self.functional_info else {}),
            # Which seed reads which translator (one per seed): reordered seeds resumed here ran another's translator.
            **({"translator_seeds": self.seeds} if per_seed else {}),
            **self.protocol.identity(),
        }

    def on_test_start(self) -> None:
        self.started_at = time.time()
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "samples"):
            raise ValueError("InjectionEvalModule needs a MultiHopQADataModule (trainer.test(..., datamodule=dm))")
        samples = list(dm.samples)
        self.samples_by_id = {s.sample_id: s for s in samples}
        self.data_info = dict(getattr(dm, "source_info", {}) or {})
        self.run_identity = self.config_fingerprint(samples)
        self.fingerprint = fingerprint(self.run_identity)
        self.run_dir = Path(self.trainer.default_root_dir) / (self.run_name or rio.default_run_name(self.fingerprint))
        try:
            rio.bind_run_dir(self.run_dir, self.run_identity, self.fingerprint, write=self.trainer.is_global_zero)
        except ValueError as err:  # another configuration's folder: bad input (--model.run_name), not a bug
            raise UsageError(str(err)) from err
        if self.trainer.is_global_zero:
            (self.run_dir / "records").mkdir(parents=True, exist_ok=True)
            self.run_lock = RunFolderLock(self.run_dir).acquire()  # released in teardown
            print(f"run folder: {self.run_dir}", flush=True)
        self.trainer.strategy.barrier()  # no rank writes a record before the folder is bound
        self.timings, batch_size = {}, int(getattr(dm, "batch_size", 16) or 16)
        buckets = self.protocol.start(self.sender, self.receiver, self.generation, samples, self.random_draw)
        partials = lambda c, seed: rio.read_partial(self.run_dir, c, seed)  # noqa: E731 (read lazily, per pending run)
        self.plan = EvalPlan.build(
            self.specs,
            self.seeds,
            len(self.translator_ckpts),
            buckets,
            rio.finished_keys(self.run_dir),
            partials,
            len(self.functional_ckpts),
        )
        self.new_records = {k: [] for k in self.plan.todo}
        self.truncated, warning = self.protocol.check_inputs(self.plan)
        if warning and self.trainer.is_global_zero:
            log.warning(warning)
        translators = {"aligned": self.translators, "functional": self.functional_translators}
        shas = {
            "aligned": [t["sha256"] for t in self.translator_info],
            "functional": [t["sha256"] for t in self.functional_info],
        }
        self.protocol.prepare(self.plan, translators, shas, batch_size)
        if self.stack_runs:
            self.generate_rows = generate_rows(self.max_generate_rows, batch_size, self.receiver, self.generation)

    # ------------------------------------------------------------------------------------------------ test loop

    def test_step(self, batch, batch_idx: int) -> None:
        samples = list(batch)
        work = []  # (group, its samples, its pending answers, seconds spent preparing them)
        for group in self.plan.groups:
            rows = self.plan.rows_to_generate(group, [s.sample_id for s in samples])
            if not rows:
                continue
            t0, sub = time.time(), [samples[i] for i in rows]
            spec, seed = group[0]  # the runs of a group share one computation
            work.append((group, sub, as_pending(self.protocol.answer(spec, seed, self.plan, sub)), time.time() - t0))
        generated = [w[2].rows for w in work]  # counted before resolve answers the runs (answered: 0 rows)
        t0 = time.time()
        answers = resolve(self.receiver, [w[2] for w in work], self.generation, self.generate_rows)
        per_row = (time.time() - t0) / (sum(generated) or 1)  # a run's share of the generates: its rows
        for (group, sub, _, prep_seconds), n, (preds, diags) in zip(work, generated, answers, strict=True):
            dt = (prep_seconds + per_row * n) / len(group)
            for spec, seed in group:
                key = rio.run_key(spec.name, seed)
                recs = [
                    rio.make_record(s, spec.name, seed, p, d)
                    for s, p, d in zip(sub, preds, diags)
                    if s.sample_id in self.plan.todo[key]
                ]
                rio.append_partial(self.run_dir, spec.name, seed, self.global_rank, recs)
                self.new_records[key].extend(recs)
                self.timings[key] = self.timings.get(key, 0.0) + dt

    # ------------------------------------------------------------------------------------------------ finishing

    @staticmethod
    def _gather(obj) -> list:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            out = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    def on_test_epoch_end(self) -> None:
        gathered, timings = zip(*self._gather((self.new_records, self.timings)), strict=True)
        for spec, seed in self.plan.pending:
            key = rio.run_key(spec.name, seed)
            self.results[key] = self.plan.merge(key, (rec for part in gathered for rec in part.get(key, [])))
            if self.trainer.is_global_zero:
                rio.write_records(rio.records_path(self.run_dir, spec.name, seed), self.results[key])
                rio.remove_partial(self.run_dir, spec.name, seed)
        self.trainer.strategy.barrier()
        for spec, seed in self.plan.runs:
            key = rio.run_key(spec.name, seed)
            if key not in self.results:
                self.results[key] = rio.read_records(rio.records_path(self.run_dir, spec.name, seed))
        self.summary_metrics = logged_metrics([r for recs in self.results.values() for r in recs])
        for name, value in grouped_metrics(self.summary_metrics).items():  # eval/<condition>/<metric>
            self.log(name, value)
        self.timing_by_run = {k: sum(t.get(k, 0.0) for t in timings) for k in self.new_records}
        self._finish()

    @rank_zero_only
    def _finish(self) -> None:
        if self.resolved_config is not None:
            atomic_write(self.run_dir / "config.yaml", self.resolved_config)
        rio.append_invocation(self.run_dir, *self.metadata())
        if self.do_report:
            self._report()

    def _report(self) -> None:
        records = [r for recs in self.results.values() for r in recs]
        present = {r["condition"] for r in records}
        baselines = [b for b in self.protocol.baselines if b in present]
        if not baselines:
            log.info("no baseline condition in this run: the report is skipped")
            return
        self.report_result = run_report(
            records,
            self.run_dir / "report",
            baselines=baselines,
            resamples=self.report_resamples,
            intersect=True,
            protocol=self.protocol.name,
        )

    def metadata(self) -> tuple[dict, dict]:
        """``meta.json``'s run summary (merged into an earlier one) and this invocation's history entry."""
        summary = {
            "fingerprint": self.fingerprint,
            "run_dir": str(self.run_dir),
            "models": {"sender": self.sender.identity(), "receiver": self.receiver.identity()},
            "translators": self.translator_info,
            **({"functional_translators": self.functional_info} if self.functional_info else {}),
            **self.protocol.identity(),
            "dataset": {**self.data_info, "samples_sha256": self.run_identity["samples"]},
            "scale": self.hparams.scale,
            "alpha": self.hparams.alpha,
            "generation": self.generation.to_dict(),
            "precision": self.run_identity["precision"],
            "random_vectors": self.protocol.random_draw_note(self.random_draw),
            "diagnostics": self.plan.shuffle_diagnostics(),
            "truncated_prompts": self.truncated,
        }
        invocation = {
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="seconds"),
            "conditions": [s.name for s in self.specs],
            "seeds": self.seeds,
            "computed": sorted(k for k, v in self.new_records.items() if v),
            "skipped_existing": sorted(self.plan.skipped),
            "run_seconds": self.timing_by_run,
            "elapsed_seconds": time.time() - self.started_at,
            "world_size": self.trainer.world_size,
            "libraries": rio.library_versions(),
            **rio.device_info(self.device),
        }
        return summary, invocation
