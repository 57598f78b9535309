"""The self-attention kernels (``model.attention``) against the XLA attention: splash in Pallas's interpreter
on CPU, and the arguments the cuDNN path passes to ``jax.nn.dot_product_attention``, on packed,
left-padded and plain causal rows, forward and backward; then whole models, sharded and not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, hf_logits
from jax.sharding import NamedSharding

from pbbjax import load_model, make_mesh
from pbbjax.models import attention
from pbbjax.models.attention import SelfAttentionMask
from pbbjax.models.sharding import logical_to_spec

TOL = 1e-5  # fp32, kernel against the XLA attention


def _segments(kind: str, b: int, t: int) -> np.ndarray:
    seg = np.ones((b, t), np.int32)
    if kind == "packed":  # rows of 2-3 sequences and trailing padding
        seg[0, 40:90], seg[0, 90:] = 2, 0
        seg[1, 17:], seg[1, t - 5 :] = 2, 0
        seg[1, 60:] = np.where(seg[1, 60:] > 0, 3, 0)
    elif kind == "left_padded":
        seg[0, :30], seg[1, :7] = 0, 0
    return seg


def _qkv(b, t, n, k, h, seed=0):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal((b, t, heads, h)), jnp.float32) for heads in (n, k, k)]


def _on_real(x, seg):
    return jnp.where(jnp.asarray(seg > 0)[:, :, None, None], x, 0.0)


@pytest.mark.parametrize("kind", ["causal", "packed", "left_padded"])
@pytest.mark.parametrize("t", [128, 100])  # 100: padded up to splash's 128-token block inside
def test_splash_equals_xla_forward_and_backward(kind, t):
    seg = _segments(kind, 2, t)
    q, k, v = _qkv(2, t, 4, 2, 64)
    segj = jnp.asarray(seg)
    xla = SelfAttentionMask(segj, "xla", attention.dense_mask(segj))
    splash = SelfAttentionMask(segj, "splash", interpret=True)

    def loss(mask, q, k, v):
        out = attention.self_attention(q, k, v, mask)
        return jnp.sum(_on_real(out, seg) * jnp.cos(jnp.arange(out.size).reshape(out.shape) * 0.1))

    ref = attention.self_attention(q, k, v, xla)
    out = attention.self_attention(q, k, v, splash)
    assert out.shape == ref.shape
    assert float(jnp.abs(_on_real(out - ref, seg)).max()) <= TOL
    grads_ref = jax.grad(loss, argnums=(1, 2, 3))(xla, q, k, v)
    grads = jax.grad(loss, argnums=(1, 2, 3))(splash, q, k, v)
    for name, g, gr in zip("qkv", grads, grads_ref, strict=True):
        assert float(jnp.abs(g - gr).max()) <= TOL, name


def _softmax_attention(q, k, v, mask):
    """The reference: plain autodiff of softmax(q k^T / sqrt(h)) v, GQA by repeating k and v per group."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("kind", ["causal", "packed", "left_padded"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
@pytest.mark.parametrize("t", [96, 100, 40])  # 3 query blocks, 3 uneven ones, one
def test_xla_attention_in_query_blocks_equals_autodiff(kind, heads, t):
    """``xla_attention`` (queries in causal blocks, its own backward pass from the kept probabilities)
    gives the forward and the q, k, v gradients of plain autodiff through the softmax of the whole
    [T, T] scores, at every real query; padding queries' outputs are not read (weight 0, as the loss's)."""
    seg = _segments(kind, 2, t)
    q, k, v = _qkv(2, t, *heads, 32, seed=2)
    mask = attention.dense_mask(jnp.asarray(seg))
    weights = _on_real(jnp.cos(jnp.arange(q.size).reshape(q.shape) * 0.1), seg)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * weights)

    out, ref = attention.xla_attention(q, k, v, mask), _softmax_attention(q, k, v, mask)
    assert float(jnp.abs(_on_real(out - ref, seg)).max()) <= TOL
    grads = jax.grad(loss, argnums=(1, 2, 3))(attention.xla_attention, q, k, v)
    grads_ref = jax.grad(loss, argnums=(1, 2, 3))(_softmax_attention, q, k, v)
    for name, g, gr in zip("qkv", grads, grads_ref, strict=True):
        assert float(jnp.abs(g - gr).max()) <= TOL, name


def test_xla_attention_over_other_keys_is_one_block_and_any_mask():
    """With keys that are not the queries' own sequence (S != T) nothing is causal: one block, any mask."""
    q, k, v = _qkv(2, 64, 6, 2, 32, seed=3)
    k, v = jnp.concatenate([k, k[:, :16] * 0.5], axis=1), jnp.concatenate([v, -v[:, :16]], axis=1)
    mask = jnp.asarray(np.random.RandomState(0).rand(2, 64, 80) < 0.7).at[:, :, 0].set(True)
    assert attention.query_blocks(64, 80) == [(0, 64, 80)]
    weights = jnp.sin(jnp.arange(q.size).reshape(q.shape) * 0.1)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * weights)

    out, ref = attention.xla_attention(q, k, v, mask), _softmax_attention(q, k, v, mask)
    assert float(jnp.abs(out - ref).max()) <= TOL
    grads = jax.grad(loss, argnums=(1, 2, 3))(attention.xla_attention, q, k, v)
    grads_ref = jax.grad(loss, argnums=(1, 2, 3))(_softmax_attention, q, k, v)
    for name, g, gr in zip("qkv", grads, grads_ref, strict=True):
        assert float(jnp.abs(g - gr).max()) <= TOL, name


