"""``InjectionEvalModule``: run the conditions of PAPER.md 4.2 on multi-hop QA and write per-sample records.

Flow (``trainer.test`` with a ``MultiHopQADataModule``):

* ``setup``: load the frozen sender and receiver with the shared loader and the translator checkpoint(s); check that
  models, layers and dims match what the checkpoint was trained on (``allow_mismatch`` downgrades a name/layer
  mismatch to a warning; a dim mismatch is always an error).
* ``on_test_start``: fix the run folder (``<output_dir>/<run_name>``, default name = hash of everything that
  determines the answers), skip condition x seed files that already exist, pick up partial shards of an interrupted
  run, tokenize every prompt once (lengths, sender/receiver token check), build the shuffled-translation donor maps
  over the *whole* dataset, and translate every sample's sender states once per translator (reused by all
  conditions and seeds, and needed anyway because a shuffled donor may sit in another batch or on another rank).
* ``test_step``: per batch, capture the receiver's own states once (self-inject only) and, for every pending
  computation, run one batched ``generate`` with a prefill-only injection hook; append the records to a partial
  shard (crash-safe).
* ``on_test_epoch_end``: gather records across DDP ranks, drop DistributedSampler duplicates, check completeness,
  write one records file per condition x seed atomically, log ``eval/<metric>/condition=<name>``, write
  ``meta.json`` and the report.

Seeds: deterministic conditions (no_inject, nl_relay, b_to_b_self_inject, zero_replacement) run once with seed null.
The others run per seed. With one translator checkpoint the seeds vary only the seeded parts (random vectors and the
shuffle), so the translator-only conditions (additive, replace, scale_corrected, best_alpha) give identical answers
for every seed; they are generated once and written once per seed. With a list of checkpoints (one per seed, as in
the paper), seed ``seeds[i]`` uses checkpoint ``i``.

``same_norm_random`` draws each sample's vectors from its own CPU ``torch.Generator`` seeded by (run seed, sample id),
so they do not depend on batch composition, order or rank: batched and one-at-a-time runs inject the same vectors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from lightning_modules.components import records as rio
from lightning_modules.components.conditions import (
    CONDITION_NAMES,
    SOURCE_RANDOM,
    SOURCE_RECEIVER,
    SOURCE_RELAY,
    SOURCE_SHUFFLED,
    SOURCE_TRANSLATED,
    SOURCE_ZEROS,
    ConditionSpec,
    bucketed_derangement,
    build_conditions,
    random_vectors,
)
from lightning_modules.components.frozen_lm import ModelRef, as_ref, load_ref
from lightning_modules.components.generation import GenerationSettings, decode, generate_ids
from lightning_modules.components.hooks import capture_hidden
from lightning_modules.components.injection import PrefillInjection, prefill_injection
from lightning_modules.components.io import atomic_write, fingerprint, sha256_file, write_json
from lightning_modules.components.prompts import check_same_tokens, tokenize_left_padded
from lightning_modules.components.scoring import METRICS, score

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (42, 123, 456)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as Hugging Face ``generate`` builds them (pads get 1)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def capture_block(model, path: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The block output for a left-padded batch, with the same position ids the ``generate`` prefill uses."""
    return capture_hidden(model, path, ids, mask, position_ids=position_ids(mask))


