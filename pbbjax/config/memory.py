"""Per-chip memory estimates by arithmetic alone: what the compiled steps of compile-only mode should need.

The estimate explains the compiler's numbers (``pbbjax.training.aot`` prints both side by side) and picks the
gradient-accumulation depth of the paper-scale presets (``pbbjax.config.presets``). Every row is bytes per
chip for a mesh of ``data x fsdp x tensor`` chips, with the layout of ``models/sharding.py``: parameters and
optimizer moments sharded over ``fsdp x tensor`` (replicated over ``data``), the batch split over
``data x fsdp``, heads / MLP / vocabulary over ``tensor``.

Train step (``training/sft.py``), in order of the table:

- ``params``: the master weights in the parameter dtype (fp32 by default).
- ``optimizer``: AdamW's two moments, in the parameter dtype.
- ``gradients``: one gradient per parameter (two with microbatches: the running sum and the current one).
- ``layer weights``: the compute-dtype copies of one layer's weights and of the LM head (the embedding
  when tied), gathered over ``fsdp`` for their matmuls, and the layer's gradient before its
  reduce-scatter.
- ``activations``: what the backward pass keeps, by remat policy (per microbatch of ``tokens`` per chip):
  ``none`` keeps every intermediate of every layer; ``dots`` keeps each layer's matmul outputs (the
  attention scores included, in fp32); ``full`` keeps each layer's input only, plus one layer's
  intermediates while that layer is recomputed (which holds for scanned layers, ``scan_layers``, where
  one layer is rebuilt at a time; with unrolled layers, XLA:CPU's compiled step keeps about as much
  under ``full`` as under ``none``: ``scripts/train_memory.py`` compares the compiled step with this
  estimate). Every policy adds the fp32 gradients of one layer's attention scores and probabilities,
  held while that layer's backward pass runs.
- ``logits``: without FSDP the train step's cross-entropy holds the logits of one chunk of positions at
  a time (``models/cross_entropy.py``), two fp32 ``[chunk tokens, vocab]`` buffers (the logits and their
  gradient); with FSDP one fp32 ``[tokens, vocab]`` buffer per microbatch (XLA fuses the log-softmax and
  its gradient into consumers of the logits rather than keeping copies).

With LoRA (``cfg.lora``) the base weights are frozen in ``param_dtype`` and only the adapters (in
``cfg.lora.dtype``) are trained: ``params`` holds both, ``optimizer`` and ``gradients`` the adapters only,
``layer weights`` one layer's compute-dtype copies and its adapters' gradient, and the activations add
each adapter's ``[tokens, rank]`` intermediate where the policy keeps matmul outputs.

Sampler (``sampling.py``): the parameters and the optimizer moments stay resident during evaluation
(the runner evaluates mid-stage), plus one gathered layer and the LM head in the compute dtype, the KV
cache (``[batch, prompt + new, kv_heads, head_dim]`` per layer, compute dtype), the intermediates of one
layer's forward pass over the prompts (prefill), and the fp32 logits of the last position. XLA may also
hoist the gathers of every layer's weights out of the decode loop (a compute-dtype copy of all weights
per chip) when it judges they fit; the estimate leaves that out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pbbjax.models.architecture import ModelConfig
from pbbjax.models.attention import query_blocks
from pbbjax.models.cross_entropy import chunked_loss, time_chunks

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh's axis sizes; the per-chip shares of parameters and of the batch follow from them."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def chips(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def param_shards(self) -> int:
        return self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp


def _bytes(dtype: str) -> int:
    return np.dtype(dtype).itemsize


# LoRA targets whose input is the hidden size (``embed``, sharded over fsdp); the others' output is.
EMBED_INPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def adapter_bytes(cfg: ModelConfig, layout: Layout) -> int:
    """Bytes per chip of the LoRA adapters (0 without): A and B are each sharded like the dimension they
    share with their base weight, over ``fsdp`` where it is the hidden size, over ``tensor`` where it is
    heads or MLP, and replicated on their rank."""
    if cfg.lora is None:
        return 0
    per_rank = 0.0
    for name in cfg.lora.targets:
        fan_in, fan_out = cfg.projection_dims(name)
        embed, other = (fan_in, fan_out) if name in EMBED_INPUT else (fan_out, fan_in)
        per_rank += embed / layout.fsdp + other / layout.tensor
    return int(cfg.num_layers * cfg.lora.rank * per_rank * _bytes(cfg.lora.dtype))


def trained_bytes(cfg: ModelConfig, layout: Layout) -> int:
    """Bytes per chip of one copy of the trained parameters: the adapters with LoRA, else every parameter."""
    if cfg.lora is not None:
        return adapter_bytes(cfg, layout)
    return cfg.num_params * _bytes(cfg.param_dtype) // layout.param_shards


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer."""
    return (cfg.num_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)) // (
        cfg.num_layers
    )


