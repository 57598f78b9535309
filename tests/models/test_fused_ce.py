"""The fused LM head + cross-entropy against the plain composition (logits, log-softmax, gather) and its
autodiff gradients: tied and untied heads, one chunk and many, and a frozen head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pbbjax.models import fused_ce

TOL = 1e-5  # fp32, relative to the largest magnitude


def _plain(x, head, targets, coef, tied):
    logits = jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", x, head)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(coef * nll)


def _close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= TOL * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_tokens", [4096, 6])  # one chunk; chunks of 3 positions x 2 rows
def test_value_and_gradients_equal_autodiff(tied, chunk_tokens, monkeypatch):
    monkeypatch.setattr(fused_ce, "CHUNK_TOKENS", chunk_tokens)
    r = np.random.default_rng(0)
    b, t, d, v = 2, 12, 16, 50
    x = jnp.asarray(r.standard_normal((b, t, d)), jnp.float32)
    head = jnp.asarray(r.standard_normal((v, d) if tied else (d, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(r.integers(0, v, (b, t)), jnp.int32)
    coef = jnp.asarray(r.random((b, t)) * (r.random((b, t)) > 0.3), jnp.float32)

    def fused(x, head):
        return fused_ce.weighted_nll(x, head, targets, coef, tied) * 0.7  # a cotangent other than 1

    def plain(x, head):
        return _plain(x, head, targets, coef, tied) * 0.7

    _close(fused(x, head), plain(x, head))
    (value, grads), (ref_value, ref_grads) = (jax.value_and_grad(f, (0, 1))(x, head) for f in (fused, plain))
    _close(value, ref_value)
    for g, ref in zip(grads, ref_grads, strict=True):
        _close(g, ref)
    # a frozen head (LoRA's base): the gradient with respect to x alone, the head's never formed
    _close(jax.grad(fused)(x, head), ref_grads[0])


def test_chunk_length_divides_the_sequence(monkeypatch):
    monkeypatch.setattr(fused_ce, "CHUNK_TOKENS", 4096)
    assert fused_ce.chunk_length(8, 256) == 256
    assert fused_ce.chunk_length(64, 1024) == 64
    assert fused_ce.chunk_length(3, 7) == 7
    assert fused_ce.chunk_length(4096, 7) == 1
