"""The supervised finetuning step: completion-only masked cross-entropy, AdamW, clipping, accumulation.

The state is a plain pytree ``{"params": nnx.State, "opt_state": optax state, "step": int32}`` whose
parameters keep the model's dtype (fp32 master weights by default); the model's ``compute_dtype`` casts
them at use, which gives bf16 compute over fp32 masters. ``make_train_step`` returns one jitted function
with explicit in/out shardings; the state is donated.

Loss averaging (``loss_mode``): ``"token"`` = mean over every completion token of the batch;
``"sequence"`` = mean over sequences of each sequence's mean token loss. Both are computed as a sum and a
count, so accumulating k microbatches of b gives exactly the loss and gradient of one batch of k*b.

A step whose loss or gradient is not finite leaves the state unchanged and reports ``finite=False``; the
runner stops with a clear error and the last good checkpoint stays.

With LoRA adapters (``models/lora.py``) only they are trained: gradients, optimizer moments and updates
cover ``trainable_split``'s trainable part; the frozen base weights pass through the step untouched (they
stay in ``state["params"]``, so evaluation, checkpoints and export see the whole model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pbbjax.config.sections import OptimConfig
from pbbjax.models.cross_entropy import chunked_loss, head_cross_entropy
from pbbjax.models.lora import dropout_key, trainable_split
from pbbjax.models.sharding import logical_to_spec


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then ``cfg.schedule``'s decay, over the ``total_steps`` of one stage.

    Warmup step i (from 0) trains at ``learning_rate * (i + 1) / (warmup + 1)``: it starts above 0, so no
    optimizer step is wasted at learning rate 0, and the peak comes right after it. A stage shorter than
    ``warmup_steps`` warms up over all but its last step, which trains at the peak (a stage of 1 step trains
    at the peak, one of 2 steps at half the peak and then the peak)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.learning_rate * cfg.end_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if not warmup:
        return decay
    ramp = optax.linear_schedule(cfg.learning_rate / (warmup + 1), cfg.learning_rate, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params) -> object:
    """True for the parameters weight decay applies to: the matrices, told by their logical axes (every
    projection and embedding has an ``embed`` axis, every LoRA adapter a ``lora_rank`` axis; norms and
    biases have neither). By name, not rank: the stacked ``[layers, D]`` norms and ``[layers, heads,
    head_dim]`` biases have the rank of a matrix."""
    return jax.tree.map(
        lambda v: "embed" in v.axes or "lora_rank" in v.axes,
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with ``cfg``'s schedule over ``total_steps``, decoupled decay on ``decay_mask``, clipping.
    Its parameters must be an ``nnx.State`` (the decay mask reads their logical axes)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm else adamw


def loss_weights(tokens, loss_mask, segment_ids, mode: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(targets [B, T], weights [B, T] fp32, count) of next-token prediction on completion tokens: the loss
    is ``sum(weights * CE(position t -> targets[t]))`` and its mean that over ``count``.

    Position t predicts token t+1; ``loss_mask[t+1]`` says whether token t+1 is a completion token. Every
    position is scored and the last one weighted 0 (slicing to T - 1 positions copied the [B, T, vocab]
    logits forward and zero-padded their gradient back on XLA:CPU). The count is an integer (completion
    tokens, or sequences with any) held exactly in float32, so that counts of microbatches add up to the
    whole batch's on any CPU.
    """
    targets = shift_left(tokens, 0)
    weight = shift_left(loss_mask, 0).astype(jnp.float32)
    if mode == "token":
        return targets, weight, jnp.sum(weight)
    # "sequence": each sequence's completion tokens share a total weight of 1; the count is the number of
    # sequences with completion tokens (each counted at its last one), not the float sum of the weights
    seg = shift_left(segment_ids, -1)  # the last position's own segment: weight 0, counted in none
    same = (seg[:, :, None] == seg[:, None, :]).astype(jnp.float32)
    per_seq_tokens = jnp.einsum("bts,bs->bt", same, weight)
    later = jnp.einsum("bts,bs->bt", same * jnp.triu(jnp.ones_like(same[0]), 1), weight)
    sequences = jnp.sum(jnp.where((weight > 0) & (later == 0), 1.0, 0.0))
    return targets, weight / jnp.maximum(per_seq_tokens, 1.0), sequences


