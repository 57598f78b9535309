"""Text generation: ``generate(model, tokenizer, prompts, ...)``.

This first sampler is deliberately simple and exact: prompts are left-padded into one buffer of
``prompt_len + max_new_tokens`` tokens and each step re-runs the full causal forward over the buffer inside
one jitted ``lax.while_loop`` (no KV cache yet; the cached sampler replaces the step function, not the
interface). Greedy at ``temperature=0``, otherwise softmax sampling at the temperature, seeded.
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
    total = p_len + max_new_tokens
    tokens = np.full((len(prompt_ids), total), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), total), np.int32)
    for i, p in enumerate(prompt_ids):
        tokens[i, p_len - len(p) : p_len] = p
        mask[i, p_len - len(p) : p_len] = 1
    graphdef, state = nnx.split(model)
    out = _decode(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(eos_ids, jnp.int32),
        jax.random.key(seed),
        jnp.float32(temperature),
        p_len,
        max_new_tokens,
    )
    out = np.asarray(out)[:, p_len:]
    results = []
    for row in out:
        stops = np.flatnonzero(np.isin(row, eos_ids))
        results.append(row[: stops[0] if stops.size else len(row)].tolist())
    return results


@jax.jit(static_argnums=(0, 7, 8))
def _decode(graphdef, state, tokens, mask, eos_ids, key, temperature, p_len, max_new_tokens):
    model = nnx.merge(graphdef, state)

    def step(carry):
        i, tokens, mask, done, key = carry
        logits = model(tokens, attention_mask=mask)[:, p_len + i - 1]
        key, sub = jax.random.split(key)
        sampled = jax.random.categorical(sub, logits / jnp.maximum(temperature, 1e-6))
        nxt = jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(tokens.dtype)
        nxt = jnp.where(done, eos_ids[0], nxt)
        tokens = tokens.at[:, p_len + i].set(nxt)
        mask = mask.at[:, p_len + i].set(1)
        return i + 1, tokens, mask, done | jnp.isin(nxt, eos_ids), key

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[3])

    done = jnp.zeros(tokens.shape[0], bool)
    return jax.lax.while_loop(cond, step, (0, tokens, mask, done, key))[1]


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
