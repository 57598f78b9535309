"""PBB curricula: from a domain and a train/eval split of its instructions, the named stage datasets and
the evaluation sets (the README describes the method).

Curricula (``CURRICULA``):

- ``proactive``: stage1 = declarative(train) + execution(train), interleaved; stage2 = declarative(eval)
  [+ ``demos`` execution demonstrations per eval instruction] [+ a ``replay_fraction`` of stage-1 rows].
- ``retroactive``: stage1 = declarative(train + eval); stage2 = execution(train) (SFT data, or RL prompts).
- ``mixture``: the homogeneous baseline: every row of proactive's two stages in one shuffled stage.
- ``ad``: Algorithm Distillation: proactive's stage1, then a stage ``pbb`` (proactive's stage 2: the eval
  instructions as text only) and for each N in ``ad_n`` a stage ``adN`` of N execution examples per eval
  instruction, each branching from the end of stage1 (``start_from``); one run gives the exchange rate.
  With ``replay_fraction``, ``pbb`` and every ``adN`` add that fraction of stage-1 rows alike.
- ``in_context``: no training; the evaluation sets alone (the instruction is put in the prompt there).

``stages`` = "1" or "2" keeps one stage (the stage-only ablations); ``representation`` = "nl" uses the
natural-language form of instructions; ``demos`` with ``skewed_demos`` gives the ciphers' imbalanced
demonstrations (with ``demos`` and no declarative stage-2 rows when ``stage2_declarative`` is off).

Invariant (tested): held-out inputs never appear in training, and executions of eval instructions appear in
training only where that is the arm's definition (``demos`` > 0, ``ad``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random

from pbbjax.core.seeds import derive_seed
from pbbjax.data.formatting import Row, declarative_row, execution_row
from pbbjax.data.tasks.base import BatchExecution, Compositions, Domain, Example, FiniteInputs, Instruction

CURRICULA = ("proactive", "retroactive", "mixture", "ad", "in_context")


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    num_train_instructions: int = 20
    num_eval_instructions: int = 10
    decl_repeats: int = 10  # declarative rows per instruction (each with its own paraphrase if augment)
    exec_per_instruction: int = 10  # execution rows per train instruction
    eval_inputs: int = 10  # held-out inputs per instruction in the evaluation sets
    demos: int = 0  # proactive stage 2: execution demonstrations per eval instruction (0 = pure PBB)
    skewed_demos: bool = False  # draw those demonstrations from the domain's skewed input distribution
    stage2_declarative: bool = True  # proactive stage 2 includes declarative rows of eval instructions
    ad_n: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    replay_fraction: float = 0.0  # proactive stage 2: stage-1 rows mixed in, as a fraction of stage 2
    augment: bool = True  # paraphrased pointer templates (else always the canonical one)
    cot: bool = False  # execution completions step through the instruction before the answer
    representation: str = "code"  # "code" | "nl"
    stages: str = "all"  # "all" | "1" | "2"
    num_compositions: int = 0  # evaluation pairs f(g(x)) of eval instructions, where the domain composes
    stage1_domain: str = ""  # the train instructions' domain, when not the eval ones' (the paper's ciphers)
    seed: int = 0

    def __post_init__(self):
        if self.representation not in ("code", "nl"):
            raise ValueError(f"representation {self.representation!r} is not 'code' or 'nl'")
        if self.stages not in ("all", "1", "2"):
            raise ValueError(f"stages {self.stages!r} is not 'all', '1' or '2'")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction {self.replay_fraction} is not in [0, 1]")


@dataclasses.dataclass
class Stage:
    name: str
    rows: list[Row]
    start_from: str | None = None  # the stage whose end this one starts from (None: the previous stage)
    warmup_for: str | None = None  # the GRPO stage this SFT stage warms up (``with_warmups``), if any

    def eval_executions(self) -> float | None:
        """Distinct execution examples per eval instruction in this stage, averaged over eval instructions:
        the real N of an AD(N) stage (None when the stage executes no eval instruction)."""
        seen = {(r.instruction_id, r.input) for r in self.rows if r.kind == "execution" and r.split == "eval"}
        if not seen:
            return None
        return len(seen) / len({i for i, _ in seen})


@dataclasses.dataclass
class Curriculum:
    name: str
    domain: str
    instructions: dict[str, Instruction]
    train_ids: list[str]
    eval_ids: list[str]
    stages: list[Stage]
    eval_sets: dict[str, list[Row]]  # "eval", "train", "in_context", "compositions"
    representation: str = "code"  # how the instructions' text reads in training and in context: code | nl
    stage1_domain: str = ""  # the train instructions' domain where it is not ``domain``


def _key(x) -> str | None:
    return None if x is None else json.dumps(x, sort_keys=True)


class _Builder:
    def __init__(self, domain: Domain, cfg: CurriculumConfig, n_train: int, n_eval: int):
        self.domain, self.cfg = domain, cfg
        found = domain.instructions(n_train + n_eval, cfg.seed)
        if len(found) < n_train + n_eval:
            raise ValueError(
                f"domain {domain.name!r} has {len(found)} instructions; the config asks for "
                f"num_train_instructions={n_train} + num_eval_instructions={n_eval}"
            )
        random.Random(derive_seed(cfg.seed, "split")).shuffle(found)
        self.train, self.eval = found[:n_train], found[n_train : n_train + n_eval]
        self.held_out: dict[str, list[Example]] = {}  # instruction id -> evaluation examples
        self.pool: dict[str, list[Example]] = {}  # instruction id -> examples training may use

    def plan(self, ins: Instruction, n_train: int, field: str, skewed: bool = False) -> tuple[list, list]:
        """``eval_inputs`` held-out inputs, and ``n_train`` training inputs disjoint from them (the config
        field ``field`` asked for them). Where the domain knows how many distinct inputs an instruction has
        (``input_space``), asking for more than that is an error: fewer examples than the config says would
        quietly change what an arm measures (an AD(N) arm with fewer than N)."""
        d, cfg = self.domain, self.cfg
        size = d.input_space(ins) if isinstance(d, FiniteInputs) else None
        if size is not None and cfg.eval_inputs + n_train > size:
            raise ValueError(
                f"instruction {ins.id} of domain {d.name!r} has {size} distinct inputs, fewer than "
                f"data.eval_inputs={cfg.eval_inputs} held out + {field}={n_train} for training: lower them, "
                f"or widen the domain's input range (domain_options.{d.name}.input_range)"
            )
        held = d.sample_inputs(ins, cfg.eval_inputs, derive_seed(cfg.seed, "eval", ins.id), split="eval")
        extra = {"skewed": True} if skewed else {}
        want, train = n_train, []
        for attempt in range(4):  # oversample until enough inputs survive the held-out filter
            seed = derive_seed(cfg.seed, "train", ins.id, attempt)
            drawn = d.sample_inputs(ins, want + len(held), seed, split="train", **extra)
            banned = {_key(x) for x in held + train if x is not None}
            train += [x for x in drawn if x is None or _key(x) not in banned][: n_train - len(train)]
            if len(train) >= n_train:
                break
            want *= 2
        return held, train

    def execute(self, plans: dict[str, tuple[Instruction, list, list]]) -> None:
        """Run every planned input, in one sandbox batch where the domain offers ``execute_many``."""
        items = list(plans.values())
        inputs = [held + train for _, held, train in items]
        if isinstance(self.domain, BatchExecution):
            done = self.domain.execute_many([ins for ins, _, _ in items], inputs)
        else:
            done = [self.domain.execute(ins, x) for (ins, _, _), x in zip(items, inputs, strict=True)]
        for (ins, held, _), examples in zip(items, done, strict=True):
            self.held_out[ins.id], self.pool[ins.id] = examples[: len(held)], examples[len(held) :]

    def rng(self, *parts) -> random.Random:
        return random.Random(derive_seed(self.cfg.seed, *parts))

    def declarative(self, instructions, split: str, stage: str) -> list[Row]:
        cfg, rng = self.cfg, self.rng("declarative", stage, split)
        nl = cfg.representation == "nl"
        return [
            declarative_row(self.domain, ins, split, stage, rng, augment=cfg.augment, nl=nl)
            for ins in instructions
            for _ in range(cfg.decl_repeats)
        ]

    def execution(self, instructions, split: str, stage: str, n: int) -> list[Row]:
        cfg, rng = self.cfg, self.rng("execution", stage, split, n)
        nl = cfg.representation == "nl"
        return [
            execution_row(self.domain, ins, ex, split, stage, rng, augment=cfg.augment, cot=cfg.cot, nl=nl)
            for ins in instructions
            for ex in self.pool[ins.id][:n]
        ]

    def shuffled(self, rows: list[Row], stage: str) -> list[Row]:
        rows = [dataclasses.replace(r, stage=stage) for r in rows]
        self.rng("shuffle", stage).shuffle(rows)
        return rows


def build_curriculum(
    domain: Domain, name: str, cfg: CurriculumConfig, stage1_domain: Domain | None = None
) -> Curriculum:
    """The curriculum ``name`` over ``domain``'s instructions; with ``stage1_domain`` (the domain that
    ``cfg.stage1_domain`` names) the train instructions, which stage 1 executes, come from it instead (the
    paper's ciphers: LeetCode programs in stage 1, ciphers in stage 2), and there is no ``train`` evaluation
    set (evaluation scores with ``domain``)."""
    if name not in CURRICULA:
        raise ValueError(f"unknown curriculum {name!r}; curricula: {', '.join(CURRICULA)}")
    n_train, n_eval = cfg.num_train_instructions, cfg.num_eval_instructions
    if (stage1_domain is None) != (not cfg.stage1_domain):
        raise ValueError(f"data.stage1_domain={cfg.stage1_domain!r} needs its domain, and only then one")
    if stage1_domain is None:
        tb = b = _Builder(domain, cfg, n_train, n_eval)  # one domain: its instructions split in two
    elif name not in ("proactive", "mixture", "ad"):
        raise ValueError(
            f"data.stage1_domain={cfg.stage1_domain!r} is for curricula whose stage 1 is the train "
            f"instructions' code and executions (proactive, mixture, ad), not {name!r}"
        )
    else:
        # nothing held out of the train instructions: without a train evaluation set, all go to stage 1
        tb = _Builder(stage1_domain, dataclasses.replace(cfg, eval_inputs=0), n_train, 0)
        b = _Builder(domain, cfg, 0, n_eval)
        _check_pointers(tb.train + b.eval)
    n_demo, demo_field = (max(cfg.ad_n), "max(data.ad_n)") if name == "ad" else (cfg.demos, "data.demos")
    field = "data.exec_per_instruction"
    plans = {ins.id: (ins, *tb.plan(ins, cfg.exec_per_instruction, field)) for ins in tb.train}
    eval_plans = {ins.id: (ins, *b.plan(ins, n_demo, demo_field, skewed=cfg.skewed_demos)) for ins in b.eval}
    if tb is b:
        b.execute(plans | eval_plans)  # one sandbox batch
    else:
        tb.execute(plans)
        b.execute(eval_plans)

    @functools.cache
    def stage1_rows() -> tuple[Row, ...]:  # built once: stage 1, and what replay draws from
        rows = tb.declarative(tb.train, "train", "stage1")
        rows += tb.execution(tb.train, "train", "stage1", cfg.exec_per_instruction)
        return tuple(b.shuffled(rows, "stage1"))

    def proactive_stage1() -> list[Row]:
        return list(stage1_rows())

    def proactive_stage2_rows():
        rows = b.declarative(b.eval, "eval", "stage2") if cfg.stage2_declarative else []
        return rows + b.execution(b.eval, "eval", "stage2", cfg.demos)

    def with_replay(rows: list[Row], *rng_parts) -> list[Row]:
        """``rows`` and a ``replay_fraction`` of them again in stage-1 rows (drawn without repeats)."""
        if not cfg.replay_fraction:
            return rows
        replay = proactive_stage1()
        k = min(len(replay), round(cfg.replay_fraction * len(rows)))
        return rows + b.rng("replay", *rng_parts).sample(replay, k)

    if name == "proactive":
        stage2 = with_replay(proactive_stage2_rows())
        stages = [Stage("stage1", proactive_stage1()), Stage("stage2", b.shuffled(stage2, "stage2"))]
    elif name == "retroactive":
        decl = b.declarative(b.train, "train", "stage1") + b.declarative(b.eval, "eval", "stage1")
        stages = [
            Stage("stage1", b.shuffled(decl, "stage1")),
            Stage(
                "stage2",
                b.shuffled(b.execution(b.train, "train", "stage2", cfg.exec_per_instruction), "stage2"),
            ),
        ]
    elif name == "mixture":
        stages = [Stage("mixture", b.shuffled(proactive_stage1() + proactive_stage2_rows(), "mixture"))]
    elif name == "ad":  # PBB and each AD(N) replay stage-1 rows alike (proactive's replay_fraction)
        pbb = with_replay(proactive_stage2_rows())
        pbb = [dataclasses.replace(r, stage="pbb") for r in b.shuffled(pbb, "stage2")]
        stages = [Stage("stage1", proactive_stage1()), Stage("pbb", pbb, start_from="stage1")] + [
            Stage(
                f"ad{n}",
                b.shuffled(with_replay(b.execution(b.eval, "eval", f"ad{n}", n), f"ad{n}"), f"ad{n}"),
                start_from="stage1",
            )
            for n in cfg.ad_n
        ]
    else:  # in_context: evaluation only
        stages = []
    if cfg.stages != "all" and name in ("proactive", "retroactive"):
        stages = [s for s in stages if s.name == f"stage{cfg.stages}"]
    instructions = {ins.id: ins for ins in tb.train + b.eval}
    return Curriculum(
        name=name,
        domain=domain.name,
        instructions=instructions,
        train_ids=[i.id for i in tb.train],
        eval_ids=[i.id for i in b.eval],
        stages=stages,
        eval_sets=_eval_sets(b, instructions, train=tb is b),
        representation=cfg.representation,
        stage1_domain=cfg.stage1_domain,
    )


def _check_pointers(instructions: list[Instruction]) -> None:
    """Two domains' instructions in one curriculum must not share a pointer name."""
    seen: dict[str, str] = {}
    for ins in instructions:
        if ins.name in seen:
            raise ValueError(f"instructions {seen[ins.name]} and {ins.id} share the pointer {ins.name!r}")
        seen[ins.name] = ins.id


def _eval_sets(b: _Builder, instructions: dict[str, Instruction], train: bool) -> dict[str, list[Row]]:
    """The evaluation sets of ``b``'s instructions (``train``: also of its train instructions)."""
    cfg, d = b.cfg, b.domain

    def rows(group, split, name, in_context=False):
        nl = cfg.representation == "nl"
        return [
            execution_row(
                d, ins, ex, split, name, b.rng(), augment=False, cot=cfg.cot, in_context=in_context, nl=nl
            )
            for ins in group
            for ex in b.held_out[ins.id]
        ]

    sets = {
        "eval": rows(b.eval, "eval", "eval"),
        **({"train": rows(b.train, "train", "train")} if train else {}),
        "in_context": rows(b.eval, "eval", "in_context", in_context=True),
    }
    if cfg.num_compositions and isinstance(d, Compositions):
        pairs = d.compositions(b.eval, cfg.num_compositions, derive_seed(cfg.seed, "compositions"))
        b.execute({ins.id: (ins, *b.plan(ins, 0, "data.num_compositions")) for ins in pairs})
        instructions.update({ins.id: ins for ins in pairs})
        sets["compositions"] = rows(pairs, "eval", "compositions")
    return sets


WARMUP = "-warmup"  # the suffix of a stage's SFT warm-up (``with_warmups``)


def with_warmups(curriculum: Curriculum, names) -> Curriculum:
    """Each stage in ``names`` preceded by a stage ``<name>-warmup`` of the same rows, which starts where the
    stage started; the stage then starts from the warm-up's end. A GRPO stage whose rollouts never earn a
    reward (a model that has not seen the answer format) learns nothing; a few SFT steps on its own rows
    first teach the format (``rl.sft_warmup_steps``). Names that are not stages are left to the caller."""
    stages = []
    for stage in curriculum.stages:
        if stage.name in names:
            rows = [dataclasses.replace(r, stage=stage.name + WARMUP) for r in stage.rows]
            warmup = Stage(stage.name + WARMUP, rows, start_from=stage.start_from, warmup_for=stage.name)
            stages.append(warmup)
            stage = dataclasses.replace(stage, start_from=None)
        stages.append(stage)
    return dataclasses.replace(curriculum, stages=stages)
