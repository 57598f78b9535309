"""Evaluation of a model on a curriculum's evaluation sets: held-out loss and execution accuracy.

- Held-out loss: the completion-only cross-entropy of the expected completions (``Answer: <output>``, after
  the CoT when the curriculum uses CoT) given the execution prompts, per set.
- Accuracy: greedy generation from each prompt, the text after the last ``Answer:`` scored by the domain
  (exact match of the value for programs and ciphers; acceptance by the grammar's parser for grammars).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from pbbjax.formatting import Row, chat_prompt
from pbbjax.pipeline import PipelineConfig, make_dataset, tokenize_rows
from pbbjax.sampling import generate
from pbbjax.tasks.base import Domain, Example, Instruction, extract_answer


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    sets: tuple[str, ...] = ("eval", "train")  # which evaluation sets of the curriculum
    max_rows: int = 0  # rows per set (0 = all), taken evenly over instructions
    generate: bool = True  # accuracy by greedy generation (else held-out loss only)
    max_new_tokens: int = 48
    batch_size: int = 16


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


def heldout_loss(eval_step, params, rows: list[Row], tokenizer, seq_len: int, batch_size: int, put) -> float:
    """Mean completion-token loss of ``rows`` (one padded example per row)."""
    examples = tokenize_rows(rows, tokenizer, seq_len)
    cfg = PipelineConfig(seq_len=seq_len, batch_size=batch_size, pack=False)
    num = den = 0.0
    for batch in make_dataset(examples, cfg, jax.process_index(), jax.process_count()):
        n, d = eval_step(params, put(batch))
        num, den = num + float(n), den + float(d)
    return num / max(den, 1e-9)


def accuracy(
    model, tokenizer, domain: Domain, instructions: dict[str, Instruction], rows: list[Row], cfg: EvalConfig
):
    """(mean score, per-row scores, generations) of greedy generations from the rows' prompts."""
    prompts = [chat_prompt(tokenizer, r.prompt) for r in rows]
    texts: list[str] = []
    for i in range(0, len(prompts), cfg.batch_size):
        texts += generate(
            model, tokenizer, prompts[i : i + cfg.batch_size], max_new_tokens=cfg.max_new_tokens
        )
    scores = []
    for r, text in zip(rows, texts, strict=True):
        ex = Example(r.instruction_id, json.loads(r.input), r.output, meta=json.loads(r.meta or "{}"))
        scores.append(float(domain.score(instructions[r.instruction_id], ex, extract_answer(text))))
    return float(np.mean(scores)) if scores else float("nan"), scores, texts


def evaluate(
    model, params, tokenizer, domain, curriculum, cfg: EvalConfig, *, eval_step, seq_len, put
) -> dict:
    """{set: {"loss", "accuracy", "n"}} for each configured evaluation set of the curriculum."""
    results = {}
    for name in cfg.sets:
        if name not in curriculum.eval_sets:
            raise ValueError(f"eval.sets names {name!r}; this curriculum has {sorted(curriculum.eval_sets)}")
        rows = subsample(curriculum.eval_sets[name], cfg.max_rows)
        entry = {
            "n": len(rows),
            "loss": heldout_loss(eval_step, params, rows, tokenizer, seq_len, cfg.batch_size, put),
        }
        if cfg.generate:
            entry["accuracy"] = accuracy(model, tokenizer, domain, curriculum.instructions, rows, cfg)[0]
        results[name] = entry
    return results
