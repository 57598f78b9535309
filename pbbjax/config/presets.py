"""Paper-scale presets: the paper's models, the TPU slices they run on, and their batch and sequence settings.

``configs/<curriculum>.py:<model>[,<pod>]`` selects one (``config.schema.select_preset``), e.g.
``configs/proactive.py:qwen3-14b,v5p-64``. The model's shape comes from
``pbbjax/config/paper_models/<model>.json``, a copy of the published Hugging Face ``config.json`` (no
weights), so compile-only mode (``pbbjax.training.aot``) needs no network; training loads the weights from
the hub id (or a local copy given as ``model.path``).

Layout: FSDP over every chip (``data=1, fsdp=-1, tensor=1``). Parameters, gradients and AdamW moments
are sharded over all chips; for models up to 14B on these slices that leaves room for activations
without tensor parallelism. The gradient-accumulation depth (``train.microbatches``) is the smallest
that the memory estimate (``pbbjax.config.memory``) fits into ``FIT`` of the chip's HBM; a pod that no depth
fits is refused with the pods that do.

Training settings where the paper is silent (research/paper.md section 6): rows packed into sequences
of 1024 tokens (a program's text, a CoT execution trace or a LeetCode solution fits), 64 sequences per
step (~65k tokens), full finetuning in fp32 master weights with bf16 compute, AdamW at 1e-5 with 50
warmup steps and cosine decay, 3 epochs per stage, full remat with scanned layers. Evaluation generates
for up to 64 prompts at a time (fewer where the sampler's estimate does not fit) with up to 256 new tokens.

LoRA presets ``<model>-lora`` (e.g. ``qwen3-4b-lora,v5e-1``) train rank-16 adapters (alpha 32, fp32) on
every projection over a frozen bf16 base, at learning rate 1e-4; their default pod is the smallest one
they fit by the estimate. That is one v5e chip (``v5e-1``) for Qwen3-1.7B/4B and Llama-3.2-1B/3B, which
full finetuning fits on 4-8 chips only, and 4 chips for the 8B and 14B models, which full finetuning
needs 16 v5e or 4-8 v5p chips for.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pbbjax.config.memory import GIB, Layout, sample_estimate, total, train_estimate
from pbbjax.models.architecture import LoRAConfig, ModelConfig

MODEL_DIR = Path(__file__).resolve().parent / "paper_models"  # package data: in every install


# HBM per chip: Google Cloud's TPU documentation, and what XLA's TPU compiler lets a program use (the
# "exceeds available HBM" figure of its out-of-memory error, libtpu 0.0.42; a v4 chip's two TensorCores
# show as two devices of half of it in compile-only mode).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
USABLE_HBM_GIB = {"v4": 30.5, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}


@dataclasses.dataclass(frozen=True)
class Pod:
    """A single-slice TPU pod: its topology name for compile-only mode, and its chips."""

    topology: str
    chips: int

    @property
    def generation(self) -> str:
        return self.topology.split(":")[0]

    @property
    def usable_hbm(self) -> float:
        """Bytes per chip."""
        return USABLE_HBM_GIB[self.generation] * GIB


# The names count TensorCores on v4 and v5p (2 per chip), chips on v5e and v6e.
PODS = {
    "v5e-1": Pod("v5e:1x1", 1),
    "v4-8": Pod("v4:2x2x1", 4),
    "v5e-4": Pod("v5e:2x2", 4),
    "v5e-8": Pod("v5e:2x4", 8),
    "v5e-16": Pod("v5e:4x4", 16),
    "v5p-8": Pod("v5p:2x2x1", 4),
    "v5p-16": Pod("v5p:2x2x2", 8),
    "v5p-32": Pod("v5p:2x2x4", 16),
    "v5p-64": Pod("v5p:4x4x2", 32),
    "v6e-8": Pod("v6e:2x4", 8),
}

# model preset -> (Hugging Face hub id, default pod); the shape file: pbbjax/config/paper_models/<preset>.json
MODELS = {
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", "v5e-8"),
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B", "v5e-8"),
    "qwen3-4b": ("Qwen/Qwen3-4B", "v5p-8"),
    "qwen3-8b": ("Qwen/Qwen3-8B", "v5p-16"),
    "qwen3-14b": ("Qwen/Qwen3-14B", "v5p-32"),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "v5e-8"),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", "v5p-8"),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "v5p-16"),
}

MESH = dict(data=1, fsdp=-1, tensor=1)
FIT = 0.85  # the share of HBM the estimate may fill: the compiler needs some slack
SEQ_LEN, BATCH_SIZE = 1024, 64
NUMERICS = dict(dtype="float32", compute_dtype="bfloat16", scan_layers=True, remat="full")
EVAL_BATCH, EVAL_NEW_TOKENS = 64, 256
LORA_SUFFIX = "-lora"
LORA = dict(rank=16, alpha=32.0, base_dtype="bfloat16")  # every projection; adapters in NUMERICS' dtype
LORA_PRESETS = tuple(f"{m}{LORA_SUFFIX}" for m in MODELS)


def model_file(name: str) -> Path:
    return MODEL_DIR / f"{name}.json"


def load_model_config(path: str | Path, **options) -> ModelConfig:
    """A ``config.json`` file (no weights beside it needed) -> ModelConfig; ``options`` as ``from_hf``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config file {path} does not exist (config field model.config_file)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config file {path} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(hf, **options)


