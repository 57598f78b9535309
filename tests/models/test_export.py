"""save_model writes what transformers loads, and a round trip changes nothing."""

import json

import numpy as np
import pytest
import transformers
from conftest import TINY, hf_logits
from flax import nnx

from pbbjax import load_model, save_model


def _params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_tied", "qwen3_head_dim", "llama3_rope"])
def test_round_trip(hf_dirs, tmp_path, name):
    _, path = hf_dirs[name]
    model, _ = load_model(path)
    out = save_model(model, tmp_path / "export")
    # pbbjax -> HF directory -> transformers: the same logits.
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(0).randint(0, TINY[name]["vocab_size"], (2, 24))
    assert np.abs(hf_logits(exported, ids) - np.asarray(model(ids))).max() <= 1e-5
    # HF directory -> pbbjax: identical arrays.
    again, _ = load_model(out)
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # Every field of the source config survives.
    src, dst = json.loads((path / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key, value in src.items():
        if key not in ("dtype", "torch_dtype", "transformers_version"):
            assert dst[key] == value, key


def test_sharded_export_with_index(hf_dirs, tmp_path):
    hf, path = hf_dirs["smollm2_shaped"]
    model, _ = load_model(path)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((out / f).is_file() for f in files)
    assert not (out / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(1).randint(0, 160, (1, 16))
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() <= 1e-5
    again, _ = load_model(out)  # pbbjax reads the sharded layout too
    assert np.abs(np.asarray(again(ids)) - hf_logits(hf, ids)).max() <= 1e-4


def test_bf16_export_keeps_dtype(hf_dirs, tmp_path):
    _, path = hf_dirs["qwen2_tied"]
    model, _ = load_model(path, dtype="bfloat16")
    out = save_model(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    import torch

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_export_replaces_existing_directory_whole(hf_dirs, tmp_path):
    _, path = hf_dirs["llama_gqa"]
    model, _ = load_model(path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_model(model, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind
