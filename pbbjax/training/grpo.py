"""GRPO (group relative policy optimisation): the RL variant of retroactive PBB's stage 2, usable in general.

One iteration: for each of ``prompts_per_step`` prompts, sample ``num_generations`` (G) completions with
the sampler from the current parameters; reward each (``rollout.py``: correctness from the domain's scorer,
plus an optional format reward); normalise rewards within each prompt's group into advantages; then take
``num_iterations`` (μ) optimizer steps on the same rollouts with the clipped surrogate

    loss_t = -min(r_t A, clip(r_t, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t,
    r_t = exp(logp_t - logp_old_t),  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (the k3 estimator)

over completion tokens. The old log-probs are computed once per batch by the trainer's forward before the
first update (so the first of the μ steps has ratio 1 up to float noise), not taken from the sampler, whose
numerics differ slightly: the mean absolute gap between the two is logged as ``logp_gap``. The trainer's
log-probs use ``logits / temperature``, the distribution the sampler drew from (ignoring top-k/top-p).

Loss aggregation (``loss_agg``), as token weights that sum to 1 over the batch:

- ``"token"``: every completion token of the batch weighs the same (DAPO);
- ``"sequence"``: each completion's tokens share 1/B (the original GRPO: per-sequence mean, then mean);
- ``"fixed"``: every token weighs 1/(B * max_new_tokens) (Dr. GRPO: no length bias).

``scale_rewards=False`` drops the division by the group's standard deviation (Dr. GRPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pbbjax.config.sections import GRPOConfig
from pbbjax.models.cross_entropy import head_log_probs
from pbbjax.training.sft import apply_gradients, batch_sharding, trainable_value_and_grad


# -- pure functions -------------------------------------------------------------------------------------
def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-4):
    """Rewards [P * G] (prompt-major) -> advantages: reward minus its group's mean, divided by the group's
    (population) standard deviation + ``eps`` when ``scale``. A group of equal rewards gets zeros."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1)


def clipped_objective(logp, old_logp, advantages, epsilon: float, epsilon_high: float):
    """Per-token (loss, ratio, clipped): ``-min(r A, clip(r, 1-eps, 1+eps_high) A)`` with ``r =
    exp(logp - old_logp)``; ``advantages`` broadcast over tokens. ``clipped`` marks tokens whose gradient
    the clip removes (ratio beyond the bound in the direction the advantage pushes)."""
    ratio = jnp.exp(logp - old_logp)
    adv = jnp.broadcast_to(advantages, ratio.shape)
    unclipped = ratio * adv
    clipped_ratio = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    loss = -jnp.minimum(unclipped, clipped_ratio * adv)
    clipped = ((ratio > 1.0 + epsilon_high) & (adv > 0)) | ((ratio < 1.0 - epsilon) & (adv < 0))
    return loss, ratio, clipped


