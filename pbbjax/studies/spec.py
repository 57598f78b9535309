"""What a study is: its runs (one ``python -m pbbjax.train`` config each), its arms (the records of one run
after one stage) and its sizes; ``pbbjax.studies.catalog`` lists the paper's studies in these terms."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    config: str  # configs/<config>.py
    overrides: dict = dataclasses.field(default_factory=dict)  # dotted config keys -> values
    rl: bool = False  # the config's GRPO variant of the preset (retroactive: rl, rl-tiny, rl-<model>)


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    run: str
    after: str  # the stage whose final records are this arm's ("start": the model before training)


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    finding: str  # the paper's result this study reproduces
    figure: str
    runs: tuple[Run, ...]
    arms: tuple[Arm, ...]
    sizes: dict  # "tiny" / "cpu" / "paper" -> overrides for every run
    plots: tuple[str, ...] = ("arms",)  # arms | by_length | by_shift | over_steps | exchange_rate
    metrics: tuple[str, ...] = ("accuracy",)  # what the table and the arms plot show
    seeds: int = 3  # the default number of seeds
    reference: str = ""  # an arm whose difference from every other arm is reported (paired bootstrap)
    first_seed: int = 0  # seeds first_seed.. (seeds below it chose the settings, so are not reported here)


# Every study: no per-stage HF exports (the runs' checkpoints suffice and are removed when a run ends).
COMMON = {"train.export": False, "train.keep_checkpoints": 1}
