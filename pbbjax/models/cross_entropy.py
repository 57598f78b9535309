"""Next-token cross-entropy through the LM head, without ever holding the ``[tokens, vocab]`` logits.

``head_cross_entropy(x, head, targets, weights)`` is ``sum_t weights[t] * CE(x[t] @ head, targets[t])``
for the final-normed hidden states ``x [B, T, D]``. It computes the logits a chunk of positions at a time
(``lax.scan`` over the time axis, every row in each chunk, so that rows stay split over the mesh's batch
axes and the vocabulary over ``tensor``). Under differentiation each chunk's gradient ``softmax - onehot``
is formed right after its logits and contracted with the head and the chunk at once, so the forward pass
returns the gradients (the loss is the scalar the step differentiates) and the backward pass only scales
them. Autodiff of ``log_softmax(x @ head)`` made four fp32 ``[tokens, vocab]`` arrays (the logits, their
exponentials, the one-hot scatter and the gradient), two of them live at once: 0.77 GiB for SmolLM2-135M
at 8 x 256 tokens, where a chunk here holds about 100 MB (``CHUNK_TOKENS``).

Positions whose weight is 0 (prompts, padding: half the tokens or more in completion-only SFT) need no
logits. Each row's positions are first reordered so that the weighted ones come first, and the chunk loop
runs only over the chunks that hold any (the most any row needs; a ``while`` loop with that trip count).
The reordering is per row, so rows stay where the mesh put them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pbbjax.models.linear import project
from pbbjax.models.sharding import batch_shards, constrain

CHUNK_TOKENS = 512  # tokens (rows x positions) whose logits a device holds at once, at most


def chunked_loss(fsdp: int) -> bool:
    """Whether the train step uses ``head_cross_entropy`` on a mesh whose ``fsdp`` axis has this size (1
    without a mesh). Not when FSDP shards the head: its gathered copy then stays live through the chunk loop,
    and the step's peak moved there (Qwen3-14B on v5p-64: 7.09 GiB of temporaries per chip against 6.95
    with the full logits, docs/scale.md). On one device it saves the logits (SmolLM2-135M at 8 x 256 on a
    CPU: 0.44 GiB of the step's temporaries, benchmarks/README.md)."""
    return fsdp == 1


def time_chunks(batch: int, length: int) -> tuple[int, int]:
    """(chunks, positions per chunk) for ``length`` positions of ``batch`` rows (a device's): the fewest
    near-equal chunks of at most ``CHUNK_TOKENS`` tokens, or of one position when even that is over. The
    chunks may cover a few positions more than ``length`` (fewer than ``chunks``); the callers pad those
    with zero weight. A prime length (e.g. GRPO's ``rl.max_new_tokens`` = 127) so gets chunks of the
    budget's size instead of one position each, as a divisor of the length would force."""
    per = max(1, min(length, CHUNK_TOKENS // max(batch, 1)))
    chunks = -(-length // per)
    return chunks, -(-length // chunks)


def _chunked(mesh: Mesh | None, *arrays: jax.Array) -> tuple[int, int, tuple[jax.Array, ...]]:
    """(chunks, positions per chunk, ``arrays`` [B, T, ...] zero-padded on the time axis to fill them)."""
    chunks, length = time_chunks(max(arrays[0].shape[0] // batch_shards(mesh), 1), arrays[0].shape[1])
    extra = chunks * length - arrays[0].shape[1]
    if extra:
        arrays = tuple(jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2)) for a in arrays)
    return chunks, length, arrays


def head_cross_entropy(
    x: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    head_out_first: bool,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Sum over positions of ``weights * CE(x @ head, targets)``: ``x [B, T, D]`` (after the final norm, in
    the compute dtype), ``head [D, V]`` (``head_out_first``: ``[V, D]``, a tied embedding as it is),
    ``targets [B, T]`` int, ``weights [B, T]`` fp32 -> a fp32 scalar. Gradients flow to ``x`` and ``head``.
    On a ``mesh``, each chunk's logits and the head's gradient keep the model's layout (rows over the batch
    axes, the vocabulary over ``tensor``, the head's gradient sharded as the head)."""
    _, length, (x, targets, weights) = _chunked(mesh, x, targets, weights)  # padding weighs 0
    return _cross_entropy((head_out_first, mesh, length), x, head, targets, weights)


def _by_weight(layout, x, targets, weights):
    """Each row's positions reordered, those with a nonzero weight first (in order), and cut into chunks of
    ``length`` positions (``layout[2]``, which divides T): (the order [B, T], (x, targets, weights)
    reordered, ``length``, how many chunks hold every weighted position of every row)."""
    length = layout[2]
    order = jnp.argsort(weights == 0, axis=1, stable=True)
    xs = tuple(
        jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
        for a in (x, targets, weights)
    )
    chunks = (jnp.max(jnp.sum(weights != 0, axis=1)) + length - 1) // length
    return order, xs, length, chunks


def _chunk(xs, i, length):
    return tuple(jax.lax.dynamic_slice_in_dim(a, i * length, length, axis=1) for a in xs)


def _logits(layout, x: jax.Array, head: jax.Array) -> jax.Array:
    out_first, mesh = layout[:2]
    logits = project(x, head, w_out_first=out_first, out_dtype=jnp.float32)
    return constrain(logits, mesh, ("batch", "length", "act_vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(layout, x, head, targets, weights):
    """The loss alone (evaluation): one head product per chunk."""
    _, xs, length, chunks = _by_weight(layout, x, targets, weights)

    def chunk(i, total):
        xc, tc, wc = _chunk(xs, i, length)
        logits = _logits(layout, xc, head)
        target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return total + jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * wc)

    return jax.lax.fori_loop(0, chunks, chunk, jnp.zeros((), jnp.float32))


def _forward(layout, x, head, targets, weights):
    """The loss and its gradients at once (training): the loss is the scalar the step differentiates, so its
    cotangent only scales them. Three head products per chunk (logits, d x, d head), as autodiff of the full
    logits has, and no recomputation in the backward pass."""
    order, xs, length, chunks = _by_weight(layout, x, targets, weights)
    out_first, mesh, _ = layout
    vocab = head.shape[0] if out_first else head.shape[1]
    head_axes = ("vocab", "embed") if out_first else ("embed", "vocab")

    def chunk(i, carry):
        total, d_head, d_x = carry
        xc, tc, wc = _chunk(xs, i, length)
        logits = _logits(layout, xc, head)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        hit = jnp.arange(vocab) == tc[..., None]
        total = total + jnp.sum((lse[..., 0] - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)) * wc)
        probs = jnp.exp(logits - lse)
        d_logits = (jnp.where(hit, probs - 1.0, probs) * wc[..., None]).astype(x.dtype)  # softmax - onehot
        # d x = d_logits @ head^T; d head = x^T d_logits over the chunk's tokens ([V, D] or [D, V])
        d_xc = project(d_logits, head, w_out_first=not out_first)
        flat_x, flat_d = xc.reshape(-1, xc.shape[-1]), d_logits.reshape(-1, vocab)
        a, b = (flat_d, flat_x) if out_first else (flat_x, flat_d)
        d_head = d_head + jax.lax.dot_general(
            a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return total, d_head, jax.lax.dynamic_update_slice_in_dim(d_x, d_xc, i * length, axis=1)

    zero = (
        jnp.zeros((), jnp.float32),
        constrain(jnp.zeros(head.shape, jnp.float32), mesh, head_axes),
        constrain(jnp.zeros_like(x), mesh, ("batch", "length", "act_embed")),
    )
    total, d_head, d_x = jax.lax.fori_loop(0, chunks, chunk, zero)
    d_x = jnp.take_along_axis(d_x, jnp.argsort(order, axis=1)[..., None], axis=1)  # the positions' own order
    return total, (d_x, d_head.astype(head.dtype))


def _backward(layout, residuals, g):
    d_x, d_head = residuals
    return (g * d_x).astype(d_x.dtype), (g * d_head).astype(d_head.dtype), None, None


_cross_entropy.defvjp(_forward, _backward)


def head_log_probs(
    x: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    head_out_first: bool,
    temperature: float = 1.0,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Per-token ``log_softmax(x @ head / temperature)[targets]``: ``x [B, T, D]`` (after the final norm),
    ``targets [B, T]`` int -> fp32 ``[B, T]``, differentiable in ``x`` and ``head``. For a loss that is not
    linear in the log-probs (GRPO's clipped ratio), so its gradients cannot be formed in the forward pass
    as ``head_cross_entropy`` does: instead each chunk of positions (``time_chunks``) is rematerialised,
    its logits recomputed in the backward pass (four head products per chunk where autodiff of the full
    logits has three), and no more than one chunk's fp32 logits are live at once."""
    layout = (head_out_first, mesh)
    positions = x.shape[1]
    k, length, (x, targets) = _chunked(mesh, x, targets)

    @jax.checkpoint
    def chunk_log_probs(xc, tc):
        logits = _logits(layout, xc, head) / temperature
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    def chunk(i, out):
        xc, tc = _chunk((x, targets), i, length)
        return jax.lax.dynamic_update_slice_in_dim(out, chunk_log_probs(xc, tc), i * length, axis=1)

    out = constrain(jnp.zeros(targets.shape, jnp.float32), mesh, ("batch", "length"))
    return jax.lax.fori_loop(0, k, chunk, out)[:, :positions]
