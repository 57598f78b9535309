"""The paper's studies (Cook et al. 2025, arXiv 2506.18777) as data: which runs, which arms, what size.

A *study* is a set of *runs* (one ``python -m pbbjax.train`` config each: a ``configs/*.py`` file, a preset
and overrides) and *arms* (what the study compares: the final evaluation records of one run after one of its
stages; several arms can share a run, e.g. stage-1-only is the proactive run after stage 1, and zero-shot
is the proactive run before training). Every run of a study shares the seed, so arms see the same
instruction split and the same held-out inputs. ``pbbjax.study`` runs them; this module only says what
they are.

Sizes: ``tiny`` (a tiny random model, seconds per run: the tests), ``cpu`` (the embedded SmolLM2-135M on a
2-core CPU, about an hour per study with its default seeds), ``demo`` (SmolLM2 in the main job's setting,
where proactive PBB works: ``x + c`` programs) and paper scale (a model preset of
``pbbjax.config.presets``, optionally ``,<pod>``; the configs' own paper settings plus the study's ``paper``
overrides).
"""

from __future__ import annotations

import dataclasses

from pbbjax.studies.spec import Arm, Run, Study

# Data sizes shared by the arithmetic studies on CPU: one pass over short programs in small batches (more
# updates for the same tokens). Sized so that the stages study (3 seeds x 8 runs) takes about an hour on
# 2 cores; see docs/results.md for what this size can and cannot show.
_ARITH_CPU = {
    "domain_options.arithmetic.length": (1, 2),
    "domain_options.arithmetic.num_inputs": (1, 1),
    "data.num_train_instructions": 10,
    "data.num_eval_instructions": 4,
    "data.decl_repeats": 3,
    "data.exec_per_instruction": 3,
    "data.eval_inputs": 3,
    "pipeline.seq_len": 192,
    "pipeline.batch_size": 4,
    "train.learning_rate": 2e-4,
    "train.warmup_steps": 2,
    "train.epochs": 1,
    "train.checkpoint_every": 10,
    "eval.max_rows": 12,
    "eval.batch_size": 12,
    "eval.max_new_tokens": 10,
    "eval.cot_max_new_tokens": 96,  # CoT traces of these programs run to 76 tokens
}
_TINY = {
    "data.num_train_instructions": 3,
    "data.num_eval_instructions": 2,
    "data.decl_repeats": 2,
    "data.exec_per_instruction": 2,
    "data.eval_inputs": 2,
    "pipeline.seq_len": 256,
    "train.epochs": 1,
    "train.checkpoint_every": 2,
    "eval.max_rows": 4,
    "eval.max_new_tokens": 4,
    "eval.cot_max_new_tokens": 8,
    "eval.bootstrap": 100,
    "eval.sets": ("eval",),
}
_PAPER = {"train.export": False}


def _variant(mode: str) -> dict:
    """Train and evaluate with CoT, or answer directly."""
    return {"data.cot": mode == "cot", "eval.modes": (mode,)}


def _stages_study(name, finding, figure, domain_overrides, modes, sizes, include_retro=True) -> Study:
    runs, arms = [], []
    for mode in modes:
        v = _variant(mode)
        s = f"-{mode}" if len(modes) > 1 else ""
        runs += [
            Run(f"proactive{s}", "proactive", {**domain_overrides, **v}),
            Run(f"stage2-only{s}", "proactive", {**domain_overrides, **v, "data.stages": "2"}),
            Run(f"mixture{s}", "mixture", {**domain_overrides, **v}),
        ]
        arms += [
            Arm(f"zero-shot{s}", f"proactive{s}", "start"),
            Arm(f"stage1-only{s}", f"proactive{s}", "stage1"),
            Arm(f"stage2-only{s}", f"stage2-only{s}", "stage2"),
            Arm(f"mixture{s}", f"mixture{s}", "mixture"),
            Arm(f"proactive{s}", f"proactive{s}", "stage2"),
        ]
        if include_retro:
            runs.append(Run(f"retroactive{s}", "retroactive", {**domain_overrides, **v}))
            arms.append(Arm(f"retroactive{s}", f"retroactive{s}", "stage2"))
    sizes = {k: {"eval.at_start": True, **v} for k, v in sizes.items()}
    return Study(name, finding, figure, tuple(runs), tuple(arms), sizes)


