"""What a run's evaluation records say, in words a newcomer reads: what the stages trained on, how the eval
set's accuracy changed over the last stage, a verdict, and sample eval programs answered before and after.

``explain(records, curriculum)`` returns the text the trainer prints after its results table. It compares the
eval set's final record of the last stage with that of the stage it started from (or ``start``), in the
first evaluated mode, using each record's bootstrap interval and guessing floor (``pbbjax.eval.harness``), and
where the domain measures it, the share of traces that state the right program (``recall``).
"""

from __future__ import annotations

from collections import Counter

from pbbjax.data.curriculum import Curriculum, Stage

SAMPLES = 2  # sample eval programs shown


def describe_stage(stage: Stage) -> str:
    """ "code of 8 eval programs (96 rows), executions of 16 train programs (272 rows)" from its rows."""
    counts = Counter((r.kind, r.split) for r in stage.rows)
    programs = {
        key: len({r.instruction_id for r in stage.rows if (r.kind, r.split) == key}) for key in counts
    }
    parts = []
    for kind, split in sorted(counts, key=lambda k: (k[1] != "eval", k[0] != "declarative")):
        what = "code" if kind == "declarative" else "executions"
        n = programs[(kind, split)]
        parts.append(f"{what} of {n} {split} program{'s' * (n != 1)} ({counts[(kind, split)]} rows)")
    return ", ".join(parts) or "no rows"


def never_executed(curriculum: Curriculum) -> bool:
    """No training row executes an eval program: what the eval set then measures is PBB."""
    return not any(r.kind == "execution" and r.split == "eval" for s in curriculum.stages for r in s.rows)


def _ci(r: dict) -> str:
    return f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r.get("ci_low") is not None else ""


def _one_line(text: str, width: int = 110) -> str:
    line = " | ".join(s.strip() for s in text.strip().splitlines() if s.strip())
    return line if len(line) <= width else line[: width - 3] + "..."


def _pair(records: list[dict], curriculum: Curriculum) -> tuple[dict, dict] | None:
    """(before, after): the eval set's final records of the last stage and of the point it started from."""
    finals = {(r["after"], r["mode"]): r for r in records if r.get("final", True) and r["set"] == "eval"}
    if not curriculum.stages or not finals:
        return None
    last = curriculum.stages[-1]
    names = [s.name for s in curriculum.stages]
    start = last.start_from or (names[-2] if len(names) > 1 else "start")
    for after, mode in finals:
        if (
            after == last.name
            and (start, mode) in finals
            and finals[(after, mode)].get("accuracy") is not None
        ):
            return finals[(start, mode)], finals[(after, mode)]
    return None


def _judgement(before: dict, after: dict, never_executed: bool) -> str:
    a0, a1, floor = before["accuracy"], after["accuracy"], after.get("floor")
    change = f"{a0:.2f} -> {a1:.2f}{_ci(after)}"
    apart = after.get("ci_low") is not None and before.get("ci_high") is not None
    apart = apart and after["ci_low"] > before["ci_high"]
    if not apart:
        return f"No clear change ({change}): the two intervals overlap."
    if floor is not None and after["ci_low"] <= floor:
        return (
            f"Accuracy rose ({change}), but not clearly above the guessing floor ({floor:.2f}): "
            "this could still be guessing each program's most frequent answer."
        )
    if never_executed:
        return (
            f"Programming by Backprop worked: the model executes programs it has only read ({change}), "
            "above the guessing floor" + (f" ({floor:.2f})." if floor is not None else ".")
        )
    return f"Accuracy rose clearly ({change})."


def explain(records: list[dict], curriculum: Curriculum) -> str:
    """The verdict and samples (empty where the run has no two eval-set evaluations to compare)."""
    pair = _pair(records, curriculum)
    if pair is None:
        return ""
    before, after = pair
    stages = {s.name: s for s in curriculum.stages}
    pbb = never_executed(curriculum)
    lines = ["", "What happened:"]
    if pbb:
        lines.append("  The eval programs were never executed in training; the model saw only their code.")
    for name in (before["after"], after["after"]):
        what = describe_stage(stages[name]) if name in stages else "the model as loaded, before training"
        lines.append(f"  {name}: {what}.")
    floor = after.get("floor")
    lines.append(
        f"  Eval-program accuracy ({after['mode']}, {after['n']} held-out rows): after {before['after']} "
        f"{before['accuracy']:.2f}{_ci(before)}, after {after['after']} {after['accuracy']:.2f}{_ci(after)}"
        + (f"; guessing floor {floor:.2f}." if floor is not None else ".")
    )
    if (recall := after.get("recall")) is not None:  # arithmetic CoT: the traces state the right program
        lines.append(
            f"  Its traces state the right program in {recall:.0%} of these rows (after {before['after']}: "
            f"{before.get('recall', 0.0):.0%}); a row that does and still misses has the arithmetic wrong."
        )
    lines.append(f"Verdict: {_judgement(before, after, pbb)}")
    lines += _samples(before, after, curriculum)
    return "\n".join(lines)


def _pick(candidates: list[dict]) -> list[tuple[str, dict]]:
    """Up to ``SAMPLES`` samples, in the records' order (the first row of each program): the first that the
    last stage answers right and the first it answers wrong where both exist, else the first ones."""
    right = [s for s in candidates if s["score"]]
    wrong = [s for s in candidates if not s["score"]]
    if right and wrong:
        return [("one it now answers right", right[0]), ("one it still misses", wrong[0])][:SAMPLES]
    return [("", s) for s in candidates[:SAMPLES]]


def _samples(before: dict, after: dict, curriculum: Curriculum) -> list[str]:
    """Sample eval programs (``_pick``), each with its code, the question and both stages' answers."""
    earlier = {s["prompt"]: s for s in before.get("samples", [])}
    candidates, seen = [], set()
    for s in after.get("samples", []):
        ins = s.get("instruction", "")
        if ins in curriculum.instructions and ins not in seen and s["prompt"] in earlier:
            seen.add(ins)
            candidates.append(s)
    lines = []
    for n, (why, s) in enumerate(_pick(candidates), 1):
        ins = curriculum.instructions[s["instruction"]]
        why = f" ({why})" if why else ""
        lines += ["", f"Sample {n}{why}: {ins.name}, an eval program. Its code, as training showed it:"]
        lines += [f"    {line}" for line in ins.text.strip().splitlines()]
        lines.append(f"  Asked: {_one_line(s['prompt'])}   True answer: {s['expected']}")
        for label, sample in ((before["after"], earlier[s["prompt"]]), (after["after"], s)):
            mark = "right" if sample["score"] else "wrong"
            lines.append(f"  After {label} ({mark}): {_one_line(sample['generated'])}")
    return lines
