import pytest
import torch

from activation_transfer.errors import UsageError
from activation_transfer.models.frozen_lm import PRESETS, load_model, load_tokenizer, model_identity, resolve_layer
from activation_transfer.models.hooks import block_hook, capture_hidden
from activation_transfer.task.tokenizer import offline_tokenizer, tokenizer_fingerprint

PROMPT = "Context: Bob lives in Tokyo. Tokyo is located in Japan.\nQ: What country does Bob live in?\nA:"


@pytest.mark.parametrize("name", ["tiny-neox", "tiny-neox-large", "tiny-gpt2", "tiny-llama"])
def test_captured_block_output_equals_hidden_states(name):
    model = load_model(name)
    tok = load_tokenizer(name)
    ids = torch.tensor([tok(PROMPT).input_ids])
    # A non-final block: HF applies the final LayerNorm to the last entry of hidden_states.
    layer = resolve_layer(model, 0)
    ref = model(input_ids=ids, output_hidden_states=True).hidden_states[layer.index + 1]
    for stop_early in (True, False):
        got = capture_hidden(model, layer.path, ids, stop_early=stop_early)
        torch.testing.assert_close(got, ref)


def test_layer_resolution_relative_and_index():
    m = load_model("tiny-neox-large")  # 4 blocks
    assert resolve_layer(m, 0.67).index == 2 and resolve_layer(m, 0.67).path == "gpt_neox.layers.2"
    assert resolve_layer(m, 3).path == "gpt_neox.layers.3"
    assert resolve_layer(load_model("tiny-gpt2"), 1).path == "transformer.h.1"
    assert resolve_layer(load_model("tiny-llama"), 0.5).path == "model.layers.1"
    for bad in (4, -1, 1.0, -0.1):
        with pytest.raises(ValueError, match="layer|depth"):
            resolve_layer(m, bad)


def test_pythia_shape_presets_match_published_layers():
    spec160, spec410 = PRESETS["pythia-160m-shape"], PRESETS["pythia-410m-shape"]
    assert (spec160["hidden_size"], spec160["num_hidden_layers"], int(0.67 * spec160["num_hidden_layers"])) == (
        768,
        12,
        8,
    )
    assert (spec410["hidden_size"], spec410["num_hidden_layers"], int(0.67 * spec410["num_hidden_layers"])) == (
        1024,
        24,
        16,
    )


def test_presets_are_seeded_frozen_and_identified():
    a, b, c = load_model("tiny-neox", preset_seed=1), load_model("tiny-neox", preset_seed=1), load_model("tiny-neox")
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert model_identity(a)["name"] == "preset:tiny-neox" and model_identity(a)["hidden_size"] == 32
    assert load_model("preset:tiny-neox", dtype="bfloat16").dtype == torch.bfloat16


def test_unknown_model_names_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'tiny-nope'"):
        load_model("preset:tiny-nope")
    with pytest.raises(ValueError, match="cannot load model .*not a preset"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny-neox", dtype="float8")


def test_offline_tokenizer_is_cached_and_deterministic(cache_dir):
    t1 = offline_tokenizer()
    assert (cache_dir / "tokenizers" / "offline-bpe-1024" / "tokenizer.json").exists()
    assert t1.pad_token_id == t1.eos_token_id == 0
    assert len(t1) <= 1024
    fresh = offline_tokenizer(str(cache_dir / "elsewhere"))  # trained again from scratch
    assert tokenizer_fingerprint(fresh) == tokenizer_fingerprint(t1)
    assert t1.decode(t1(PROMPT).input_ids) == PROMPT


def test_block_hook_rewrites_output_and_is_removed():
    model = load_model("tiny-neox")
    tok = load_tokenizer("tiny-neox")
    ids = torch.tensor([tok(PROMPT).input_ids])
    base = model(input_ids=ids).logits
    with block_hook(model, "gpt_neox.layers.0", lambda h: h * torch.linspace(0, 2, h.shape[-1])):
        changed = model(input_ids=ids).logits
    assert not torch.allclose(base, changed)
    torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_load_ref_identity_is_plain_and_complete():
    from activation_transfer.models.frozen_lm import ModelRef, load_ref

    loaded = load_ref(ModelRef(name="tiny-neox-large", layer=0.67))
    ident = loaded.identity()
    assert ident["layer"] == "gpt_neox.layers.2" and ident["layer_index"] == 2 and ident["hidden_size"] == 48
    assert all(isinstance(v, (str, int, float, type(None))) for v in ident.values())
    assert load_ref({"name": "tiny-neox", "layer": 1}).layer.path == "gpt_neox.layers.1"


def test_tokenizer_fingerprint_ignores_call_time_truncation_state():
    tok = offline_tokenizer()
    before = tokenizer_fingerprint(tok)
    tok([PROMPT], truncation=True, max_length=8, padding="max_length")
    assert tokenizer_fingerprint(tok) == before


def test_model_folder_without_tokenizer_files_is_refused(tmp_path):
    # transformers 5 loads such a folder as an empty 2-token tokenizer; the project refuses it, naming the fix.
    load_model("tiny-neox").save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"has no tokenizer files .*save_pretrained"):
        load_tokenizer(str(tmp_path / "model"))
    offline_tokenizer().save_pretrained(tmp_path / "model")
    assert load_tokenizer(str(tmp_path / "model")).vocab_size > 2


def test_organism_names_need_the_registered_resolver(monkeypatch):
    # A name never trains a model: without the organism layer's resolver, organism: names are an error.
    from activation_transfer.models import frozen_lm

    monkeypatch.setattr(frozen_lm, "_RESOLVERS", {})
    with pytest.raises(ValueError, match="needs the organism resolver"):
        frozen_lm.resolve_name("organism:sender")
    assert frozen_lm.resolve_name("tiny-neox") == "tiny-neox"
    frozen_lm.register_resolver("demo:", lambda rest, cache_dir: f"/models/{rest}")
    assert frozen_lm.resolve_name("demo:x") == "/models/x"


def test_local_folder_identity_is_a_content_digest_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    from activation_transfer.models import weights
    from activation_transfer.models.frozen_lm import ModelRef, load_ref, weights_identity

    folder = tmp_path / "model"
    load_model("tiny-neox").save_pretrained(folder)
    offline_tokenizer().save_pretrained(folder)
    first = weights_identity(ModelRef(str(folder)))["weights_sha256"]
    assert load_ref(ModelRef(str(folder), layer=1)).identity()["weights_sha256"] == first
    assert load_ref(ModelRef("tiny-neox")).identity()["weights_sha256"] is None  # a preset: name + seed
    hashed, real = [], weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: hashed.append(p.name) or "0" * 64)
    assert weights_identity(ModelRef(str(folder)))["weights_sha256"] == first and hashed == []  # nothing re-read
    load_model("tiny-neox", preset_seed=1).save_pretrained(folder)  # same name, other weights
    monkeypatch.setattr(weights, "sha256_file", real)
    assert weights_identity(ModelRef(str(folder)))["weights_sha256"] != first


def test_damaged_weights_file_of_a_model_folder_is_one_clear_error(tmp_path):
    # A copy cut short (disk full, interrupted transfer) used to escape as safetensors' own error: a traceback.
    folder = tmp_path / "model"
    load_model("tiny-neox").save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UsageError, match=rf"cannot load model '{folder}': a \.safetensors file is damaged"):
        load_model(str(folder))