def _representation() -> Study:
    runs = tuple(
        Run(f"{rep}{'' if aug else '-noaug'}", "proactive", {"data.representation": rep, "data.augment": aug})
        for rep in ("code", "nl")
        for aug in (True, False)
    )
    return Study(
        "representation",
        "Instructions as code beat natural-language descriptions; augmentation (paraphrased pointers) helps.",
        "Fig. 3 lower middle",
        runs,
        tuple(Arm(r.name, r.name, "stage2") for r in runs),
        {"tiny": _TINY, "cpu": _ARITH_CPU, "paper": _PAPER},
        seeds=1,
    )


def _exchange_rate() -> Study:
    """AD(N) against PBB from one instruction, on the same eval programs after the same stage 1. On CPU in
    the main job's setting (the ``demo`` preset: ``x + c`` programs, where PBB works), N up to 16 (a
    program has 17 inputs besides the 4 held out), without the preset's replay: PBB and AD(N) as the paper
    has them (the ``demo`` study's controls found proactive strongest without replay)."""
    ad = Run("ad", "ad")
    arms = (Arm("stage1", "ad", "stage1"), Arm("pbb", "ad", "pbb"))
    return Study(
        "exchange-rate",
        "PBB from a single instruction matches Algorithm Distillation with N execution examples; for "
        "Qwen3-14B, N* is about 100.",
        "Fig. 2",
        (ad,),
        arms,  # the AD(N) arms are added from data.ad_n (study.arms_of)
        {
            "tiny": {**_TINY, "data.ad_n": (1, 2), "eval.sets": ("eval",)},
            "demo": {"data.ad_n": (1, 2, 4, 8, 16), "data.replay_fraction": 0.0},  # the paper's, as is
            "paper": {**_PAPER, "data.ad_n": (1, 2, 5, 10, 20, 50, 100)},
        },
        plots=("arms", "exchange_rate"),
        seeds=5,
        reference="pbb",
    )


def _in_context() -> Study:
    """The instruction in the prompt, by program length: the base model, and the model after proactive
    stage 1 (which knows the answer format from the train programs' executions, as in the paper)."""
    over = {
        "domain_options.arithmetic.length": (1, 6),
        "data.stages": "1",
        "eval.sets": ("in_context",),
        "eval.modes": ("in_context",),
        "eval.at_start": True,
    }
    return Study(
        "in-context",
        "With the instruction in context, accuracy falls with program length (the in-context reference).",
        "Fig. 3 upper left",
        (Run("in-context", "proactive", over),),
        (Arm("base-model", "in-context", "start"), Arm("after-stage1", "in-context", "stage1")),
        {
            "tiny": _TINY,
            "cpu": {
                **_ARITH_CPU,
                "data.num_eval_instructions": 12,
                "data.eval_inputs": 4,
                "eval.max_rows": 48,
                "eval.batch_size": 16,
                "pipeline.seq_len": 256,
            },
            "paper": _PAPER,
        },
        plots=("arms", "by_length"),
        seeds=1,
    )


def _retroactive() -> Study:
    """Retroactive stage 2 by SFT or by GRPO. At the ``demo`` size (the main job's programs) GRPO starts from
    10 SFT steps on stage 2's rows (``rl.sft_warmup_steps``, the ``warmup`` arm), since a model that has
    only read code never writes the answer format and earns no reward; the ``cpu`` size has no warm-up (its
    GRPO run got zero reward throughout)."""
    track = {"eval.sets": ("eval",)}
    return Study(
        "retroactive",
        "Retroactive stage 2 by RL (GRPO) generalises to eval instructions better than by SFT.",
        "Fig. 3 upper right",
        (
            Run("sft", "retroactive", {**track}),
            Run("grpo", "retroactive", {**track}, rl=True),
        ),
        (
            Arm("stage1", "sft", "stage1"),
            Arm("sft", "sft", "stage2"),
            Arm("warmup", "grpo", "stage2-warmup"),  # no records without a warm-up (the cpu size)
            Arm("grpo", "grpo", "stage2"),
        ),
        {
            "tiny": {**_TINY, "train.eval_every": 2, "train.steps": 4, "rl.sft_warmup_steps": 1},
            "cpu": {**_ARITH_CPU, "train.eval_every": 10, "train.steps": 30},
            "demo": {"train.eval_every": 10},
            "paper": {**_PAPER, "train.eval_every": 20},
        },
        plots=("arms", "over_steps"),
        metrics=("accuracy", "recall"),
        seeds=1,
        reference="grpo",
    )


