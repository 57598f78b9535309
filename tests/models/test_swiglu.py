"""Layer pieces with hand-written gradients (``layers.swiglu``) against autodiff of what they compute."""

import jax
import jax.numpy as jnp
import numpy as np

from pbbjax.models.layers import swiglu


def test_swiglu_gradient_equals_autodiff_of_silu_times_up():
    kg, ku, kd = jax.random.split(jax.random.key(0), 3)
    gate = 4 * jax.random.normal(kg, (3, 7, 16))  # large |gate| too, where the sigmoid saturates
    up, d = jax.random.normal(ku, gate.shape), jax.random.normal(kd, gate.shape)

    def ref(g, u):
        return jax.nn.silu(g) * u

    np.testing.assert_allclose(swiglu(gate, up), ref(gate, up), rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda g, u: jnp.sum(swiglu(g, u) * d), (0, 1))(gate, up)
    refs = jax.grad(lambda g, u: jnp.sum(ref(g, u) * d), (0, 1))(gate, up)
    for got, want in zip(grads, refs, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
