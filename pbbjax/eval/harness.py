"""Evaluation of a model on a curriculum's evaluation sets, in every PBB measure.

For each evaluation set (``eval``: held-out inputs of eval instructions; ``train``: of train instructions;
``in_context``; ``compositions``) and each mode, ``evaluate`` returns one *record*: the set, its instruction
group (train/eval), the mode, the number of rows, the accuracy with a bootstrap confidence interval, the
held-out answer loss, and breakdowns (accuracy per program length, per cipher shift, ...). Records are flat
dicts, so a run's ``results.json`` is a list of them and tables and plots are filters over that list.

Modes (how the model is asked; ``EvalConfig.modes``):

- ``direct``: pointer + input; the assistant turn is prefilled with ``Answer:``, so the model must answer
  at once (``max_new_tokens``).
- ``cot``: pointer + input; free generation (``cot_max_new_tokens``); the answer is the text after the last
  ``Answer:``.
- ``in_context``: the instruction's text (its natural-language form under ``representation=nl``) is put
  before the prompt (the paper's upper reference), and a sentence after it asks for a final ``Answer:``
  line; free generation.
- ``zero_shot``: pointer + input + that sentence, for models never trained on the answer format; free
  generation.
- ``auto``: ``cot`` when the curriculum trains with CoT, else ``direct``.

Scores come from the domain (exact match of the extracted, normalised answer; grammars: acceptance by the
parser). Grammar-like domains (with ``diversity`` and ``random_baseline``) also get the diversity of the
generations and the parser's acceptance rate of random word strings of the same lengths (chance level).
Domains with a ``recall`` (arithmetic) also get, in ``cot`` mode, the fraction of generated traces that
state every statement of the program, whatever values they compute: retrieval of the program apart from
arithmetic.

Guessing floor (``floor``): the accuracy of always answering each program's most frequent output on its
rows of the set, i.e. the share of rows whose expected output is their program's most frequent one. An
accuracy near it shows guessing, not execution (programs whose outputs are mostly 0 give a high floor).
Computed from the expected outputs, for every domain scored by exact match (grammars have
``random_baseline`` instead); records written before it existed have none.

Confidence intervals: a percentile bootstrap over *instructions* (rows of one instruction are correlated, so
instructions are resampled with all their rows); with a single instruction, over rows. Seeded.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from pbbjax.core.tables import format_table
from pbbjax.data.curriculum import Curriculum
from pbbjax.data.formatting import IN_CONTEXT_PREFIX, Row, chat_prompt
from pbbjax.data.pipeline import PipelineConfig, make_dataset, tokenize_rows
from pbbjax.data.tasks.base import (
    ANSWER_MARKER,
    Domain,
    Example,
    Generative,
    Instruction,
    Recall,
    extract_answer,
)
from pbbjax.inference.sampler import generate, prompt_bucket
from pbbjax.models.sharding import batch_shards

MODES = ("direct", "cot", "in_context", "zero_shot")
SAMPLES = 8  # sample generations kept per record: the first row of each of the first SAMPLES programs
# What the free-generation modes for a model maybe never trained on the answer format (zero-shot, in-context)
# add to the prompt, so that they measure execution, not whether the model guesses the format.
ANSWER_HINT = f'\n\nWork it out, then end your reply with a line of the form "{ANSWER_MARKER} <result>".'


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sets: tuple[str, ...] = ("eval", "train")  # which evaluation sets of the curriculum
    modes: tuple[str, ...] = ("auto",)  # see the module docstring
    max_rows: int = 0  # rows per set (0 = all), taken evenly over instructions
    generate: bool = True  # accuracy by generation (else held-out loss only)
    max_new_tokens: int = 48  # the direct mode's budget
    cot_max_new_tokens: int = 256  # the budget of the free-generation modes
    temperature: float = 0.0  # 0 = greedy; grammars want sampling (> 0) for diversity
    batch_size: int = 16
    breakdowns: tuple[str, ...] = ("length", "shift")  # meta keys (example's, else instruction's)
    bootstrap: int = 1000  # bootstrap resamples for the confidence intervals
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        for mode in self.modes:
            if mode not in (*MODES, "auto"):
                raise ValueError(f"eval.modes has {mode!r}; modes: auto, {', '.join(MODES)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"eval.confidence {self.confidence} is not in (0, 1)")


def subsample(rows: list[Row], max_rows: int) -> list[Row]:
    """Up to ``max_rows`` rows, round-robin over instructions so every instruction is represented."""
    if not max_rows or len(rows) <= max_rows:
        return rows
    by_instruction: dict[str, list[Row]] = {}
    for r in rows:
        by_instruction.setdefault(r.instruction_id, []).append(r)
    out, i = [], 0
    while len(out) < max_rows:
        for group in by_instruction.values():
            if i < len(group) and len(out) < max_rows:
                out.append(group[i])
        i += 1
    return out


def bootstrap_ci(
    scores, clusters, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean score, resampling whole clusters (instructions) with
    replacement; with a single cluster, resampling the scores themselves. (nan, nan) for no scores."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        return float("nan"), float("nan")
    _, idx = np.unique(np.asarray(clusters), return_inverse=True)
    if idx.max() == 0:
        idx = np.arange(scores.size)
    sums, counts = np.bincount(idx, weights=scores), np.bincount(idx)
    draw = np.random.default_rng(seed).integers(0, sums.size, size=(n_boot, sums.size))
    means = sums[draw].sum(1) / counts[draw].sum(1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def resolve_mode(mode: str, cot: bool) -> str:
    return ("cot" if cot else "direct") if mode == "auto" else mode


def render_prompt(tokenizer, row: Row, instruction: Instruction, mode: str, nl=False) -> tuple[str, str]:
    """(the text the model continues, the prefill it continues from) for one row in one mode; ``nl``: the
    instruction as the in-context modes show it is its natural-language form (``representation=nl``)."""
    prompt = row.prompt
    if mode == "in_context":
        text = instruction.text_nl if nl else instruction.text
        prefix = IN_CONTEXT_PREFIX.format(name=instruction.name, text=text)
        prompt = prompt if prompt.startswith(prefix) else prefix + prompt
    if mode in ("in_context", "zero_shot"):  # free generation by a model that may not know the format
        prompt += ANSWER_HINT
    prefill = ANSWER_MARKER if mode == "direct" else ""
    return chat_prompt(tokenizer, prompt) + prefill, prefill


def row_example(row: Row) -> Example:
    return Example(row.instruction_id, json.loads(row.input), row.output, meta=json.loads(row.meta or "{}"))


def score_texts(domain: Domain, instructions: dict[str, Instruction], rows: list[Row], texts: list[str]):
    """Per-row scores of completions (each including its prefill) by the domain's scorer."""
    return [
        float(domain.score(instructions[r.instruction_id], row_example(r), extract_answer(t)))
        for r, t in zip(rows, texts, strict=True)
    ]