def _compositions() -> Study:
    over = {"eval.sets": ("eval", "compositions"), "domain_options.arithmetic.num_inputs": (1, 1)}
    return Study(
        "compositions",
        "Programs learned separately by PBB compose: f(g(x)) is computed without composition training.",
        "Fig. 3 lower right",
        (Run("proactive", "proactive", over),),
        (Arm("stage1-only", "proactive", "stage1"), Arm("proactive", "proactive", "stage2")),
        {
            "tiny": {**_TINY, "data.num_eval_instructions": 3, "data.num_compositions": 2},
            "cpu": {**_ARITH_CPU, "data.num_compositions": 6},
            "paper": {**_PAPER, "data.num_compositions": 20},
        },
        seeds=1,
    )


def _ciphers(name: str, stage1: str) -> Study:
    """PBB vs skewed demonstrations on ciphers. Stage 1 is LeetCode programs (``stage1="leetcode"``), as in
    the paper: nothing in it is a cipher or a shift; or other ciphers' code and uniform-shift executions
    (``stage1="ciphers"``, the in-domain option), which already teach shift-robust execution."""
    demos = {"data.demos": 8, "data.skewed_demos": True}
    runs = (
        Run("pbb", "proactive"),
        Run("demos", "proactive", {**demos, "data.stage2_declarative": False}),
        Run("pbb+demos", "proactive", demos),
    )
    cpu = {
        "data.num_train_instructions": 12,
        "data.num_eval_instructions": 3,
        "data.decl_repeats": 4,
        "data.exec_per_instruction": 4,
        "data.eval_inputs": 25,
        "pipeline.seq_len": 256,
        "train.learning_rate": 2e-4,
        "train.epochs": 1,
        "train.checkpoint_every": 10,
        "eval.at_start": False,  # no arm reads the untrained model
        "eval.sets": ("eval",),
        "eval.max_rows": 75,
        "eval.batch_size": 25,
        "eval.max_new_tokens": 16,
    }
    tiny = {**_TINY, "data.demos": 2, "data.eval_inputs": 4, "eval.sets": ("eval",)}
    over = {"domain": "ciphers"}
    if stage1 == "leetcode":  # leetcode rows (a program's source and docstring) run to about 700 tokens
        over["data.stage1_domain"] = "leetcode"
        cpu |= {"pipeline.seq_len": 1024, "pipeline.batch_size": 1}
        tiny |= {"pipeline.seq_len": 1024}
    where = "LeetCode programs, as in the paper" if stage1 == "leetcode" else "other ciphers, not LeetCode"
    return Study(
        name,
        "PBB is more robust across shifts than imbalanced demonstrations (which fit only the common shifts); "
        f"the two together are best. (Stage 1 here: {where}.)",
        "Fig. 5",
        tuple(dataclasses.replace(r, overrides={**over, **r.overrides}) for r in runs),
        tuple(Arm(r.name, r.name, "stage2") for r in runs),
        {"tiny": tiny, "cpu": cpu, "paper": _PAPER},
        plots=("arms", "by_shift"),
        seeds=1,
    )


