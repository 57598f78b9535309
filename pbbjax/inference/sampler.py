"""Text generation with a static KV cache: ``generate`` (strings), ``generate_tokens`` (token lists) and
``generate_arrays`` (numpy arrays, for RL rollouts).

One call, one jitted program:

- Prompts are left-padded to a bucketed length (16, 24, 32, 48, 64, 96, 128, ...: powers of two and 1.5x
  powers of two), so a new batch of a similar length reuses the compiled program. With a mesh
  (``model.mesh``), rows are sharded over the mesh axes of the logical ``batch`` axis (``data`` + ``fsdp``):
  the row count is padded up to a multiple of their size with dummy rows, dropped afterwards.
- Prefill writes the prompts into a static KV cache (``Transformer.empty_cache``: per layer a
  ``layers.KVCache``, laid out by the same rules: rows over ``data`` + ``fsdp``, KV heads over ``tensor``)
  and takes LM-head logits at the last position only. A ``lax.while_loop`` then decodes one token per
  step, writing its keys and values into the cache in place, and stops as soon as every row has ended (EOS
  or a stop sequence) or ``max_new_tokens`` tokens are out. Nothing in the loop syncs with the host. Both
  run the model's own layers (``Transformer.cached_hidden_states``).
- The decode loop runs in segments (``segment_count``: one per 64 new tokens, at most 4, one when the new
  tokens are under half the prompt bucket): each segment's cache holds the slots its steps reach and no
  more, and grows by zero slots between segments. A step attends over every slot of the cache it has, so
  with one segment a step reads ``max_new_tokens / 2`` empty slots on average, with 4 segments an eighth of
  ``max_new_tokens``. Greedy SmolLM2 at 32 rows x 256 new tokens: 1.16x the tokens/s of one segment,
  tokens and log-probs identical (benchmarks/README.md). The cost: the loop body compiles once per segment.
- Greedy at ``temperature=0``; otherwise each step samples from ``process_logits`` (temperature, then
  top-k, then top-p). Each row draws from its own key (the seed's key folded with the row's index, then
  with the step), so a row's sample does not depend on the batch around it, on padding or on sharding.
  ``n`` samples per prompt repeat each prompt's row ``n`` times (prompt-major order).
- Log-probs of the chosen tokens: under the processed distribution actually sampled from, or, when greedy,
  under the temperature-1 softmax of the raw logits.

Cache limit: a prompt of ``k`` tokens needs ``k + max_new_tokens`` positions, which must not exceed
``max_cache_len`` (default: the model's ``max_position_embeddings``); otherwise ValueError naming the
prompt, its length and the limit. The cache holds ``bucket + max_new_tokens`` slots, with the bucket capped
so that this never exceeds the limit.

Parameters: by default the model's own; ``params=`` takes a state of the same structure as the trainer
holds it (``nnx.split(model)[1]``, any shardings, e.g. the params being trained). They are used in place:
never copied to another device, never donated, still valid after the call. On a CPU backend
(``unstack_layers=None`` means: on CPU only) each layer's weights are sliced out of the stacked layer
parameters once per call, before the decode loop: XLA:CPU would otherwise copy every weight slice in every
decode step. That costs one transient copy of the layer weights inside the program, freed at its end.

Stop sequences: ``generate(..., stop=[...])`` cuts each decoded text at its first stop string (exact),
and also ends rows inside the loop: a row ends once it emits a token whose text contains a stop string,
or the stop string's own tokenization (whole, or character by character). For tokenizers whose decoding
is concatenation (byte-level BPE: SmolLM2, Llama 3, Qwen) this never ends a row whose text lacks the stop
string; a stop string produced through another tokenization only ends its row later (at EOS or the token
budget), and the text cut still applies. The lower-level functions take ``stop_sequences`` (token id
sequences) directly.

``generate_arrays`` returns a ``Generation`` of numpy arrays: ``tokens`` [rows, max_new_tokens] (``pad_id``
after each row's end), ``logprobs`` (0 there), ``lengths`` (tokens kept: an EOS is dropped, a stop sequence
kept), ``ended`` (False where a row ran out of tokens), ``eos`` (the EOS id that ended each row, -1 where
none did) and ``steps`` (decode steps run). On a mesh they come out of the program replicated, so every
host of a pod reads every row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pbbjax.inference.stops import cut_at_stop, stop_token_sequences
from pbbjax.models.layers import KVCache
from pbbjax.models.sharding import batch_shards, logical_to_spec

_CONTINUE, _EOS, _STOP = 0, 1, 2
_WINDOW_EMPTY, _NEVER, _ANY = -3, -2, -1  # stop-sequence window fill, a never-matching entry, a wildcard


class Generation(NamedTuple):
    """What ``generate_arrays`` returns; one row per prompt sample (prompt-major)."""

    tokens: np.ndarray  # int32 [rows, max_new_tokens]; pad_id after each row's length
    logprobs: np.ndarray  # float32 [rows, max_new_tokens]; 0 after each row's length
    lengths: np.ndarray  # int32 [rows]: tokens kept (EOS excluded, a stop sequence included)
    ended: np.ndarray  # bool [rows]: ended by EOS or a stop sequence; False: ran out of max_new_tokens
    eos: np.ndarray  # int32 [rows]: the EOS id that ended the row (dropped from tokens), -1 if none did
    steps: int  # decode steps run, <= max_new_tokens; fewer when every row ended early


class DecodeState(NamedTuple):
    """The carry of the decode loop, which chooses token ``i`` of every row per step."""

    i: jax.Array  # int32: tokens chosen so far
    tokens: jax.Array  # int32 [B, max_new_tokens]: chosen tokens, pad_id where a row has ended
    logprobs: jax.Array  # float32 [B, max_new_tokens]: their log-probs, 0 where a row has ended
    lengths: jax.Array  # int32 [B]: tokens kept; max_new_tokens until the row ends
    ended: jax.Array  # bool [B]: ended by EOS or a stop sequence
    done: jax.Array  # bool [B]: ended, or a dummy row
    window: jax.Array  # int32 [B, W]: the last W tokens chosen, matched against the stop sequences
    eos: jax.Array  # int32 [B]: the EOS id that ended the row, -1 if none did
    logits: jax.Array  # float32 [B, V]: to choose token i from
    positions: jax.Array  # int32 [B]: the position of token i
    cache: tuple[KVCache, ...]
    key_valid: jax.Array  # bool [B, slots]: cache slots that hold real tokens


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k) that holds ``n``."""
    p = max(minimum, 1 << (n - 1).bit_length())
    return p * 3 // 4 if n <= p * 3 // 4 and p * 3 // 4 >= minimum else p


def pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def segment_count(prompt_len: int, max_new_tokens: int) -> int:
    """How many segments the decode loop runs in by default: one per 64 new tokens, at most 4, and one
    when the new tokens are fewer than half the prompt bucket (the prompt's slots, read in every step
    anyway, then dominate the attention, and each extra segment compiles the loop body again)."""
    if 2 * max_new_tokens < prompt_len:
        return 1
    return max(1, min(4, max_new_tokens // 64))


def segment_ends(prompt_len: int, max_new_tokens: int, count: int | None = None) -> tuple[int, ...]:
    """The decode loop's steps split into ``count`` near-equal segments (default ``segment_count``): the
    step count at the end of each, the last ``max_new_tokens - 1`` (the last token is chosen after the
    loop, with no forward)."""
    steps = max_new_tokens - 1
    count = max(1, min(count or segment_count(prompt_len, max_new_tokens), steps))
    return tuple(steps * (j + 1) // count for j in range(count))


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


def _check_prompts(
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    max_prompt_len: int | None,
    max_cache_len: int | None,
    vocab_size: int | None,
    limit_name: str = "max_cache_len",
) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("generate needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompt_ids):
        n = len(p)
        if n == 0:
            raise ValueError(f"prompt {i} is empty")
        if max_prompt_len is not None and n > max_prompt_len:
            raise ValueError(f"prompt {i} has {n} tokens, more than max_prompt_len={max_prompt_len}")
        if max_cache_len is not None and n + max_new_tokens > max_cache_len:
            raise ValueError(
                f"prompt {i} has {n} tokens: with max_new_tokens={max_new_tokens} it needs "
                f"{n + max_new_tokens} cache positions, more than {limit_name}={max_cache_len}"
            )
        if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
            bad = next(t for t in p if not 0 <= t < vocab_size)
            raise ValueError(
                f"prompt {i} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})"
            )


def generate_arrays(
    model: nnx.Module | nnx.GraphDef,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    params: nnx.State | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    n: int = 1,
    stop_sequences: Sequence[Sequence[int]] = (),
    max_prompt_len: int | None = None,
    max_cache_len: int | None = None,
    unstack_layers: bool | None = None,
    decode_segments: int | None = None,
) -> Generation:
    """Token id prompts -> a ``Generation`` of numpy arrays (see the module docstring). ``model`` is the
    module, or its ``GraphDef`` with ``params``; ``params`` (optional with a module) replaces the module's
    own state for this call. ``eos_ids``: ids that end a row (dropped from the output); ``pad_id`` fills
    prompt padding and the output after each row's end; ``stop_sequences``: token id sequences that end a
    row once generated (kept in the output); ``decode_segments``: the decode loop's segment count (default
    ``segment_count``; it changes the empty slots each step reads, not what it computes)."""
    if isinstance(model, nnx.GraphDef):
        if params is None:
            raise ValueError("generate_arrays got a GraphDef without params; pass params=the model state")
        graphdef = model
    else:
        graphdef, own = nnx.split(model)
        params = own if params is None else params
    merged = nnx.merge(graphdef, params)  # a view for cfg and mesh: no array is copied
    cfg, mesh = merged.cfg, merged.mesh
    limit, limit_name = max_cache_len, "max_cache_len"
    if limit is None:
        limit, limit_name = cfg.max_position_embeddings, "max_cache_len (the model's max_position_embeddings)"
    _check_prompts(prompt_ids, max_new_tokens, max_prompt_len, limit, cfg.vocab_size, limit_name)
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or n < 1:
        raise ValueError(f"bad sampling options: {temperature=}, {top_k=}, {top_p=}, {n=}")
    if any(len(s) == 0 for s in stop_sequences):
        raise ValueError("stop_sequences must not contain an empty sequence")

    rows = [list(p) for p in prompt_ids for _ in range(n)]
    shards = batch_shards(mesh)
    b = -(-len(rows) // shards) * shards
    p_len = min(prompt_bucket(max(len(p) for p in rows)), limit - max_new_tokens)
    tokens = np.full((b, p_len), pad_id, np.int32)
    mask = np.zeros((b, p_len), np.int32)
    for i in range(b):
        p = rows[i if i < len(rows) else 0]  # dummy rows repeat row 0; they start ended
        tokens[i, p_len - len(p) :] = p
        mask[i, p_len - len(p) :] = 1
    live = np.arange(b) < len(rows)

    end_codes = np.zeros(cfg.vocab_size, np.int32)
    multi = [tuple(s) for s in stop_sequences if len(s) > 1]
    end_codes[[s[0] for s in stop_sequences if len(s) == 1 and 0 <= s[0] < cfg.vocab_size]] = _STOP
    end_codes[[e for e in eos_ids if e is not None and 0 <= e < cfg.vocab_size]] = _EOS
    width = pow2_at_least(max((len(s) for s in multi), default=1), 8)
    seqs = np.full((pow2_at_least(len(multi), 4), width), _ANY, np.int32)
    seqs[len(multi) :, -1] = _NEVER
    for j, s in enumerate(multi):
        seqs[j, width - len(s) :] = s

    batch_arrays = (tokens, mask, live, np.arange(b, dtype=np.int32))
    if mesh is not None:
        spec = logical_to_spec(("batch",), None, mesh)  # b is a multiple of the shard count
        batch_arrays = tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x in batch_arrays)
    if unstack_layers is None:
        unstack_layers = jax.default_backend() == "cpu"
    out, logps, lengths, ended, eos, steps = sample_program(
        graphdef,
        params,
        *batch_arrays,
        jnp.asarray(end_codes),
        jnp.asarray(seqs),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
        jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
        filtered=top_k > 0 or top_p < 1,
        unstack=bool(unstack_layers),
        segments=segment_ends(p_len, max_new_tokens, decode_segments),
    )
    r = len(rows)
    return Generation(*(np.asarray(x)[:r] for x in (out, logps, lengths, ended, eos)), int(steps))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "filtered", "unstack", "segments"))
def sample_program(
    graphdef, params, tokens, mask, live, row_ids, end_codes, stop_seqs, key, temperature, top_k, top_p,
    pad_id, *, max_new_tokens, filtered, unstack, segments,
):  # fmt: skip
    model = nnx.merge(graphdef, params)
    b, p_len = tokens.shape
    layers = model.unstacked_layers() if unstack else None

    def forward(ids, positions, cache, index, key_valid):
        """ids [B, T] written at cache slot ``index`` -> (fp32 logits of the last position [B, V], cache)."""
        x, cache = model.cached_hidden_states(ids, positions, cache, index, key_valid, layers)
        return model.logits(x[:, -1:])[:, 0], cache

    cache = model.empty_cache(b, p_len + segments[0])
    key_valid = jnp.zeros((b, p_len + segments[0]), bool).at[:, :p_len].set(mask.astype(bool))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = forward(tokens, positions, cache, 0, key_valid)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)

    def choose(logits, i):
        def greedy():
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            return nxt, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[:, None], -1)[:, 0]

        def sample():
            # Unfiltered, process_logits skips its sort: top_k / top_p are then Python constants.
            x = process_logits(logits, temperature, *((top_k, top_p) if filtered else (0, 1.0)))
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
            nxt = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
            return nxt, jnp.take_along_axis(jax.nn.log_softmax(x, -1), nxt[:, None], -1)[:, 0]

        return jax.lax.cond(temperature > 0, sample, greedy)

    def record(s: DecodeState) -> tuple[DecodeState, jax.Array]:
        """Choose token ``s.i`` of every row and book-keep ends; rows already ended write padding."""
        i, done = s.i, s.done
        nxt, logp = choose(s.logits, i)
        window = jnp.concatenate([s.window[:, 1:], nxt[:, None]], axis=1)
        hit = jnp.all((stop_seqs[None] == window[:, None]) | (stop_seqs[None] == _ANY), -1).any(-1)
        end = jnp.where(end_codes[nxt] == _CONTINUE, jnp.where(hit, _STOP, _CONTINUE), end_codes[nxt])
        end = jnp.where(done, _CONTINUE, end)
        keep = ~done & (end != _EOS)
        s = s._replace(
            i=i + 1,
            tokens=s.tokens.at[:, i].set(jnp.where(keep, nxt, pad_id)),
            logprobs=s.logprobs.at[:, i].set(jnp.where(keep, logp, 0.0)),
            lengths=jnp.where(end != _CONTINUE, i + (end == _STOP), s.lengths),
            ended=s.ended | (end != _CONTINUE),
            done=done | (end != _CONTINUE),
            window=window,
            eos=jnp.where(end == _EOS, nxt, s.eos),
        )
        return s, nxt

    def step(s: DecodeState) -> DecodeState:
        index = p_len + s.i
        s, nxt = record(s)
        key_valid = s.key_valid.at[:, index].set(True)
        logits, cache = forward(nxt[:, None], s.positions[:, None], s.cache, index, key_valid)
        return s._replace(logits=logits, positions=s.positions + 1, cache=cache, key_valid=key_valid)

    state = DecodeState(
        i=jnp.int32(0),
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
        lengths=jnp.full((b,), max_new_tokens, jnp.int32),
        ended=jnp.zeros((b,), bool),
        done=~live,
        window=jnp.full((b, stop_seqs.shape[1]), _WINDOW_EMPTY, jnp.int32),
        eos=jnp.full((b,), -1, jnp.int32),
        logits=logits,
        positions=positions[:, -1] + 1,
        cache=cache,
        key_valid=key_valid,
    )
    for j, end in enumerate(segments):
        if j:  # the next segment's steps write up to slot p_len + end - 1
            extra = p_len + end - state.key_valid.shape[1]
            state = state._replace(
                cache=model.extend_cache(state.cache, extra),
                key_valid=jnp.pad(state.key_valid, ((0, 0), (0, extra))),
            )
        state = jax.lax.while_loop(lambda s, end=end: (s.i < end) & ~jnp.all(s.done), step, state)
    # The last token needs no forward after it: chosen outside the loop (a no-op if every row has ended).
    final, _ = record(state)
    steps = jnp.where(jnp.all(state.done), state.i, final.i)
    outputs = final.tokens, final.logprobs, final.lengths, final.ended & live, final.eos, steps
    if model.mesh is None:
        return outputs
    # Replicated, so that every host can read every row (on a pod, rows live on other hosts' devices).
    return jax.lax.with_sharding_constraint(outputs, NamedSharding(model.mesh, PartitionSpec()))


