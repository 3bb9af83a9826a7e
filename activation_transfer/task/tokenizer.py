"""The offline tokenizer (byte-level BPE trained on the built-in corpus) and tokenizer fingerprints.

No tokenizer can be downloaded on the development, CI and GPU machines, so presets and organisms share one
tokenizer trained here, deterministically, on the built-in generator's text.
"""

from __future__ import annotations

import hashlib
import json

from activation_transfer.io import atomic_write, cache_root

# The offline tokenizer has at most this many entries (tiny presets size their embeddings to it).
TOKENIZER_VOCAB = 1024


def _train_offline_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from activation_transfer.task.generator import corpus_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],  # id 0, like Pythia's bos/eos/pad
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Deterministic corpus: the built-in generator with a fixed seed, never the evaluation seed's samples alone.
    tok.train_from_iterator(corpus_text(num_samples=3000, seed=0), trainer=trainer)
    return tok


def offline_tokenizer(cache_dir: str | None = None, vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer trained offline on the built-in corpus, cached as ``tokenizer.json``.

    Byte-level BPE encodes any text (the paper's QA files included); its merges fit the synthetic domain.
    """
    from transformers import PreTrainedTokenizerFast

    folder = cache_root(cache_dir) / "tokenizers" / f"offline-bpe-{vocab_size}"
    path = folder / "tokenizer.json"
    if not path.exists():
        # atomic: concurrent processes never read a half-written file
        atomic_write(path, _train_offline_tokenizer(vocab_size).to_str())
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.name_or_path = f"offline-bpe-{vocab_size}"
    return tok


def tokenizer_fingerprint(tok) -> str:
    """SHA-256 of a tokenizer's serialized vocabulary and merges: equal fingerprints tokenize identically."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        blob = json.dumps(tok.get_vocab(), sort_keys=True)
    else:
        state = json.loads(backend.to_str())
        # Truncation and padding are call-time state (set by any `truncation=True` call), not the tokenization.
        state.pop("truncation", None)
        state.pop("padding", None)
        blob = json.dumps(state, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
