"""The homogeneous-mixture baseline: every row of proactive PBB's two stages, shuffled into one stage.

python -m pbbjax.train --config configs/mixture.py[:preset]
"""

from pbbjax.config.schema import base_config, select_preset


def get_config(preset: str | None = None):
    return select_preset(base_config("mixture"), preset)