def generate_answers(
    model, tokenizer, instructions, rows: list[Row], mode: str, cfg: EvalConfig, nl: bool = False
) -> list[str]:
    """The model's completion of every row in ``mode`` (prefill included), in batches of ``batch_size``."""
    rendered = [render_prompt(tokenizer, r, instructions[r.instruction_id], mode, nl) for r in rows]
    budget = cfg.max_new_tokens if mode == "direct" else cfg.cot_max_new_tokens
    texts: list[str] = []
    for i in range(0, len(rendered), cfg.batch_size):
        chunk = rendered[i : i + cfg.batch_size]
        out = generate(
            model,
            tokenizer,
            [text for text, _ in chunk],
            max_new_tokens=budget,
            temperature=cfg.temperature,
            seed=cfg.seed + i,
        )
        texts += [prefill + t for (_, prefill), t in zip(chunk, out, strict=True)]
    return texts


def heldout_loss(eval_step, params, rows: list[Row], tokenizer, seq_len: int, batch_size: int, put) -> float:
    """Mean completion-token loss of ``rows`` (one padded example per row). ``batch_size`` must split over
    the mesh's batch shards and the hosts (``loss_batch_size``); the last batch is filled with empty rows.
    Rows are padded on the right to the longest row, rounded up to one of a few lengths (64, 96, 128, 192,
    ...; ``prompt_bucket``) so that a run compiles few shapes, and to at most ``seq_len`` where they fit
    it: not to ``seq_len`` itself (40-token cipher rows padded to 1024 made each evaluation spend minutes
    on padding). Evaluation rows are not packed, so the training length does not bound them (a
    composition's two programs may exceed it)."""
    examples = tokenize_rows(rows, tokenizer)
    longest = max((len(e["tokens"]) for e in examples), default=1)
    length = prompt_bucket(longest, minimum=64)
    if longest <= seq_len:
        length = min(length, seq_len)
    cfg = PipelineConfig(seq_len=length, batch_size=batch_size, pack=False)
    num = den = 0.0
    for batch in make_dataset(examples, cfg, jax.process_index(), jax.process_count()):
        n, d = eval_step(params, put(batch))
        num, den = num + float(n), den + float(d)
    return num / max(den, 1e-9)


