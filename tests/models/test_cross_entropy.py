"""``head_cross_entropy`` (logits a chunk at a time, gradients formed in the forward pass) against autodiff
of the plain masked cross-entropy over all the logits: value and gradients, both head layouts, any
chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pbbjax.models import cross_entropy
from pbbjax.models.cross_entropy import head_cross_entropy, time_chunks


def _reference(x, head, targets, weights, out_first):
    logits = jnp.einsum("btd,vd->btv" if out_first else "btd,dv->btv", x, head, precision="highest")
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)


@pytest.mark.parametrize("out_first", [True, False])
@pytest.mark.parametrize("chunk_tokens", [4096, 24, 3])  # one chunk; several; one position per chunk
def test_chunked_head_cross_entropy_equals_autodiff_of_the_full_logits(out_first, chunk_tokens, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", chunk_tokens)
    b, t, d, v = 3, 16, 8, 50
    kx, kh, kt, kw = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (b, t, d))
    head = jax.random.normal(kh, (v, d) if out_first else (d, v))
    targets = jax.random.randint(kt, (b, t), 0, v)
    weights = (jax.random.uniform(kw, (b, t)) > 0.3).astype(jnp.float32) * jnp.linspace(0.5, 2.0, t)

    def ours(x, head):
        return head_cross_entropy(x, head, targets, weights, head_out_first=out_first)

    def ref(x, head):
        return _reference(x, head, targets, weights, out_first)

    np.testing.assert_allclose(ours(x, head), ref(x, head), rtol=1e-5)  # the loss alone (evaluation)
    value, _ = jax.value_and_grad(ours)(x, head)  # the loss with its gradients (training)
    np.testing.assert_allclose(value, ref(x, head), rtol=1e-5)
    for got, want in zip(jax.grad(ours, (0, 1))(x, head), jax.grad(ref, (0, 1))(x, head), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_time_chunks_divide_the_length_within_the_token_budget():
    assert time_chunks(8, 256) == 4  # 8 rows x 64 positions = 512 tokens per chunk
    assert time_chunks(1, 256) == 1
    assert time_chunks(8, 100) == 2  # 8 x 50 = 400; 100 has no divisor giving exactly 64
    assert time_chunks(1024, 7) == 7  # one position at a time when even that is over the budget
