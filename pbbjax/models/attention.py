"""Causal self-attention over a sequence (training, scoring, evaluation forwards), by one of three kernels.

``model.attention`` picks the kernel:

- ``xla``: the scores ``[B, heads, T, T]`` in fp32, masked, softmaxed, times the values; runs everywhere.
  The queries run in causal blocks, so the scores above the diagonal's blocks are never computed.
  Its backward pass keeps the probabilities (in the compute dtype) and nothing else ``[T, T]``.
- ``splash``: Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) on TPU. A
  flash kernel: scores are never materialised, and blocks that the causal and segment masks rule out are
  skipped. Rows are padded to a multiple of its 128-token block with segment 0. On a CPU it runs in
  Pallas's interpreter, which is how the tests check it.
- ``cudnn``: cuDNN's fused attention through ``jax.nn.dot_product_attention``, NVIDIA GPUs only, in
  bfloat16 or float16.
- ``auto``: splash on TPU, cuDNN on GPU when the compute dtype is 16-bit, XLA otherwise.

Which tokens attend to which is given by ``segments`` [B, T] (int): a token attends to itself and the
earlier tokens of its own segment, and segment 0 is padding (it attends to nothing, and nothing attends to
it). Packed rows number their sequences 1, 2, ...; a left-padded row is its attention mask. What a padding
query outputs differs between the kernels; nothing reads it (the loss masks padding out).

On a mesh, splash runs per shard under ``shard_map``: rows split as the logical ``batch`` axis is, heads
over ``tensor`` when both the query and the KV head counts divide it.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pbbjax.models.sharding import logical_to_spec

SPLASH_BLOCK = 128  # splash's token block (the TPU lane width); rows are padded to a multiple of it
log = logging.getLogger(__name__)
_PLATFORM_KERNEL = {"tpu": "splash", "gpu": "cudnn"}
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


class SelfAttentionMask(NamedTuple):
    """What a layer's self-attention needs besides q, k, v: which tokens see which, and how to compute it."""

    segments: jax.Array  # int32 [B, T]: a token sees the earlier tokens of its segment; 0 = padding
    kernel: str  # a resolved implementation: "xla", "splash" or "cudnn"
    dense: jax.Array | None = None  # [B, T, T] bool, dense_mask(segments): the xla and cudnn kernels' mask
    mesh: Mesh | None = None
    interpret: bool = False  # splash in Pallas's interpreter (tests on CPU)


def dense_mask(segments: jax.Array) -> jax.Array:
    """[B, T, T] bool: query t may attend key s (causal, same segment, not padding)."""
    t = segments.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    return causal & (segments[:, :, None] == segments[:, None, :]) & (segments > 0)[:, None, :]