def masked_loss_sums(logits, tokens, loss_mask, segment_ids, mode: str) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, count) from ``logits`` [B, T, V] (``loss_weights``'s weighting)."""
    targets, weights, count = loss_weights(tokens, loss_mask, segment_ids, mode)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights), count


def batch_sharding(mesh: Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), None, mesh))


def state_shardings(state: dict):
    return jax.tree.map(lambda x: x.sharding, state)


def abstract_state(params, optimizer: optax.GradientTransformation, mesh: Mesh | None = None) -> dict:
    """The train state's shapes, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves), computed without
    allocating it: each optimizer moment takes its parameter's sharding, other leaves (step counts) are
    replicated. ``params``: the model's ``nnx.State`` (arrays, or ShapeDtypeStructs with shardings); the
    optimizer state covers its trainable part. The one layout of the state: ``init_state`` builds it, the
    runner restores into it, ``pbbjax.training.aot`` compiles it."""
    p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    trainable = trainable_split(p)[0]
    other = NamedSharding(mesh, PartitionSpec()) if mesh is not None else jax.tree.leaves(p)[0].sharding

    def like(v, sharding):
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)

    opt_state = optax.tree_map_params(
        optimizer,
        lambda v, param: like(v, param.sharding),
        jax.eval_shape(optimizer.init, trainable),
        trainable,
        transform_non_params=lambda v: like(v, other),
    )
    return {"params": p, "opt_state": opt_state, "step": like(jax.ShapeDtypeStruct((), jnp.int32), other)}


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh | None = None) -> dict:
    """The train state of ``model`` (its parameters, not copied), laid out as ``abstract_state``: without
    explicit output shardings, ``jit(optimizer.init)`` would replicate every moment on every device, since
    zeros depend on nothing XLA could propagate a sharding from."""
    _, params = nnx.split(model)
    layout = state_shardings(abstract_state(params, optimizer, mesh))
    opt_state = jax.jit(optimizer.init, out_shardings=layout["opt_state"])(trainable_split(params)[0])
    step = jax.device_put(jnp.zeros((), jnp.int32), layout["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


def shift_left(x: jax.Array, fill) -> jax.Array:
    """``x`` shifted one position left along time, ``fill`` at the last position: [B, T] -> [B, T]."""
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def make_loss_fn(graphdef: nnx.GraphDef, mode: str):
    """(params, batch[, dropout_key]) -> (loss sum, count); the key (training) drives adapter dropout."""

    def loss_fn(params, batch, dropout_key=None):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            dropout_key=dropout_key,
        )
        if not chunked_loss(1 if model.mesh is None else model.mesh.shape["fsdp"]):
            return masked_loss_sums(
                model.logits(hidden), batch["tokens"], batch["loss_mask"], batch["segment_ids"], mode
            )
        targets, weights, count = loss_weights(
            batch["tokens"], batch["loss_mask"], batch["segment_ids"], mode
        )
        # the logits a chunk at a time, never all [B, T, vocab] of them (pbbjax.models.cross_entropy)
        x = model.final_normed(hidden)
        head, out_first = model.head_weight(x.dtype)
        return head_cross_entropy(x, head, targets, weights, head_out_first=out_first, mesh=model.mesh), count

    return loss_fn


def trainable_value_and_grad(loss_fn, has_aux: bool = False):
    """``jax.value_and_grad`` of ``loss_fn(params, batch, *rest)`` with respect to the trainable parameters
    only (``trainable_split``): (value, gradient of the trainable part)."""

    def fn(params, batch, *rest):
        trainable, frozen = trainable_split(params)
        loss = lambda t, b: loss_fn(nnx.merge_state(t, frozen), b, *rest)
        return jax.value_and_grad(loss, has_aux=has_aux)(trainable, batch)

    return fn


def make_grad_fn(graphdef, loss_mode: str, microbatches: int):
    """(params, batch[, dropout_key]) -> (mean loss, completion-token count, mean gradient of the trainable
    parameters), summed over microbatches (each with its own dropout key, folded from the step's)."""
    value_and_grad = trainable_value_and_grad(make_loss_fn(graphdef, loss_mode), has_aux=True)
    k = microbatches

    def grad_fn(params, batch, key=None):
        if k == 1:
            (num, den), g = value_and_grad(params, batch, key)
        else:

            def one(carry, xs):
                i, micro = xs
                micro_key = None if key is None else jax.random.fold_in(key, i)
                (num, den), g = value_and_grad(params, micro, micro_key)
                return jax.tree.map(jnp.add, carry, (num, den, g)), None

            micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)
            zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, trainable_split(params)[0]))
            (num, den, g), _ = jax.lax.scan(one, zero, (jnp.arange(k), micro))
        den = jnp.maximum(den, 1e-9)
        return num / den, den, jax.tree.map(lambda x: x / den, g)

    return grad_fn