def _minimal() -> Study:
    """Proactive PBB on the simplest programs (one statement, ``x + c``), with CoT traces that restate the
    statement before computing it, enough stage-2 repeats and updates to memorise every eval definition,
    stage-1 rows replayed in stage 2 (on CPU), and executions of nearly every input of every train program.
    docs/results.md gives the reasons for each setting."""
    over = {
        **_variant("cot"),
        "domain_options.arithmetic.length": (1, 1),
        "domain_options.arithmetic.num_inputs": (1, 1),
        "domain_options.arithmetic.operations": ("+",),
        "domain_options.arithmetic.constant_range": (1, 30),  # 30 distinct programs
        "domain_options.arithmetic.operand_first_prob": 0.0,
        "eval.cot_max_new_tokens": 40,  # these traces run to about 25 tokens
    }
    return Study(
        "minimal",
        "(The paper's proactive result in its simplest form.) Proactive PBB executes eval programs that "
        "stage 1 alone cannot.",
        "Fig. 3 lower left, CoT",
        (Run("proactive", "proactive", over),),
        (Arm("stage1-only", "proactive", "stage1"), Arm("proactive", "proactive", "stage2")),
        {
            "tiny": _TINY,
            "cpu": {
                **_ARITH_CPU,
                "data.num_train_instructions": 16,
                "data.num_eval_instructions": 8,
                "data.decl_repeats": 12,
                "data.exec_per_instruction": 17,  # every input: x in 0..20 less the 4 held out
                "data.eval_inputs": 4,
                "data.replay_fraction": 0.5,  # against the format collapse of a declarative-only stage 2
                "pipeline.batch_size": 2,
                "train.learning_rate": 1e-4,
                "eval.at_start": False,
                "eval.max_rows": 32,
                "eval.batch_size": 16,
            },
            "paper": _PAPER,
        },
        metrics=("accuracy", "recall"),
    )


def _demo() -> Study:
    """The main job (``configs/proactive.py``, the ``demo`` preset) over seeds, with the paper's controls in
    its setting (the settings of the ``minimal`` study with stage 2's replay doubled, ``config._demo``):
    stage 1 alone, stage 2 alone (the eval programs' code only, no replay), the homogeneous mixture of both
    stages' rows, and proactive without replay. Every difference from proactive gets a paired interval."""
    no_replay = {"data.replay_fraction": 0.0}
    return Study(
        "demo",
        "Proactive PBB executes eval programs that stage 1 alone cannot, and the two-stage curriculum beats "
        "stage 2 alone and the homogeneous mixture of the same rows.",
        "Fig. 3 lower left, CoT",
        (
            Run("proactive", "proactive", {}),
            Run("stage2-only", "proactive", {"data.stages": "2", **no_replay}),
            Run("mixture", "mixture", {}),
            Run("no-replay", "proactive", no_replay),
        ),
        (
            Arm("stage1-only", "proactive", "stage1"),
            Arm("stage2-only", "stage2-only", "stage2"),
            Arm("mixture", "mixture", "mixture"),
            Arm("proactive-no-replay", "no-replay", "stage2"),
            Arm("proactive", "proactive", "stage2"),
        ),
        {"demo": {}, "tiny": _TINY},
        metrics=("accuracy", "recall"),
        seeds=5,
        reference="proactive",
    )


def _replay() -> Study:
    """Whether the main job's stage 2 should replay stage-1 rows: the ``demo`` study's controls (seeds 0-4)
    found proactive without replay ahead of the main job's replay 1.0. Those seeds found the difference;
    this study measures both on seeds 5-9. Seeds 5-7 had chosen replay 1.0 over 0.5 (one seed per
    candidate, docs/results.md), never against no replay: any bias they carry favors the replay arm."""
    return Study(
        "replay",
        "The paper's proactive curriculum has no replay in stage 2; the main job adds one replayed "
        "stage-1 row per code row of the eval programs.",
        "Fig. 3 lower left, CoT",
        (
            Run("replay", "proactive", {"data.replay_fraction": 1.0}),
            Run("no-replay", "proactive", {"data.replay_fraction": 0.0}),
        ),
        (
            Arm("stage1-only", "replay", "stage1"),
            Arm("proactive-replay", "replay", "stage2"),
            Arm("proactive-no-replay", "no-replay", "stage2"),
        ),
        {"demo": {}, "tiny": _TINY},
        metrics=("accuracy", "recall"),
        seeds=5,
        reference="proactive-replay",
        first_seed=5,
    )


