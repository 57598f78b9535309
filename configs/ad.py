"""Algorithm Distillation AD(N): proactive stage 1, then for each N in data.ad_n a stage of N execution
examples per eval instruction, each branching from the end of stage 1. Compared with proactive PBB, it
gives the "exchange rate": the N at which AD(N) matches PBB from a single instruction.

    python -m pbbjax.train --config configs/ad.py[:preset] [--config.data.ad_n=1,10,100]
"""

from pbbjax.config.schema import base_config, select_preset


def get_config(preset: str | None = None):
    return select_preset(base_config("ad"), preset)