def apply_gradients(state: dict, grads, loss, optimizer) -> tuple[dict, jax.Array, jax.Array]:
    """One optimizer update of the trainable parameters (``grads`` covers them) -> (new state, gradient norm,
    finite). A non-finite loss or gradient norm keeps the old state (the caller stops the run and keeps its
    last good checkpoint)."""
    trainable, frozen = trainable_split(state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    old = {"params": trainable, "opt_state": state["opt_state"], "step": state["step"]}

    def update(old):
        updates, opt_state = optimizer.update(grads, old["opt_state"], old["params"])
        return {
            "params": optax.apply_updates(old["params"], updates),
            "opt_state": opt_state,
            "step": old["step"] + 1,
        }

    def select(old):  # both states, then jnp.where: fused in place where XLA:TPU compiles it
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), update(old), old)

    def branch(old):  # XLA:CPU copied every optimizer moment for the select (0.8 GiB of SmolLM2-135M's step)
        return jax.lax.cond(finite, update, lambda old: old, old)

    # the same state either way; which compiles to less memory depends on the backend: on TPU the branch
    # cost 1.2 GiB per chip of temporaries for Qwen3-14B on v5p-64 (docs/scale.md)
    kept = jax.lax.platform_dependent(old, cpu=branch, default=select)
    return kept | {"params": nnx.merge_state(kept["params"], frozen)}, grad_norm, finite


def make_train_step(graphdef, optimizer, cfg: OptimConfig, total_steps: int, shardings, mesh: Mesh | None):
    """jit(state, batch) -> (state, metrics); the batch is a dict of [global_batch, seq_len] int32 arrays."""
    grad_fn = make_grad_fn(graphdef, cfg.loss_mode, cfg.microbatches)
    schedule = learning_rate_schedule(cfg, total_steps)

    def step(state, batch):
        key = dropout_key(nnx.merge(graphdef, state["params"]).cfg, state["step"])  # None without dropout
        loss, _, grads = grad_fn(state["params"], batch, key)
        new, grad_norm, finite = apply_gradients(state, grads, loss, optimizer)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "target_tokens": jnp.sum(batch["loss_mask"][:, 1:]),
            "finite": finite,
        }
        return new, metrics

    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(graphdef, mode: str):
    """jit(params, batch) -> (loss sum, count): held-out loss on completion tokens."""
    return jax.jit(make_loss_fn(graphdef, mode))


def check_batch(batch_size: int, cfg: OptimConfig, mesh: Mesh | None) -> None:
    """The global batch must split into microbatches and over the mesh's batch axes."""
    if batch_size % cfg.microbatches:
        raise ValueError(
            f"pipeline.batch_size={batch_size} is not divisible by train.microbatches={cfg.microbatches}"
        )
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if (batch_size // cfg.microbatches) % shards:
            raise ValueError(
                f"a microbatch of {batch_size // cfg.microbatches} sequences cannot be split over the mesh's "
                f"data x fsdp = {shards} devices; change pipeline.batch_size, train.microbatches or the mesh"
            )
