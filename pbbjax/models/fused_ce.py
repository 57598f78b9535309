"""The LM head and the cross-entropy in one op that never holds a whole ``[B, T, vocab]`` logits array.

``weighted_nll(x, head, targets, coef)`` is ``sum(coef * -log softmax(x @ head)[targets])``. It runs over
chunks of positions (``lax.scan``): each chunk's fp32 logits exist only while that chunk is processed. When
differentiated, the forward pass also forms each chunk's gradients (softmax minus one-hot, then through the
head: the same three matrix products autodiff would run, none repeated), and the backward pass only scales
them by the incoming cotangent. Memory for the loss is then one chunk of logits instead of the several
``[B, T, vocab]`` fp32 arrays (logits, softmax, its gradient) that the plain composition keeps for the
backward pass; on a 49k vocabulary those dominate a small model's step.

``head`` is ``[vocab, D]`` (a tied embedding, ``tied=True``) or ``[D, vocab]`` (an LM head). ``coef`` is
data, not differentiated (the per-token weights of the loss). The head's gradient is formed only when the
head is being differentiated (a frozen LoRA base skips it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pbbjax.models.sharding import constrain

CHUNK_TOKENS = 4096  # positions x rows per chunk: 4096 x 49152 fp32 logits = 0.8 GB


def chunk_length(batch: int, length: int) -> int:
    """The largest divisor of ``length`` whose chunk of ``batch`` rows stays within ``CHUNK_TOKENS``."""
    fits = [c for c in range(1, length + 1) if length % c == 0 and batch * c <= CHUNK_TOKENS]
    return max(fits, default=1)


def _chunks(a: jax.Array, c: int) -> jax.Array:
    """[B, T, ...] -> [T // c, B, c, ...]."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, t // c, c, *a.shape[2:]), 1, 0)


def _logits(x, head, tied: bool):
    dims = (((2,), (1,)), ((), ())) if tied else (((2,), (0,)), ((), ()))
    return jax.lax.dot_general(x, head.astype(x.dtype), dims, preferred_element_type=jnp.float32)


def _nll(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse


def _forward(x, head, targets, coef, tied: bool, mesh, with_grads: bool, head_grad: bool):
    c = chunk_length(x.shape[0], x.shape[1])

    def one(dhead, xs):
        xc, yc, ac = xs
        logits = constrain(_logits(xc, head, tied), mesh, ("batch", "length", "act_vocab"))
        nll, lse = _nll(logits, yc)
        if not with_grads:
            return dhead, (jnp.sum(nll * ac), None)
        g = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(yc, logits.shape[-1], dtype=jnp.float32)
        g = (g * ac[..., None]).astype(x.dtype)  # d loss / d logits
        back = (((2,), (0,)), ((), ())) if tied else (((2,), (1,)), ((), ()))
        dx = jax.lax.dot_general(g, head.astype(x.dtype), back, preferred_element_type=jnp.float32)
        if head_grad:
            eq = "bcv,bcd->vd" if tied else "bcv,bcd->dv"
            dhead = constrain(dhead + jnp.einsum(eq, g, xc, preferred_element_type=jnp.float32), mesh, axes)
        return dhead, (jnp.sum(nll * ac), dx.astype(x.dtype))

    axes = ("vocab", "embed") if tied else ("embed", "vocab")  # the head's own layout (its gradient's)
    dhead0 = constrain(jnp.zeros(head.shape, jnp.float32), mesh, axes) if with_grads and head_grad else None
    dhead, (sums, dx) = jax.lax.scan(one, dhead0, (_chunks(x, c), _chunks(targets, c), _chunks(coef, c)))
    if dx is not None:
        dx = jnp.moveaxis(dx, 0, 1).reshape(x.shape)
    return jnp.sum(sums), dx, dhead


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def weighted_nll(x, head, targets, coef, tied: bool, mesh: Mesh | None = None) -> jax.Array:
    """x [B, T, D], head, targets [B, T] int, coef [B, T] fp32 -> sum(coef * nll) (fp32 scalar); on a
    ``mesh``, each chunk's logits are laid out as the model's (rows over the batch axes, vocab over
    ``tensor``)."""
    return _forward(x, head, targets, coef, tied, mesh, with_grads=False, head_grad=False)[0]


def _fwd(x, head, targets, coef, tied, mesh):
    head_grad = head.perturbed
    total, dx, dhead = _forward(
        x.value, head.value, targets.value, coef.value, tied, mesh, with_grads=True, head_grad=head_grad
    )
    return total, (dx, dhead, head.value)


def _bwd(tied, mesh, residuals, ct):
    dx, dhead, head = residuals
    dx = (dx * ct.astype(dx.dtype)).astype(dx.dtype)
    dhead = None if dhead is None else (dhead * ct).astype(head.dtype)
    return dx, dhead, None, None


weighted_nll.defvjp(_fwd, _bwd, symbolic_zeros=True)