def _programs() -> Study:
    """Beyond one statement: the main job's setting without replay (the ``demo`` study's strongest
    curriculum), each run a harder program family. ``lengths``: ``+`` programs of 1-3 statements, 12 eval
    programs, scored by length (the paper's accuracy by program length), and compositions f(g(x)) of eval
    programs; ``lengths-replay``: the same with the main job's replay (added when ``lengths`` showed traces of
    longer programs stopping at the return line); ``sub``, ``mul``: one statement of ``-`` or ``*``;
    ``mixed``: two statements of ``+ - *`` (two operations). Nothing else is tuned per family. One seed: a
    search (docs/results.md), not a measurement of any one family."""
    arith = "domain_options.arithmetic."
    lengths = {
        arith + "length": (1, 3),
        "data.num_eval_instructions": 12,
        "data.num_compositions": 4,
        "eval.sets": ("eval", "compositions"),
        "eval.max_rows": 48,
    }
    families = {
        "lengths": lengths,
        # the same with the main job's replay (stage-1 rows replayed in stage 2): without it, traces of
        # longer programs stop at the return line as the code rows do (seed 0, the search)
        "lengths-replay": {**lengths, "data.replay_fraction": 1.0},
        "sub": {arith + "operations": ("-",)},
        "mul": {arith + "operations": ("*",)},
        "mixed": {arith + "length": (2, 2), arith + "operations": ("+", "-", "*")},
    }
    runs = tuple(Run(name, "proactive", over) for name, over in families.items())
    arms = tuple(
        Arm(f"{r.name}{suffix}", r.name, after)
        for r in runs
        for suffix, after in (("-stage1", "stage1"), ("", "stage2"))
    )
    return Study(
        "programs",
        "Proactive PBB goes beyond one statement: accuracy falls with program length (Qwen3-14B executes "
        "random arithmetic programs of up to 5 statements).",
        "Fig. 3 lower left (by length)",
        runs,
        arms,
        {
            # three statements' CoT traces run to about 75 tokens
            "demo": {"data.replay_fraction": 0.0, "eval.cot_max_new_tokens": 96},
            "tiny": {**_TINY, "data.num_compositions": 0, "eval.sets": ("eval",)},
        },
        plots=("arms", "by_length"),
        metrics=("accuracy", "recall"),
        seeds=1,
    )


def _grammars() -> Study:
    grammar = {"domain": "grammars", "eval.temperature": 1.0, "eval.sets": ("eval",), "eval.at_start": True}
    return Study(
        "grammars",
        "After the full proactive curriculum, generated sentences are valid far above random generation.",
        "Section 4 (grammars)",
        (Run("proactive", "proactive", grammar),),
        (
            Arm("zero-shot", "proactive", "start"),
            Arm("stage1-only", "proactive", "stage1"),
            Arm("proactive", "proactive", "stage2"),
        ),
        {  # a grammar's rules run to about 200 tokens
            "tiny": _TINY,
            "cpu": {**_ARITH_CPU, "pipeline.seq_len": 384, "eval.max_new_tokens": 24},
            "paper": _PAPER,
        },
        metrics=("accuracy", "diversity", "random_baseline"),
        seeds=1,
    )


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        _stages_study(
            "stages",
            "Only the full curriculum executes eval programs: proactive about 37% (Qwen3-14B, random "
            "arithmetic, CoT), each stage alone about 0%; CoT beats direct answers.",
            "Fig. 3 lower left",
            {},
            ("cot", "direct"),
            {"tiny": _TINY, "cpu": _ARITH_CPU, "paper": _PAPER},
        ),
        _exchange_rate(),
        _representation(),
        _in_context(),
        _retroactive(),
        _compositions(),
        _stages_study(
            "leetcode",
            "On leetcode programs the stages behave as on arithmetic: the full curriculum is needed.",
            "Fig. 4",
            {"domain": "leetcode"},
            ("auto",),
            {  # leetcode rows (the program's source and docstring) run to about 700 tokens
                "tiny": {**_TINY, "pipeline.seq_len": 1024},
                # batch 1: 4 x 1024 tokens ran out of this machine's 24 GiB (remat=full would need
                # scan_layers too on XLA:CPU: scripts/train_memory.py)
                "cpu": {
                    **_ARITH_CPU,
                    "pipeline.seq_len": 1024,
                    "pipeline.batch_size": 1,
                    "eval.max_new_tokens": 16,
                },
                "paper": _PAPER,
            },
            include_retro=False,
        ),
        _ciphers("ciphers", stage1="leetcode"),
        _ciphers("ciphers-in-domain", stage1="ciphers"),
        _grammars(),
        _minimal(),
        _demo(),
        _replay(),
        _programs(),
    )
}
