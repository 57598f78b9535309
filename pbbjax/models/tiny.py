"""A tiny random Llama with SmolLM2's tokenizer (the ``tiny`` preset's model: seconds per run, for tests)."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from pbbjax.models.architecture import ModelConfig
from pbbjax.models.decoder import Transformer
from pbbjax.models.default_model import default_model_path
from pbbjax.models.hf_io import load_tokenizer, save_model


def tiny_model_dir(fields: dict, workdir: Path, seed: int) -> Path:
    """The model of ``fields`` (HF ``config.json`` fields), written once as an HF directory in the workdir.

    On a pod, process 0 writes it first; a host that does not share its disk then writes its own copy
    (the same bytes: the weights come from ``seed``)."""
    out = workdir / "tiny_model"
    if jax.process_index() == 0:
        _write_tiny_model(fields, out, seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pbbjax-tiny-model")
        _write_tiny_model(fields, out, seed)
    return out


def _write_tiny_model(fields: dict, out: Path, seed: int) -> None:
    if (out / "config.json").exists():
        return
    tokenizer = load_tokenizer(default_model_path())
    hf = {
        **fields,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    cfg = ModelConfig.from_hf(hf, generation_config=generation)
    save_model(Transformer(cfg, rngs=nnx.Rngs(seed)), out, tokenizer=tokenizer, write=True)
