"""The causal LM: token embedding, a stack of decoder layers, final norm, LM head (or tied embedding).

Layers are stored stacked (every layer parameter has a leading ``layers`` axis), so the same parameters
run either as one ``lax.scan`` (``scan_layers=True``: one compiled layer, fast compiles for deep models)
or as an unrolled loop. Each layer is wrapped in ``jax.checkpoint`` with the configured remat policy.

Masks: ``attention_mask`` [B, T] (1 = token, 0 = padding; left padding for generation) and/or
``segment_ids`` [B, T] (packed sequences; 0 = padding). A query attends to a key iff the key is not
later, both are real tokens, and both lie in the same segment. Positions default to the index of the
token among the real tokens of its row (or of its segment), which makes a left-padded row compute the
same logits as the unpadded sequence.

Generation runs ``cached_hidden_states``: the same layers, unrolled, over a KV cache (``empty_cache``,
``layers.KVCache``) that each call extends by its tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pbbjax.models import attention
from pbbjax.models.architecture import ModelConfig, resolve_dtype
from pbbjax.models.layers import DecoderLayer, KVCache, make_param, rms_norm, rope_cos_sin, rope_inv_freq
from pbbjax.models.linear import project
from pbbjax.models.sharding import constrain

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

ACT = ("batch", "length", "act_embed")
K_AXES = ("batch", "kv_heads", "head_dim", "length")  # KVCache keys
V_AXES = ("batch", "kv_heads", "length", "head_dim")  # KVCache values


def default_positions(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """Index of each token among the real tokens of its row or segment; 0 on padding."""
    if segment_ids is not None:
        seg = segment_ids
        new_segment = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        idx = jnp.arange(seg.shape[1])[None, :]
        start = jax.lax.cummax(jnp.where(new_segment, idx, 0), axis=1)
        return jnp.where(seg > 0, idx - start, 0).astype(jnp.int32)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, mesh: Mesh | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {cfg.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        self.cfg = cfg
        self.mesh = mesh
        self.embed = make_param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg, "normal", None
        )
        self.layers = DecoderLayer(cfg, rngs=rngs, stack=cfg.num_layers)
        self.final_norm = make_param(rngs, (cfg.hidden_size,), ("norm",), cfg, "ones", None)
        if not cfg.tie_word_embeddings:
            self.lm_head = make_param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg, "normal", None
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids [B, T] -> logits [B, T, vocab] in float32. ``dropout_key``: the LoRA adapters' dropout
        (``lora.dropout``, SFT steps only; ``lora.dropout_key``), a key per layer drawn from it."""
        hidden = self.hidden_states(input_ids, attention_mask, positions, segment_ids, dropout_key)
        return self.logits(hidden)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        dt = resolve_dtype(self.cfg.compute_dtype)
        return constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(dt), self.mesh, ACT)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and LM head: hidden [B, T, D] -> fp32 logits [B, T, V]."""
        x = self.final_normed(hidden)
        head, out_first = self.head_weight(x.dtype)
        logits = project(x, head, w_out_first=out_first, out_dtype=jnp.float32)
        return constrain(logits, self.mesh, ("batch", "length", "act_vocab"))

    def final_normed(self, hidden: jax.Array) -> jax.Array:
        """The final norm of the last layer's output [B, T, D]: what the LM head reads."""
        return rms_norm(hidden, self.final_norm[...], self.cfg.rms_norm_eps)

    def head_weight(self, dtype) -> tuple[jax.Array, bool]:
        """(the LM head's matrix in ``dtype``, whether it is [vocab, embed]): the tied embedding as it is,
        with no transposed copy, or the untied head [embed, vocab]."""
        if self.cfg.tie_word_embeddings:
            return self.embed[...].astype(dtype), True
        return self.lm_head[...].astype(dtype), False

    def hidden_states(
        self, input_ids, attention_mask=None, positions=None, segment_ids=None, dropout_key=None
    ) -> jax.Array:
        """The last layer's output, before the final norm: [B, T, D] in the compute dtype."""
        shape = input_ids.shape
        if positions is None:
            positions = default_positions(attention_mask, segment_ids, shape)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.rope, self.cfg.head_dim))
        segments = attention.segments_of(attention_mask, segment_ids, shape)
        mask = attention.self_attention_mask(self.cfg.attention, segments, self.mesh, self.cfg.compute_dtype)
        x = self.embed_tokens(input_ids)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.cfg.num_layers)
        return self.run_layers(lambda layer, h, key: layer(h, cos, sin, mask, key), x, keys)[0]

    def empty_cache(self, batch: int, slots: int) -> tuple[KVCache, ...]:
        """A zero KV cache of ``slots`` positions for ``batch`` rows, one ``KVCache`` per layer, in the
        compute dtype; on a mesh, rows over ``data`` + ``fsdp`` and KV heads over ``tensor``."""
        cfg = self.cfg
        dtype = resolve_dtype(cfg.compute_dtype)
        k = jnp.zeros((batch, cfg.num_kv_heads, cfg.head_dim, slots), dtype)
        v = jnp.zeros((batch, cfg.num_kv_heads, slots, cfg.head_dim), dtype)
        return (self.constrain_cache(KVCache(k, v)),) * cfg.num_layers

    def extend_cache(self, cache: tuple[KVCache, ...], extra: int) -> tuple[KVCache, ...]:
        """``cache`` with ``extra`` zero slots appended (after the last), laid out as ``empty_cache``'s."""
        return tuple(
            self.constrain_cache(
                KVCache(
                    jnp.pad(c.k, ((0, 0), (0, 0), (0, 0), (0, extra))),
                    jnp.pad(c.v, ((0, 0), (0, 0), (0, extra), (0, 0))),
                )
            )
            for c in cache
        )

    def constrain_cache(self, cache: KVCache) -> KVCache:
        return KVCache(constrain(cache.k, self.mesh, K_AXES), constrain(cache.v, self.mesh, V_AXES))

    def unstacked_layers(self) -> list[DecoderLayer]:
        """One ``DecoderLayer`` per layer, its parameters sliced out of the stacked ones."""
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, layer) for layer in unstack_layers(state, self.cfg.num_layers)]

    def cached_hidden_states(
        self, input_ids, positions, cache: tuple[KVCache, ...], index, key_valid, layers=None
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """A forward over ``input_ids`` [B, T] through a KV cache (``empty_cache``): a prefill when T > 1,
        one decode step when T = 1. Query t sits at slot ``index + t``, writes its keys and values there and
        attends to the slots up to its own that ``key_valid`` [B, S] (bool) marks as real tokens (left
        padding is not). Layers run unrolled; ``layers``: ``unstacked_layers()``, when the caller sliced
        them already (default: sliced here). Returns (the last layer's output [B, T, D], the new cache)."""
        layers = self.unstacked_layers() if layers is None else layers
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.rope, self.cfg.head_dim))
        q_slots = index + jnp.arange(input_ids.shape[1])
        mask = (jnp.arange(key_valid.shape[1])[None, :] <= q_slots[:, None])[None] & key_valid[:, None, :]
        x = self.embed_tokens(input_ids)
        new = []
        for layer, layer_cache in zip(layers, cache, strict=True):
            x, layer_cache = layer(x, cos, sin, mask, cache=layer_cache, index=index)
            new.append(self.constrain_cache(layer_cache))
            x = constrain(x, self.mesh, ACT)
        return x, tuple(new)

    def run_layers(self, fn, x: jax.Array, per_layer=None):
        """(x, ys) <- fn(layer_i, x, per_layer[i]) for each layer, scanned or unrolled, rematerialised per
        layer; ``per_layer`` arrays have a leading layers axis (e.g. dropout keys), ``ys`` are stacked."""
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            layer_state, extra = xs
            carry, ys = fn(nnx.merge(graphdef, layer_state), carry, extra)
            return constrain(carry, self.mesh, ACT), ys

        if self.cfg.remat != "none":
            body = jax.checkpoint(
                body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers
            )
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x, (state, per_layer))
        outs = []
        for xs in unstack_layers((state, per_layer), self.cfg.num_layers):
            x, y = body(x, xs)
            outs.append(y)
        return x, (None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs))


def unstack_layers(tree, num_layers: int) -> list:
    """``tree`` (arrays with a leading layers axis) as one tree per layer. Each array is split once
    (``jnp.unstack``), so that the gradient of the layers' parameters is one concatenation; indexing each
    layer out (``a[i]``) made it a sum of ``num_layers`` zero-padded copies of the whole stack."""
    leaves, treedef = jax.tree.flatten(tree)
    per_leaf = [jnp.unstack(a) for a in leaves]
    return [treedef.unflatten([parts[i] for parts in per_leaf]) for i in range(num_layers)]
