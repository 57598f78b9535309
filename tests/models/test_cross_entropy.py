"""``head_cross_entropy`` (logits a chunk at a time, gradients formed in the forward pass, only the chunks
that hold weighted positions) against autodiff of the plain masked cross-entropy over all the logits: value
and gradients, both head layouts, any chunking, any pattern of zero weights, on one device and on a mesh.
And ``head_log_probs`` (per-token log-probs, chunks rematerialised) against autodiff of ``log_softmax``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pbbjax.models import cross_entropy
from pbbjax.models.cross_entropy import head_cross_entropy, head_log_probs, time_chunks
from pbbjax.models.sharding import make_mesh


def _reference(x, head, targets, weights, out_first):
    logits = jnp.einsum("btd,vd->btv" if out_first else "btd,dv->btv", x, head, precision="highest")
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)


def _weights(pattern: str, b: int, t: int) -> jax.Array:
    """[b, t] fp32 loss weights: scattered (random), the second half (completion-only SFT), one row with
    none and one with all, or none at all."""
    scale = jnp.linspace(0.5, 2.0, t)
    if pattern == "scattered":
        return (jax.random.uniform(jax.random.key(3), (b, t)) > 0.3).astype(jnp.float32) * scale
    if pattern == "second half":
        return jnp.zeros((b, t)).at[:, t // 2 :].set(1.0) * scale
    if pattern == "uneven rows":
        return jnp.zeros((b, t)).at[1].set(1.0).at[2, 3].set(1.5) * scale
    return jnp.zeros((b, t))


def _check(out_first, weights, mesh=None, b=3, t=16, d=8, v=50):
    kx, kh, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, t, d))
    head = jax.random.normal(kh, (v, d) if out_first else (d, v))
    targets = jax.random.randint(kt, (b, t), 0, v)

    def ours(x, head):
        return head_cross_entropy(x, head, targets, weights, head_out_first=out_first, mesh=mesh)

    def ref(x, head):
        return _reference(x, head, targets, weights, out_first)

    np.testing.assert_allclose(jax.jit(ours)(x, head), ref(x, head), rtol=1e-5, atol=1e-6)  # evaluation
    value, _ = jax.jit(jax.value_and_grad(ours))(x, head)  # the loss with its gradients (training)
    np.testing.assert_allclose(value, ref(x, head), rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(ours, (0, 1)))(x, head)
    for got, want in zip(grads, jax.grad(ref, (0, 1))(x, head), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_first", [True, False])
@pytest.mark.parametrize("chunk_tokens", [4096, 24, 3])  # one chunk; several; one position per chunk
@pytest.mark.parametrize("pattern", ["scattered", "second half", "uneven rows", "none"])
def test_chunked_head_cross_entropy_equals_autodiff_of_the_full_logits(
    out_first, chunk_tokens, pattern, monkeypatch
):
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", chunk_tokens)
    _check(out_first, _weights(pattern, 3, 16))


@pytest.mark.parametrize("pattern", ["scattered", "uneven rows"])
def test_chunked_head_cross_entropy_on_a_mesh_keeps_each_row_on_its_devices(pattern, monkeypatch):
    """Rows over ``data``, the vocabulary over ``tensor`` (8 CPU devices): the per-row reordering and the
    loop's trip count (a maximum over every row) give the single-device result."""
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 8)  # 4 rows per device group x 2 positions
    _check(True, _weights(pattern, 8, 16), mesh=make_mesh(data=4, fsdp=1, tensor=2), b=8, v=64)


def test_only_the_chunks_holding_weighted_positions_are_computed(monkeypatch):
    """The chunk loop's trip count: the most weighted positions in any row, in chunks of ``length``."""
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 12)  # 3 rows x 4 positions per chunk
    x, targets = jnp.zeros((3, 16, 8)), jnp.zeros((3, 16), jnp.int32)
    for pattern, want in [("second half", 2), ("uneven rows", 4), ("scattered", 4), ("none", 0)]:
        weights = _weights(pattern, 3, 16)
        _, (_, _, reordered), length, chunks = cross_entropy._by_weight((True, None, 4), x, targets, weights)
        assert (length, int(chunks)) == (4, want), pattern
        # the weighted positions lead each row, in their order
        for row, got in zip(weights, reordered, strict=True):
            kept = np.asarray(row)[np.asarray(row) != 0]
            np.testing.assert_array_equal(np.asarray(got)[: len(kept)], kept)
            assert not np.asarray(got)[len(kept) :].any()


