"""Proactive PBB (the README describes the method): stage 1 = declarative + execution examples of train
instructions, stage 2 = declarative examples of eval instructions; then evaluate execution of eval
instructions.

    python -m pbbjax.train --config configs/proactive.py[:preset] [--config.a.b=value ...]
    python -m pbbjax.data  --config configs/proactive.py --out DIR [--config.domain=ciphers]

Presets: ``demo`` (the default: the main job, PBB on one-statement additions with SmolLM2-135M in about
10 minutes on 2 CPU cores), ``cpu`` (the CPU studies' base), ``tiny``, and the paper-scale ones
(``pbbjax.config.presets``).

Stage-only ablations: --config.data.stages=1 or 2. Code vs natural language: --config.data.representation=nl.
Augmentation off: --config.data.augment=False. Replay against forgetting: --config.data.replay_fraction=0.1.
Ciphers, PBB + imbalanced demonstrations: --config.data.demos=20 --config.data.skewed_demos=True.
"""

from pbbjax.config.schema import base_config, select_preset


def get_config(preset: str | None = None):
    return select_preset(base_config("proactive"), preset)
