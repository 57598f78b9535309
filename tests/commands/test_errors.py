"""Bad inputs give clear errors that name the file, tensor or field, and what was expected."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pbbjax import load_model
from pbbjax.models.architecture import ModelConfig, UnsupportedModelError
from pbbjax.models.hf_weights import CheckpointError


@pytest.fixture
def model_dir(hf_dirs, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(hf_dirs["llama_gqa"][1], dst)
    return dst


def _edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", {"format": "pt"})


def test_missing_weight_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        load_model(model_dir)


def test_missing_shard_listed_in_index(model_dir):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors is missing"):
        load_model(model_dir)


def test_mis_shaped_tensor_names_tensor_and_both_shapes(model_dir):
    name = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(model_dir, lambda t: t.update({name: np.zeros((95, 64), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(95, 64\), "
        r"the model expects \(96, 64\)",
    ):
        load_model(model_dir)


def test_missing_tensor_is_named(model_dir):
    _edit_tensors(model_dir, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_model(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    _edit_tensors(model_dir, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.extra\.weight"):
        load_model(model_dir)


def test_corrupt_weight_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model\.safetensors"):
        load_model(model_dir)


def test_unsupported_model_type_lists_supported(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError, match=r"'gpt2' is not supported; supported: llama, qwen2, qwen3"
    ):
        load_model(model_dir)


def test_config_errors():
    base = dict(
        model_type="llama",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match="lacks the field 'hidden_size'"):
        ModelConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="dtype 'float8'"):
        ModelConfig.from_hf(base, param_dtype="float8")


def test_missing_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError,
        match=r"'some-org/some-model' is not a local directory and could not "
        r"be fetched from the Hugging Face hub",
    ):
        load_model("some-org/some-model")
