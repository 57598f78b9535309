"""Compile-only mode: every jitted step of a run, compiled ahead of time for a TPU topology not present here.

    python -m pbbjax.train --config configs/proactive.py:qwen3-14b,v5p-64 \
        --config.compile_only_topology=v5p:4x4x2

(a pod name such as ``v5p-64`` works too) builds the mesh on the topology's devices
(``jax.experimental.topologies``; needs ``libtpu``, which the ``tpu`` and ``test`` extras install, but no
TPU), makes each step from abstract shapes only (``jax.ShapeDtypeStruct`` with shardings, ``nnx.eval_shape``
for the model, the model's shape from ``model.config_file``: no weights are read), compiles it, and prints
per chip: XLA's memory analysis (arguments, outputs, aliased = donated, temporaries, generated code, their
total) against what XLA may use of the chip's HBM, the estimate of ``pbbjax.config.memory`` that explains it,
and FLOPs from XLA's cost analysis next to the model FLOPs of ``training/metrics.py``. It exits with status 1
if a step does not fit. A step whose arguments alone exceed HBM is reported without compiling.

XLA's cost analysis counts the body of a loop once: with scanned layers, microbatches or the sampler's
decode loop its FLOPs are those of one iteration, not the step's (the model FLOPs are the step's).

The steps come from ``STEP_BUILDERS``: functions ``(Context) -> list[Step]``, each ``Step`` a jitted
function with its abstract arguments. Another compiled step is one more builder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pbbjax.config import memory, presets
from pbbjax.config.run_config import RunConfig
from pbbjax.core.tables import format_table
from pbbjax.data.pipeline import FEATURES
from pbbjax.inference import sampler as sampling
from pbbjax.models.architecture import ModelConfig
from pbbjax.models.default_model import default_model_path
from pbbjax.models.hf_io import abstract_model
from pbbjax.models.sharding import logical_to_spec, make_mesh
from pbbjax.training import sft
from pbbjax.training.grpo import make_grpo_step
from pbbjax.training.metrics import forward_flops_per_token, train_flops_per_token
from pbbjax.training.rollout import grpo_optimizer

GIB = memory.GIB
# jax device kind -> TPU generation (presets.HBM_GIB / USABLE_HBM_GIB keys)
GENERATIONS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e"}


@dataclasses.dataclass
class Context:
    """What every step builder needs: the config, the model's config and abstract state, the mesh."""

    config: RunConfig
    cfg: ModelConfig
    mesh: Mesh
    layout: memory.Layout
    graphdef: nnx.GraphDef
    optim: sft.OptimConfig
    optimizer: Any  # optax.GradientTransformation
    state: dict  # sft.abstract_state: the train state a real run builds, ShapeDtypeStructs with shardings

    @property
    def params(self) -> nnx.State:
        return self.state["params"]

    @property
    def opt_state(self):
        return self.state["opt_state"]

    def sharded(self, shape, dtype, spec: PartitionSpec | None = None) -> jax.ShapeDtypeStruct:
        """An abstract array on the mesh, replicated unless ``spec`` says otherwise."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh, spec or PartitionSpec()))


@dataclasses.dataclass
class Step:
    """One jitted function to compile, its abstract arguments, and what to print beside XLA's numbers."""

    name: str
    fn: Any  # a jax.jit-wrapped function
    args: tuple  # its arguments: ShapeDtypeStructs with shardings (static ones as they are)
    estimate: dict[str, int]  # pbbjax.config.memory rows, bytes per chip
    model_flops: float  # per chip per call
    resident: int = 0  # bytes per chip live beside the step that are none of its arguments
    kwargs: dict = dataclasses.field(default_factory=dict)  # static keyword arguments


def sft_steps(ctx: Context) -> list[Step]:
    """The SFT train step of ``training/sft.py`` on one global batch."""
    shardings = sft.state_shardings(ctx.state)
    fn = sft.make_train_step(ctx.graphdef, ctx.optimizer, ctx.optim, 1000, shardings, ctx.mesh)
    batch_size, seq_len = ctx.config.pipeline.batch_size, ctx.config.pipeline.seq_len
    sharding = sft.batch_sharding(ctx.mesh)
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding) for k in FEATURES}
    estimate = memory.train_estimate(
        ctx.cfg, ctx.layout, batch=batch_size, seq_len=seq_len, microbatches=ctx.optim.microbatches
    )
    flops = train_flops_per_token(ctx.cfg, seq_len) * batch_size * seq_len / ctx.layout.chips
    return [Step("train (sft)", fn, (ctx.state, batch), estimate, flops)]