def kl_k3(logp, ref_logp):
    """The k3 estimator of KL(policy || reference) per token: ``exp(d) - d - 1``, ``d = ref - logp``
    (unbiased, always >= 0)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def token_weights(mask, mode: str, max_new_tokens: int):
    """Completion-token mask [B, T] -> weights summing to 1 over the batch (see ``loss_agg``)."""
    mask = jnp.asarray(mask, jnp.float32)
    b = mask.shape[0]
    if mode == "token":
        return mask / jnp.maximum(mask.sum(), 1.0)
    if mode == "sequence":
        return mask / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0) / b
    if mode == "fixed":
        return mask / (b * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}")


# -- rollout batches -----------------------------------------------------------------------------------
def rollout_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, max_new_tokens: int):
    """Prompts (each repeated for its completions, prompt-major) and completions -> numpy arrays
    ``tokens``, ``attention_mask`` [B, P + max_new_tokens] (prompts left-padded to P, the longest rounded up
    to a power of two so that new batches rarely recompile the step; completions right-padded) and
    ``completion_mask`` [B, P + max_new_tokens - 1], aligned with next-token targets (entry t is 1 when token
    t + 1 is a completion token)."""
    p_len = max(16, 1 << (max(len(p) for p in prompts) - 1).bit_length())
    b, t = len(completions), p_len + max_new_tokens
    tokens = np.full((b, t), pad_id, np.int32)
    attn = np.zeros((b, t), np.int32)
    comp = np.zeros((b, t), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        c = c[:max_new_tokens]
        tokens[i, p_len - len(p) : p_len] = p
        tokens[i, p_len : p_len + len(c)] = c
        attn[i, p_len - len(p) : p_len + len(c)] = 1
        comp[i, p_len : p_len + len(c)] = 1
    return {"tokens": tokens, "attention_mask": attn, "completion_mask": comp[:, 1:]}


def make_logprob_fn(graphdef, temperature: float, completion_len: int):
    """(params, batch) -> per-token log-probs [B, T-1] of each next token under ``logits / temperature``,
    at the last ``completion_len`` positions: in ``rollout_batch``'s layout those predict the completion
    tokens, and the positions before them (prompt targets, which ``completion_mask`` leaves out) hold 0.
    The LM head and the softmax run over the completion positions only (with a 256-token prompt bucket and
    64 new tokens, a fifth of the whole rows' positions), a chunk of positions at a time
    (``cross_entropy.head_log_probs``: one chunk's fp32 logits live at once, recomputed for the backward
    pass)."""

    def logprobs(params, batch):
        model = nnx.merge(graphdef, params)
        tokens = batch["tokens"]
        t = tokens.shape[1]
        n = min(completion_len, t - 1)
        hidden = model.hidden_states(tokens, attention_mask=batch["attention_mask"])
        # positions t-1-n .. t-2 predict tokens t-n .. t-1; slicing the hidden states (not the logits)
        # leaves the head nothing to do elsewhere
        x = model.final_normed(hidden[:, t - 1 - n : t - 1])
        head, out_first = model.head_weight(x.dtype)
        picked = head_log_probs(
            x, head, tokens[:, t - n :], head_out_first=out_first, temperature=temperature, mesh=model.mesh
        )
        return jnp.pad(picked, ((0, 0), (t - 1 - n, 0)))

    return logprobs


def make_grpo_step(graphdef, optimizer, cfg: GRPOConfig, schedule, shardings, mesh):
    """jit(state, batch) -> (state, metrics). ``batch``: rollout_batch's arrays plus ``advantages`` [B],
    ``old_logp`` and ``ref_logp`` [B, T-1] (the latter ignored when beta = 0). The state is donated; a
    non-finite loss or gradient leaves it unchanged and reports ``finite=False``."""
    logprob_fn = make_logprob_fn(graphdef, cfg.temperature, cfg.max_new_tokens)

    def loss_fn(params, batch):
        logp = logprob_fn(params, batch)
        weights = token_weights(batch["completion_mask"], cfg.loss_agg, cfg.max_new_tokens)
        per_token, ratio, clipped = clipped_objective(
            logp, batch["old_logp"], batch["advantages"][:, None], cfg.epsilon, cfg.epsilon_high
        )
        mask = batch["completion_mask"].astype(jnp.float32)
        n = jnp.maximum(mask.sum(), 1.0)
        metrics = {"clip_fraction": jnp.sum(clipped * mask) / n, "ratio": jnp.sum(ratio * mask) / n}
        if cfg.beta:
            kl = kl_k3(logp, batch["ref_logp"])
            per_token = per_token + cfg.beta * kl
            metrics["kl"] = jnp.sum(kl * mask) / n
        metrics["entropy_proxy"] = -jnp.sum(logp * mask) / n  # mean negative log-prob of sampled tokens
        return jnp.sum(per_token * weights), metrics

    def step(state, batch):
        (loss, metrics), grads = trainable_value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        new, grad_norm, finite = apply_gradients(state, grads, loss, optimizer)
        metrics |= {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "finite": finite,
        }
        return new, metrics

    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    data = batch_sharding(mesh)
    batch_shardings = {
        k: data for k in ("tokens", "attention_mask", "completion_mask", "old_logp", "ref_logp")
    }
    batch_shardings["advantages"] = (
        NamedSharding(mesh, PartitionSpec(data.spec[0])) if mesh is not None else data
    )
    return jax.jit(
        step,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
