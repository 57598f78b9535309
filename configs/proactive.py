"""Proactive PBB (DESIGN.md section 1): stage 1 = declarative + execution examples of train instructions,
stage 2 = declarative examples of eval instructions; then evaluate execution of eval instructions.

Usage: python -m pbbjax.train --config configs/proactive.py[:preset] [--config.a.b=value ...]

The curriculum fields arrive with the trainer; today the job loads the model and answers ``demo.prompt``.
"""

import ml_collections

PRESETS = ("cpu",)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for configs/proactive.py; presets: {', '.join(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.curriculum = "proactive"
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF directory or hub id; "" = the embedded SmolLM2-135M-Instruct
    c.model.dtype = "float32"
    c.model.compute_dtype = ""  # "" = same as dtype
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.demo = ml_collections.ConfigDict()
    c.demo.prompt = (
        "Here is a Python function:\n\ndef blorp(x):\n    y = x * 3\n    return y - 4\n\n"
        "What does blorp(5) return? Answer with the number only."
    )
    c.demo.max_new_tokens = 32
    return c
