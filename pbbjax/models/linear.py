"""The decoder's weight products, each computed as one 2-D matrix product.

``project(x, w)`` contracts the trailing input axes of activations ``x [..., *in]`` with a kernel
``w [*in, *out]`` (or ``[*out, *in]``: the tied LM head reads the embedding ``[vocab, embed]`` as it is). It
first flattens ``x`` to ``[tokens, inputs]`` and ``w`` to a matrix (free reshapes of contiguous axes), then
restores the output's axes. The forward product is the same as an ``einsum`` over the unflattened axes, but
the gradient is not: autodiff of a product over ``[B, T, ...]`` contracts the weight gradient over two axes
(batch and time), and XLA:CPU lays out such a product by first transposing the activation-sized operand
(the MLP's, 12.6 MB per layer for SmolLM2 at 8 x 256 tokens, the LM head's 400 MB). Over one flat tokens
axis the gradient is a plain ``x^T g`` product with no copies. ``benchmarks/train_step.py`` measures the
difference (benchmarks/README.md).
"""

from __future__ import annotations

import math

import jax


def project(x: jax.Array, w: jax.Array, inputs: int = 1, *, w_out_first: bool = False, out_dtype=None):
    """``x [..., *in]`` times ``w [*in, *out]`` (``w_out_first``: ``w [*out, *in]``) -> ``[..., *out]``, where
    ``in`` is the last ``inputs`` axes of ``x``; ``out_dtype``: the product's accumulation and output dtype
    (default: ``x``'s)."""
    lead, k = x.shape[: x.ndim - inputs], math.prod(x.shape[x.ndim - inputs :])
    if w_out_first:
        out, matrix, contract = w.shape[: w.ndim - inputs], w.reshape(-1, k), 1
    else:
        out, matrix, contract = w.shape[inputs:], w.reshape(k, -1), 0
    y = jax.lax.dot_general(
        x.reshape(-1, k), matrix, (((1,), (contract,)), ((), ())), preferred_element_type=out_dtype
    )
    return y.reshape(*lead, *out)