def generate_tokens(
    model: nnx.Module | nnx.GraphDef,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
    n: int = 1,
    max_prompt_len: int | None = None,
    return_logprobs: bool = False,
    stop_sequences: Sequence[Sequence[int]] = (),
    max_cache_len: int | None = None,
    params: nnx.State | None = None,
    decode_segments: int | None = None,
):
    """Token lists in, new token lists out (each cut after its first EOS, EOS excluded, or after its first
    stop sequence, included), ``n`` per prompt in prompt-major order. With ``return_logprobs``: (token
    lists, log-prob lists aligned with them). Options as in ``generate_arrays``."""
    g = generate_arrays(
        model,
        prompt_ids,
        max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        params=params,
        temperature=temperature,
        seed=seed,
        top_k=top_k,
        top_p=top_p,
        n=n,
        stop_sequences=stop_sequences,
        max_prompt_len=max_prompt_len,
        max_cache_len=max_cache_len,
        decode_segments=decode_segments,
    )
    tokens = [row[:k].tolist() for row, k in zip(g.tokens, g.lengths, strict=True)]
    if not return_logprobs:
        return tokens
    return tokens, [row[:k].tolist() for row, k in zip(g.logprobs, g.lengths, strict=True)]


def generation_ids(model: nnx.Module, tokenizer) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) for ``model`` and ``tokenizer``: EOS from the checkpoint's generation_config.json,
    else the tokenizer's; pad from the tokenizer, else the first EOS, else 0."""
    eos = model.cfg.generation_config.get("eos_token_id", tokenizer.eos_token_id)
    eos = tuple(e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    pad = tokenizer.pad_token_id
    return eos, pad if pad is not None else (eos[0] if eos else 0)


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
    max_cache_len: int | None = None,
    params: nnx.State | None = None,
) -> list[str]:
    """Prompts (already chat-formatted if the model wants that) -> generated texts, special tokens dropped,
    ``n`` per prompt in prompt-major order, each cut at its first stop string (rows also stop generating
    there, see the module docstring). ``max_prompt_len`` counts tokens; ``max_cache_len`` bounds prompt
    tokens + ``max_new_tokens`` (default: the model's max_position_embeddings). Raises ValueError on no
    prompts, an empty prompt, a prompt over either limit, or an empty stop string."""
    if len(prompts) == 0:
        raise ValueError("generate needs at least one prompt")
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop or ())
    if any(not s for s in stop):
        raise ValueError(f"stop strings must be non-empty, got {stop!r}")
    eos_ids, pad_id = generation_ids(model, tokenizer)
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
        stop_sequences=stop_token_sequences(tokenizer, stop, model.cfg.vocab_size),
        max_cache_len=max_cache_len,
        params=params,
    )
    return [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop) for t in new]
