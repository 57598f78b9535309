"""The run config as one typed tree: built once from the ``ml_collections`` config (a ``configs/*.py`` file,
its preset and the command line's overrides), every section checked while it is built, so that a bad value
fails before any work with the name of its field. It is what the trainer, compile-only mode, evaluation and
the studies take; the ``ConfigDict`` it came from stays in ``source`` (the run's record of itself:
``config.json`` of a study run, its digest, the wandb run config).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from pbbjax.config.schema import (
    as_tuple,
    curriculum_config,
    eval_config,
    lora_config,
    optim_config,
    param_dtype,
    pipeline_config,
    rl_config,
)
from pbbjax.config.sections import GRPOConfig, OptimConfig, WandbConfig, profile_window, wandb_config
from pbbjax.data.curriculum import CurriculumConfig, build_curriculum, with_warmups
from pbbjax.data.pipeline import PipelineConfig
from pbbjax.data.tasks.base import get_domain
from pbbjax.data.tasks.sandbox import MODES as SANDBOX_MODES
from pbbjax.data.tasks.sandbox import set_mode as set_sandbox_mode
from pbbjax.eval.harness import EvalConfig
from pbbjax.models.architecture import ATTENTION_KERNELS, LoRAConfig
from pbbjax.models.decoder import REMAT_POLICIES

REMAT = tuple(REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    path: str  # an HF directory or hub id; "" = the embedded SmolLM2-135M-Instruct
    config_file: str  # a config.json giving the shape without weights (compile-only mode)
    dtype: str
    compute_dtype: str  # "" = dtype
    param_dtype: str  # the base parameters' dtype (LoRA: model.lora.base_dtype, else dtype)
    scan_layers: bool
    remat: str
    attention: str  # "auto", "xla", "splash" (TPU) or "cudnn" (GPU): the self-attention kernel
    tiny: dict  # HF config.json fields of a tiny random model ({} = none)
    lora: LoRAConfig | None

    def options(self, **overrides) -> dict:
        """The keyword options every site that builds a model passes on (``ModelConfig``'s, which are also
        ``load_model``'s, less the parameter dtype), so that a new model setting reaches all of them."""
        options = dict(
            compute_dtype=self.compute_dtype or self.dtype,
            scan_layers=self.scan_layers,
            remat=self.remat,
            attention=self.attention,
            lora=self.lora,
        )
        return options | overrides


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    optim: OptimConfig
    epochs: int  # passes over each stage's data (when steps is 0)
    steps: int  # steps per stage; 0 = epochs over the stage's packed batches
    checkpoint_every: int
    keep_checkpoints: int
    eval_every: int  # also evaluate every N steps within a stage (0 = at stage ends only)
    export: bool  # each stage's model to <workdir>/export/<stage> (models under 1B parameters)
    peak_flops: float  # FLOP/s per chip for MFU; 0 = from the device kind
    stop_after: str  # end the run after this stage, its end saved for a run that goes on from it ("" = none)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    curriculum: str
    domain: str
    seed: int
    workdir: str  # "" = runs/<curriculum>-<domain>-seed<seed>
    sandbox: str
    corpus: str
    domain_options: dict  # domain name -> its constructor options
    model: ModelSettings
    data: CurriculumConfig
    pipeline: PipelineConfig
    train: TrainSettings
    eval: EvalConfig
    eval_at_start: bool
    rl: GRPOConfig
    rl_stages: tuple[str, ...]  # the stages GRPO trains instead of SFT
    mesh: dict  # data, fsdp, tensor sizes (-1 = the remaining devices)
    distributed: str
    cluster: dict
    compile_only_topology: str
    wandb: WandbConfig | None
    profile: tuple[int, int] | None  # (first global step, count) to trace
    source: ml_collections.ConfigDict = dataclasses.field(repr=False, compare=False)

    @property
    def compute_dtype(self) -> str:
        return self.model.options()["compute_dtype"]


def _check(condition: bool, field: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"config field '{field}' is {value!r}; expected {expected}")


def build_run_config(c: ml_collections.ConfigDict) -> RunConfig:
    """``c`` checked and typed, section by section; a ``ValueError`` names the first bad field."""
    _check(c.sandbox in SANDBOX_MODES, "sandbox", c.sandbox, " or ".join(map(repr, SANDBOX_MODES)))
    _check(c.model.remat in REMAT, "model.remat", c.model.remat, " or ".join(map(repr, REMAT)))
    kernels = " or ".join(map(repr, ATTENTION_KERNELS))
    _check(c.model.attention in ATTENTION_KERNELS, "model.attention", c.model.attention, kernels)
    _check(c.distributed in ("auto", "on", "off"), "distributed", c.distributed, "'auto', 'on' or 'off'")
    for field in ("epochs", "checkpoint_every", "keep_checkpoints"):
        _check(c.train[field] >= 1, f"train.{field}", c.train[field], "at least 1")
    for field in ("steps", "eval_every"):
        _check(c.train[field] >= 0, f"train.{field}", c.train[field], "0 or more")
    m = c.model
    model = ModelSettings(
        path=m.path,
        config_file=m.config_file,
        dtype=m.dtype,
        compute_dtype=m.compute_dtype,
        param_dtype=param_dtype(c),
        scan_layers=m.scan_layers,
        remat=m.remat,
        attention=m.attention,
        tiny=m.tiny.to_dict() if m.tiny else {},
        lora=lora_config(c),
    )
    t = c.train
    train = TrainSettings(
        optim=optim_config(c),
        epochs=t.epochs,
        steps=t.steps,
        checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints,
        eval_every=t.eval_every,
        export=t.export,
        peak_flops=t.peak_flops,
        stop_after=t.stop_after,
    )
    return RunConfig(
        curriculum=c.curriculum,
        domain=c.domain,
        seed=c.seed,
        workdir=c.workdir,
        sandbox=c.sandbox,
        corpus=c.corpus,
        domain_options=c.domain_options.to_dict(),
        model=model,
        data=curriculum_config(c),
        pipeline=pipeline_config(c),
        train=train,
        eval=eval_config(c),
        eval_at_start=c.eval.at_start,
        rl=rl_config(c),
        rl_stages=as_tuple(c.rl.stages),
        mesh=c.mesh.to_dict(),
        distributed=c.distributed,
        cluster=c.cluster.to_dict(),
        compile_only_topology=c.compile_only_topology,
        wandb=wandb_config(c),
        profile=profile_window(c),
        source=c,
    )


def domain_of(c: RunConfig, field: str = "domain"):
    """The domain that config field ``field`` names (``domain``, or ``data.stage1_domain``), built with its
    ``domain_options``."""
    set_sandbox_mode(c.sandbox)
    name = c.domain if field == "domain" else c.data.stage1_domain
    if name not in c.domain_options:
        raise ValueError(
            f"unknown domain {name!r} (config field {field!r}); domains: "
            f"{', '.join(sorted(c.domain_options))}"
        )
    options = dict(c.domain_options[name])
    if c.corpus:
        if "leetcode" not in (c.domain, c.data.stage1_domain):
            raise ValueError(f"config field 'corpus' is for the leetcode domain, not {c.domain!r}")
        if name == "leetcode":
            options["corpus"] = c.corpus
    return get_domain(name, **options)


def build_config_curriculum(c: RunConfig):
    """(the domain, the curriculum) that the config describes: every caller builds it this way."""
    domain = domain_of(c)
    stage1 = domain_of(c, "data.stage1_domain") if c.data.stage1_domain else None
    curriculum = build_curriculum(domain, c.curriculum, c.data, stage1)
    if c.rl.sft_warmup_steps:
        curriculum = with_warmups(curriculum, c.rl_stages)
    return domain, curriculum