def segments_of(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """[B, T] int32 segments from an attention mask (1 = token) and/or packed segment ids (0 = padding)."""
    seg = jnp.ones(shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return seg if attention_mask is None else seg * (attention_mask != 0)


def platform_of(mesh: Mesh | None) -> str:
    """The platform the program is compiled for: the mesh's devices' (compile-only TPU devices included)."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(implementation: str, platform: str, compute_dtype) -> str:
    """``model.attention`` -> the kernel to run on ``platform`` ("cpu", "gpu", "tpu") in ``compute_dtype``;
    ValueError when the named kernel cannot run there (``ModelConfig`` checks the name itself)."""
    if implementation == "auto":
        kernel = _PLATFORM_KERNEL.get(platform, "xla")
        if kernel == "cudnn" and jnp.dtype(compute_dtype) not in _CUDNN_DTYPES:
            kernel = "xla"
        return kernel
    if implementation == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"model.attention='splash' runs on TPU (or interpreted on CPU), not on {platform}")
    if implementation == "cudnn":
        if platform != "gpu":
            raise ValueError(f"model.attention='cudnn' runs on NVIDIA GPUs only; this one is for {platform}")
        if jnp.dtype(compute_dtype) not in _CUDNN_DTYPES:
            raise ValueError(
                f"model.attention='cudnn' needs model.compute_dtype bfloat16 or float16, not {compute_dtype}"
            )
    return implementation


def self_attention_mask(
    implementation: str, segments: jax.Array, mesh: Mesh | None, compute_dtype
) -> SelfAttentionMask:
    """The mask of a forward on ``mesh`` (or the default device) with ``model.attention`` =
    ``implementation``, built once for all layers; splash on a CPU runs in Pallas's interpreter (slow: for
    checking the kernel)."""
    platform = platform_of(mesh)
    kernel = resolve(implementation, platform, compute_dtype)
    interpret = kernel == "splash" and platform == "cpu"
    if interpret:
        _warn_interpreted()
    dense = None if kernel == "splash" else dense_mask(segments)
    return SelfAttentionMask(segments, kernel, dense, mesh, interpret)


@functools.cache
def _warn_interpreted() -> None:
    log.warning("model.attention='splash' on a CPU runs Pallas's interpreter: correct, and very slow")


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SelfAttentionMask) -> jax.Array:
    """q [B,T,N,H], k and v [B,T,K,H] (K divides N) -> [B,T,N,H] in v's dtype."""
    if mask.kernel == "splash":
        return _splash(q, k, v, mask)
    if mask.kernel == "cudnn":
        return dot_product_attention(q, k, v, mask, implementation="cudnn")
    return xla_attention(q, k, v, mask.dense)


def dot_product_attention(q, k, v, mask: SelfAttentionMask, implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` with ``mask`` (``implementation="cudnn"``: the fused kernel)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense[:, None], implementation=implementation)


@jax.custom_vjp
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax(q k^T / sqrt(h)) v with GQA: q [B,T,N,H], k and v [B,S,K,H], mask [B,T,S] bool -> [B,T,N,H].

    ``mask`` must be causal where S == T (no query sees a later key; ``dense_mask`` is), for the queries run
    in blocks (``query_blocks``): the queries of rows [a, b) meet the keys [0, b) only, so the blocks above
    the diagonal, which the mask rules out, cost nothing. For SmolLM2-135M's layer at 8 x 256 tokens, 8
    blocks take the attention's forward and backward from 63 to 41 ms on a 2-core AMD EPYC (fp32). A
    padding query (every key masked) averages the values of its block's keys rather than all of them; what
    it outputs is not read (the module's docstring).

    The products run heads-major (``heads_first``, as the decode step's ``layers.Attention.attend_cache``):
    q as [B, K, G*T, H], k and v as [B, K, S, H], so every product is a plain batched matrix product over
    (B, K). Contracting over (G, T) in q's own [B, T, K, G, H] layout made XLA:CPU copy the queries, the
    output gradient and the probabilities into a transposed layout for each backward product (83 -> 66 ms
    for SmolLM2-135M's layer at 8 x 256 tokens, forward and backward); the transposes here are of the
    [T, H]-sized tensors only.

    Its gradient keeps one ``[T, S]`` tensor per layer from the forward pass (less, for the blocks it skips):
    the probabilities, in the values' dtype, as the forward's product with the values reads them. Autodiff
    of the softmax kept three fp32 ones (the exponentials, the broadcast reciprocal of their sum, the
    probabilities): 1.6 GiB for SmolLM2-135M at 8 x 256 tokens, where this keeps 0.5 GiB. (Recomputing the
    probabilities in the backward pass instead does not save memory on XLA:CPU: it merges the recomputation
    with the forward's as a common subexpression, after dropping any optimization barrier.)"""
    return _xla_attention_fwd(q, k, v, mask)[0]


def query_blocks(t: int, s: int) -> list[tuple[int, int, int]]:
    """(a, b, keys): the query rows [a, b) ``xla_attention`` runs together and the keys [0, keys) they meet.

    With S == T (causal), ``min(16, T // 32)`` blocks of equal size, each at least 32 rows (at 8 x 256
    tokens, 8 blocks beat 2, 4 and 16; at 2 x 1024, 16 beat 4 and 8), block [a, b) meeting keys [0, b);
    otherwise (keys that are not the queries' own sequence) one block meeting every key."""
    if s != t:
        return [(0, t, s)]
    n = max(1, min(16, t // 32))
    edges = [round(i * t / n) for i in range(n + 1)]
    return [(a, b, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def heads_first(x: jax.Array, kv: int) -> jax.Array:
    """[B, T, K*G, H] -> [B, K, G*T, H] (row g*T + t): GQA's query rows grouped per KV head."""
    b, t, n, h = x.shape
    return x.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, n // kv * t, h)


def heads_last(x: jax.Array, t: int) -> jax.Array:
    """[B, K, G*T, H] -> [B, T, K*G, H]: ``heads_first``'s inverse."""
    b, kv, gt, h = x.shape
    return x.reshape(b, kv, gt // t, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * (gt // t), h)


def grouped_mask(mask: jax.Array, groups: int) -> jax.Array:
    """[B, T, S] -> [B, 1, G*T, S]: the mask of every query row of ``heads_first``'s layout."""
    b, t, s = mask.shape
    return jnp.tile(mask, (1, groups, 1)).reshape(b, 1, groups * t, s)


def _xla_attention_fwd(q, k, v, mask):
    h, kv = q.shape[-1], k.shape[2]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    outs, blocks = [], []
    for a, b, keys in query_blocks(q.shape[1], k.shape[1]):
        qb, mb = heads_first(q[:, a:b], kv), grouped_mask(mask[:, a:b, :keys], q.shape[2] // kv)
        scores = jnp.einsum("bkqh,bksh->bkqs", qb, kh[:, :, :keys], preferred_element_type=jnp.float32)
        scores = jnp.where(mb, scores * (h**-0.5), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G*(b-a), keys]
        outs.append(heads_last(jnp.einsum("bkqs,bksh->bkqh", probs, vh[:, :, :keys]), b - a))
        blocks.append((qb, mb, probs))
    return jnp.concatenate(outs, axis=1), (kh, vh, blocks)


def _xla_attention_bwd(residuals, d_out):
    kh, vh, blocks = residuals
    h, kv, s = kh.shape[-1], kh.shape[1], kh.shape[2]
    d_q, d_k, d_v = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
    for (a, b, keys), (qb, mask, probs) in zip(query_blocks(d_out.shape[1], s), blocks, strict=True):
        do = heads_first(d_out[:, a:b], kv)
        d_probs = jnp.einsum("bkqh,bksh->bkqs", do, vh[:, :, :keys], preferred_element_type=jnp.float32)
        p = probs.astype(jnp.float32)
        # softmax backward, ds = p * (dp - sum_s p dp), then the mask's: no gradient to masked scores (a
        # padding query, whose keys are all masked, has uniform p, not 0)
        d_scores = p * (d_probs - jnp.sum(p * d_probs, axis=-1, keepdims=True)) * (h**-0.5)
        d_scores = jnp.where(mask, d_scores, 0.0)
        d_q.append(
            heads_last(jnp.einsum("bkqs,bksh->bkqh", d_scores.astype(qb.dtype), kh[:, :, :keys]), b - a)
        )
        d_k = d_k.at[:, :, :keys].add(jnp.einsum("bkqs,bkqh->bksh", d_scores.astype(kh.dtype), qb))
        d_v = d_v.at[:, :, :keys].add(jnp.einsum("bkqs,bkqh->bksh", probs, do))
    d_k, d_v = d_k.astype(kh.dtype).transpose(0, 2, 1, 3), d_v.astype(vh.dtype).transpose(0, 2, 1, 3)
    return jnp.concatenate(d_q, axis=1), d_k, d_v, None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def _splash(q, k, v, mask: SelfAttentionMask) -> jax.Array:
    b, t, n, h = q.shape
    pad = -t % SPLASH_BLOCK
    seg = jnp.pad(mask.segments, ((0, 0), (0, pad)))
    # The kernel's layout is [heads, T, head_dim] per row; it does not scale q itself.
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = heads_first(q * jnp.asarray(h**-0.5, q.dtype)), heads_first(k), heads_first(v)
    if mask.mesh is None:
        out = _splash_rows(q, k, v, seg, interpret=mask.interpret)
    else:
        rows = logical_to_spec(("batch",), (b,), mask.mesh)[0]
        heads = logical_to_spec(("kv_heads",), (k.shape[1],), mask.mesh)[0]
        if heads is not None and logical_to_spec(("q_heads",), (n,), mask.mesh)[0] != heads:
            heads = None
        spec = PartitionSpec(rows, heads, None, None)
        out = jax.shard_map(
            functools.partial(_splash_rows, interpret=mask.interpret),
            mesh=mask.mesh,
            in_specs=(spec, spec, spec, PartitionSpec(rows, None)),
            out_specs=spec,
            check_vma=False,
        )(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _splash_rows(q, k, v, seg, *, interpret: bool):
    """The splash kernel over each row: q [B,N,T,H], k and v [B,K,T,H], seg [B,T] (T a multiple of 128)."""
    # Imported here: the TPU kernels' modules take a second to import, for a kernel only TPUs run.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    n, t = q.shape[1], q.shape[2]
    block = max(b for b in (512, 256, SPLASH_BLOCK) if t % b == 0)
    sizes = kernels.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    causal = masks.MultiHeadMask([masks.CausalMask((t, t))] * n)
    kernel = kernels.make_splash_mha(
        causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    return jax.vmap(kernel)(q, k, v, segment_ids=kernels.SegmentIds(seg, seg))
