"""The decoder's configuration, built from a Hugging Face ``config.json`` (never from size tables).

One frozen dataclass covers Llama 3.x (incl. ``llama3`` rope scaling), SmolLM2 (Llama, tied embeddings),
Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm, explicit ``head_dim``). The source dict is kept so that
export writes back every field it came with. ``LoRAConfig`` (optional, ``ModelConfig.lora``) adds low-rank
adapters to the projections (``lora.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
ATTENTION_KERNELS = ("auto", "xla", "splash", "cudnn")  # model.attention; see attention.py
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """'float32' / 'bfloat16' / a jnp dtype -> jnp dtype, with a clear error otherwise."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# LoRA targets, in Hugging Face naming (``self_attn.q_proj`` ... ``mlp.down_proj``).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the ``targets`` projections: ``W x + (alpha / rank) B A x``. Errors name the
    run config's fields (``model.lora.*``)."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0  # on the adapters' input in SFT steps (peft's lora_dropout); none in evaluation
    dtype: str = "float32"  # the adapters' dtype (their master weights); the base's is param_dtype
    seed: int = 0  # draws the initial A matrices

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1 for adapters (0 turns LoRA off), got {self.rank}")
        if not self.alpha >= 0:
            raise ValueError(f"model.lora.alpha must be >= 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"model.lora.targets {list(self.targets)}: {unknown or 'none given'} match no weight; "
                f"the projections are {', '.join(LORA_TARGETS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        resolve_dtype(self.dtype)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias only)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    # Numerics and memory; not from config.json.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"  # see decoder.REMAT_POLICIES
    attention: str = "auto"  # the self-attention kernel, one of ATTENTION_KERNELS (attention.py)
    lora: LoRAConfig | None = None  # adapters on the projections; the base weights are then frozen
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    # generation_config.json of the source directory (eos ids etc.), written back on export.
    generation_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        resolve_dtype(self.param_dtype)
        resolve_dtype(self.compute_dtype)
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"model.attention is {self.attention!r}; expected one of {ATTENTION_KERNELS}")
        for name in self.lora.targets if self.lora else ():
            fan_in, fan_out = self.projection_dims(name)
            if self.lora.rank > min(fan_in, fan_out):
                raise ValueError(
                    f"model.lora.rank={self.lora.rank} exceeds the smaller dimension of {name} "
                    f"({fan_in} in, {fan_out} out): a rank-{self.lora.rank} update of it is not low-rank"
                )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d + (2 * h if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def projection_dims(self, name: str) -> tuple[int, int]:
        """(inputs, outputs) of a projection (a ``LORA_TARGETS`` name)."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
        return {**dims, "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[name]

    @property
    def num_lora_params(self) -> int:
        """Parameters of the LoRA adapters (0 without): rank x (inputs + outputs) per target and layer."""
        if self.lora is None:
            return 0
        per_layer = sum(sum(self.projection_dims(t)) for t in self.lora.targets)
        return self.num_layers * self.lora.rank * per_layer

    @classmethod
    def from_hf(cls, hf: dict, **options) -> ModelConfig:
        """Build from a ``config.json`` dict; ``options`` set the non-HF fields (dtypes, scan, remat)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{model_type}: use_sliding_window=True is not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{model_type}: hidden_act {act!r} is not supported (only 'silu')")
        try:
            heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            attention_bias = bool(hf.get("attention_bias", False))
            return cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hidden // heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope=_rope_from_hf(hf),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=model_type != "qwen2" and attention_bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                hf_config=dict(hf),
                **options,
            )
        except KeyError as e:
            raise ValueError(f"config.json of a {model_type} model lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_dir(cls, path: str | Path, **options) -> ModelConfig:
        path = Path(path) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a Hugging Face model directory needs config.json")
        return cls.from_hf(json.loads(path.read_text()), **options)


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta included); older ones `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type != "llama3":
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
    try:
        return RopeConfig(
            theta=float(theta),
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling lacks the field {e.args[0]!r}") from None
