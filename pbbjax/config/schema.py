"""The experiment config shared by every ``configs/*.py`` file, and its conversion to typed configs.

A config is an ``ml_collections.ConfigDict`` with the sections:

- ``curriculum``, ``domain``, ``seed``, ``corpus`` (leetcode: the user's own JSONL or dataset id)
- ``domain_options.<domain>.<option>``: every constructor option of every registered domain, with its
  default (so ``--config.domain_options.ciphers.demonstration_shifts=...`` works and a typo is an error)
- ``data``: ``curriculum.CurriculumConfig`` fields; ``pipeline``: ``pipeline.PipelineConfig`` fields
- ``model``: ``path`` ("" = the embedded SmolLM2-135M-Instruct), ``dtype``, ``compute_dtype``;
  ``model.lora``: ``rank`` (0 = full finetuning), ``alpha``, ``targets``, ``dropout``, ``base_dtype``
- ``mesh``: ``data``, ``fsdp``, ``tensor`` sizes (-1 = the remaining devices)
- ``compile_only_topology``: a TPU topology or pod to only compile the run's steps for
  (``pbbjax.training.aot``); ``model.config_file`` then gives the model's shape (the paper presets ship
  ``pbbjax/config/paper_models/*.json``)
- ``sandbox``: how programs from data run (``pbbjax.data.tasks.sandbox``): "strict" (the default; refuses
  to run where the kernel lacks a mechanism) or "weak" (a subprocess with resource limits only)
- ``log``: experiment tracking besides ``metrics.jsonl`` and TensorBoard (``pbbjax.training.tracking``):
  ``wandb`` (a Weights & Biases project; "" = off; needs ``pip install 'pbbjax[wandb]'``), ``wandb_entity``
  ("" = wandb's default), ``wandb_mode`` ("" = ``WANDB_MODE`` or online; "online", "offline", "disabled")
- ``profile``: ``steps`` = "START,COUNT" traces COUNT training steps from global step START (as numbered in
  ``metrics.jsonl``) with ``jax.profiler`` into ``<workdir>/profile/`` ("" = off;
  ``pbbjax.training.profiling``)
"""

from __future__ import annotations

import dataclasses
import inspect

import ml_collections

from pbbjax.config.presets import LORA_PRESETS, MODELS, apply_paper
from pbbjax.config.sections import GRPOConfig, OptimConfig
from pbbjax.core.distributed import CLUSTER_DEFAULTS
from pbbjax.data.curriculum import CURRICULA, CurriculumConfig
from pbbjax.data.pipeline import PipelineConfig
from pbbjax.data.tasks.base import _REGISTRY, get_domain
from pbbjax.eval.harness import EvalConfig
from pbbjax.models.architecture import LORA_TARGETS, LoRAConfig

DEFAULT_DOMAIN = "arithmetic"


