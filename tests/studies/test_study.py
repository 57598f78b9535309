"""``python -m pbbjax.study``: every study end to end on the tiny preset (a tiny random model, a few steps),
well-formed outputs, resumption after a kill, and the report's statistics against hand-computed values."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from pbbjax import study as study_mod
from pbbjax.studies import runner as study_runner
from pbbjax.studies.catalog import STUDIES, Arm
from pbbjax.studies.report import (
    aggregate,
    differences,
    exchange_rate_estimate,
    markdown_table,
    report,
    seed_interval,
)
from pbbjax.training.checkpoint import Checkpointer

ROOT = Path(__file__).parents[2]


def run_tiny(name, tmp_path, *extra, seeds=1):
    out, work = tmp_path / "results" / name, tmp_path / "runs" / name
    args = [name, "--preset", "tiny", "--seeds", str(seeds), "--out", str(out), "--workdir", str(work)]
    assert study_mod.main([*args, *extra]) == 0
    return out, work


def check_outputs(name, out, seeds):
    s = STUDIES[name]
    data = json.loads((out / "results.json").read_text())
    assert data["study"] == name and data["seeds"] == seeds and data["preset"] == "tiny"
    arms = {r["arm"] for r in data["arms"]}
    assert {a.name for a in s.arms} <= arms, "every arm has a row"
    for row in data["arms"]:
        assert row["seeds"] == seeds and row["n"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0 and len(row["per_seed"]) == seeds
        assert row["ci_low"] <= row["accuracy"] + 1e-9 and row["accuracy"] <= row["ci_high"] + 1e-9
    table = (out / "table.md").read_text()
    assert all(f"| {a} |" in table for a in arms)
    for run in s.runs:
        config = json.loads((out / "configs" / f"{run.name}.json").read_text())
        assert config["command"].startswith(f"python -m pbbjax.train --config configs/{run.config}.py:")
        for seed in range(s.first_seed, s.first_seed + seeds):
            saved = json.loads((out / "runs" / run.name / f"seed{seed}.json").read_text())
            assert saved["records"] and saved["seed"] == seed
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots and all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    want = {"arms": "arms.png", "by_length": "accuracy_by_length.png", "by_shift": "accuracy_by_shift.png"}
    want |= {"over_steps": "accuracy_over_steps.png", "exchange_rate": "exchange_rate.png"}
    assert {want[p] for p in s.plots} <= set(plots), plots
    return data


# On the tiny preset, stages (8 runs) and leetcode (1024-token rows) take about 3 minutes each, and
# representation (4 proactive runs, the machinery of compositions) 1.5 minutes.
SLOW = {"stages", "leetcode", "representation"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in STUDIES if n != "exchange-rate"],
)
def test_study_end_to_end_tiny(name, tmp_path, capsys):
    out, work = run_tiny(name, tmp_path)
    data = check_outputs(name, out, 1)
    if name == "minimal":  # arithmetic CoT: whether the traces state the programs, apart from their values
        assert all(0.0 <= row["recall"] <= 1.0 for row in data["arms"])
        assert (
            "| recall [95% CI] |" in (out / "table.md").read_text()
            and (out / "plots" / "arms_recall.png").exists()
        )
    if name == "demo":  # the controls: proactive minus each other arm, paired over (seed, program)
        minus = {d["minus"] for d in data["differences"] if d["set"] == "eval"}
        assert minus == {"stage1-only", "stage2-only", "mixture", "proactive-no-replay"}
        assert all(-1.0 <= d["ci_low"] <= d["ci_high"] <= 1.0 for d in data["differences"])
        assert "proactive - mixture" in (out / "table.md").read_text()
    if name == "replay":  # seeds 0-4 chose the main job's settings: this study reports seeds 5..
        assert data["first_seed"] == 5 and "seeds 5-5" in capsys.readouterr().out
        assert {d["minus"] for d in data["differences"]} == {"stage1-only", "proactive-no-replay"}
    assert list(work.glob("*/seed*")) and not list(work.glob("*/seed*/checkpoints/*")), "checkpoints removed"


def test_exchange_rate_study_resumes_after_a_kill(tmp_path, monkeypatch, capsys, caplog):
    """Two seeds; the run of seed 1 is killed right after its third checkpoint. The rerun skips seed 0's
    finished run, resumes seed 1 from that checkpoint, and reports N* with its interval."""
    saves = {"n": 0}
    original = Checkpointer.save

    def save_then_die(self, step, state, meta, *, force=False):
        original(self, step, state, meta, force=force)
        if "seed1" in str(self.directory) and "stage_ends" not in str(self.directory):
            saves["n"] += 1
            if saves["n"] == 3:
                self.wait()
                raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_tiny("exchange-rate", tmp_path, seeds=2)
    out = tmp_path / "results" / "exchange-rate"
    assert (out / "runs" / "ad" / "seed0.json").exists() and not (out / "runs" / "ad" / "seed1.json").exists()
    capsys.readouterr()
    monkeypatch.setattr(Checkpointer, "save", original)
    with caplog.at_level("WARNING", logger="pbbjax.training.runner"):
        run_tiny("exchange-rate", tmp_path, seeds=2)
    printed = capsys.readouterr().out
    assert "ad seed 0: done before" in printed and "ad seed 1 (" in printed
    assert [m for m in caplog.messages if m.startswith("resuming from checkpoint")], caplog.messages
    data = check_outputs("exchange-rate", out, 2)
    xr = data["exchange_rate"]
    assert xr["ns"] == [1, 2] and 0 <= xr["reached_in"] <= 1  # the real N, from the records
    assert {r["arm"]: r["eval_executions"] for r in data["arms"] if r["arm"].startswith("ad")} == {
        "ad1": 1.0,
        "ad2": 2.0,
    }
    assert float(xr["ci_low"]) <= float(xr["ci_high"])  # "inf" (a string: strict JSON) when not reached


def test_a_changed_config_is_not_mixed_with_old_results(tmp_path):
    out, _ = run_tiny("in-context", tmp_path)
    (out / "results.json").unlink()
    run_tiny("in-context", tmp_path, "--report-only")  # aggregates the records, trains nothing
    assert json.loads((out / "results.json").read_text())["arms"]
    with pytest.raises(FileNotFoundError, match="no records .* for in-context seed 1"):
        run_tiny("in-context", tmp_path, "--report-only", seeds=2)
    with pytest.raises(ValueError, match="different config"):
        run_tiny("in-context", tmp_path, "--set", "eval.max_new_tokens=5")


def test_unknown_override_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown config field 'train.learning_rat'"):
        run_tiny("compositions", tmp_path, "--set", "train.learning_rat=0.5")


# -- the report's statistics -----------------------------------------------------------------------------


def _rec(after, acc, by_instruction=None, set_name="eval"):
    r = {"after": after, "final": True, "set": set_name, "mode": "direct", "n": 4, "accuracy": acc}
    return r | {"ci_low": acc - 0.1, "ci_high": acc + 0.1, "by_instruction": by_instruction or {}}


def test_seed_interval_is_the_student_t_interval():
    values = [0.2, 0.4, 0.3]
    lo, hi = seed_interval(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert lo == pytest.approx(0.3 - half) and hi == pytest.approx(min(1.0, 0.3 + half))
    assert seed_interval([0.0, 0.0, 0.0]) == (0.0, 0.0)


def test_aggregate_over_seeds_and_single_seed_intervals():
    arms = (Arm("a", "r", "stage2"),)
    runs = {
        ("r", 0): [_rec("stage2", 0.5) | {"loss": 1.0, "recall": 0.9, "floor": 0.2}, _rec("stage1", 0.9)],
        ("r", 1): [_rec("stage2", 0.7) | {"loss": 2.0, "recall": 1.0, "floor": 0.3}],
    }
    (row,) = aggregate(arms, runs, 2)
    assert row["floor"] == pytest.approx(0.25)  # the guessing floor: its mean over the seeds
    assert markdown_table([row]).splitlines()[2].split(" | ")[9] == "0.250"
    assert row["accuracy"] == pytest.approx(0.6) and row["per_seed"] == [0.5, 0.7] and row["ci"] == "seeds"
    half = stats.t.ppf(0.975, 1) * np.std([1.0, 2.0], ddof=1) / math.sqrt(2)  # losses are not clipped at 1
    assert (row["loss"], row["loss_ci_high"]) == (pytest.approx(1.5), pytest.approx(1.5 + half))
    assert row["loss_ci_low"] == 0.0
    # recall, a fraction like accuracy, gets the same t-interval clipped to [0, 1]
    assert row["recall_per_seed"] == [0.9, 1.0] and row["recall_ci_high"] == 1.0
    assert row["recall_ci_low"] == pytest.approx(
        0.95 - stats.t.ppf(0.975, 1) * np.std([0.9, 1.0], ddof=1) / 2**0.5
    )
    (one,) = aggregate(arms, {("r", 0): runs[("r", 0)]}, 1)
    assert (one["ci_low"], one["ci_high"], one["ci"]) == (0.4, 0.6, "instructions")


def test_cluster_intervals_and_paired_differences():
    """Two seeds with the same accuracy from different programs: a t-interval over the seeds would have zero
    width; the (seed, program) bootstrap does not. Differences are paired: the same clusters for both arms."""
    arms = (Arm("ref", "r", "stage2"), Arm("other", "r", "stage1"), Arm("same", "r", "mixture"))
    ref, other = {"i": [4, 1.0], "j": [4, 0.0]}, {"i": [4, 0.5], "j": [4, 0.0]}
    runs = {
        ("r", s): [_rec("stage2", 0.5, ref), _rec("stage1", 0.25, other), _rec("mixture", 0.5, ref)]
        for s in (0, 1)
    }
    rows = {r["arm"]: r for r in aggregate(arms, runs, 2)}
    assert rows["ref"]["ci"] == "clusters" and rows["ref"]["per_seed"] == [0.5, 0.5]
    assert rows["ref"]["ci_low"] < 0.5 < rows["ref"]["ci_high"]
    by_minus = {d["minus"]: d for d in differences("ref", arms, runs, 2, n_boot=500)}
    d = by_minus["other"]
    assert (d["arm"], d["set"], d["mode"], d["clusters"], d["seeds"]) == ("ref", "eval", "direct", 4, 2)
    # per cluster ref - other is 0.5 (program i) or 0 (program j): every paired resample lies in [0, 0.5]
    assert d["difference"] == pytest.approx(0.25) and 0.0 <= d["ci_low"] < 0.25 < d["ci_high"] <= 0.5
    same = by_minus["same"]  # identical arms: no difference in any resample
    assert (same["difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    assert differences("missing", arms, runs, 2) == []


def test_exchange_rate_point_estimate_and_interval():
    """AD(1) = 0.1, AD(10) = 0.5, PBB = 0.3 in both seeds: N* = 10^0.5 by log-linear interpolation; when
    every resample has the same curve the interval collapses to the point."""
    ins = {"i": [2, 0.0], "j": [2, 0.0]}
    arms = (Arm("pbb", "ad", "pbb"), Arm("ad1", "ad", "ad1"), Arm("ad10", "ad", "ad10"))

    def recs(p, a1, a10):
        return [
            _rec("pbb", p, {k: [2, p] for k in ins}),
            _rec("ad1", a1, {k: [2, a1] for k in ins}),
            _rec("ad10", a10, {k: [2, a10] for k in ins}),
        ]

    runs = {("ad", 0): recs(0.3, 0.1, 0.5), ("ad", 1): recs(0.3, 0.1, 0.5)}
    xr = exchange_rate_estimate(arms, runs, 2, n_boot=200)
    assert xr["n_star"] == pytest.approx(10**0.5) and xr["ci_low"] == pytest.approx(10**0.5)
    assert xr["ci_high"] == pytest.approx(10**0.5) and xr["reached_in"] == 1.0
    # A seed where AD never reaches PBB: some resamples have no N*, so the interval is open above.
    runs[("ad", 1)] = recs(0.9, 0.1, 0.5)
    xr = exchange_rate_estimate(arms, runs, 2, n_boot=200)
    assert xr["ci_high"] == math.inf and 0 < xr["reached_in"] < 1


def test_exchange_rate_report_warns_when_pbb_is_no_better_than_stage1(tmp_path, capsys):
    names = ("stage1", "pbb", "ad1", "ad10")
    arms = tuple(Arm(a, "ad", a) for a in names)

    def recs(stage1, pbb):
        return [_rec(a, acc, {"i": [2, acc]}) for a, acc in zip(names, (stage1, pbb, 0.5, 1.0), strict=True)]

    for pbb, warned in ((0.25, True), (0.75, False)):
        runs = {("ad", 0): recs(0.25, pbb), ("ad", 1): recs(0.25, pbb)}
        data = report(STUDIES["exchange-rate"], arms, runs, 2, "test", tmp_path / str(pbb))
        assert data["exchange_rate"]["stage1_accuracy"] == 0.25
        assert ("no better than stage 1 alone" in (tmp_path / str(pbb) / "table.md").read_text()) == warned


def test_study_compile_only_on_a_tpu_topology(capsys):
    """Every run of the retroactive study (SFT and GRPO steps, sampler) AOT-compiles for a TPU topology."""
    assert study_mod.main(["retroactive", "--preset", "tiny", "--compile-only", "v5e:2x2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("all steps fit") == 2 and "retroactive on v5e:2x2: every run fits" in printed
    assert "grpo" in printed


@pytest.mark.slow
def test_paper_scale_study_compiles_on_its_pod():
    assert study_mod.main(["exchange-rate", "--preset", "qwen3-0.6b,v5e-4", "--compile-only", "v5e:2x2"]) == 0


COMMITTED = sorted(
    (p.parent.name, p.name) for p in (ROOT / "results").glob("*/*") if p.name in ("cpu", "demo")
)


@pytest.mark.parametrize("name,preset", COMMITTED)
def test_committed_results_match_todays_configs(name, preset):
    """Each committed ``results/<study>/<preset>`` record was written by the config the study builds today
    (its digest), so ``--report-only`` and resuming still accept them; a preset change must move them."""
    out = ROOT / "results" / name / preset
    runner = study_runner.StudyRunner(STUDIES[name], preset, 1, out, ROOT / "runs")
    for run in STUDIES[name].runs:
        for path in sorted((out / "runs" / run.name).glob("seed*.json")):
            seed = int(path.stem.removeprefix("seed"))
            saved = json.loads(path.read_text())["config_digest"]
            assert saved == study_runner.digest(runner.config(run, seed)), path


def test_a_field_added_at_its_old_behaviour_keeps_the_digest_and_changes_it_when_set(tmp_path):
    """``rl.sft_warmup_steps`` came after the retroactive study's results: at 0 (what those runs did) the
    digest leaves it out, so they stay valid; set, it makes a new run."""
    runner = study_runner.StudyRunner(STUDIES["retroactive"], "cpu", 1, tmp_path / "out", tmp_path / "runs")
    run = STUDIES["retroactive"].runs[1]
    config = runner.config(run, 0)
    before = study_runner.digest(config)
    del config.rl.sft_warmup_steps  # the config as it was before the field existed
    assert study_runner.digest(config) == before
    config = runner.config(run, 0)
    config.rl.sft_warmup_steps = 3
    assert study_runner.digest(config) != before


def test_a_study_without_the_asked_size_names_the_presets_it_has(tmp_path):
    with pytest.raises(ValueError, match="study 'demo' has no 'cpu' size; presets: demo, tiny"):
        study_runner.StudyRunner(STUDIES["demo"], "cpu", 1, tmp_path / "out", tmp_path / "runs")