@pytest.mark.parametrize("t", [1, 31, 64, 100, 256, 1000, 4096])
def test_query_blocks_cover_every_row_once(t):
    blocks = attention.query_blocks(t, t)
    assert blocks[0][0] == 0 and blocks[-1][1] == t
    assert all(a < b == c for (a, b, _), (c, _, _) in zip(blocks, blocks[1:] + [(t, 0, 0)], strict=True))
    assert all(keys == b for _, b, keys in blocks)  # causal: rows [a, b) meet keys [0, b)
    assert len(blocks) == {1: 1, 31: 1, 64: 2, 100: 3, 256: 8, 1000: 16, 4096: 16}[t]
    assert min(b - a for a, b, _ in blocks) >= min(t, 32)


@pytest.mark.parametrize("kind", ["causal", "packed", "left_padded"])
def test_cudnn_path_arguments_mean_the_same_mask(kind):
    """The cuDNN branch hands ``jax.nn.dot_product_attention`` the dense mask; its XLA implementation
    (this CPU has no cuDNN) with those arguments equals pbbjax's attention."""
    seg = _segments(kind, 2, 96)
    q, k, v = _qkv(2, 96, 6, 2, 32, seed=1)
    mask = SelfAttentionMask(jnp.asarray(seg), "cudnn", attention.dense_mask(jnp.asarray(seg)))
    out = attention.dot_product_attention(q, k, v, mask, implementation="xla")
    ref = attention.xla_attention(q, k, v, mask.dense)
    assert float(jnp.abs(_on_real(out - ref, seg)).max()) <= TOL


def test_segments_of_reproduces_the_causal_padding_and_packing_mask():
    am = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)
    sid = np.array([[0, 0, 1, 1, 2, 2], [1, 1, 1, 2, 2, 0]], np.int32)
    dense = attention.dense_mask(attention.segments_of(jnp.asarray(am), jnp.asarray(sid), am.shape))
    t = am.shape[1]
    expect = np.tril(np.ones((t, t), bool))[None] & am[:, None, :].astype(bool) & am[:, :, None].astype(bool)
    expect &= (sid[:, :, None] == sid[:, None, :]) & (sid > 0)[:, None, :]
    np.testing.assert_array_equal(np.asarray(dense), expect)


def test_resolve_by_platform_and_dtype():
    assert attention.resolve("auto", "cpu", "float32") == "xla"
    assert attention.resolve("auto", "tpu", "float32") == "splash"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float32") == "xla"  # cuDNN's kernel is 16-bit only
    assert attention.resolve("xla", "tpu", "bfloat16") == "xla"
    with pytest.raises(ValueError, match="model.attention='cudnn' runs on NVIDIA GPUs only"):
        attention.resolve("cudnn", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="needs model.compute_dtype bfloat16 or float16"):
        attention.resolve("cudnn", "gpu", "float32")
    with pytest.raises(ValueError, match="splash"):
        attention.resolve("splash", "gpu", "bfloat16")


def test_unknown_kernel_is_a_config_error():
    from pbbjax.config.run_config import build_run_config
    from pbbjax.config.schema import base_config

    c = base_config("proactive")
    c.model.attention = "flash"
    with pytest.raises(ValueError, match="config field 'model.attention' is 'flash'"):
        build_run_config(c)


def _packed_batch(vocab, t=128):
    ids = np.random.RandomState(3).randint(0, vocab, (2, t)).astype(np.int32)
    return ids, _segments("packed", 2, t)


def test_model_with_splash_equals_xla_and_transformers(hf_dirs):
    hf, path = hf_dirs["llama_gqa"]
    xla, _ = load_model(path, attention="xla")
    splash, _ = load_model(path, attention="splash")  # interpreted on this CPU
    ids, seg = _packed_batch(TINY["llama_gqa"]["vocab_size"])
    real = seg > 0
    diff = np.abs(np.asarray(splash(ids, segment_ids=seg)) - np.asarray(xla(ids, segment_ids=seg)))[real]
    assert diff.max() <= TOL
    plain = np.asarray(splash(ids))
    assert np.abs(plain - hf_logits(hf, ids)).max() <= 1e-4  # the parity tolerance of tests/models


def test_splash_on_a_mesh_equals_xla(hf_dirs):
    """Under ``shard_map``: rows over data x fsdp, heads over tensor (llama_gqa: 4 query, 2 KV heads)."""
    _, path = hf_dirs["llama_gqa"]
    mesh = make_mesh(2, 2, 2)
    ids, seg = _packed_batch(TINY["llama_gqa"]["vocab_size"])
    rows = NamedSharding(mesh, logical_to_spec(("batch", None), ids.shape, mesh))
    logits = {}
    for kernel in ("xla", "splash"):
        model, _ = load_model(path, mesh=mesh, attention=kernel)
        fwd = jax.jit(lambda m, i, s: m(i, segment_ids=s))
        logits[kernel] = np.asarray(
            jax.device_get(fwd(model, jax.device_put(ids, rows), jax.device_put(seg, rows)))
        )
    assert np.abs(logits["splash"] - logits["xla"])[seg > 0].max() <= TOL
