"""The main job's default (``demo``) preset builds the curriculum that its docstring and docs/results.md
describe: every count of programs, rows and held-out inputs, and no execution of an eval program in
training."""

from collections import Counter

from pbbjax.config.run_config import build_run_config, domain_of
from pbbjax.config.schema import base_config, curriculum_config, select_preset
from pbbjax.data.curriculum import build_curriculum
from pbbjax.studies.runner import load_config


def test_the_main_job_defaults_to_the_demo_preset():
    assert (
        load_config("proactive", None).to_dict() == select_preset(base_config("proactive"), "demo").to_dict()
    )


def test_demo_curriculum_counts():
    c = load_config("proactive", None)
    cur = build_curriculum(domain_of(build_run_config(c)), "proactive", curriculum_config(c))
    assert (len(cur.train_ids), len(cur.eval_ids)) == (16, 8)
    for ins in cur.instructions.values():  # one statement: return x + c, with c in 1..30
        body = ins.text.strip().splitlines()[1:]
        assert len(body) == 1 and body[0].strip().startswith("return x + "), ins.text
        assert 1 <= int(body[0].split("+")[1]) <= 30
    stage1, stage2 = cur.stages
    kinds1 = Counter((r.kind, r.split, r.instruction_id) for r in stage1.rows)
    for i in cur.train_ids:  # 12 code rows and every input but the 4 held out (x in 0..20: 17 executions)
        assert kinds1[("declarative", "train", i)] == 12 and kinds1[("execution", "train", i)] == 17
    assert sum(kinds1.values()) == 16 * (12 + 17)
    eval_rows = [r for r in stage2.rows if r.split == "eval"]
    assert len(eval_rows) == 8 * 12 and {r.kind for r in eval_rows} == {"declarative"}
    assert len(stage2.rows) == 2 * len(eval_rows)  # as many stage-1 rows replayed
    assert not [r for s in cur.stages for r in s.rows if r.kind == "execution" and r.split == "eval"]
    held = cur.eval_sets["eval"]  # 32 held-out rows (at least the 24 the main job must show)
    assert len(held) == 32 and Counter(r.instruction_id for r in held) == {i: 4 for i in cur.eval_ids}
    trained = {(r.instruction_id, r.input) for s in cur.stages for r in s.rows if r.kind == "execution"}
    assert not {(r.instruction_id, r.input) for r in cur.eval_sets["train"]} & trained
