"""Evaluation: confidence intervals, modes, scoring, breakdowns, grammar measures and plots."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats

import pbbjax.eval.plots
from pbbjax.data.curriculum import CurriculumConfig, build_curriculum
from pbbjax.data.formatting import IN_CONTEXT_PREFIX
from pbbjax.data.tasks.base import get_domain
from pbbjax.eval.harness import (
    ANSWER_HINT,
    EvalConfig,
    bootstrap_ci,
    grammar_measures,
    guessing_floor,
    render_prompt,
    results_table,
    score_texts,
    summarize,
)
from pbbjax.eval.plots import ad_curve, exchange_rate, write_plots


class PlainTokenizer:
    """No chat template: prompts pass through as ``<prompt>\\n``."""

    chat_template = None


@pytest.fixture(scope="module")
def arithmetic():
    domain = get_domain("arithmetic", length=[1, 3])
    cfg = CurriculumConfig(num_train_instructions=4, num_eval_instructions=3, eval_inputs=4, seed=1)
    return domain, build_curriculum(domain, "proactive", cfg)


def test_bootstrap_over_rows_agrees_with_scipy():
    scores = (np.random.default_rng(0).random(300) < 0.3).astype(float)
    lo, hi = bootstrap_ci(scores, np.zeros(300), n_boot=4000, seed=1)  # one cluster: rows are resampled
    ref = stats.bootstrap((scores,), np.mean, n_resamples=4000, method="percentile", random_state=1)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert lo < scores.mean() < hi


def test_bootstrap_resamples_instructions_not_rows():
    # Two instructions, one always right and one always wrong: the mean is 0, 0.5 or 1 in a resample,
    # so the interval spans [0, 1]; resampling rows would pretend to know the accuracy to +-0.1.
    scores = [1.0] * 50 + [0.0] * 50
    clusters = ["a"] * 50 + ["b"] * 50
    assert bootstrap_ci(scores, clusters, seed=0) == (0.0, 1.0)
    lo, hi = bootstrap_ci(scores, np.arange(100), seed=0)
    assert 0.35 < lo < 0.5 < hi < 0.65
    assert np.isnan(bootstrap_ci([], [])[0])
    assert bootstrap_ci([1.0, 1.0], ["a", "b"]) == (1.0, 1.0)


def test_modes_render_the_prompt_and_prefill(arithmetic):
    domain, cur = arithmetic
    row = cur.eval_sets["eval"][0]
    ins = cur.instructions[row.instruction_id]
    text, prefill = render_prompt(PlainTokenizer(), row, ins, "direct")
    assert (text, prefill) == (f"{row.prompt}\nAnswer:", "Answer:")
    assert render_prompt(PlainTokenizer(), row, ins, "cot") == (f"{row.prompt}\n", "")
    text, _ = render_prompt(PlainTokenizer(), row, ins, "zero_shot")
    assert text == f"{row.prompt}{ANSWER_HINT}\n"
    # In context: the instruction before the prompt, and the answer format asked for after it (the base
    # model otherwise answers in prose, and the arm would measure the format, not execution).
    text, _ = render_prompt(PlainTokenizer(), row, ins, "in_context")
    prefix = IN_CONTEXT_PREFIX.format(name=ins.name, text=ins.text)
    assert text == f"{prefix}{row.prompt}{ANSWER_HINT}\n" and ins.text in text
    ic_row = next(r for r in cur.eval_sets["in_context"] if r.instruction_id == row.instruction_id)
    text, _ = render_prompt(PlainTokenizer(), ic_row, ins, "in_context")
    assert text.count(ins.text) == 1, "rows that already carry the instruction are not prefixed twice"
    # Under representation=nl the instruction in context is its natural-language form, never its code.
    text, _ = render_prompt(PlainTokenizer(), row, ins, "in_context", nl=True)
    assert ins.text_nl in text and ins.text not in text
    nl_cfg = CurriculumConfig(num_train_instructions=4, num_eval_instructions=3, representation="nl")
    nl_cur = build_curriculum(domain, "proactive", nl_cfg)
    nl_row = nl_cur.eval_sets["in_context"][0]
    nl_ins = nl_cur.instructions[nl_row.instruction_id]
    assert nl_row.prompt.startswith(IN_CONTEXT_PREFIX.format(name=nl_ins.name, text=nl_ins.text_nl))
    with pytest.raises(ValueError, match="eval.modes has 'fewshot'"):
        EvalConfig(modes=("fewshot",))


def test_scores_come_from_real_execution(arithmetic):
    domain, cur = arithmetic
    rows = cur.eval_sets["eval"]
    right = [f"Answer: {r.output}" for r in rows]
    wrong = [f"Answer: {json.loads(r.output) + 1}" for r in rows]
    assert score_texts(domain, cur.instructions, rows, right) == [1.0] * len(rows)
    assert score_texts(domain, cur.instructions, rows, wrong) == [0.0] * len(rows)
    assert score_texts(domain, cur.instructions, rows, ["no marker"] * len(rows)) == [0.0] * len(rows)
    # The CoT form: the answer after the last marker counts.
    cot = [f"step 1: Answer: {json.loads(r.output) + 1}\nAnswer: {r.output}" for r in rows]
    assert score_texts(domain, cur.instructions, rows, cot) == [1.0] * len(rows)


def test_guessing_floor_is_the_score_of_answering_each_programs_most_frequent_output(arithmetic):
    domain, cur = arithmetic
    rows = cur.eval_sets["eval"] + cur.eval_sets["train"]
    # the guesser, scored by the domain like a model: each program's most common output, every time
    outputs = {}
    for r in rows:
        outputs.setdefault(r.instruction_id, []).append(r.output)
    guess = {i: max(set(o), key=o.count) for i, o in outputs.items()}
    texts = [f"Answer: {guess[r.instruction_id]}" for r in rows]
    assert guessing_floor(rows) == pytest.approx(np.mean(score_texts(domain, cur.instructions, rows, texts)))
    # by hand: program a answers 0, 0, 1 and program b 5, 6: 2 + 1 of 5 rows
    pairs = zip("aaabb", "00156", strict=True)
    by_hand = [dataclasses.replace(rows[0], instruction_id=i, output=o) for i, o in pairs]
    assert guessing_floor(by_hand) == pytest.approx(3 / 5) and guessing_floor([]) is None


def test_summary_breaks_accuracy_down_by_program_length(arithmetic):
    domain, cur = arithmetic
    rows = cur.eval_sets["eval"] + cur.eval_sets["train"]
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 2, len(rows)).astype(float).tolist()
    out = summarize(scores, rows, cur.instructions, EvalConfig(bootstrap=200))
    assert out["n"] == len(rows) and out["accuracy"] == pytest.approx(np.mean(scores))
    lengths = [cur.instructions[r.instruction_id].meta["length"] for r in rows]
    for length, entry in out["by_length"].items():
        mine = [s for s, n in zip(scores, lengths, strict=True) if str(n) == length]
        assert entry["n"] == len(mine) and entry["accuracy"] == pytest.approx(np.mean(mine))
        assert entry["ci_low"] <= entry["accuracy"] <= entry["ci_high"]
    assert sum(e["n"] for e in out["by_length"].values()) == len(rows)
    assert "by_shift" not in out  # arithmetic examples have no shift


def test_grammar_measures_diversity_and_the_random_baseline():
    domain = get_domain("grammars")
    cfg = CurriculumConfig(num_train_instructions=2, num_eval_instructions=2, eval_inputs=6, seed=0)
    cur = build_curriculum(domain, "proactive", cfg)
    rows = [r for r in cur.eval_sets["eval"] if r.input == "null"]
    assert rows
    valid = [f"Answer: {r.output}" for r in rows]  # sentences the grammar generated: all accepted
    assert score_texts(domain, cur.instructions, rows, valid) == [1.0] * len(rows)
    m = grammar_measures(domain, cur.instructions, rows, valid, seed=0)
    assert m["random_baseline"] < 0.5, "random word strings are rarely sentences of the grammar"
    same = [valid[0]] * len(rows)
    assert grammar_measures(domain, cur.instructions, rows, same, seed=0)["diversity"] < m["diversity"]


def _record(after, step, acc, final=True, **extra):
    return dict(
        after=after,
        step=step,
        final=final,
        set="eval",
        group="eval",
        mode="direct",
        n=20,
        loss=1.0,
        accuracy=acc,
        ci_low=max(acc - 0.1, 0),
        ci_high=min(acc + 0.1, 1),
        **extra,
    )


def test_exchange_rate_by_hand():
    assert exchange_rate([1, 10, 100], [0.1, 0.3, 0.5], 0.4) == pytest.approx(10**1.5)
    assert exchange_rate([1, 10, 100], [0.1, 0.3, 0.5], 0.3) == pytest.approx(10.0)
    assert exchange_rate([1, 10, 100], [0.1, 0.3, 0.5], 0.05) == 1.0
    assert exchange_rate([1, 10, 100], [0.1, 0.3, 0.5], 0.9) is None
    curve = ad_curve([_record("ad10", 5, 0.3), _record("stage1", 2, 0.0), _record("ad2", 3, 0.1)])
    assert [n for n, _ in curve] == [2, 10]


def test_plots_and_table_from_records(tmp_path):
    by_length = {"by_length": {"1": {"n": 10, "accuracy": 0.5, "ci_low": 0.3, "ci_high": 0.7}}}
    records = [
        _record("start", 0, 0.0),
        _record("stage1", 10, 0.2, **by_length),
        _record("stage2", 15, 0.3, final=False),
        _record("stage2", 20, 0.4),
        _record("ad1", 25, 0.1),
        _record("ad5", 30, 0.35),
    ]
    paths = write_plots(records, tmp_path, title="test", pbb=_record("stage2", 20, 0.3))
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["accuracy_by_stage.png", "accuracy_by_length.png", "accuracy_over_steps.png", "exchange_rate.png"]
    )
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    table = results_table(records)
    assert "ci95" in table.splitlines()[0] and "[0.100, 0.300]" in table


def test_every_accuracy_plot_and_table_shows_the_guessing_floor(tmp_path, monkeypatch):
    """Records with a floor draw it on every plot (a tick over each bar, else a line at its height) and
    show it in the table; records written before the floor existed still plot and tabulate."""
    drawn = {}

    def save(fig, path):
        ax = fig.axes[0]
        floors = [line for line in ax.lines if line.get_color() == "k"]
        drawn[path.name] = sorted({round(float(y), 6) for line in floors for y in line.get_ydata()})
        return real_save(fig, path)

    real_save = pbbjax.eval.plots._save
    monkeypatch.setattr(pbbjax.eval.plots, "_save", save)
    by_length = {"by_length": {"1": {"n": 10, "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}}}
    records = [
        _record("stage1", 10, 0.2, floor=0.25, **by_length),
        _record("stage2", 15, 0.3, final=False, floor=0.25),
        _record("stage2", 20, 0.4, floor=0.25),
        _record("ad1", 25, 0.1, floor=0.25),
        _record("ad5", 30, 0.35, floor=0.25),
    ]
    paths = write_plots(records, tmp_path, title="test", pbb=_record("stage2", 20, 0.3))
    assert len(paths) == 4 and all(drawn[p.name] == [0.25] for p in paths), drawn
    table = results_table(records).splitlines()
    assert table[0].split()[-1] == "floor" and all(line.endswith("0.2500") for line in table[2:])
    old = [{k: v for k, v in r.items() if k != "floor"} for r in records]
    drawn.clear()
    paths = write_plots(old, tmp_path / "old", title="test")
    assert drawn and all(v == [] for v in drawn.values())
    assert all(not line.endswith("0.2500") for line in results_table(old).splitlines()[2:])


def test_heldout_loss_takes_rows_longer_than_the_training_length(smollm2_dir):
    """A composition's row can outgrow ``pipeline.seq_len``: evaluation rows are not packed, so the loss
    pads to the longest row (rounded up to a bucket) instead of refusing, and gives what a longer seq_len
    gives; rows far shorter than ``seq_len`` are not padded to it."""
    import jax
    from flax import nnx

    from pbbjax import load_model
    from pbbjax.data.formatting import Row
    from pbbjax.data.pipeline import ExampleTooLongError, PipelineConfig, make_dataset, tokenize_rows
    from pbbjax.eval.harness import heldout_loss
    from pbbjax.inference.sampler import prompt_bucket
    from pbbjax.training import sft

    model, tokenizer = load_model(smollm2_dir)
    step = sft.make_eval_step(nnx.split(model)[0], "token")
    long = "def f(x):\n" + "".join(f"    x = x + {i}\n" for i in range(12)) + "    return x"
    rows = [
        Row("eval", "execution", "a", "eval", "What is f(2)?\n" + long, "Answer: 68"),
        Row("eval", "execution", "b", "eval", "What is 1 + 1?", "Answer: 2"),
    ]
    lengths = [len(e["tokens"]) for e in tokenize_rows(rows, tokenizer)]
    short = lengths[1] + 8
    assert lengths[0] > short
    with pytest.raises(ExampleTooLongError):  # training refuses such a row at this length
        tokenize_rows(rows, tokenizer, short)
    params, put = nnx.state(model), lambda batch: jax.tree.map(jax.numpy.asarray, batch)
    shapes = []

    def seen(params, batch):
        shapes.append(batch["tokens"].shape)
        return step(params, batch)

    got = heldout_loss(seen, params, rows, tokenizer, short, 2, put)
    padded = heldout_loss(seen, params, rows, tokenizer, 1024, 2, put)
    # the reference: both rows padded to 256 by the pipeline itself, through the eval step directly
    cfg = PipelineConfig(seq_len=256, batch_size=2, pack=False)
    (batch,) = make_dataset(tokenize_rows(rows, tokenizer), cfg, 0, 1)
    num, den = step(params, put(batch))
    want = float(num) / float(den)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-5)
    assert padded == pytest.approx(want, rel=1e-5)
    bucket = prompt_bucket(lengths[0], minimum=64)
    assert lengths[0] <= bucket < 1024 and shapes == [(2, bucket), (2, bucket)]
    (alone,) = rows[1:]  # a short row alone: padded to its bucket, or to seq_len where that is shorter
    heldout_loss(seen, params, [alone], tokenizer, 1024, 2, put)
    heldout_loss(seen, params, [alone], tokenizer, short, 2, put)
    assert shapes[2:] == [(2, 64), (2, min(64, short))]