def layer_activation_bytes(cfg: ModelConfig, tokens: int, seq_len: int, policy: str, tensor: int = 1) -> int:
    """Bytes one layer holds over ``tokens`` tokens per chip, each attending ``seq_len`` keys.

    ``policy``: a remat policy name (what the backward pass keeps of the layer), ``"forward"`` (every
    intermediate of the forward pass, as ``none`` keeps it), ``"backward"`` (those and the fp32 gradients
    of the attention scores and probabilities: what ``full`` holds while it rebuilds one layer),
    ``"score gradients"`` (those two fp32 gradients alone: what the backward pass of a layer whose
    intermediates were kept adds) or ``"prefill"`` (the forward's, with the KV-cache attention's fp32
    scores and probabilities)."""
    c = _bytes(cfg.compute_dtype)
    d, f = cfg.hidden_size, cfg.intermediate_size // tensor
    q, kv = cfg.num_heads * cfg.head_dim // tensor, cfg.num_kv_heads * cfg.head_dim // tensor
    # fp32 [heads, keys] per query token: the keys its query block meets (``attention.query_blocks``; the
    # prefill's KV-cache attention meets all of them)
    keys = seq_len if policy == "prefill" else attended_keys(seq_len)
    scores = int(cfg.num_heads // tensor * keys * 4)
    lora = cfg.lora.rank * len(cfg.lora.targets) * c if cfg.lora else 0  # each adapter's x A [rank]
    if policy == "score gradients":
        return 2 * tokens * scores
    if policy == "full":  # the layer's input
        return tokens * d * c
    if policy == "dots":  # dot_general outputs (q, k, v, scores, PV, o, gate, up, down) and the input
        return tokens * ((2 * q + 2 * kv + 3 * d + 2 * f) * c + scores + lora)
    if policy == "dots_no_batch":  # the batched dots (scores, PV) are recomputed
        return tokens * ((q + 2 * kv + 3 * d + 2 * f) * c + lora)
    # norms, q/k/v before and after norm and rope, PV, o, residual, gate, up, sigmoid(gate), gate*up, down;
    # the attention probabilities in the compute dtype (attention.xla_attention keeps nothing else [T, S])
    forward = tokens * ((5 * d + 3 * q + 4 * kv + 4 * f) * c + scores // 4 * c + lora)
    return forward + (2 * tokens * scores if policy in ("backward", "prefill") else 0)


def attended_keys(seq_len: int) -> float:
    """Keys per query, on average, that the training attention's query blocks meet over ``seq_len`` tokens
    (0.56 x 256 at 256 tokens; the blocks above the causal diagonal are skipped)."""
    return sum((b - a) * keys for a, b, keys in query_blocks(seq_len, seq_len)) / seq_len


def train_estimate(
    cfg: ModelConfig, layout: Layout, *, batch: int, seq_len: int, microbatches: int = 1
) -> dict[str, int]:
    """Bytes per chip of one train step, row by row (see the module docstring)."""
    p, c = _bytes(cfg.param_dtype), _bytes(cfg.compute_dtype)
    n, trained = cfg.num_params, trained_bytes(cfg, layout)
    tokens = batch * seq_len // layout.batch_shards // microbatches
    head = cfg.vocab_size * cfg.hidden_size
    lora_layer = cfg.num_lora_params // cfg.num_layers * _bytes(cfg.lora.dtype) if cfg.lora else 0
    layer_grad = lora_layer if cfg.lora else layer_params(cfg) * p
    working = ((layer_params(cfg) + head) * c + layer_grad) // layout.tensor
    policy = "forward" if cfg.remat == "none" else cfg.remat
    keep = layer_activation_bytes(cfg, tokens, seq_len, policy, layout.tensor) * cfg.num_layers
    # and, while one layer's backward runs, what it rebuilds (``full``) or its fp32 score gradients (others)
    rebuilt = "backward" if cfg.remat == "full" else "score gradients"
    keep += layer_activation_bytes(cfg, tokens, seq_len, rebuilt, layout.tensor)
    # the chunked cross-entropy's logits and their gradient, or the full logits (fused into their consumers)
    logit_tokens = 2 * chunk_tokens(tokens, seq_len) if chunked_loss(layout.fsdp) else tokens
    return {
        "params": n * p // layout.param_shards + adapter_bytes(cfg, layout),
        "optimizer": 2 * trained,
        "gradients": (2 if microbatches > 1 else 1) * trained,
        "layer weights": working,
        "activations": keep,
        "logits": logit_tokens * cfg.vocab_size * 4 // layout.tensor,
    }


def grpo_estimate(
    cfg: ModelConfig, layout: Layout, *, batch: int, seq_len: int, max_new_tokens: int
) -> dict[str, int]:
    """Bytes per chip of one GRPO update on ``batch`` rollouts of ``seq_len`` tokens: a train step's rows,
    but the log-probs' fp32 logits cover the last ``max_new_tokens`` positions only, one chunk of them at
    a time with its gradient (``grpo.make_logprob_fn``, ``cross_entropy.head_log_probs``)."""
    estimate = train_estimate(cfg, layout, batch=batch, seq_len=seq_len)
    completions = batch * max_new_tokens // layout.batch_shards
    estimate["logits"] = 2 * chunk_tokens(completions, max_new_tokens) * cfg.vocab_size * 4 // layout.tensor
    return estimate


def chunk_tokens(tokens: int, seq_len: int) -> int:
    """Tokens per chip whose logits a chunked head (``cross_entropy.head_cross_entropy``, ``head_log_probs``)
    holds at once, of ``tokens`` in rows of ``seq_len`` (``cross_entropy.time_chunks``)."""
    rows = max(tokens // seq_len, 1)
    return rows * time_chunks(rows, seq_len)[1]


def sample_estimate(
    cfg: ModelConfig, layout: Layout, *, batch: int, prompt_len: int, max_new_tokens: int
) -> dict[str, int]:
    """Bytes per chip of one generate call (prefill + decode loop) during a run (see the module docstring)."""
    p, c = _bytes(cfg.param_dtype), _bytes(cfg.compute_dtype)
    n = cfg.num_params
    rows = -(-batch // layout.batch_shards)
    slots = prompt_len + max_new_tokens
    return {
        "params": n * p // layout.param_shards + adapter_bytes(cfg, layout),
        "optimizer (resident)": 2 * trained_bytes(cfg, layout),
        "layer weights": (layer_params(cfg) + cfg.vocab_size * cfg.hidden_size) * c // layout.tensor,
        "kv cache": 2 * cfg.num_layers * rows * slots * cfg.num_kv_heads * cfg.head_dim * c // layout.tensor,
        "prefill activations": layer_activation_bytes(
            cfg, rows * prompt_len, slots, "prefill", layout.tensor
        ),
        "logits": rows * cfg.vocab_size * 4 // layout.tensor,
    }


def total(rows: dict[str, int]) -> int:
    return sum(rows.values())


def format_estimate(rows: dict[str, int], hbm: int | None = None) -> str:
    """The rows as ``name  GiB`` lines, a total, and the HBM a program may use when given."""
    lines = [f"  {name:<22}{value / GIB:>9.2f} GiB" for name, value in rows.items()]
    lines.append(f"  {'total':<22}{total(rows) / GIB:>9.2f} GiB")
    if hbm:
        lines.append(f"  {'usable HBM':<22}{hbm / GIB:>9.2f} GiB")
    return "\n".join(lines)
