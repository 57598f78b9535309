"""``project``: the decoder's weight products as 2-D matrix products, equal to the einsums they replace,
forward and gradient, for every layout the decoder uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pbbjax.models.linear import project

CASES = [  # (x shape, w shape, inputs, w_out_first, the einsum it computes)
    ((2, 5, 6), (6, 3, 4), 1, False, "btd,dnh->btnh"),  # q/k/v: [embed, heads, head_dim]
    ((2, 5, 3, 4), (3, 4, 6), 2, False, "btnh,nhd->btd"),  # o: [heads, head_dim, embed]
    ((2, 5, 6), (6, 7), 1, False, "btd,df->btf"),  # MLP, untied LM head
    ((2, 5, 6), (11, 6), 1, True, "btd,vd->btv"),  # tied LM head: the embedding [vocab, embed]
    ((5, 6), (6, 7), 1, False, "td,df->tf"),  # no batch axis
]


@pytest.mark.parametrize("xs,ws,inputs,out_first,spec", CASES)
def test_project_equals_einsum_forward_and_gradients(xs, ws, inputs, out_first, spec):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    y = project(x, w, inputs, w_out_first=out_first)
    ref = jnp.einsum(spec, x, w, precision="highest")
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, ref.shape)
    grads = jax.grad(lambda x, w: jnp.sum(project(x, w, inputs, w_out_first=out_first) * g), (0, 1))(x, w)
    refs = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w, precision="highest") * g), (0, 1))(x, w)
    for a, b in zip(grads, refs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_project_out_dtype_accumulates_bf16_in_fp32():
    x = jnp.ones((2, 3, 8), jnp.bfloat16)
    w = jnp.full((8, 4), 1 / 3, jnp.bfloat16)
    assert project(x, w).dtype == jnp.bfloat16
    assert project(x, w, out_dtype=jnp.float32).dtype == jnp.float32