def paper_model_config(name: str) -> ModelConfig:
    """The preset's model with the presets' numerics (fp32 masters, bf16 compute, scan, full remat); a
    LoRA preset's with its adapters over the bf16 base."""
    n, model = NUMERICS, name.removesuffix(LORA_SUFFIX)
    lora = LoRAConfig(LORA["rank"], LORA["alpha"], dtype=n["dtype"]) if model != name else None
    return load_model_config(
        model_file(model),
        param_dtype=LORA["base_dtype"] if lora else n["dtype"],
        compute_dtype=n["compute_dtype"],
        scan_layers=n["scan_layers"],
        remat=n["remat"],
        lora=lora,
    )


def pick_microbatches(cfg: ModelConfig, layout: Layout, hbm_bytes: float, batch: int, seq_len: int):
    """The fewest microbatches whose train-step estimate fits ``FIT`` of HBM; None if none does."""
    for k in range(1, batch + 1):
        if batch % k or (batch // k) % layout.batch_shards:
            continue
        estimate = train_estimate(cfg, layout, batch=batch, seq_len=seq_len, microbatches=k)
        if total(estimate) <= FIT * hbm_bytes:
            return k
    return None


def pod_microbatches(name: str, pod: str, cfg: ModelConfig | None = None) -> int | None:
    p = PODS[pod]
    cfg = cfg or paper_model_config(name)
    return pick_microbatches(cfg, Layout(fsdp=p.chips), p.usable_hbm, BATCH_SIZE, SEQ_LEN)


def pick_eval_batch(cfg: ModelConfig, layout: Layout, hbm_bytes: float) -> int:
    """The largest power of two up to ``EVAL_BATCH`` whose sampler estimate (prompts of ``SEQ_LEN``, the
    worst case) fits ``FIT`` of HBM; 1 if none does."""
    batch = EVAL_BATCH
    while batch > 1:
        est = sample_estimate(cfg, layout, batch=batch, prompt_len=SEQ_LEN, max_new_tokens=EVAL_NEW_TOKENS)
        if total(est) <= FIT * hbm_bytes:
            break
        batch //= 2
    return batch


def fitting_pods(name: str) -> list[str]:
    cfg = paper_model_config(name)
    return [pod for pod in PODS if pod_microbatches(name, pod, cfg) is not None]


def apply_paper(c, name: str, pod: str | None = None) -> None:
    """Set ``c`` (a base config) to the paper-scale preset ``name`` on ``pod`` (default: the model's, or
    for a LoRA preset the smallest pod it fits)."""
    model = name.removesuffix(LORA_SUFFIX)
    path, default_pod = MODELS[model]
    if model != name:
        default_pod = min(fitting_pods(name), key=lambda p: PODS[p].chips, default=default_pod)
    pod = pod or default_pod
    if pod not in PODS:
        raise ValueError(f"unknown pod {pod!r} for the {name} preset; pods: {', '.join(PODS)}")
    microbatches = pod_microbatches(name, pod)
    if microbatches is None:
        p = PODS[pod]
        raise ValueError(
            f"{name} does not fit a {pod} ({p.chips} chips of {HBM_GIB[p.generation]} GiB) by the memory "
            f"estimate; pods it fits: {', '.join(fitting_pods(name))}"
        )
    c.model.path, c.model.config_file = path, str(model_file(model))
    c.model.dtype, c.model.compute_dtype = NUMERICS["dtype"], NUMERICS["compute_dtype"]
    c.model.scan_layers, c.model.remat = NUMERICS["scan_layers"], NUMERICS["remat"]
    c.mesh.update(MESH)
    c.data.update(
        dict(
            num_train_instructions=200,
            num_eval_instructions=100,
            decl_repeats=20,
            exec_per_instruction=20,
            eval_inputs=20,
        )
    )
    # The paper says only "small integers" for the programs' inputs. 0..127 gives a one-input program its
    # 20 held-out inputs and the 100 examples of AD(100), disjoint; values may then reach 10^4.
    c.domain_options.arithmetic.update(dict(input_range=(0, 127), max_abs_value=10_000))
    c.pipeline.update(dict(seq_len=SEQ_LEN, batch_size=BATCH_SIZE))
    c.train.update(
        dict(
            learning_rate=1e-5,
            warmup_steps=50,
            epochs=3,
            checkpoint_every=200,
            peak_flops=0.0,
            microbatches=microbatches,
        )
    )
    if model != name:
        c.model.lora.update(LORA)
        c.train.learning_rate = 1e-4
    p = PODS[pod]
    eval_batch = pick_eval_batch(paper_model_config(name), Layout(fsdp=p.chips), p.usable_hbm)
    c.eval.update(dict(batch_size=eval_batch, max_new_tokens=EVAL_NEW_TOKENS))
