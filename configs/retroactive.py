"""Retroactive PBB: stage 1 = declarative examples of all instructions; stage 2 = execution of train
instructions by SFT (the RL variant arrives with GRPO). Eval-instruction accuracy is tracked through stage 2.

    python -m pbbjax.train --config configs/retroactive.py[:preset]
"""

from pbbjax.config import base_config, select_preset


def get_config(preset: str | None = None):
    return select_preset(base_config("retroactive"), preset)