def _dataclass_dict(cls) -> dict:
    """The dataclass's defaults, without ``seed`` (one top-level seed drives everything). Sequences stay
    tuples: ml_collections overrides tuples from the command line (``--config.data.ad_n='(1, 10)'``), not
    lists."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "seed"}


def as_tuple(value) -> tuple:
    """A sequence field's value as a tuple of its items, where the command line's ``a,b`` for words (which
    ml_collections leaves one string, alone or in a tuple) becomes ``("a", "b")``."""
    items = (value,) if isinstance(value, str) else tuple(value)
    out = []
    for item in items:
        out += [p.strip() for p in item.split(",") if p.strip()] if isinstance(item, str) else [item]
    return tuple(out)


def _domain_defaults() -> dict:
    get_domain(DEFAULT_DOMAIN)  # imports and registers every domain
    out = {}
    for name, cls in sorted(_REGISTRY.items()):
        params = inspect.signature(cls).parameters.values()
        out[name] = {
            p.name: p.default
            for p in params
            if p.default is not inspect.Parameter.empty and p.default is not None
        }
    return out


def base_config(curriculum: str, **data_overrides) -> ml_collections.ConfigDict:
    """Every field with its default; curriculum files change what differs for them."""
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}; curricula: {', '.join(CURRICULA)}")
    c = ml_collections.ConfigDict()
    c.curriculum = curriculum
    c.domain = DEFAULT_DOMAIN
    c.seed = 0
    c.corpus = ""  # leetcode: a JSONL file or HF dataset id of the user's own programs ("" = kzleet)
    c.domain_options = _domain_defaults()
    c.data = {**_dataclass_dict(CurriculumConfig), **data_overrides}
    c.pipeline = _dataclass_dict(PipelineConfig)
    c.workdir = ""  # "" = runs/<curriculum>-<domain>-seed<seed>
    c.sandbox = "strict"  # "weak": run programs from data without namespaces, Landlock and seccomp
    c.distributed = "auto"  # "auto" (initialize when launched on a pod / cluster), "on", "off"
    c.cluster = dict(CLUSTER_DEFAULTS)  # coordinator, process count and id (pbbjax.core.distributed)
    # A TPU topology ("v5p:4x4x2") or pod ("v5p-64"): only compile the steps for it and report
    # (pbbjax.training.aot)
    c.compile_only_topology = ""
    # config_file: a config.json giving the model's shape without weights ("" = the one in model.path)
    c.model = dict(
        path="",
        config_file="",
        dtype="float32",
        compute_dtype="",
        scan_layers=False,
        remat="none",
        attention="auto",  # self-attention kernel: auto (by platform), xla, splash (TPU), cudnn (GPU)
        tiny={},
    )
    # LoRA (rank > 0): adapters on the `targets` projections in `dtype`, the base frozen in `base_dtype`
    # ("" = dtype); dropout: on the adapters' input in SFT steps (none in evaluation, sampling or GRPO)
    c.model.lora = dict(rank=0, alpha=16.0, targets=LORA_TARGETS, dropout=0.0, base_dtype="")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.train = {
        **_dataclass_dict(OptimConfig),
        "epochs": 1,  # passes over each stage's data (when steps is 0)
        "steps": 0,  # steps per stage; 0 = epochs over the stage's packed batches
        "checkpoint_every": 50,
        "keep_checkpoints": 3,
        "eval_every": 0,  # also evaluate every N steps within a stage (0 = at stage ends only)
        "export": True,  # export each stage's model to <workdir>/export/<stage> (models under 1B params)
        "peak_flops": 0.0,  # FLOP/s per chip for MFU; 0 = from the device kind (none on CPU)
        "stop_after": "",  # end the run after this stage, its checkpoint, evaluation and end saved ("" = no)
    }
    c.log = dict(wandb="", wandb_entity="", wandb_mode="")  # wandb: a W&B project ("" = off)
    c.profile = dict(steps="")  # "START,COUNT": a jax.profiler trace of those global steps ("" = off)
    c.eval = {**_dataclass_dict(EvalConfig), "at_start": False}
    c.rl = {**_dataclass_dict(GRPOConfig), "stages": ()}  # GRPO settings; stages trained by GRPO, not SFT
    return c


REPLAY = 1.0  # the demo's stage 2: replayed stage-1 rows per eval-program code row

# A tiny random Llama built on the spot (SmolLM2's tokenizer), for tests and smoke runs.
TINY_MODEL = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _cpu(c):
    """The CPU studies' base (``pbbjax.studies.catalog`` adds their own sizes): the embedded
    SmolLM2-135M-Instruct on short random arithmetic programs."""
    c.domain_options.arithmetic.length = (1, 2)
    c.domain_options.arithmetic.num_inputs = (1, 1)
    c.data.update(
        dict(
            num_train_instructions=16,
            num_eval_instructions=4,
            decl_repeats=4,
            exec_per_instruction=6,
            eval_inputs=5,
            ad_n=(1, 5),
        )
    )
    c.pipeline.update(dict(seq_len=256, batch_size=8))
    c.train.update(dict(learning_rate=2e-4, warmup_steps=3, epochs=3, checkpoint_every=5))
    c.eval.update(dict(sets=("eval", "train"), max_rows=20, max_new_tokens=12, batch_size=20, at_start=True))


def _demo(c):
    """The main job (the default): proactive PBB shown on the embedded SmolLM2-135M-Instruct in about 12
    minutes on a 2-core CPU. Programs are one statement, ``return x + c`` (c in 1..30, x in 0..20): addition
    is the arithmetic a 135M model has, so what is tested is executing a program it only read. Stage 1 takes
    every input of each train program but the 4 held out (17 CoT executions) and 12 paraphrased code rows;
    stage 2 has 12 code rows per eval program and as many stage-1 rows replayed, without which stage 2's
    updates wear away the adding the model does in its traces. Choices and seeds: docs/results.md."""
    c.domain_options.arithmetic.update(
        dict(
            length=(1, 1),
            num_inputs=(1, 1),
            operations=("+",),
            constant_range=(1, 30),
            operand_first_prob=0.0,
        )
    )
    c.data.update(
        dict(
            num_train_instructions=16,
            num_eval_instructions=8,
            decl_repeats=12,
            exec_per_instruction=17,  # the 21 inputs of x less the 4 held out
            eval_inputs=4,
            cot=True,
            replay_fraction=REPLAY,
            ad_n=(1, 2, 4, 8, 16),
        )
    )
    c.pipeline.update(dict(seq_len=192, batch_size=2))
    c.train.update(
        dict(learning_rate=1e-4, warmup_steps=2, epochs=1, checkpoint_every=25, keep_checkpoints=1)
    )
    c.eval.update(
        dict(
            sets=("eval",),
            modes=("cot",),
            max_rows=32,
            batch_size=16,
            max_new_tokens=10,
            cot_max_new_tokens=40,  # the traces run to about 25 tokens
            at_start=False,
        )
    )


def _tiny(c):
    """A tiny random model and tiny data: end to end in about a minute."""
    c.model.tiny = TINY_MODEL
    c.data.update(
        dict(
            num_train_instructions=4,
            num_eval_instructions=2,
            decl_repeats=3,
            exec_per_instruction=3,
            eval_inputs=2,
            ad_n=(1, 2),
        )
    )
    c.pipeline.update(dict(seq_len=128, batch_size=8, num_packing_bins=4))
    c.train.update(dict(learning_rate=1e-3, warmup_steps=2, epochs=3, checkpoint_every=3))
    c.eval.update(dict(max_rows=4, max_new_tokens=8, batch_size=8))


PRESETS = ("demo", "cpu", "tiny", *MODELS, *LORA_PRESETS)


@dataclasses.dataclass(frozen=True)
class Preset:
    """What ``configs/<curriculum>.py:<preset>`` names, parsed in this one place: ``[rl-]<name>[,<pod>]``.

    ``name`` is ``demo`` (the main job), ``cpu`` (the CPU studies' base), ``tiny`` or a paper-scale model
    preset (``qwen3-14b``, ``qwen3-4b-lora``...); ``pod`` a TPU pod for the paper-scale ones
    (``pbbjax.config.presets``); ``rl`` the retroactive config's GRPO variant (``rl`` alone is ``rl-cpu``)."""

    name: str
    pod: str | None = None
    rl: bool = False

    @classmethod
    def parse(cls, text: str | None, default: str = "demo") -> Preset:
        head, _, pod = (text or default).partition(",")
        rl = head == "rl" or head.startswith("rl-")
        name = (head.removeprefix("rl-") if head != "rl" else "cpu") if rl else head
        return cls(name, pod or None, rl)

    @property
    def size(self) -> str:
        """``tiny``, ``cpu``, ``demo``, or ``paper`` for the paper-scale presets."""
        return self.name if self.name in ("tiny", "cpu", "demo") else "paper"

    def __str__(self) -> str:
        head = ("rl" if self.name == "cpu" else f"rl-{self.name}") if self.rl else self.name
        return head + (f",{self.pod}" if self.pod else "")


def select_preset(c: ml_collections.ConfigDict, preset: str | Preset | None) -> ml_collections.ConfigDict:
    """Apply ``preset`` (a ``Preset`` or its text; default ``demo``) to the base config ``c``."""
    p = preset if isinstance(preset, Preset) else Preset.parse(preset)
    if p.rl:
        raise ValueError(f"preset {str(p)!r}: the rl presets are configs/retroactive.py's")
    if p.name not in PRESETS:
        raise ValueError(
            f"unknown preset {p.name!r} for the {c.curriculum} config; presets: {', '.join(PRESETS)}"
        )
    if p.name in MODELS or p.name in LORA_PRESETS:
        apply_paper(c, p.name, p.pod)
    elif p.pod:
        raise ValueError(
            f"the {p.name} preset takes no pod ({p.pod!r} given); pods are for paper-scale presets"
        )
    else:
        {"demo": _demo, "cpu": _cpu, "tiny": _tiny}[p.name](c)
    return c


def curriculum_config(c: ml_collections.ConfigDict) -> CurriculumConfig:
    data = c.data.to_dict()
    return CurriculumConfig(**{**data, "seed": c.seed})


def lora_config(c: ml_collections.ConfigDict) -> LoRAConfig | None:
    """``model.lora`` as the model's LoRAConfig (None at rank 0): adapters in ``model.dtype``, their initial
    A matrices drawn from ``seed``."""
    lora = c.model.lora
    if lora.rank == 0:
        return None
    fields = dict(rank=lora.rank, alpha=lora.alpha, targets=as_tuple(lora.targets), dropout=lora.dropout)
    return LoRAConfig(**fields, dtype=c.model.dtype, seed=c.seed)


def param_dtype(c: ml_collections.ConfigDict) -> str:
    """The dtype of the model's base parameters: ``model.lora.base_dtype`` for LoRA, else ``model.dtype``."""
    return (c.model.lora.base_dtype if c.model.lora.rank else "") or c.model.dtype


def pipeline_config(c: ml_collections.ConfigDict) -> PipelineConfig:
    return PipelineConfig(**{**c.pipeline.to_dict(), "seed": c.seed})


def optim_config(config) -> OptimConfig:
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    return OptimConfig(**{k: v for k, v in config.train.to_dict().items() if k in fields})


def eval_config(config) -> EvalConfig:
    d = {k: v for k, v in config.eval.to_dict().items() if k != "at_start"}
    d |= {k: as_tuple(d[k]) for k in ("sets", "modes", "breakdowns")}
    return EvalConfig(**{**d, "seed": config.seed})


def rl_config(config) -> GRPOConfig:
    return GRPOConfig(**{k: v for k, v in config.rl.to_dict().items() if k != "stages"})
