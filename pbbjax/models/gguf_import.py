"""Convert a Llama-architecture GGUF file into a plain Hugging Face model directory.

This module owns one job: ``gguf_to_hf(gguf_path, out_dir)`` reads a llama.cpp GGUF file (any
quantization the ``gguf`` package can dequantize) and writes ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32, HF tensor names), ``tokenizer.json`` and ``tokenizer_config.json`` (with
the GGUF's chat template), so that ``transformers`` and pbbjax's own safetensors loader read it like any
checkpoint from the hub.

It follows what ``transformers`` does when it loads a GGUF itself (``modeling_gguf_pytorch_utils`` and
``integrations/gguf``): the same numpy dequantization, tensor names, undoing of llama.cpp's q/k row
permutation and config keys, so the weights are bit-identical to ``from_pretrained(..., gguf_file=...)``,
and transformers' own tokenizer builder. The one deliberate difference is the tokenizer's digit splitting,
where we follow llama.cpp (see ``_DIGIT_SPLIT_PRE``). Weights are produced with numpy only; PyTorch is
never needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

# llama.cpp leaf name -> HF name, inside `blk.{i}.` / `model.layers.{i}.`
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")  # Llama has no biases


def _metadata(reader: GGUFReader) -> dict:
    """Every metadata field as a Python value (strings decoded, arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _hf_name(gguf_name: str) -> str:
    if m := _LAYER_RE.fullmatch(gguf_name):
        if m[2] in _LAYER_NAMES:
            return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.weight"
    elif (stem := gguf_name.removesuffix(".weight")) in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.weight"
    # e.g. llama 3.1's `rope_freqs.weight` (rope scaling), which transformers does not load either
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama equivalent that this converter knows.")


def _unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation, which interleaves each head's two rotary halves row by row.

    llama.cpp writes ``w.reshape(n_head, 2, d, ...).swapaxes(1, 2)``; this is its inverse, exactly as
    transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def _config(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"Only Llama-architecture GGUF files are supported, got {arch!r}.")
    key = lambda name: meta[f"llama.{name}"]  # noqa: E731
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise NotImplementedError(f"GGUF rope scaling {meta['llama.rope.scaling.type']!r} is not supported.")
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.rope.dimension_count", hidden // heads),
        "hidden_act": "silu",
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        # transformers 5 reads `rope_parameters`; the top-level `rope_theta` is the older spelling
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,
        "attention_bias": False,
        "mlp_bias": False,
        # llama.cpp writes `output.weight` only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
        "use_cache": True,
        "dtype": "float32",
    }


# llama.cpp pre-tokenizers that cut every digit apart before the GPT-2 regex (llama-vocab.cpp), as the
# original tokenizer.json files do with `Digits(individual_digits=True)`. transformers 5 knows none of these
# names and falls back to bare GPT-2 splitting, which differs after a whitespace run: "\n\n1" -> "Ċ", "Ċ", "1"
# instead of "ĊĊ", "1". We follow llama.cpp and the original tokenizer.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _write_tokenizer(meta: dict, out_dir: Path, max_length: int) -> None:
    """Build the tokenizer with transformers' own GGUF builder, from metadata read here (no torch)."""
    from tokenizers import pre_tokenizers
    from transformers import TokenizersBackend
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    # the same grouping as transformers' `get_gguf_tokenizer`, whose own reader needs torch
    tok_dict, tok_config = (
        {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    )
    if tok_dict.get("tokenizer_type") == "llama":  # sentencepiece files without the flag add BOS
        tok_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tok_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
    if tok_dict.get("tokenizer_type") == "gpt2" and tok_dict.get("pre_tokenizer_type") in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    tokenizer = TokenizersBackend(
        tokenizer_object=backend, model_max_length=max_length, **tok_config, **extra
    )
    # the template goes into tokenizer_config.json, as on the hub, rather than a separate .jinja file
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a float32 Hugging Face Llama directory for ``gguf_path`` into ``out_dir``; return ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(gguf_path)
    meta = _metadata(reader)
    config = _config(meta, {t.name for t in reader.tensors})

    tensors = {}
    for tensor in reader.tensors:  # one at a time: dequantize, un-permute, cast
        weight = dequantize(tensor.data, tensor.tensor_type)
        if tensor.name.endswith("attn_q.weight"):
            weight = _unpermute_rows(weight, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            weight = _unpermute_rows(weight, config["num_key_value_heads"])
        tensors[_hf_name(tensor.name)] = np.ascontiguousarray(weight, dtype=np.float32)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    del tensors

    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer(meta, out_dir, config["max_position_embeddings"])
    return out_dir
