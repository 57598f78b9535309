"""Text generation: ``generate(model, tokenizer, prompts, ...)``.

Prompts are left-padded to a power-of-two bucket (so new prompts of a similar length reuse the compiled
program), prefilled into a static KV cache of ``bucket + max_new_tokens`` slots in one forward, then
decoded one token per step inside one jitted ``lax.while_loop`` that stops when every row has emitted an
EOS. Greedy at ``temperature=0``, otherwise softmax sampling at the temperature, seeded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _bucket(n: int, minimum: int = 16) -> int:
    """Round a prompt length up to a power of two so new prompts rarely trigger a recompile."""
    return max(minimum, 1 << (n - 1).bit_length())


def generate_tokens(
    model: nnx.Module,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    *,
    eos_ids: tuple[int, ...],
    pad_id: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[int]]:
    """Token lists in, new token lists out (each cut after its first EOS, EOS excluded)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt, and no prompt may be empty")
    p_len = _bucket(max(len(p) for p in prompt_ids))
    tokens = np.full((len(prompt_ids), p_len), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), p_len), np.int32)
    for i, p in enumerate(prompt_ids):
        tokens[i, p_len - len(p) :] = p
        mask[i, p_len - len(p) :] = 1
    graphdef, state = nnx.split(model)
    out = _decode(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(eos_ids, jnp.int32),
        jax.random.key(seed),
        jnp.float32(temperature),
        max_new_tokens,
    )
    results = []
    for row in np.asarray(out):
        stops = np.flatnonzero(np.isin(row, eos_ids))
        results.append(row[: stops[0] if stops.size else len(row)].tolist())
    return results


@jax.jit(static_argnums=(0, 7))
def _decode(graphdef, state, tokens, mask, eos_ids, key, temperature, max_new_tokens):
    model = nnx.merge(graphdef, state)
    b, p_len = tokens.shape
    key_valid = jnp.zeros((b, p_len + max_new_tokens), bool).at[:, :p_len].set(mask.astype(bool))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.decode(tokens, positions, model.init_cache(b, p_len + max_new_tokens), 0, key_valid)

    def step(carry):
        i, out, logits, pos, cache, key_valid, done, key = carry
        key, sub = jax.random.split(key)
        sampled = jax.random.categorical(sub, logits / jnp.maximum(temperature, 1e-6))
        nxt = jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)
        nxt = jnp.where(done, eos_ids[0], nxt)
        out = out.at[:, i].set(nxt)
        done = done | jnp.isin(nxt, eos_ids)
        key_valid = key_valid.at[:, p_len + i].set(True)
        logits, cache = model.decode(nxt[:, None], pos[:, None], cache, p_len + i, key_valid)
        return i + 1, out, logits[:, -1], pos + 1, cache, key_valid, done, key

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[6])

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    init = (0, out, logits[:, -1], positions[:, -1] + 1, cache, key_valid, jnp.zeros(b, bool), key)
    return jax.lax.while_loop(cond, step, init)[1]


def generate(
    model: nnx.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Prompts (already chat-formatted if the model wants that) -> generated texts, special tokens dropped."""
    eos_ids = model.cfg.generation_config.get("eos_token_id", tokenizer.eos_token_id)
    eos_ids = tuple(eos_ids) if isinstance(eos_ids, list) else (eos_ids,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    new = generate_tokens(
        model, ids, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, seed=seed
    )
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]