def sampler_steps(ctx: Context) -> list[Step]:
    """The sampler on one evaluation batch, prompts as long as a training row (the worst case)."""
    ev = ctx.config.eval
    new = max(ev.max_new_tokens, ev.cot_max_new_tokens)
    return [sample_step(ctx, "sample (prefill+decode)", ev.batch_size, ctx.config.pipeline.seq_len, new)]


def sample_step(ctx: Context, name: str, rows: int, prompt_len: int, new: int, filtered=False) -> Step:
    """``sampling.sample_program`` (prefill + decode loop) for ``rows`` prompts of up to ``prompt_len`` tokens
    and ``new`` new tokens, with ``generate_arrays``' argument layout, the optimizer state resident."""
    prompt = min(sampling.prompt_bucket(prompt_len), ctx.cfg.max_position_embeddings - new)
    shards = ctx.layout.batch_shards
    rows = -(-rows // shards) * shards  # padded to a multiple of the shards, as the sampler does
    spec = logical_to_spec(("batch",), None, ctx.mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        ctx.graphdef,
        ctx.params,
        ctx.sharded((rows, prompt), jnp.int32, spec),  # tokens
        ctx.sharded((rows, prompt), jnp.int32, spec),  # mask
        ctx.sharded((rows,), jnp.bool_, spec),  # live
        ctx.sharded((rows,), jnp.int32, spec),  # row ids
        ctx.sharded((ctx.cfg.vocab_size,), jnp.int32),  # end codes
        ctx.sharded(
            (sampling.pow2_at_least(0, 4), sampling.pow2_at_least(1, 8)), jnp.int32
        ),  # stop sequences: none
        ctx.sharded((), key.dtype),
        ctx.sharded((), jnp.float32),  # temperature
        ctx.sharded((), jnp.int32),  # top_k
        ctx.sharded((), jnp.float32),  # top_p
        ctx.sharded((), jnp.int32),  # pad id
    )
    segments = sampling.segment_ends(prompt, new)
    static = dict(max_new_tokens=new, filtered=filtered, unstack=False, segments=segments)
    estimate = memory.sample_estimate(ctx.cfg, ctx.layout, batch=rows, prompt_len=prompt, max_new_tokens=new)
    # prefill: causal over the prompt; each new token: the whole cache so far (half the budget on average)
    flops = rows * prompt * forward_flops_per_token(ctx.cfg, prompt)
    flops += rows * new * forward_flops_per_token(ctx.cfg, prompt + new // 2, causal=False)
    resident = shard_bytes(ctx.opt_state)
    return Step(name, sampling.sample_program, args, estimate, flops / ctx.layout.chips, resident, static)


def grpo_steps(ctx: Context) -> list[Step]:
    """The GRPO update (``training/grpo.py``) on one batch of rollouts (prompts of up to
    ``rl.max_prompt_len`` tokens, bucketed as ``rollout_batch`` does, + ``rl.max_new_tokens``), and the
    rollout sampler; only for configs with GRPO stages."""
    if not ctx.config.rl_stages:
        return []
    rl = ctx.config.rl
    optimizer, schedule = grpo_optimizer(ctx.optim, rl, rl.steps)  # the same AdamW tree as ctx.opt_state
    shardings = sft.state_shardings(ctx.state)
    fn = make_grpo_step(ctx.graphdef, optimizer, rl, schedule, shardings, ctx.mesh)
    b = rl.prompts_per_step * rl.num_generations
    t = max(16, 1 << (rl.max_prompt_len - 1).bit_length()) + rl.max_new_tokens
    spec = logical_to_spec(("batch", "length"), None, ctx.mesh)
    batch = {
        "tokens": ctx.sharded((b, t), jnp.int32, spec),
        "attention_mask": ctx.sharded((b, t), jnp.int32, spec),
        "completion_mask": ctx.sharded((b, t - 1), jnp.int32, spec),
        "old_logp": ctx.sharded((b, t - 1), jnp.float32, spec),
        "ref_logp": ctx.sharded((b, t - 1), jnp.float32, spec),
        "advantages": ctx.sharded((b,), jnp.float32, PartitionSpec(spec[0])),
    }
    estimate = memory.grpo_estimate(ctx.cfg, ctx.layout, batch=b, seq_len=t, max_new_tokens=rl.max_new_tokens)
    if rl.beta:  # the frozen reference parameters stay live beside the step
        estimate["reference params"] = shard_bytes(ctx.params)
    # model FLOPs: the LM head (6 per weight and token, forward + backward) runs on the completions only
    head = ctx.cfg.vocab_size * ctx.cfg.hidden_size
    per_row = train_flops_per_token(ctx.cfg, t) * t - 6 * head * (t - rl.max_new_tokens)
    flops = per_row * b / ctx.layout.chips
    filtered = rl.top_k > 0 or rl.top_p < 1
    rollouts = sample_step(
        ctx, "sample (rollouts)", b, sampling.prompt_bucket(rl.max_prompt_len), rl.max_new_tokens, filtered
    )
    return [Step("train (grpo)", fn, (ctx.state, batch), estimate, flops), rollouts]


STEP_BUILDERS: list[Callable[[Context], list[Step]]] = [sft_steps, sampler_steps, grpo_steps]


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology (``v5p:4x4x2``) or pod (``v5p-64``)."""
    name = presets.PODS[topology].topology if topology in presets.PODS else topology
    # Compile-only use of libtpu needs no lock on the TPU (other processes may hold it), and no workers.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # A slice smaller than one host (v5e:1x1) needs host bounds of its own size; libtpu assumes 2x2x1.
    dims = [int(d) for d in name.partition(":")[2].split("x") if d.isdigit()]
    small = dict(chips_per_host_bounds=(*dims, 1, 1)[:3]) if dims and math.prod(dims) < 4 else {}
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **small).devices)
    except Exception as e:  # libtpu missing, or a name libtpu rejects
        raise ValueError(
            f"compile_only_topology {topology!r}: no TPU topology ({type(e).__name__}: {e}). Give a topology "
            f"such as v5p:4x4x2 or v5e:2x2, or a pod: {', '.join(presets.PODS)}; libtpu must be installed "
            "(pip install 'pbbjax[tpu]')"
        ) from None


def usable_hbm(devices) -> tuple[str, int]:
    """(generation, bytes XLA may use per device); a v4 chip shows as two devices in compile-only mode."""
    kind = devices[0].device_kind
    if kind not in GENERATIONS:
        raise ValueError(f"no HBM size known for {kind!r}; known: {', '.join(GENERATIONS)}")
    gen = GENERATIONS[kind]
    chips = len({tuple(d.coords) for d in devices})
    return gen, int(presets.USABLE_HBM_GIB[gen] * GIB * chips / len(devices))


def model_config(config: RunConfig) -> ModelConfig:
    """The model's shape: ``model.config_file``, else the config.json of the directory the run would load
    (``model.path``, the tiny preset's fields over the default model's vocabulary, or the default model)."""
    m = config.model
    options = dict(param_dtype=m.param_dtype, **m.options())
    if m.config_file:
        return presets.load_model_config(m.config_file, **options)
    if m.tiny:
        vocab = ModelConfig.from_dir(default_model_path()).vocab_size
        return ModelConfig.from_hf({**m.tiny, "vocab_size": vocab}, **options)
    path = m.path or default_model_path()
    if not os.path.isdir(path):
        raise ValueError(
            f"compile-only mode reads no weights but needs the model's config.json: model.path {path!r} is "
            "no local directory, so set model.config_file (the presets ship theirs in "
            "pbbjax/config/paper_models/)"
        )
    return ModelConfig.from_dir(path, **options)


def build_context(config: RunConfig, devices) -> Context:
    """The mesh on ``devices``, the abstract model and train state laid out on it, the optimizer."""
    m = config.mesh
    try:
        mesh = make_mesh(m["data"], m["fsdp"], m["tensor"], devices=devices)
    except ValueError as e:
        raise ValueError(f"config field 'mesh' on topology {config.compile_only_topology}: {e}") from None
    layout = memory.Layout(*(mesh.shape[a] for a in ("data", "fsdp", "tensor")))
    cfg = model_config(config)
    optim = config.train.optim
    sft.check_batch(config.pipeline.batch_size, optim, mesh)
    graphdef, params = abstract_model(cfg, mesh)
    optimizer = sft.make_optimizer(optim, 1000)
    state = sft.abstract_state(params, optimizer, mesh)  # the layout a real run builds
    return Context(config, cfg, mesh, layout, graphdef, optim, optimizer, state)


def shard_bytes(tree) -> int:
    """Bytes per device of a pytree of ShapeDtypeStructs with shardings (static leaves count 0)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.ShapeDtypeStruct):
            continue
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        total += math.prod(shape) * (8 if key else np.dtype(x.dtype).itemsize)
    return total


def compile_step(step: Step, hbm: int) -> dict:
    """One row of the report: XLA's memory analysis and FLOPs of the compiled step, or why it did not fit."""
    row = {"step": step.name, "estimate": memory.total(step.estimate) / GIB, "resident": step.resident / GIB}
    floor = shard_bytes(step.args) + step.resident
    if floor > hbm:
        return row | {"total": floor / GIB, "fits": "no", "note": "arguments alone exceed HBM; not compiled"}
    try:
        compiled = step.fn.lower(*step.args, **step.kwargs).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return row | {"fits": "no", "note": str(e).splitlines()[0][:160]}
    m = compiled.memory_analysis()
    used = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return row | {
        "arguments": m.argument_size_in_bytes / GIB,
        "outputs": m.output_size_in_bytes / GIB,
        "aliased": m.alias_size_in_bytes / GIB,
        "temporaries": m.temp_size_in_bytes / GIB,
        "code": m.generated_code_size_in_bytes / GIB,
        "total": (used + step.resident) / GIB,
        "fits": "yes" if used + step.resident <= hbm else "no",
        "xla_tflops": cost.get("flops", 0.0) / 1e12,
        "model_tflops": step.model_flops / 1e12,
    }


COLUMNS = ["step", "arguments", "outputs", "aliased", "temporaries", "code", "resident", "total", "estimate"]


def run(config: RunConfig) -> int:
    """Compile every step for ``config.compile_only_topology``, print the report; 0 if all fit, else 1."""
    devices = topology_devices(config.compile_only_topology)
    gen, hbm = usable_hbm(devices)
    ctx = build_context(config, devices)
    steps = [s for build in STEP_BUILDERS for s in build(ctx)]
    lora = ctx.cfg.lora
    adapters = (
        f"LoRA rank {lora.rank} on {','.join(lora.targets)} ({ctx.cfg.num_lora_params / 1e6:.1f}M "
        f"{lora.dtype} adapter parameters, the base frozen); "
        if lora
        else ""
    )
    print(
        f"compile-only: {config.compile_only_topology}, {len(devices)} devices ({devices[0].device_kind}), "
        f"mesh {dict(ctx.mesh.shape)}; {ctx.cfg.model_type} of {ctx.cfg.num_params / 1e9:.2f}B parameters, "
        f"{ctx.cfg.param_dtype} params, {ctx.cfg.compute_dtype} compute, remat {ctx.cfg.remat}; {adapters}"
        f"batch {config.pipeline.batch_size} x {config.pipeline.seq_len}, "
        f"microbatches {ctx.optim.microbatches}",
        flush=True,
    )
    rows = []
    for step in steps:
        rows.append(compile_step(step, hbm))
        print(f"  {step.name}: {'compiled' if 'code' in rows[-1] else 'not compiled'}", flush=True)
    print(f"\nmemory per device, GiB (XLA may use {hbm / GIB:.2f} GiB of a {gen} device):")
    print(format_table(rows, [*COLUMNS, "fits"]))
    print("\nFLOPs per device per call, TFLOP (XLA counts each loop body once; model FLOPs count the step):")
    print(format_table(rows, ["step", "xla_tflops", "model_tflops"]))
    for step, row in zip(steps, rows, strict=True):
        print(
            f"\nestimate for {step.name} (pbbjax.config.memory):\n"
            + memory.format_estimate(step.estimate, hbm)
        )
        if "note" in row:
            print(f"  -> does not fit: {row['note']}")
    ok = all(r["fits"] == "yes" for r in rows)
    print("\nall steps fit" if ok else "\nDOES NOT FIT: see the tables above")
    return 0 if ok else 1