def test_time_chunks_within_the_token_budget():
    """(chunks, positions per chunk): near-equal chunks of at most CHUNK_TOKENS (512) tokens."""
    assert time_chunks(8, 256) == (4, 64)  # 8 rows x 64 positions = 512 tokens per chunk
    assert time_chunks(1, 256) == (1, 256)
    assert time_chunks(8, 100) == (2, 50)
    assert time_chunks(64, 127) == (16, 8)  # a prime length: padded to 128, not 127 chunks of one position
    assert time_chunks(8, 130) == (3, 44)  # 132 positions; a divisor of 130 would give 5 chunks of 26
    assert time_chunks(1024, 7) == (7, 1)  # one position at a time when even that is over the budget


@pytest.mark.parametrize("pattern", ["scattered", "second half", "uneven rows"])
def test_head_cross_entropy_on_a_prime_length(pattern, monkeypatch):
    """13 positions in chunks of 4 (3 rows x 4 positions): the 3 padding positions weigh nothing."""
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 12)
    assert time_chunks(3, 13) == (4, 4)
    _check(True, _weights(pattern, 3, 13), t=13)


def _check_log_probs(out_first, mesh=None, b=3, t=16, d=8, v=50, temperature=0.7):
    kx, kh, kt, kg = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(kx, (b, t, d))
    head = jax.random.normal(kh, (v, d) if out_first else (d, v))
    targets = jax.random.randint(kt, (b, t), 0, v)
    cotangent = jax.random.normal(kg, (b, t))  # a loss that is not linear in the log-probs' sum

    def ours(x, head):
        return head_log_probs(x, head, targets, head_out_first=out_first, temperature=temperature, mesh=mesh)

    def ref(x, head):
        logits = jnp.einsum("btd,vd->btv" if out_first else "btd,dv->btv", x, head, precision="highest")
        logp = jax.nn.log_softmax(logits / temperature, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    np.testing.assert_allclose(jax.jit(ours)(x, head), ref(x, head), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda x, h: jnp.sum(jnp.exp(ours(x, h)) * cotangent), (0, 1)))(x, head)
    want = jax.grad(lambda x, h: jnp.sum(jnp.exp(ref(x, h)) * cotangent), (0, 1))(x, head)
    for got, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_first", [True, False])
@pytest.mark.parametrize("chunk_tokens", [4096, 24, 3])  # one chunk; several; one position per chunk
def test_chunked_head_log_probs_equal_autodiff_of_the_full_log_softmax(out_first, chunk_tokens, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", chunk_tokens)
    _check_log_probs(out_first)


def test_head_log_probs_on_a_prime_length(monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 12)  # 13 positions in 4 chunks of 4
    _check_log_probs(False, t=13)


def test_chunked_head_log_probs_on_a_mesh(monkeypatch):
    """Rows over ``data``, the vocabulary over ``tensor`` (8 CPU devices), two positions per chunk."""
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 8)
    _check_log_probs(True, mesh=make_mesh(data=4, fsdp=1, tensor=2), b=8, v=64)


def test_head_log_probs_keep_one_chunk_of_logits_live(monkeypatch):
    """The jaxpr's largest logits are one chunk's ([3, 4, vocab] of [3, 16]), in the forward pass and in the
    backward pass's recomputation alike."""
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 12)
    x, head, targets = jnp.zeros((3, 16, 8)), jnp.zeros((50, 8)), jnp.zeros((3, 16), jnp.int32)
    fn = jax.grad(lambda x: jnp.sum(head_log_probs(x, head, targets[:, : x.shape[1]], head_out_first=True)))
    text = str(jax.make_jaxpr(fn)(x))
    assert {int(n) for n in re.findall(r"f32\[3,(\d+),50\]", text)} == {4}
    prime = str(jax.make_jaxpr(fn)(jnp.zeros((3, 13, 8))))  # padded to 16, not 13 chunks of one position
    assert {int(n) for n in re.findall(r"f32\[3,(\d+),50\]", prime)} == {4}
