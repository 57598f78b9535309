"""LoRA: low-rank adapters on the attention and MLP projections, trained while the base weights stay frozen.

A targeted projection ``W`` (our layout ``[*in, *out]``, see ``layers.py``) gains two ``LoRAParam``s:
``A [*in, rank]`` and ``B [rank, *out]`` (with the leading ``layers`` axis of a stacked layer), and computes
``x W + (alpha / rank) (x A) B``. A starts uniform in +-1/sqrt(inputs) (peft's default, kaiming-uniform
with a = sqrt(5)), drawn from ``LoRAConfig.seed`` and the projection's name, whatever the mesh; B starts at
zero, so a fresh adapter changes no logit. Each adapter carries its base weight's logical axes on the
dimensions it shares with it (A its inputs, B its outputs) and ``lora_rank`` (replicated) on the other,
so ``sharding.py``'s rules lay it out like its base weight. (An adapter whose shared side is heads or MLP,
B of q/k/v/gate/up and A of o/down, is thus replicated over ``fsdp``; adapters are small.)

``trainable_split`` is what the train steps differentiate and update: the adapters when the model has any
(the base gets no gradient and no optimizer state), every parameter otherwise.

Export: ``hf_delta`` is one layer's ``(alpha / rank) B A`` in the Hugging Face layout ``[out, in]``, added to
the base tensor for a merged model (``hf_weights.iter_hf_tensors``, ``pbbjax.export``); ``lora_io.py``
writes the adapters in peft's format instead.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbbjax.models.architecture import ModelConfig, resolve_dtype
from pbbjax.models.linear import project

# How many leading (non-layer) axes of each projection's kernel are its inputs (layers.py's layouts).
INPUT_AXES = {
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,
    "o_proj": 2,
    "gate_proj": 1,
    "up_proj": 1,
    "down_proj": 1,
}


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: trained, while the plain ``nnx.Param``s beside it stay frozen."""


def adapter_names(path: str) -> tuple[str, str]:
    """A base parameter's path (``layers.attn.q_proj``) -> the paths of its A and B adapters."""
    return f"{path}_lora_a", f"{path}_lora_b"


def initial_value(cfg: ModelConfig, name: str, which: str, shape, dtype) -> jax.Array:
    """The initial A (``which="a"``) or B of projection ``name``: a function of the seed, name and shape
    only (threefry draws the same numbers whatever the output sharding)."""
    if which == "b":
        return jnp.zeros(shape, dtype)
    inputs = cfg.projection_dims(name)[0]
    key = jax.random.fold_in(jax.random.key(cfg.lora.seed), zlib.crc32(name.encode()))
    bound = 1.0 / np.sqrt(inputs)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def add_adapters(module: nnx.Module, cfg: ModelConfig, names: tuple[str, ...]) -> None:
    """Give ``module`` (an Attention or MLP, its kernels built) the adapters of the targeted ``names``."""
    if cfg.lora is None:
        return
    dtype = resolve_dtype(cfg.lora.dtype)
    for name in names:
        if name not in cfg.lora.targets:
            continue
        base = getattr(module, name)
        axes, shape = base.get_metadata()["axes"], base.shape
        lead = 1 if axes[0] == "layers" else 0
        split = lead + INPUT_AXES[name]
        specs = {
            "a": ((*shape[:split], cfg.lora.rank), (*axes[:split], "lora_rank")),
            "b": ((*shape[:lead], cfg.lora.rank, *shape[split:]), (*axes[:lead], "lora_rank", *axes[split:])),
        }
        for which, (s, a) in specs.items():
            value = initial_value(cfg, name, which, s, dtype)
            setattr(module, f"{name}_lora_{which}", LoRAParam(value, axes=a))


def apply(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, key=None) -> jax.Array:
    """``y`` (= ``x`` through projection ``name``) plus the adapter's ``scale (x A) B``, if it has one. With a
    ``key`` (training) and ``lora.dropout`` p > 0, the adapter sees ``x`` with each element zeroed with
    probability p and the rest scaled by 1 / (1 - p), as peft's ``lora_dropout``; the base path never."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return y
    b = getattr(module, f"{name}_lora_b")
    dt = x.dtype
    p = module.cfg.lora.dropout
    if key is not None and p > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(key, zlib.crc32(name.encode())), 1.0 - p, x.shape)
        x = jnp.where(keep, x / (1.0 - p), 0).astype(dt)
    h = project(x, a[...].astype(dt), inputs=INPUT_AXES[name])
    delta = project(h, b[...].astype(dt))
    return y + (delta * module.cfg.lora.scale).astype(y.dtype)


def dropout_key(cfg: ModelConfig, step: jax.Array) -> jax.Array | None:
    """The adapters' dropout key of train step ``step``: a function of the seed and the step, so a resumed
    run drops what the uninterrupted one did; None without adapter dropout."""
    if cfg.lora is None or cfg.lora.dropout == 0:
        return None
    root = jax.random.fold_in(jax.random.key(cfg.lora.seed), zlib.crc32(b"dropout"))
    return jax.random.fold_in(root, step)


def trainable_split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parameters: (the adapters, the rest) when there are adapters, else (all, none).
    ``nnx.merge_state(trainable, frozen)`` puts them back together."""
    adapters, rest = nnx.split_state(params, LoRAParam, ...)
    if not jax.tree.leaves(adapters):
        return rest, adapters
    return adapters, rest


def initial_adapters(cfg: ModelConfig, shardings: dict[str, jax.sharding.Sharding], shapes: dict) -> dict:
    """{path: the initial adapter array on its sharding} for every adapter path among ``shapes``
    ({path: ShapeDtypeStruct}): what ``load_model`` gives the parameters a checkpoint does not hold."""
    out = {}
    for path, var in shapes.items():
        stem, _, which = path.rpartition("_lora_")
        if which in ("a", "b"):
            name = stem.rsplit(".", 1)[-1]
            init = lambda n=name, w=which, v=var: initial_value(cfg, n, w, v.shape, v.dtype)
            out[path] = jax.jit(init, out_shardings=shardings[path])()
    return out


# -- export -------------------------------------------------------------------------------------------
def hf_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """One layer's adapter ``a [*in, r]``, ``b [r, *out]`` -> ``scale * B A`` as HF ``[out, in]``, fp32."""
    a_hf, b_hf = peft_layout(a, b)
    return scale * (b_hf.astype(np.float32) @ a_hf.astype(np.float32))


def peft_layout(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer's ``a [*in, r]``, ``b [r, *out]`` -> peft's ``lora_A [r, in]``, ``lora_B [out, r]`` (the
    flattened in/out axes in the order of the HF kernel's, as ``hf_weights.to_hf`` flattens them)."""
    r = a.shape[-1]
    return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)
