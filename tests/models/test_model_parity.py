"""fp32 logits of the pbbjax decoder against transformers on PyTorch (the reference), tiny random configs."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, hf_logits
from flax import nnx

from pbbjax import load_model
from pbbjax.models.architecture import LoRAConfig
from pbbjax.models.lora import LoRAParam

TOL = 1e-4  # max |Δlogit| in fp32


def _ids(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_match_transformers(hf_dirs, name):
    hf, path = hf_dirs[name]
    model, _ = load_model(path)
    # 100 tokens: beyond llama3_rope's original_max_position_embeddings, and 3 causal query blocks
    ids = _ids(TINY[name]["vocab_size"], (2, 100))
    diff = np.abs(np.asarray(model(ids)) - hf_logits(hf, ids)).max()
    assert diff <= TOL, f"{name}: max |Δlogit| = {diff}"


@pytest.mark.parametrize("name", ["llama3_rope", "qwen3_head_dim"])
def test_explicit_positions_far_beyond_original_context(hf_dirs, name):
    hf, path = hf_dirs[name]
    model, _ = load_model(path)
    ids = _ids(TINY[name]["vocab_size"], (2, 16), seed=1)
    positions = np.stack([np.arange(100, 116), np.arange(200, 216)]).astype(np.int32)
    ours = np.asarray(model(ids, positions=positions))
    diff = np.abs(ours - hf_logits(hf, ids, position_ids=positions)).max()
    assert diff <= TOL, f"{name}: max |Δlogit| = {diff}"


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_tied"])
def test_left_padded_batch(hf_dirs, name):
    """Left padding changes nothing for the real tokens: equal to HF with the same mask and positions,
    and to each sequence run alone without padding."""
    hf, path = hf_dirs[name]
    model, _ = load_model(path)
    lengths, t = [70, 40, 3], 70  # 70 tokens: 2 causal query blocks, padding in both
    ids = _ids(TINY[name]["vocab_size"], (3, t), seed=2)
    mask = np.zeros((3, t), np.int32)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = 1
    ours = np.asarray(model(ids, attention_mask=mask))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= TOL
    for i, n in enumerate(lengths):
        alone = hf_logits(hf, ids[i : i + 1, t - n :])[0]
        assert np.abs(ours[i, t - n :] - alone).max() <= TOL


def test_packed_segments_equal_separate_sequences(hf_dirs):
    """segment_ids: causal attention within a segment only, positions restarting per segment."""
    hf, path = hf_dirs["qwen3_head_dim"]
    model, _ = load_model(path)
    a, b = _ids(128, (1, 9), seed=3), _ids(128, (1, 6), seed=4)
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
    segments = np.array([[1] * 9 + [2] * 6 + [0] * 3], np.int32)
    ours = np.asarray(model(packed, segment_ids=segments))[0]
    assert np.abs(ours[:9] - hf_logits(hf, a)[0]).max() <= TOL
    assert np.abs(ours[9:15] - hf_logits(hf, b)[0]).max() <= TOL


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_match_transformers(hf_dirs, remat):
    hf, path = hf_dirs["llama_gqa"]
    ids = _ids(128, (2, 20), seed=5)
    ref = hf_logits(hf, ids)
    for scan in (False, True):
        model, _ = load_model(path, scan_layers=scan, remat=remat)
        assert np.abs(np.asarray(model(ids)) - ref).max() <= TOL, f"scan={scan} remat={remat}"


def test_bfloat16_params_and_compute(hf_dirs):
    """bf16 is lossy: the check is that it runs in bf16 end to end and stays close to the fp32 reference."""
    hf, path = hf_dirs["llama_gqa"]
    model, _ = load_model(path, dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    ids = _ids(128, (2, 20), seed=6)
    ours = np.asarray(model(ids))
    ref = hf_logits(hf, ids)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).mean() < 0.05 * np.abs(ref).mean()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    mixed, _ = load_model(path, dtype="float32", compute_dtype="bfloat16")
    assert mixed.embed[...].dtype == jnp.float32
    assert np.abs(np.asarray(mixed(ids)) - ref).mean() < 0.05 * np.abs(ref).mean()


@pytest.mark.parametrize(
    "name,lora",
    [("llama_gqa", False), ("qwen3_head_dim", False), ("qwen2_tied", False), ("qwen2_tied", True)],
)
def test_kv_cache_decode_equals_full_forward(hf_dirs, name, lora):
    """The sampler's path: prefill half, then one token per step through the KV cache; the same logits as
    one full forward (with LoRA: random adapters on every projection, o_proj's included)."""
    _, path = hf_dirs[name]
    model, _ = load_model(path, lora=LoRAConfig(rank=4) if lora else None)
    if lora:
        rng = np.random.default_rng(0)
        state = nnx.state(model, LoRAParam)
        for _, var in nnx.to_flat_state(state):
            var.set_value(jnp.asarray(rng.normal(0, 0.05, var.shape), var.dtype))
        nnx.update(model, state)
    t, half = 16, 7
    ids = _ids(TINY[name]["vocab_size"], (2, t), seed=7)
    mask = np.ones((2, t), np.int32)
    mask[1, :3] = 0  # row 1 is left-padded
    full = np.asarray(model(ids, attention_mask=mask))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    valid = jnp.asarray(mask.astype(bool))
    layers = model.unstacked_layers()
    hidden, cache = model.cached_hidden_states(
        ids[:, :half], positions[:, :half], model.empty_cache(2, t), 0, valid, layers
    )
    steps = [np.asarray(model.logits(hidden))]
    for i in range(half, t):
        hidden, cache = model.cached_hidden_states(
            ids[:, i : i + 1], positions[:, i : i + 1], cache, i, valid
        )
        steps.append(np.asarray(model.logits(hidden)))
    cached = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert np.abs(cached - full)[real].max() <= TOL
    if lora:
        base, _ = load_model(path)
        assert np.abs(np.asarray(base(ids, attention_mask=mask)) - full)[real].max() > 100 * TOL
