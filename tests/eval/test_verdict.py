"""The verdict after the results table (``pbbjax.eval.verdict``): which stages it compares, what it concludes
from the intervals and the guessing floor, and the sample programs it shows."""

from pbbjax.data.curriculum import Curriculum, Stage
from pbbjax.data.formatting import Row
from pbbjax.data.tasks.base import Instruction
from pbbjax.eval.verdict import describe_stage, explain


def _row(kind, split, ins="a/f"):
    return Row("s", kind, ins, split, "p", "c")


def _curriculum(stage2_rows, start_from=None) -> Curriculum:
    instructions = {
        "a/f": Instruction("a/f", "F", "def f(x):\n    return x + 3"),
        "a/g": Instruction("a/g", "G", "def g(x):\n    return x + 5"),
    }
    stage1 = [_row("declarative", "train", "a/t")] * 2 + [_row("execution", "train", "a/t")] * 3
    stages = [Stage("stage1", stage1), Stage("stage2", stage2_rows, start_from)]
    return Curriculum("proactive", "a", instructions, ["a/t"], ["a/f", "a/g"], stages, {})


def _sample(ins, prompt, expected, generated):
    return {
        "instruction": ins,
        "prompt": prompt,
        "expected": expected,
        "generated": generated,
        "score": float(generated.endswith(expected)),
    }


def _record(after, acc, lo, hi, floor=0.25, samples=()):
    return {
        "after": after,
        "step": 1,
        "final": True,
        "set": "eval",
        "mode": "cot",
        "n": 24,
        "accuracy": acc,
        "ci_low": lo,
        "ci_high": hi,
        "floor": floor,
        "samples": list(samples),
    }


BEFORE = [_sample("a/f", "f(1)?", "4", "Answer: 9"), _sample("a/g", "g(2)?", "7", "x = 2\nAnswer: 1")]
AFTER = [_sample("a/f", "f(1)?", "4", "return x + 3\nAnswer: 4"), _sample("a/g", "g(2)?", "7", "Answer: 3")]


def test_describe_stage_counts_rows_and_programs_by_kind_and_split():
    rows = [_row("declarative", "eval", "a/f")] * 4 + [_row("declarative", "eval", "a/g")] * 2
    rows += [_row("execution", "train", "a/t")]
    assert describe_stage(Stage("stage2", rows)) == (
        "code of 2 eval programs (6 rows), executions of 1 train program (1 rows)"
    )


def test_pbb_verdict_when_intervals_are_apart_and_above_the_floor():
    cur = _curriculum([_row("declarative", "eval")] * 4)
    text = explain(
        [_record("stage1", 0.0, 0.0, 0.0, samples=BEFORE), _record("stage2", 0.75, 0.6, 0.9, samples=AFTER)],
        cur,
    )
    assert "never executed in training" in text
    assert "Verdict: Programming by Backprop worked" in text and "0.00 -> 0.75 [0.60, 0.90]" in text
    # both samples: the program's code, the question, the true answer, both outputs on one line each
    assert "Sample 1 (one it now answers right): F" in text and "        return x + 3" in text
    assert "Asked: f(1)?   True answer: 4" in text
    assert (
        "After stage1 (wrong): Answer: 9" in text and "After stage2 (right): return x + 3 | Answer: 4" in text
    )
    assert "Sample 2 (one it still misses): G" in text and "After stage1 (wrong): x = 2 | Answer: 1" in text
    assert "state the right program" not in text  # no recall in these records


def test_recall_says_how_many_traces_state_the_right_program():
    cur = _curriculum([_row("declarative", "eval")])
    records = [_record("stage1", 0.0, 0.0, 0.0), _record("stage2", 0.5, 0.4, 0.6)]
    records[0]["recall"], records[1]["recall"] = 0.0, 0.97
    text = explain(records, cur)
    assert "state the right program in 97% of these rows (after stage1: 0%)" in text


def test_overlapping_intervals_are_no_clear_change():
    cur = _curriculum([_row("declarative", "eval")])
    text = explain([_record("stage1", 0.0, 0.0, 0.0), _record("stage2", 0.19, 0.0, 0.38)], cur)
    assert "Verdict: No clear change" in text


def test_a_rise_not_clear_of_the_guessing_floor_is_said_to_be_possible_guessing():
    cur = _curriculum([_row("declarative", "eval")])
    text = explain([_record("stage1", 0.0, 0.0, 0.0), _record("stage2", 0.4, 0.2, 0.6, floor=0.3)], cur)
    assert "not clearly above the guessing floor (0.30)" in text


def test_executed_eval_programs_are_not_called_pbb():
    cur = _curriculum([_row("declarative", "eval"), _row("execution", "eval")])
    text = explain([_record("stage1", 0.0, 0.0, 0.0), _record("stage2", 0.9, 0.8, 1.0)], cur)
    assert "never executed" not in text and "Programming by Backprop" not in text
    assert "Verdict: Accuracy rose clearly" in text


def test_a_branch_compares_with_the_stage_it_starts_from_and_no_pair_gives_nothing():
    cur = _curriculum([_row("declarative", "eval")], start_from="stage1")
    cur.stages.insert(1, Stage("other", [_row("declarative", "eval")]))
    records = [
        _record("stage1", 0.0, 0.0, 0.0),
        _record("other", 0.5, 0.4, 0.6),
        _record("stage2", 0.1, 0.0, 0.2),
    ]
    assert "after stage1 0.00 [0.00, 0.00], after stage2 0.10" in explain(records, cur)
    assert explain([_record("stage2", 0.5, 0.4, 0.6)], cur) == ""


def test_samples_without_both_outcomes_are_the_first_programs_unlabelled():
    cur = _curriculum([_row("declarative", "eval")])
    wrong = [dict(s, score=0.0) for s in AFTER]
    text = explain(
        [_record("stage1", 0.0, 0.0, 0.0, samples=BEFORE), _record("stage2", 0.0, 0.0, 0.0, samples=wrong)],
        cur,
    )
    assert "Sample 1: F" in text and "Sample 2: G" in text and "Sample 3" not in text
