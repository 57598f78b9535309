"""Text generation: ``generate(model, tokenizer, prompts, ...)``.

Prompts are left-padded to a power-of-two bucket (so new prompts of a similar length reuse the compiled
program), prefilled into a static KV cache of ``bucket + max_new_tokens`` slots in one forward, then
decoded one token per step inside one jitted ``lax.while_loop`` that stops when every row has emitted an
EOS. Greedy at ``temperature=0``; otherwise each step samples from ``process_logits`` (temperature, then
top-k, then top-p), seeded. ``n`` samples per prompt repeat each prompt's row ``n`` times (prompt-major
order). ``generate_tokens(..., return_logprobs=True)`` also returns each chosen token's log-probability:
under the processed distribution actually sampled from, or, when greedy, under the temperature-1 softmax
of the raw logits. ``generate(..., stop=[...])`` cuts each decoded text at its first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _bucket(n: int, minimum: int = 16) -> int:
    """Round a prompt length up to a power of two so new prompts rarely trigger a recompile."""
    return max(minimum, 1 << (n - 1).bit_length())


def process_logits(logits: jax.Array, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """Logits [..., V] -> the logits to sample from: ``logits / temperature`` (no scaling when
    ``temperature <= 0``; the sampler is greedy there), then all but the ``top_k`` largest set to -inf
    (``top_k = 0``: off), then top-p: all but the smallest set of highest-probability tokens whose
    cumulative probability (after top-k, renormalised) reaches ``top_p`` set to -inf (``top_p >= 1``: off;
    the top token is always kept). Tokens tied with the last kept value are kept too. Jittable; every
    argument may be traced, and a Python ``top_k = 0`` / ``top_p = 1.0`` skips its sort statically."""
    x = jnp.asarray(logits, jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    x = x / jnp.where(t > 0, t, 1.0)
    k_off = isinstance(top_k, (int, np.integer)) and top_k <= 0
    p_off = isinstance(top_p, (int, float, np.floating)) and top_p >= 1
    if k_off and p_off:
        return x
    v = x.shape[-1]
    desc = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
    k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where(k > 0, jnp.minimum(k, v), v)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1])[..., None], axis=-1)
    x = jnp.where(x >= kth, x, -jnp.inf)
    desc = jnp.where(jnp.arange(v) < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
    p = jnp.asarray(top_p, jnp.float32)
    n_keep = jnp.maximum(jnp.sum(before < p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    return jnp.where((p >= 1) | (x >= cutoff), x, -jnp.inf)


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string; unchanged if none."""
    ends = [i for i in (text.find(s) for s in stop or ()) if i >= 0]
    return text[: min(ends)] if ends else text


def _check_prompts(lengths: list[int], max_prompt_len: int | None) -> None:
    if not lengths:
        raise ValueError("generate needs at least one prompt")
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} is empty")
        if max_prompt_len is not None and n > max_prompt_len:
            raise ValueError(f"prompt {i} has {n} tokens, more than max_prompt_len={max_prompt_len}")


def generate_tokens(
    model: nnx.Module,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    *,
    eos_ids: tuple[int, ...],
    pad_id: int,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    n: int = 1,
    max_prompt_len: int | None = None,
    return_logprobs: bool = False,
):
    """Token lists in, new token lists out (each cut after its first EOS, EOS excluded), ``n`` per prompt
    in prompt-major order. With ``return_logprobs``: (token lists, log-prob lists aligned with them)."""
    _check_prompts([len(p) for p in prompt_ids], max_prompt_len)
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or n < 1:
        raise ValueError(f"bad sampling options: {temperature=}, {top_k=}, {top_p=}, {n=}")
    rows = [p for p in prompt_ids for _ in range(n)]
    p_len = _bucket(max(len(p) for p in rows))
    tokens = np.full((len(rows), p_len), pad_id, np.int32)
    mask = np.zeros((len(rows), p_len), np.int32)
    for i, p in enumerate(rows):
        tokens[i, p_len - len(p) :] = p
        mask[i, p_len - len(p) :] = 1
    graphdef, state = nnx.split(model)
    out, logps = _decode(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jnp.asarray(eos_ids, jnp.int32),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
        max_new_tokens,
        top_k > 0 or top_p < 1,
    )
    results, logprobs = [], []
    for row, lp in zip(np.asarray(out), np.asarray(logps), strict=True):
        stops = np.flatnonzero(np.isin(row, eos_ids))
        end = stops[0] if stops.size else len(row)
        results.append(row[:end].tolist())
        logprobs.append(lp[:end].tolist())
    return (results, logprobs) if return_logprobs else results


@jax.jit(static_argnums=(0, 9, 10))
def _decode(graphdef, state, tokens, mask, eos_ids, key, temperature, top_k, top_p, max_new_tokens, filtered):
    model = nnx.merge(graphdef, state)
    b, p_len = tokens.shape
    key_valid = jnp.zeros((b, p_len + max_new_tokens), bool).at[:, :p_len].set(mask.astype(bool))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.decode(tokens, positions, model.init_cache(b, p_len + max_new_tokens), 0, key_valid)

    def greedy(logits, sub):
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        return nxt, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[:, None], -1)[:, 0]

    def sample(logits, sub):
        # Unfiltered, process_logits skips its sort: top_k / top_p are then Python constants.
        x = process_logits(logits, temperature, *((top_k, top_p) if filtered else (0, 1.0)))
        nxt = jax.random.categorical(sub, x).astype(jnp.int32)
        return nxt, jnp.take_along_axis(jax.nn.log_softmax(x, -1), nxt[:, None], -1)[:, 0]

    def step(carry):
        i, out, logps, logits, pos, cache, key_valid, done, key = carry
        key, sub = jax.random.split(key)
        nxt, logp = jax.lax.cond(temperature > 0, sample, greedy, logits, sub)
        nxt = jnp.where(done, eos_ids[0], nxt)
        out = out.at[:, i].set(nxt)
        logps = logps.at[:, i].set(logp)
        done = done | jnp.isin(nxt, eos_ids)
        key_valid = key_valid.at[:, p_len + i].set(True)
        logits, cache = model.decode(nxt[:, None], pos[:, None], cache, p_len + i, key_valid)
        return i + 1, out, logps, logits[:, -1], pos + 1, cache, key_valid, done, key

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[7])

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    logps = jnp.zeros((b, max_new_tokens), jnp.float32)
    init = (0, out, logps, logits[:, -1], positions[:, -1] + 1, cache, key_valid, jnp.zeros(b, bool), key)
    return jax.lax.while_loop(cond, step, init)[1:3]


def generate(
    model: nnx.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    n: int = 1,
    stop: Sequence[str] | None = None,
    max_prompt_len: int | None = None,
) -> list[str]:
    """Prompts (already chat-formatted if the model wants that) -> generated texts, special tokens dropped,
    ``n`` per prompt in prompt-major order, each cut at its first stop string. ``max_prompt_len`` counts
    tokens. Raises ValueError on no prompts, an empty prompt, or a prompt over ``max_prompt_len``."""
    _check_prompts([len(p) for p in prompts], None)
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and any(not s for s in stop):
        raise ValueError("stop strings must be non-empty")
    eos_ids = model.cfg.generation_config.get("eos_token_id", tokenizer.eos_token_id)
    eos_ids = tuple(eos_ids) if isinstance(eos_ids, list) else (eos_ids,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    new = generate_tokens(
        model,
        ids,
        max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        temperature=temperature,
        seed=seed,
        top_k=top_k,
        top_p=top_p,
        n=n,
        max_prompt_len=max_prompt_len,
    )
    return [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop) for t in new]