def left_grid(rows: list[torch.Tensor], width: int, hidden: int, dtype, device) -> torch.Tensor:
    """Place per-sample (L_i, H) tensors at the right end of a zero (B, width, H) grid (left padding)."""
    grid = torch.zeros((len(rows), width, hidden), dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if len(r):
            grid[i, width - len(r) :] = r.to(device=device, dtype=dtype)
    return grid


class InjectionEvalModule(pl.LightningModule):
    """Evaluate cross-model activation injection on multi-hop QA (``test`` only).

    Args:
        sender: The frozen sender model and the block whose output is translated.
        receiver: The frozen receiver model and the block whose output is rewritten.
        translator_ckpt: Translator checkpoint from ``train.py``, or a list with one checkpoint per seed (same
            order as ``seeds``). Needed only when a translator condition is selected.
        conditions: Condition names (default: all eleven of PAPER.md 4.2).
        seeds: Run seeds of the non-deterministic conditions (default 42, 123, 456).
        scale: ``additive``'s injection scale.
        alpha: ``best_alpha``'s blend weight (``scale_corrected`` uses 1).
        max_new_tokens: New tokens per receiver answer (greedy).
        relay_max_new_tokens: New tokens of the sender's relay (``nl_relay``).
        repetition_penalty: Hugging Face repetition penalty of every generation.
        no_repeat_ngram_size: N-gram size that may not repeat (0 = off).
        do_sample: Sample instead of greedy decoding (off in the paper).
        max_prompt_tokens: Prompt truncation length (right truncation).
        allow_mismatch: Accept a translator trained on other model names or layers (a warning instead of an error).
            Hidden sizes must always match.
        output_dir: Parent folder of run folders.
        run_name: Run folder name; default ``eval-<hash>`` of the answer-determining config, so rerunning the same
            command resumes the same folder.
        report: Run ``report.run_report`` on the finished records into ``<run_dir>/report``.
        report_resamples: Bootstrap resamples of the report.
        cache_dir: Project cache (offline tokenizer); default ``$ACTIVATION_TRANSFER_CACHE``.
    """

    def __init__(
        self,
        sender: ModelRef,
        receiver: ModelRef,
        translator_ckpt: str | list[str] | None = None,
        conditions: list[str] | None = None,
        seeds: list[int] | None = None,
        scale: float = 0.01,
        alpha: float = 0.3,
        max_new_tokens: int = 64,
        relay_max_new_tokens: int = 128,
        repetition_penalty: float = 1.3,
        no_repeat_ngram_size: int = 3,
        do_sample: bool = False,
        max_prompt_tokens: int = 256,
        allow_mismatch: bool = False,
        output_dir: str = "runs/eval",
        run_name: str | None = None,
        report: bool = True,
        report_resamples: int = 5000,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.sender_ref, self.receiver_ref = as_ref(sender), as_ref(receiver)
        self.specs: list[ConditionSpec] = build_conditions(list(conditions or CONDITION_NAMES), scale, alpha)
        self.seeds = [int(s) for s in (DEFAULT_SEEDS if seeds is None else seeds)]
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"model.seeds has duplicates: {self.seeds}")
        if not self.seeds and any(not s.deterministic for s in self.specs):
            raise ValueError("model.seeds is empty but non-deterministic conditions are selected")
        ckpts = [translator_ckpt] if isinstance(translator_ckpt, str) else list(translator_ckpt or [])
        if len(ckpts) > 1 and len(ckpts) != len(self.seeds):
            raise ValueError(
                f"model.translator_ckpt lists {len(ckpts)} checkpoints for {len(self.seeds)} seeds; give one "
                "checkpoint, or one per seed in the order of model.seeds"
            )
        if not ckpts and any(s.uses_translator for s in self.specs):
            needing = [s.name for s in self.specs if s.uses_translator]
            raise ValueError(f"conditions {', '.join(needing)} need a translator: set --model.translator_ckpt")
        self.translator_ckpts = ckpts
        self.generation = GenerationSettings(
            max_new_tokens=max_new_tokens,
            relay_max_new_tokens=relay_max_new_tokens,
            do_sample=do_sample,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            max_prompt_tokens=max_prompt_tokens,
        )
        self.allow_mismatch = allow_mismatch
        self.output_dir, self.run_name = output_dir, run_name
        self.do_report, self.report_resamples = report, report_resamples
        self.cache_dir = cache_dir
        self.save_hyperparameters(ignore=["sender", "receiver"])
        self.hparams.update(sender=asdict(self.sender_ref), receiver=asdict(self.receiver_ref))
        self.resolved_config: str | None = None  # set by the CLI; written as config.yaml into the run folder
        self._loaded = False
        # Results for callbacks (filled at the end of the test epoch).
        self.run_dir: Path | None = None
        self.results: dict[str, list[dict]] = {}
        self.summary_metrics: dict[str, float] = {}
        self.report_result = None
        self.samples_by_id: dict = {}

    # ------------------------------------------------------------------------------------------------ loading

    def setup(self, stage: str) -> None:
        if self._loaded:
            return
        self.sender = load_ref(self.sender_ref, cache_dir=self.cache_dir)
        self.receiver = load_ref(self.receiver_ref, cache_dir=self.cache_dir)
        # Registered as submodules so Lightning moves them to the accelerator.
        self.sender_model, self.receiver_model = self.sender.model, self.receiver.model
        self.translators = torch.nn.ModuleList()
        self.translator_info: list[dict] = []
        if any(s.uses_translator for s in self.specs):
            for path in self.translator_ckpts:
                module = self._load_translator(path)
                self.translators.append(module)
                self.translator_info.append({"path": str(path), "sha256": sha256_file(path)})
        self._loaded = True

    def _load_translator(self, path: str):
        from lightning_modules.translator import check_translator_matches, load_translator

        module = load_translator(path, map_location="cpu")
        module.eval().requires_grad_(False)
        try:
            check_translator_matches(module, self.sender.identity(), self.receiver.identity())
        except ValueError as err:
            if not self.allow_mismatch:
                raise ValueError(f"{err} (translator checkpoint {path}; set --model.allow_mismatch true to "
                                 "evaluate it anyway)") from err  # fmt: skip
            log.warning("translator %s does not match the models (allowed by allow_mismatch): %s", path, err)
        # Whatever the names say, the translator must map sender-sized vectors to receiver-sized ones.
        d_s, d_r = self.sender.identity()["hidden_size"], self.receiver.identity()["hidden_size"]
        dims = (module.hparams.get("sender_dim"), module.hparams.get("receiver_dim"))
        if dims != (d_s, d_r):
            raise ValueError(
                f"translator checkpoint {path} maps {dims[0]} -> {dims[1]} dims, but the sender has {d_s} and the "
                f"receiver {d_r} (allow_mismatch cannot bridge different hidden sizes)"
            )
        return module

    # ------------------------------------------------------------------------------------------------ planning

    def _runs(self) -> list[tuple[ConditionSpec, int | None]]:
        return [(s, None) for s in self.specs if s.deterministic] + [
            (s, seed) for s in self.specs if not s.deterministic for seed in self.seeds
        ]

    def _translator_index(self, seed: int | None) -> int:
        return 0 if len(self.translator_ckpts) <= 1 else self.seeds.index(seed)

    def _compute_key(self, spec: ConditionSpec, seed: int | None) -> tuple:
        return (
            spec.name,
            self._translator_index(seed) if spec.uses_translator else None,
            seed if spec.seeded else None,
        )

    def config_fingerprint(self, samples) -> dict:
        """Everything that determines the answers (not the condition/seed lists: adding one reuses the folder)."""
        return {
            "sender": self.sender.identity(),
            "receiver": self.receiver.identity(),
            "translators": [t["sha256"] for t in self.translator_info],
            "scale": self.hparams.scale,
            "alpha": self.hparams.alpha,
            "generation": self.generation.to_dict(),
            "samples": fingerprint([(s.sample_id, s.context, s.question, s.answer, s.hops) for s in samples]),
        }

    def on_test_start(self) -> None:
        self._t0 = time.time()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "samples"):
            raise ValueError("InjectionEvalModule needs a MultiHopQADataModule (trainer.test(..., datamodule=dm))")
        samples = list(dm.samples)
        self.samples_by_id = {s.sample_id: s for s in samples}
        self.data_info = dict(getattr(dm, "source_info", {}) or {})
        fp = self.config_fingerprint(samples)
        self.fingerprint = fingerprint(fp)
        self.run_dir = Path(self.output_dir) / (self.run_name or rio.default_run_name(self.fingerprint))
        self._check_existing_meta(fp)
        if self.trainer.is_global_zero:
            (self.run_dir / "records").mkdir(parents=True, exist_ok=True)
            print(f"run folder: {self.run_dir}", flush=True)

        runs = self._runs()
        self.pending = [(s, seed) for s, seed in runs if not rio.records_path(self.run_dir, s.name, seed).exists()]
        self.skipped = [rio.run_key(s.name, seed) for s, seed in runs if (s, seed) not in self.pending]
        # Token ids of every prompt, once: lengths for the shuffle buckets, sender/receiver equality.
        ids = [s.sample_id for s in samples]
        rec = self._token_rows(self.receiver.tokenizer, [s.prompt for s in samples])
        self.prompt_len = {sid: len(r) for sid, r in zip(ids, rec)}
        if any(s.needs_same_tokens for s, _ in self.pending):
            snd = self._token_rows(self.sender.tokenizer, [s.prompt for s in samples])
            check_same_tokens(snd, rec, ids)
        # Shuffled donors per seed, over the whole dataset.
        self.derangements = {}
        for s, seed in self.pending:
            if s.source == SOURCE_SHUFFLED and seed not in self.derangements:
                self.derangements[seed] = bucketed_derangement(ids, [self.prompt_len[i] for i in ids], seed)
        # Which samples each pending run still needs (strict drops singletons; partial shards are already done).
        self.done: dict[str, dict[str, dict]] = {}
        self.todo: dict[str, set[str]] = {}
        for s, seed in self.pending:
            key = rio.run_key(s.name, seed)
            eligible = set(self.derangements[seed].strict_ids()) if s.strict else set(ids)
            self.done[key] = {k: v for k, v in rio.read_partial(self.run_dir, s.name, seed).items() if k in eligible}
            self.todo[key] = eligible - set(self.done[key])
        self.expected = {
            rio.run_key(s.name, seed): (set(self.derangements[seed].strict_ids()) if s.strict else set(ids))
            for s, seed in self.pending
        }
        self.new_records: dict[str, list[dict]] = {k: [] for k in self.todo}
        self.timings: dict[str, float] = {}
        # Translate every sample once per translator that a pending run needs.
        needed = {self._translator_index(seed) for s, seed in self.pending if s.uses_translator and self.todo[
            rio.run_key(s.name, seed)]}  # fmt: skip
        self.translated = {t: self._translate_all(t, samples) for t in sorted(needed)}
        groups: dict[tuple, list[tuple[ConditionSpec, int | None]]] = {}
        for s, seed in self.pending:
            groups.setdefault(self._compute_key(s, seed), []).append((s, seed))
        self.groups = list(groups.values())

    def _check_existing_meta(self, fp: dict) -> None:
        meta_path = self.run_dir / "meta.json"
        if not meta_path.exists():
            return
        import json

        old = json.loads(meta_path.read_text()).get("fingerprint")
        if old and old != self.fingerprint:
            raise ValueError(
                f"run folder {self.run_dir} holds results of a different configuration (fingerprint {old[:12]} vs "
                f"{self.fingerprint[:12]}); choose another --model.run_name or output_dir"
            )

    def _token_rows(self, tokenizer, texts: list[str]) -> list[list[int]]:
        enc = tokenizer(texts, truncation=True, max_length=self.generation.max_prompt_tokens, padding=False)
        return enc["input_ids"]

    def _batch_size(self) -> int:
        dm = self.trainer.datamodule
        return int(getattr(dm, "batch_size", 16) or 16)

    @torch.no_grad()
    def _translate_all(self, t: int, samples) -> dict[str, torch.Tensor]:
        """Each sample's translated sequence (L_i, d_r), in the receiver's dtype on the receiver's device."""
        translator = self.translators[t]
        t_dtype = next(translator.parameters()).dtype
        r_dtype = next(self.receiver_model.parameters()).dtype
        out: dict[str, torch.Tensor] = {}
        bs = self._batch_size()
        for start in range(0, len(samples), bs):
            chunk = samples[start : start + bs]
            tok = tokenize_left_padded(
                self.sender.tokenizer, [s.prompt for s in chunk], self.generation.max_prompt_tokens
            )
            h = capture_block(self.sender_model, self.sender.layer.path, tok["input_ids"], tok["attention_mask"])
            tr = translator.translate(h.to(t_dtype)).to(r_dtype)
            lengths = tok["attention_mask"].sum(1).tolist()
            width = tr.shape[1]
            for i, s in enumerate(chunk):
                out[s.sample_id] = tr[i, width - int(lengths[i]) :]
        return out

    # ------------------------------------------------------------------------------------------------ test loop

    def test_step(self, batch, batch_idx: int) -> None:
        samples = list(batch)
        tok = tokenize_left_padded(
            self.receiver.tokenizer, [s.prompt for s in samples], self.generation.max_prompt_tokens
        )
        for group in self.groups:
            keys = [rio.run_key(s.name, seed) for s, seed in group]
            rows = [i for i, s in enumerate(samples) if any(s.sample_id in self.todo[k] for k in keys)]
            if not rows:
                continue
            t0 = time.time()
            spec, seed = group[0]
            sub = [samples[i] for i in rows]
            if spec.source == SOURCE_RELAY:
                preds, diags = self._run_relay(sub)
            else:
                ids, mask = self._sub_batch(tok, rows)
                preds, diags = self._run_injection(spec, seed, sub, ids, mask)
            dt = (time.time() - t0) / len(group)
            for (s, sd), key in zip(group, keys):
                recs = [
                    self._record(s, sd, smp, p, d)
                    for smp, p, d in zip(sub, preds, diags)
                    if smp.sample_id in self.todo[key]
                ]
                rio.append_partial(self.run_dir, s.name, sd, self.global_rank, recs)
                self.new_records[key].extend(recs)
                self.timings[key] = self.timings.get(key, 0.0) + dt

    @staticmethod
    def _sub_batch(tok: dict, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tok["input_ids"][rows], tok["attention_mask"][rows]
        # Drop columns that are padding in every selected row (left padding: a prefix of columns).
        start = int(mask.any(0).long().argmax())
        return ids[:, start:], mask[:, start:]

    def _record(self, spec, seed, sample, prediction: str, diag: dict) -> dict:
        return {
            "sample_id": sample.sample_id,
            "condition": spec.name,
            "seed": seed,
            "gold": sample.answer,
            "prediction": prediction,
            "hops": sample.hops,
            "metrics": score(prediction, sample.answer),
            "diagnostics": diag,
        }

    def _source(self, spec: ConditionSpec, seed, sub, ids, mask):
        """The vectors a condition writes for this sub-batch (B, T, d_r), or the (B, d_r) additive vector."""
        width = ids.shape[1]
        hidden = self.receiver.identity()["hidden_size"]
        param = next(self.receiver_model.parameters())
        dtype, device = param.dtype, param.device
        if spec.source == SOURCE_TRANSLATED:
            trans = self.translated[self._translator_index(seed)]
            rows = [trans[s.sample_id] for s in sub]
            if spec.mode == "additive":
                return torch.stack([r[-1] for r in rows]), rows
            return left_grid(rows, width, hidden, dtype, device), rows
        if spec.source == SOURCE_SHUFFLED:
            trans = self.translated[self._translator_index(seed)]
            donors = self.derangements[seed].donors
            rows = [trans[donors[s.sample_id]] for s in sub]
            return left_grid(rows, width, hidden, dtype, device), rows
        if spec.source == SOURCE_RANDOM:
            lengths = mask.sum(1).tolist()
            rows = [random_vectors(seed, s.sample_id, int(n), hidden) for s, n in zip(sub, lengths)]
            return left_grid(rows, width, hidden, dtype, device), None
        if spec.source == SOURCE_RECEIVER:
            return capture_block(self.receiver_model, self.receiver.layer.path, ids, mask), None
        if spec.source == SOURCE_ZEROS:
            return torch.zeros((len(sub), width, hidden), dtype=dtype, device=device), None
        return None, None

    def _run_injection(self, spec, seed, sub, ids, mask):
        source, trans_rows = self._source(spec, seed, sub, ids, mask)
        inj = PrefillInjection(mask, mode=spec.mode, source=source, alpha=spec.alpha, scale=spec.scale)
        with prefill_injection(self.receiver_model, self.receiver.layer.path, inj):
            new_ids = generate_ids(self.receiver_model, self.receiver.tokenizer, ids, mask, self.generation)
        preds = decode(self.receiver.tokenizer, new_ids)
        lengths = mask.sum(1).tolist()
        diags = []
        for i, s in enumerate(sub):
            d = {
                "prompt_len": int(lengths[i]),
                "translated_norm_mean": None,
                "receiver_norm_mean": float(inj.receiver_norm_mean[i]),
                "injected_norm_mean": None if inj.injected_norm_mean is None else float(inj.injected_norm_mean[i]),
            }
            if trans_rows is not None:
                d["translated_norm_mean"] = float(trans_rows[i].float().norm(dim=-1).mean())
            if spec.source == SOURCE_SHUFFLED:
                d["donor_id"] = self.derangements[seed].donors[s.sample_id]
            diags.append(d)
        return preds, diags

    def _run_relay(self, sub):
        settings = self.generation
        stok = tokenize_left_padded(
            self.sender.tokenizer, [s.relay_sender_prompt for s in sub], settings.max_prompt_tokens
        )
        relay_ids = generate_ids(
            self.sender_model, self.sender.tokenizer, stok["input_ids"], stok["attention_mask"], settings,
            settings.relay_max_new_tokens,
        )  # fmt: skip
        relays = decode(self.sender.tokenizer, relay_ids)
        rtok = tokenize_left_padded(
            self.receiver.tokenizer,
            [s.relay_receiver_prompt(r) for s, r in zip(sub, relays)],
            settings.max_prompt_tokens,
        )
        inj = PrefillInjection(rtok["attention_mask"])  # records the receiver's norms, writes nothing
        with prefill_injection(self.receiver_model, self.receiver.layer.path, inj):
            new_ids = generate_ids(
                self.receiver_model, self.receiver.tokenizer, rtok["input_ids"], rtok["attention_mask"], settings
            )
        preds = decode(self.receiver.tokenizer, new_ids)
        lengths = rtok["attention_mask"].sum(1).tolist()
        diags = [
            {
                "prompt_len": int(n),
                "translated_norm_mean": None,
                "receiver_norm_mean": float(inj.receiver_norm_mean[i]),
                "injected_norm_mean": None,
                "relay": relay,
            }
            for i, (n, relay) in enumerate(zip(lengths, relays))
        ]
        return preds, diags

    # ------------------------------------------------------------------------------------------------ finishing

    def _gather(self, obj):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            out = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(out, obj)
            return out
        return [obj]

    def on_test_epoch_end(self) -> None:
        gathered = self._gather(self.new_records)
        timings = self._gather(self.timings)
        for spec, seed in self.pending:
            key = rio.run_key(spec.name, seed)
            merged = dict(self.done[key])
            for part in gathered:
                for rec in part.get(key, []):
                    merged.setdefault(rec["sample_id"], rec)  # DistributedSampler pads with duplicates
            missing = self.expected[key] - set(merged)
            if missing:
                raise RuntimeError(f"{key}: {len(missing)} sample(s) were never evaluated, e.g. {sorted(missing)[:3]}")
            self.results[key] = [merged[k] for k in sorted(self.expected[key])]
            if self.trainer.is_global_zero:
                rio.write_records(rio.records_path(self.run_dir, spec.name, seed), self.results[key])
                rio.remove_partial(self.run_dir, spec.name, seed)
        if self.trainer.is_global_zero and (self.run_dir / "partial").is_dir():
            try:
                (self.run_dir / "partial").rmdir()  # only when empty: shards of other runs stay
            except OSError:
                pass
        self.trainer.strategy.barrier()
        for spec, seed in self._runs():
            key = rio.run_key(spec.name, seed)
            if key not in self.results:
                self.results[key] = rio.read_records(rio.records_path(self.run_dir, spec.name, seed))
        self.summary_metrics = summarize(self.results)
        for name, value in self.summary_metrics.items():
            self.log(name, value)
        self.timing_by_run = {k: sum(t.get(k, 0.0) for t in timings) for k in self.new_records}
        self._finish()

    @rank_zero_only
    def _finish(self) -> None:
        if self.resolved_config is not None:
            atomic_write(self.run_dir / "config.yaml", self.resolved_config)
        write_json(self.run_dir / "meta.json", self.metadata())
        if self.do_report:
            self._report()

    def _report(self) -> None:
        from lightning_modules.components.report import run_report

        records = [r for recs in self.results.values() for r in recs]
        present = {r["condition"] for r in records}
        baselines = [b for b in ("no_inject", "nl_relay") if b in present]
        if not baselines:
            log.info("no baseline condition in this run: the report is skipped")
            return
        self.report_result = run_report(
            records, self.run_dir / "report", baselines=baselines, resamples=self.report_resamples, intersect=True
        )

    def metadata(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "run_dir": str(self.run_dir),
            "models": {"sender": self.sender.identity(), "receiver": self.receiver.identity()},
            "translators": self.translator_info,
            "dataset": {**self.data_info, "samples_sha256": fingerprint(
                [(s.sample_id, s.context, s.question, s.answer, s.hops) for s in self.samples_by_id.values()])},
            "conditions": [s.name for s in self.specs],
            "seeds": self.seeds,
            "scale": self.hparams.scale,
            "alpha": self.hparams.alpha,
            "generation": self.generation.to_dict(),
            "random_vectors": "per-sample CPU torch.Generator seeded by sha256(f'{seed}:{sample_id}')[:16]",
            "diagnostics": {
                "shuffle_self_fallback_count": {str(k): len(d.self_fallback) for k, d in self.derangements.items()},
                "shuffle_self_fallback_ids": {str(k): list(d.self_fallback) for k, d in self.derangements.items()},
            },
            "computed_this_invocation": sorted(k for k, v in self.new_records.items() if v),
            "skipped_existing": sorted(self.skipped),
            "run_seconds": self.timing_by_run,
            "elapsed_seconds": time.time() - self._t0,
            "world_size": self.trainer.world_size,
            "libraries": rio.library_versions(),
            **rio.device_info(self.device),
        }  # fmt: skip


def summarize(results: dict[str, list[dict]]) -> dict[str, float]:
    """``eval/<metric>/condition=<name>``: per condition, the mean over its runs of each run's accuracy."""
    per_cond: dict[str, list[dict[str, float]]] = {}
    for recs in results.values():
        if not recs:
            continue
        acc = {m: sum(bool(r["metrics"][m]) for r in recs) / len(recs) for m in METRICS}
        per_cond.setdefault(recs[0]["condition"], []).append(acc)
    out = {}
    for cond, runs in per_cond.items():
        for m in METRICS:
            out[f"eval/{m}/condition={cond}"] = sum(r[m] for r in runs) / len(runs)
    return out
