"""The experiment config shared by every ``configs/*.py`` file, and its conversion to typed configs.

A config is an ``ml_collections.ConfigDict`` with the sections:

- ``curriculum``, ``domain``, ``seed``, ``corpus`` (leetcode: the user's own JSONL or dataset id)
- ``domain_options.<domain>.<option>``: every constructor option of every registered domain, with its
  default (so ``--config.domain_options.ciphers.demonstration_shifts=...`` works and a typo is an error)
- ``data``: ``curriculum.CurriculumConfig`` fields; ``pipeline``: ``pipeline.PipelineConfig`` fields
- ``model``: ``path`` ("" = the embedded SmolLM2-135M-Instruct), ``dtype``, ``compute_dtype``
- ``mesh``: ``data``, ``fsdp``, ``tensor`` sizes (-1 = the remaining devices)
- ``demo``: the prompt the main job answers until the trainer exists
"""

from __future__ import annotations

import dataclasses
import inspect

import ml_collections

from pbbjax.curriculum import CURRICULA, CurriculumConfig
from pbbjax.pipeline import PipelineConfig
from pbbjax.tasks.base import _REGISTRY, get_domain

DEFAULT_DOMAIN = "arithmetic"


def _dataclass_dict(cls) -> dict:
    """The dataclass's defaults, without ``seed`` (one top-level seed drives everything)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "seed":
            continue
        value = f.default
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _domain_defaults() -> dict:
    get_domain(DEFAULT_DOMAIN)  # imports and registers every domain
    out = {}
    for name, cls in sorted(_REGISTRY.items()):
        params = inspect.signature(cls).parameters.values()
        out[name] = {
            p.name: (list(p.default) if isinstance(p.default, tuple) else p.default)
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
    c.model = dict(path="", dtype="float32", compute_dtype="")
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.demo = dict(
        prompt="Here is a Python function:\n\ndef blorp(x):\n    y = x * 3\n    return y - 4\n\n"
        "What does blorp(5) return? Answer with the number only.",
        max_new_tokens=32,
    )
    return c


PRESETS = ("cpu",)


def select_preset(c: ml_collections.ConfigDict, preset: str | None) -> ml_collections.ConfigDict:
    """``configs/<curriculum>.py:<preset>``. ``cpu`` (the default): the embedded SmolLM2-135M on this CPU."""
    preset = preset or "cpu"
    if preset not in PRESETS:
        known = ", ".join(PRESETS)
        raise ValueError(f"unknown preset {preset!r} for the {c.curriculum} config; presets: {known}")
    return c


def domain_of(c: ml_collections.ConfigDict):
    if c.domain not in c.domain_options:
        raise ValueError(
            f"unknown domain {c.domain!r} (config field 'domain'); domains: "
            f"{', '.join(sorted(c.domain_options))}"
        )
    options = c.domain_options[c.domain].to_dict()
    if c.corpus:
        if c.domain != "leetcode":
            raise ValueError(f"config field 'corpus' is for the leetcode domain, not {c.domain!r}")
        options["corpus"] = c.corpus
    return get_domain(c.domain, **options)


def curriculum_config(c: ml_collections.ConfigDict) -> CurriculumConfig:
    data = c.data.to_dict()
    data["ad_n"] = tuple(data["ad_n"])
    return CurriculumConfig(**{**data, "seed": c.seed})


def pipeline_config(c: ml_collections.ConfigDict) -> PipelineConfig:
    return PipelineConfig(**{**c.pipeline.to_dict(), "seed": c.seed})
