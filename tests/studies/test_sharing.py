"""Shared stages in studies (``pbbjax.studies.sharing``): which runs share what, and that a run resumed from
a shared prefix gives the records it gives when trained whole."""

import json
import re

import pytest

from pbbjax import study as study_mod
from pbbjax.config.run_config import build_run_config
from pbbjax.studies import sharing
from pbbjax.studies.catalog import STUDIES
from pbbjax.studies.runner import StudyRunner, apply_overrides, canonical
from pbbjax.training.run import train


def _keys(name, tmp_path, overrides=None, preset="tiny"):
    runner = StudyRunner(STUDIES[name], preset, 1, tmp_path / "out", tmp_path / "work", overrides)
    seed = runner.seed_values[0]
    configs = {r.name: runner.config(r, seed) for r in runner.study.runs}
    return {n: sharing.stage_keys(c, canonical(c)) for n, c in configs.items()}, configs


def test_runs_that_differ_after_stage1_share_it_and_nothing_else(tmp_path):
    keys, _ = _keys("replay", tmp_path)  # replay 1.0 vs 0.0: the same stage 1, other stage-2 rows
    assert [n for n, _ in keys["replay"]] == ["stage1", "stage2"]
    assert keys["replay"][0] == keys["no-replay"][0] and keys["replay"][1] != keys["no-replay"][1]
    assert sharing.shared_prefix(keys, "replay") == sharing.shared_prefix(keys, "no-replay") == 1
    keys, _ = _keys("retroactive", tmp_path)  # SFT vs GRPO stage 2: the GRPO settings act from stage 2
    assert sharing.shared_prefix(keys, "sft") == sharing.shared_prefix(keys, "grpo") == 1
    keys, _ = _keys("demo", tmp_path)  # stage 2 alone and the mixture start elsewhere
    assert {r: sharing.shared_prefix(keys, r) for r in keys} == {
        "proactive": 1,
        "no-replay": 1,
        "stage2-only": 0,
        "mixture": 0,
    }


def test_a_setting_outside_data_ends_the_sharing(tmp_path):
    keys, configs = _keys("replay", tmp_path)
    lr = configs["no-replay"].train.learning_rate
    apply_overrides(configs["no-replay"], {"train.learning_rate": lr * 2}, "test")
    changed = {n: sharing.stage_keys(c, canonical(c)) for n, c in configs.items()}
    assert changed["replay"] == keys["replay"] and changed["no-replay"][0] != keys["no-replay"][0]
    assert sharing.shared_prefix(changed, "replay") == 0
    apply_overrides(configs["no-replay"], {"train.learning_rate": lr, "seed": 99}, "test")
    reseeded = sharing.stage_keys(configs["no-replay"], canonical(configs["no-replay"]))
    assert reseeded[0] != keys["no-replay"][0]
    # where a run trains (its workdir) changes nothing it computes
    apply_overrides(configs["replay"], {"workdir": str(tmp_path / "elsewhere")}, "test")
    assert sharing.stage_keys(configs["replay"], canonical(configs["replay"])) == keys["replay"]


def test_a_run_that_another_contains_still_trains_its_last_stage():
    keys = {"a": [("s1", "x")], "b": [("s1", "x"), ("s2", "y")]}
    assert sharing.shared_prefix(keys, "a") == 0 and sharing.shared_prefix(keys, "b") == 1
    assert sharing.shared_prefix({"a": [("s1", "x")]}, "a") == 0


def test_stop_after_must_name_a_stage(tmp_path):
    _, configs = _keys("replay", tmp_path)
    config = configs["replay"]
    config.workdir, config.train.stop_after = str(tmp_path / "run"), "stage3"
    with pytest.raises(ValueError, match=r"'train.stop_after' is 'stage3'.*stage1, stage2"):
        train(build_run_config(config))


def test_shared_stage1_gives_the_records_of_runs_trained_whole(tmp_path, capsys):
    args = ["replay", "--preset", "tiny", "--seeds", "1"]
    shared_out, whole_out = tmp_path / "shared", tmp_path / "whole"
    work = tmp_path / "work_shared"
    shared_args = ["--out", str(shared_out), "--workdir", str(work), "--keep-checkpoints"]
    assert study_mod.main([*args, *shared_args]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"stages up to 'stage1', shared with no-replay", printed)
    assert re.search(r"stages up to 'stage1' from .*_shared", printed)  # the second run trains no stage 1
    prefix = next((work / "_shared").glob("seed*/*"))
    assert (prefix / sharing.DONE).read_text() == "stage1"
    assert not (work / "replay" / "seed5" / sharing.DONE).exists()
    done = json.loads((prefix / "results.json").read_text())
    assert {r["after"] for r in done["records"]} == {"stage1"}  # the prefix run stopped after stage 1
    whole_args = ["--out", str(whole_out), "--workdir", str(tmp_path / "work_whole"), "--no-share"]
    assert study_mod.main([*args, *whole_args]) == 0
    assert not (tmp_path / "work_whole" / "_shared").exists()
    for run in ("replay", "no-replay"):
        shared = json.loads((shared_out / "runs" / run / "seed5.json").read_text())
        whole = json.loads((whole_out / "runs" / run / "seed5.json").read_text())
        assert shared["config_digest"] == whole["config_digest"]
        assert {r["after"] for r in shared["records"]} == {"stage1", "stage2"}
        assert shared["records"] == whole["records"], run
        steps = [json.loads(line)["step"] for line in (work / run / "seed5" / "metrics.jsonl").open()]
        assert steps == sorted(steps) and steps[0] == 1  # stage 1's metrics came with the copy


def test_a_run_starts_from_a_copy_of_the_prefix_but_not_its_wandb_run(tmp_path):
    from pbbjax.training.tracking import RUN_ID_FILE

    prefix, workdir = tmp_path / "prefix", tmp_path / "run"
    (prefix / "checkpoints" / "21").mkdir(parents=True)
    (prefix / "checkpoints" / "21" / "state").write_text("weights")
    for name, text in {"metrics.jsonl": "{}\n", RUN_ID_FILE: "abc", sharing.DONE: "stage1"}.items():
        (prefix / name).write_text(text)
    workdir.mkdir()
    (workdir / "source_model").write_text("left by a run killed before its first checkpoint")
    sharing.start_from_prefix(prefix, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert (workdir / "checkpoints" / "21" / "state").read_text() == "weights"
    with (workdir / "metrics.jsonl").open("a") as f:  # the run appends: the prefix's own file is untouched
        f.write("{}\n")
    assert (prefix / "metrics.jsonl").read_text() == "{}\n"
