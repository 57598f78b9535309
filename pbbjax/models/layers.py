"""The decoder's building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Parameter layouts (``axes`` metadata names the logical axis of each dimension; a decoder layer's
parameters carry a leading ``layers`` axis because layers are stored stacked, see ``decoder.py``):

- q/k/v kernels ``[embed, heads, head_dim]``, o kernel ``[heads, head_dim, embed]``
- MLP kernels ``[embed, mlp]`` and ``[mlp, embed]``; norms ``[norm]``; biases ``[heads, head_dim]``

RoPE uses Hugging Face's split-half (``rotate_half``) layout, so HF q/k weights load without permutation.
With ``cfg.lora``, the targeted projections also carry LoRA adapters (``lora.py``), added to their outputs.

Attention runs over the sequence itself (training, scoring; by the kernel ``model.attention`` picks,
``attention.py``) or, given a ``KVCache`` (generation), writes the
new keys and values into the cache and attends over it. The cache layouts (keys ``[B, kv_heads, head_dim,
slots]``, values ``[B, kv_heads, slots, head_dim]``) are the ones the two attention dots read as they are,
so no decode step transposes the cache (XLA:CPU would copy it per layer per step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pbbjax.models import lora
from pbbjax.models.architecture import ModelConfig, RopeConfig, resolve_dtype
from pbbjax.models.attention import SelfAttentionMask, grouped_mask, heads_first, heads_last, self_attention
from pbbjax.models.linear import project

_INIT_STD = 0.02


def make_param(
    rngs: nnx.Rngs | None, shape, axes, cfg: ModelConfig, init: str, stack: int | None
) -> nnx.Param:
    """A parameter of ``shape`` (with a leading ``layers`` axis of size ``stack`` when given)."""
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    dtype = resolve_dtype(cfg.param_dtype)
    if init == "normal":
        value = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF order: normalise in fp32, cast back to the input dtype, then scale."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """Inverse frequencies [head_dim // 2], incl. Llama 3.1's piecewise ``llama3`` scaling."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, head_dim] (fp32)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H]; cos/sin [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class KVCache(NamedTuple):
    """One layer's KV cache."""

    k: jax.Array  # keys [B, kv_heads, head_dim, slots]
    v: jax.Array  # values [B, kv_heads, slots, head_dim]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, stack: int | None = None):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = make_param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), cfg, "normal", stack)
        self.k_proj = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, "normal", stack)
        self.v_proj = make_param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg, "normal", stack)
        self.o_proj = make_param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), cfg, "normal", stack)
        if cfg.qkv_bias:
            self.q_bias = make_param(rngs, (n, h), ("q_heads", "head_dim"), cfg, "zeros", stack)
            self.k_bias = make_param(rngs, (k, h), ("kv_heads", "head_dim"), cfg, "zeros", stack)
            self.v_bias = make_param(rngs, (k, h), ("kv_heads", "head_dim"), cfg, "zeros", stack)
        if cfg.o_bias:
            self.o_bias = make_param(rngs, (d,), ("embed",), cfg, "zeros", stack)
        if cfg.qk_norm:
            self.q_norm = make_param(rngs, (h,), ("head_dim",), cfg, "ones", stack)
            self.k_norm = make_param(rngs, (h,), ("head_dim",), cfg, "ones", stack)
        lora.add_adapters(self, cfg, ("q_proj", "k_proj", "v_proj", "o_proj"))

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key: jax.Array | None = None):
        """x [B,T,D] -> q [B,T,N,H], k and v [B,T,K,H], with biases, q/k norm and RoPE applied; ``key``:
        the adapters' dropout (training only)."""
        dt = x.dtype

        def proj(name):
            y = project(x, getattr(self, f"{name}_proj")[...].astype(dt))
            y = lora.apply(self, f"{name}_proj", x, y, key)
            if self.cfg.qkv_bias:
                y = y + getattr(self, f"{name}_bias")[...].astype(dt)
            return y

        q, k, v = proj("q"), proj("k"), proj("v")
        if self.cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], self.cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], self.cfg.rms_norm_eps)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask: SelfAttentionMask, key=None) -> jax.Array:
        """Attention over the sequence's own keys/values [B,T,K,H] by ``mask.kernel`` -> [B,T,D]."""
        out = self_attention(q, k, v, mask)
        y = project(out, self.o_proj[...].astype(v.dtype), inputs=2)
        return self.o_adapter_and_bias(out, y, key)

    def attend_cache(self, q, k, v, mask: jax.Array, cache: KVCache, index) -> tuple[jax.Array, KVCache]:
        """Writes ``k``, ``v`` [B,T,K,H] at slots ``index`` .. ``index + T - 1`` of ``cache``, then attends
        over all its slots; ``mask`` [B,T,S] -> ([B,T,D], the updated cache)."""
        t, n, hd = q.shape[1:]
        kv, g = k.shape[2], n // k.shape[2]
        k_cache = jax.lax.dynamic_update_slice(
            cache.k, k.transpose(0, 2, 3, 1).astype(cache.k.dtype), (0, 0, 0, index)
        )
        v_cache = jax.lax.dynamic_update_slice(
            cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype), (0, 0, index, 0)
        )
        # Query rows grouped per KV head, as in attention.xla_attention: [B, K, G*T, H].
        scores = jnp.einsum(
            "bkqh,bkhs->bkqs", heads_first(q, kv), k_cache, preferred_element_type=jnp.float32
        ) * (hd**-0.5)
        scores = jnp.where(grouped_mask(mask, g), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
        out = heads_last(jnp.einsum("bkqs,bksh->bkqh", probs, v_cache), t)
        y = project(out, self.o_proj[...].astype(out.dtype), inputs=2)
        return self.o_adapter_and_bias(out, y), KVCache(k_cache, v_cache)

    def o_adapter_and_bias(self, out: jax.Array, y: jax.Array, key=None) -> jax.Array:
        """``y`` = ``out`` [B,T,N,H] through o_proj, plus o_proj's adapter and bias where it has them."""
        y = lora.apply(self, "o_proj", out, y, key)
        return y + self.o_bias[...].astype(y.dtype) if self.cfg.o_bias else y

    def __call__(self, x, cos, sin, mask, key=None, cache: KVCache | None = None, index=0):
        """x [B,T,D] -> (y [B,T,D], the updated cache, or None without one). Without a cache, ``mask`` is a
        ``SelfAttentionMask`` over the sequence; with one, [B,T,S] bool over its slots, and ``x`` sits at
        slot ``index``."""
        q, k, v = self.project_qkv(x, cos, sin, key)
        if cache is None:
            return self.attend(q, k, v, mask, key), None
        return self.attend_cache(q, k, v, mask, cache, index)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, stack: int | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.gate_proj = make_param(rngs, (d, f), ("embed", "mlp"), cfg, "normal", stack)
        self.up_proj = make_param(rngs, (d, f), ("embed", "mlp"), cfg, "normal", stack)
        self.down_proj = make_param(rngs, (f, d), ("mlp", "embed"), cfg, "normal", stack)
        if cfg.mlp_bias:
            self.gate_bias = make_param(rngs, (f,), ("mlp",), cfg, "zeros", stack)
            self.up_bias = make_param(rngs, (f,), ("mlp",), cfg, "zeros", stack)
            self.down_bias = make_param(rngs, (d,), ("embed",), cfg, "zeros", stack)
        lora.add_adapters(self, cfg, ("gate_proj", "up_proj", "down_proj"))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        dt = x.dtype

        def dense(name, x):
            w = getattr(self, f"{name}_proj")[...].astype(dt)
            y = lora.apply(self, f"{name}_proj", x, project(x, w), key)
            return y + getattr(self, f"{name}_bias")[...].astype(dt) if self.cfg.mlp_bias else y

        return dense("down", swiglu(dense("gate", x), dense("up", x)))


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose gradient needs only ``gate`` and ``up`` (and recomputes the sigmoid). Autodiff
    kept silu(gate) and the sigmoid as well, two more ``[tokens, mlp]`` tensors per layer; XLA:CPU still
    keeps the sigmoid (it merges the recomputation with the forward's), one fewer."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return d_out * up * (sig + silu * (1 - sig)), d_out * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, stack: int | None = None):
        self.cfg = cfg
        self.input_norm = make_param(rngs, (cfg.hidden_size,), ("norm",), cfg, "ones", stack)
        self.attn = Attention(cfg, rngs=rngs, stack=stack)
        self.post_attn_norm = make_param(rngs, (cfg.hidden_size,), ("norm",), cfg, "ones", stack)
        self.mlp = MLP(cfg, rngs=rngs, stack=stack)

    def __call__(self, x, cos, sin, mask, key=None, cache: KVCache | None = None, index=0):
        """-> (x, the updated cache or None), as ``Attention``; ``key``: this layer's adapter-dropout key
        (training with ``lora.dropout`` only)."""
        eps = self.cfg.rms_norm_eps
        y, cache = self.attn(rms_norm(x, self.input_norm[...], eps), cos, sin, mask, key, cache, index)
        x = x + y
        return x + self.mlp(rms_norm(x, self.post_attn_norm[...], eps), key), cache