def loss_batch_size(batch_size: int, mesh) -> int:
    """``eval.batch_size`` rounded up to a multiple of the mesh's batch shards and of the hosts, so that
    held-out loss batches split evenly over both (the sampler pads its rows the same way)."""
    multiple = math.lcm(batch_shards(mesh), jax.process_count())
    return -(-batch_size // multiple) * multiple


def guessing_floor(rows: list[Row]) -> float | None:
    """The share of ``rows`` whose expected output is the most frequent one of their instruction's rows:
    the accuracy of a guesser that knows each program's most common answer, but not how to run it."""
    if not rows:
        return None
    outputs = defaultdict(Counter)
    for r in rows:
        outputs[r.instruction_id][r.output] += 1
    return sum(max(c.values()) for c in outputs.values()) / len(rows)


def _meta_value(row: Row, instruction: Instruction, key: str):
    example_meta = json.loads(row.meta or "{}")
    return example_meta.get(key, instruction.meta.get(key))


def summarize(scores, rows: list[Row], instructions, cfg: EvalConfig) -> dict:
    """n, accuracy and its confidence interval, and the breakdowns, of per-row scores."""
    clusters = [r.instruction_id for r in rows]
    ci = dict(n_boot=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    lo, hi = bootstrap_ci(scores, clusters, **ci)
    out = {
        "n": len(scores),
        "accuracy": float(np.mean(scores)) if scores else None,
        "ci_low": lo,
        "ci_high": hi,
    }
    per_instruction = defaultdict(list)
    for r, s in zip(rows, scores, strict=True):
        per_instruction[r.instruction_id].append(s)
    # per instruction: (n, accuracy), for confidence intervals over seeds and instructions (pbbjax.study)
    out["by_instruction"] = {i: [len(s), float(np.mean(s))] for i, s in per_instruction.items()}
    for key in cfg.breakdowns:
        groups = defaultdict(list)
        for r, s in zip(rows, scores, strict=True):
            value = _meta_value(r, instructions[r.instruction_id], key)
            if value is not None:
                groups[value].append((s, r.instruction_id))
        if groups:
            out[f"by_{key}"] = {
                str(v): {
                    "n": len(g),
                    "accuracy": float(np.mean([s for s, _ in g])),
                    **dict(
                        zip(("ci_low", "ci_high"), bootstrap_ci(*zip(*g, strict=True), **ci), strict=True)
                    ),
                }
                for v, g in sorted(groups.items())
            }
    return out


def grammar_measures(domain, instructions, rows: list[Row], texts: list[str], seed: int) -> dict:
    """Diversity of the generated sentences per instruction (mean), and the random baseline's acceptance."""
    by_ins = defaultdict(list)
    for r, t in zip(rows, texts, strict=True):
        by_ins[r.instruction_id].append(extract_answer(t) or "")
    baseline = [
        float(domain.score(instructions[i], Example(i, None, ""), s))
        for i, answers in by_ins.items()
        for s in domain.random_baseline(instructions[i], len(answers), seed)
    ]
    return {
        "diversity": float(np.mean([domain.diversity(a) for a in by_ins.values()])),
        "random_baseline": float(np.mean(baseline)),
    }


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """What an evaluation needs besides the model: the curriculum's sets, how to score and how to ask.

    ``eval_step`` is the jitted held-out loss step (``training.sft.make_eval_step``), ``put`` turns this
    host's slice of a batch into the global array, ``cot`` resolves mode ``auto``."""

    tokenizer: Any
    domain: Domain
    curriculum: Curriculum
    cfg: EvalConfig
    eval_step: Callable
    seq_len: int
    put: Callable
    cot: bool = False


def evaluate(model, params, job: EvalJob) -> list[dict]:
    """One record per (configured set, mode) of ``job``: see the module docstring."""
    tokenizer, domain, curriculum, cfg = job.tokenizer, job.domain, job.curriculum, job.cfg
    eval_step, seq_len, put, cot = job.eval_step, job.seq_len, job.put, job.cot
    records = []
    for name in cfg.sets:
        if name not in curriculum.eval_sets:
            raise ValueError(f"eval.sets names {name!r}; this curriculum has {sorted(curriculum.eval_sets)}")
        rows = subsample(curriculum.eval_sets[name], cfg.max_rows)
        batch = loss_batch_size(cfg.batch_size, model.mesh)
        loss = heldout_loss(eval_step, params, rows, tokenizer, seq_len, batch, put) if rows else None
        group = "/".join(sorted({r.split for r in rows}))
        for mode in dict.fromkeys(resolve_mode(m, cot) for m in cfg.modes):
            record = {"set": name, "group": group, "mode": mode, "n": len(rows), "loss": loss}
            if not isinstance(domain, Generative):
                record["floor"] = guessing_floor(rows)
            if cfg.generate and rows:
                nl = curriculum.representation == "nl"
                texts = generate_answers(model, tokenizer, curriculum.instructions, rows, mode, cfg, nl)
                scores = score_texts(domain, curriculum.instructions, rows, texts)
                record |= summarize(scores, rows, curriculum.instructions, cfg)
                if mode == "cot" and isinstance(domain, Recall):  # the trace states the program's statements
                    recalled = [
                        domain.recall(curriculum.instructions[r.instruction_id], t, nl)
                        for r, t in zip(rows, texts, strict=True)
                    ]
                    record["recall"] = float(np.mean(recalled))
                if isinstance(domain, Generative):
                    record |= grammar_measures(domain, curriculum.instructions, rows, texts, cfg.seed)
                record["samples"] = [
                    {
                        "instruction": r.instruction_id,
                        "prompt": r.prompt,
                        "expected": r.output,
                        "generated": t,
                        "score": s,
                    }
                    for r, t, s in _first_of_each(rows, texts, scores, SAMPLES)
                ]
            records.append(record)
    return records


def _first_of_each(rows: list[Row], texts, scores, n: int) -> list[tuple]:
    """(row, text, score) of the first row of each of the first ``n`` instructions."""
    firsts: dict[str, tuple] = {}
    for item in zip(rows, texts, scores, strict=True):
        if len(firsts) < n:
            firsts.setdefault(item[0].instruction_id, item)
    return list(firsts.values())


TABLE_COLUMNS = ["after", "step", "set", "group", "mode", "n", "loss", "accuracy", "ci95", "floor"]


def results_table(records: list[dict], columns=TABLE_COLUMNS) -> str:
    """The readable table of evaluation records (one line each; the interval as ``[lo, hi]``)."""
    rows = []
    for r in records:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else "-"
        rows.append({**r, "ci95": ci})
    return format_table(rows, columns)
