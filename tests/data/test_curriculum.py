"""Curricula: stage contents, no leakage of eval executions or held-out inputs, determinism, the data CLI."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import load_config

from pbbjax.config.run_config import build_run_config, domain_of
from pbbjax.config.schema import curriculum_config
from pbbjax.data.curriculum import CURRICULA, CurriculumConfig, build_curriculum, with_warmups
from pbbjax.data.tasks.base import get_domain

SMALL = dict(
    num_train_instructions=5,
    num_eval_instructions=3,
    decl_repeats=2,
    exec_per_instruction=3,
    eval_inputs=4,
    ad_n=(1, 3),
)
DOMAINS = ["arithmetic", "ciphers", "grammars"]


@pytest.fixture(scope="module")
def domains():
    return {name: get_domain(name) for name in DOMAINS}


def _training_executions(cur):
    return [r for s in cur.stages for r in s.rows if r.kind == "execution"]


def _held_out(cur):
    return {
        (r.instruction_id, r.input)
        for name in ("eval", "train")
        for r in cur.eval_sets[name]
        if json.loads(r.input) is not None
    }


@pytest.mark.parametrize("domain_name", DOMAINS)
@pytest.mark.parametrize("name", ["proactive", "retroactive", "mixture"])
def test_no_leakage(domains, domain_name, name):
    cur = build_curriculum(domains[domain_name], name, CurriculumConfig(**SMALL))
    eval_ids = set(cur.eval_ids)
    assert eval_ids and not eval_ids & set(cur.train_ids)
    train_exec = _training_executions(cur)
    assert train_exec, "every PBB curriculum trains on executions of train instructions"
    assert not [r for r in train_exec if r.instruction_id in eval_ids], (
        "an eval instruction's execution leaked"
    )
    assert not {(r.instruction_id, r.input) for r in train_exec} & _held_out(cur), "a held-out input leaked"
    decl_ids = {r.instruction_id for s in cur.stages for r in s.rows if r.kind == "declarative"}
    assert eval_ids <= decl_ids, "every eval instruction is seen as text"
    for s in cur.stages:
        for r in s.rows:
            assert r.stage == s.name
            if r.kind == "declarative":
                assert r.completion == cur.instructions[r.instruction_id].text


def test_stage_contents_per_curriculum(domains):
    d = domains["arithmetic"]
    pro = build_curriculum(d, "proactive", CurriculumConfig(**SMALL))
    s1, s2 = pro.stages
    kinds = lambda rows, split: sorted({(r.kind, r.split) for r in rows if r.split == split})  # noqa: E731
    assert kinds(s1.rows, "train") == [("declarative", "train"), ("execution", "train")]
    assert {(r.kind, r.split) for r in s2.rows} == {("declarative", "eval")}
    assert len(s1.rows) == 5 * 2 + 5 * 3 and len(s2.rows) == 3 * 2
    assert [r.kind for r in s1.rows] != sorted(r.kind for r in s1.rows), "stage 1 is interleaved"
    retro = build_curriculum(d, "retroactive", CurriculumConfig(**SMALL))
    assert {(r.kind, r.split) for r in retro.stages[0].rows} == {
        ("declarative", "train"),
        ("declarative", "eval"),
    }
    assert {(r.kind, r.split) for r in retro.stages[1].rows} == {("execution", "train")}
    mix = build_curriculum(d, "mixture", CurriculumConfig(**SMALL))
    assert len(mix.stages) == 1 and len(mix.stages[0].rows) == len(s1.rows) + len(s2.rows)
    only1 = build_curriculum(d, "proactive", CurriculumConfig(**SMALL, stages="1"))
    only2 = build_curriculum(d, "proactive", CurriculumConfig(**SMALL, stages="2"))
    assert [s.name for s in only1.stages] == ["stage1"] and [s.name for s in only2.stages] == ["stage2"]
    assert build_curriculum(d, "in_context", CurriculumConfig(**SMALL)).stages == []
    replay = build_curriculum(d, "proactive", CurriculumConfig(**SMALL, replay_fraction=0.5))
    assert len(replay.stages[1].rows) == 6 + 3 and sum(r.split == "train" for r in replay.stages[1].rows) == 3


def test_ad_and_demonstrations_are_the_intended_exceptions(domains):
    cur = build_curriculum(domains["arithmetic"], "ad", CurriculumConfig(**SMALL))
    assert [(s.name, s.start_from) for s in cur.stages] == [
        ("stage1", None),
        ("pbb", "stage1"),
        ("ad1", "stage1"),
        ("ad3", "stage1"),
    ]
    proactive = build_curriculum(domains["arithmetic"], "proactive", CurriculumConfig(**SMALL))
    assert cur.stages[1].rows == [dataclasses.replace(r, stage="pbb") for r in proactive.stages[1].rows]
    for stage, n in zip(cur.stages[2:], (1, 3), strict=True):
        assert {r.kind for r in stage.rows} == {"execution"}
        per = {i: sum(r.instruction_id == i for r in stage.rows) for i in cur.eval_ids}
        assert per == dict.fromkeys(cur.eval_ids, n)
        assert not {(r.instruction_id, r.input) for r in stage.rows} & _held_out(cur)
    ad1 = {(r.instruction_id, r.input) for r in cur.stages[2].rows}
    assert ad1 <= {(r.instruction_id, r.input) for r in cur.stages[3].rows}, "AD(1) is inside AD(3)"
    skewed = build_curriculum(
        domains["ciphers"],
        "proactive",
        CurriculumConfig(
            **{**SMALL, "eval_inputs": 25}, demos=40, skewed_demos=True, stage2_declarative=False
        ),
    )
    rows = skewed.stages[1].rows
    assert {r.kind for r in rows} == {"execution"} and len(rows) == 3 * 40
    shifts = [json.loads(r.meta)["shift"] for r in rows]
    assert sum(s in (3, 13) for s in shifts) > 0.7 * len(shifts)
    assert not {(r.instruction_id, r.input) for r in rows} & _held_out(skewed)
    assert sorted({json.loads(r.meta)["shift"] for r in skewed.eval_sets["eval"]}) == list(range(1, 26))


def test_variants_nl_augmentation_cot_in_context(domains):
    d = domains["arithmetic"]
    nl = build_curriculum(d, "proactive", CurriculumConfig(**SMALL, representation="nl"))
    for r in nl.stages[1].rows:
        assert r.completion == nl.instructions[r.instruction_id].text_nl
    plain = build_curriculum(d, "proactive", CurriculumConfig(**SMALL, augment=False, cot=True))
    assert {r.prompt.split(" ")[0] for r in plain.stages[1].rows} == {
        d.declarative_templates[0].split(" ")[0]
    }
    assert (
        len({r.prompt for r in build_curriculum(d, "proactive", CurriculumConfig(**SMALL)).stages[0].rows})
        > 5
    )
    ex = [r for r in plain.stages[0].rows if r.kind == "execution"]
    assert all("\n" in r.completion and r.completion.rsplit("\n", 1)[1].startswith("Answer: ") for r in ex)
    for r in plain.eval_sets["in_context"]:
        assert plain.instructions[r.instruction_id].text in r.prompt
    for r in plain.eval_sets["eval"]:
        assert plain.instructions[r.instruction_id].text not in r.prompt
    # Under nl with CoT, traces restate the English description and in-context prompts show it, not code.
    nl_cot = build_curriculum(d, "proactive", CurriculumConfig(**SMALL, representation="nl", cot=True))
    ex = [r for r in nl_cot.stages[0].rows if r.kind == "execution"]
    assert ex and all(" and returns the result: " in r.completion for r in ex)
    assert not any("return " in r.completion for r in ex)
    for r in nl_cot.eval_sets["in_context"]:
        ins = nl_cot.instructions[r.instruction_id]
        assert ins.text_nl in r.prompt and ins.text not in r.prompt


def test_compositions_of_eval_instructions(domains):
    cur = build_curriculum(domains["arithmetic"], "proactive", CurriculumConfig(**SMALL, num_compositions=2))
    rows = cur.eval_sets["compositions"]
    assert rows and {r.split for r in rows} == {"eval"}
    for r in rows:
        parts = cur.instructions[r.instruction_id].meta["composition"]
        assert set(parts) <= set(cur.eval_ids)


def test_config_errors(domains):
    with pytest.raises(ValueError, match="unknown curriculum 'nope'"):
        build_curriculum(domains["ciphers"], "nope", CurriculumConfig(**SMALL))
    with pytest.raises(ValueError, match="70 ciphers asked for; .* have 58"):
        build_curriculum(domains["ciphers"], "proactive", CurriculumConfig(num_train_instructions=60))
    c = load_config("configs/proactive.py")
    c.domain = "poetry"
    with pytest.raises(ValueError, match=r"unknown domain 'poetry' \(config field 'domain'\)"):
        domain_of(build_run_config(c))
    assert sorted(CURRICULA) == sorted(["proactive", "retroactive", "mixture", "ad", "in_context"])
    assert curriculum_config(load_config("configs/ad.py")).ad_n == (1, 2, 4, 8, 16)  # the demo preset's N


def _dump(tmp_path, name, *overrides, env):
    cmd = [
        sys.executable,
        "-m",
        "pbbjax.data",
        "--config",
        "configs/proactive.py",
        "--out",
        str(tmp_path / name),
        "--config.data.num_train_instructions=4",
        "--config.data.num_eval_instructions=2",
        "--config.data.decl_repeats=2",
        "--config.data.exec_per_instruction=2",
        "--config.data.eval_inputs=2",
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_data_cli_dumps_are_deterministic(tmp_path, smollm2_dir):
    import os

    env = {**os.environ, "PBBJAX_CACHE_DIR": str(smollm2_dir.parent)}
    out = _dump(tmp_path, "a", "--config.domain=ciphers", env=env)
    assert "stage1" in out and "eval_eval" in out and "tokens" in out
    _dump(tmp_path, "b", "--config.domain=ciphers", env=env)
    _dump(tmp_path, "c", "--config.domain=ciphers", "--config.seed=1", env=env)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.json*"))
    assert {"stage1.jsonl", "stage2.jsonl", "eval_eval.jsonl", "instructions.jsonl", "summary.json"} <= set(
        files
    )
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "stage1.jsonl").read_bytes() != (tmp_path / "c" / "stage1.jsonl").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "a" / "stage1.jsonl").read_text().splitlines()]
    assert {"stage", "kind", "instruction_id", "split", "prompt", "completion", "input", "output"} <= set(
        rows[0]
    )
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "a" / "stage1"))
    assert len(ds) == len(rows) and ds[0]["prompt"] == rows[0]["prompt"]


def test_more_inputs_than_an_instruction_has_is_an_error():
    """One-input x + c programs have 21 inputs (0..20): 4 held out leave 17 to train on, and asking for
    more names the instruction, the field and the sizes (once a quiet shortfall: AD(20) trained on 18)."""
    d = get_domain("arithmetic", num_inputs=(1, 1), length=(1, 1))
    too_many = r"instruction arithmetic/\w+ .*has 21 distinct inputs, fewer than data.eval_inputs=4 held out"
    with pytest.raises(ValueError, match=too_many + r" \+ data.exec_per_instruction=18"):
        build_curriculum(d, "proactive", CurriculumConfig(**{**SMALL, "exec_per_instruction": 18}))
    with pytest.raises(ValueError, match=too_many + r" \+ max\(data.ad_n\)=20"):
        build_curriculum(d, "ad", CurriculumConfig(**{**SMALL, "ad_n": (1, 20)}))
    with pytest.raises(ValueError, match=too_many + r" \+ data.demos=18"):
        build_curriculum(d, "proactive", CurriculumConfig(**SMALL, demos=18))
    every = build_curriculum(d, "proactive", CurriculumConfig(**{**SMALL, "exec_per_instruction": 17}))
    inputs = {i: set() for i in every.train_ids}
    for r in every.stages[0].rows:
        if r.kind == "execution":
            inputs[r.instruction_id].add(r.input)
    assert all(len(v) == 17 for v in inputs.values()), "every input but the held-out ones, each once"


PAPER_PRESET = "qwen3-14b"  # every model preset has the same data (asserted below)


@pytest.mark.parametrize("name", ["proactive", "retroactive", "mixture", "ad"])
def test_paper_presets_build_with_every_count(name):
    """The paper presets' curricula have exactly the rows their config asks for: no instruction runs short
    of inputs (one-input arithmetic programs need 20 held out + 100 for AD(100))."""
    from pbbjax.config.presets import MODELS
    from pbbjax.studies.catalog import STUDIES

    c = load_config(f"configs/{name}.py:{PAPER_PRESET}")
    for model in MODELS:
        other = load_config(f"configs/{name}.py:{model}")
        assert (other.data, other.domain_options) == (c.data, c.domain_options), model
    if name == "ad":
        c.data.ad_n = STUDIES["exchange-rate"].sizes["paper"]["data.ad_n"]
    data = c.data
    cur = build_curriculum(domain_of(build_run_config(c)), name, curriculum_config(c))
    n_train, n_eval = data.num_train_instructions, data.num_eval_instructions
    assert (len(cur.train_ids), len(cur.eval_ids)) == (n_train, n_eval)
    for set_name, ids in (("eval", cur.eval_ids), ("train", cur.train_ids)):
        rows = cur.eval_sets[set_name]
        assert len(rows) == len(ids) * data.eval_inputs
        assert all(sum(r.instruction_id == i for r in rows) == data.eval_inputs for i in ids)
    stages = {s.name: s for s in cur.stages}
    decl, execs = data.decl_repeats, data.exec_per_instruction
    expected = {
        "proactive": {"stage1": n_train * (decl + execs), "stage2": n_eval * decl},
        "retroactive": {"stage1": (n_train + n_eval) * decl, "stage2": n_train * execs},
        "mixture": {"mixture": n_train * (decl + execs) + n_eval * decl},
        "ad": {"stage1": n_train * (decl + execs), "pbb": n_eval * decl}
        | {f"ad{n}": n_eval * n for n in data.ad_n},
    }[name]
    assert {k: len(s.rows) for k, s in stages.items()} == expected
    executing = {"retroactive": "stage2", "mixture": "mixture"}.get(name, "stage1")  # the train programs'
    per = {}
    for r in stages[executing].rows:
        if r.kind == "execution" and r.split == "train":
            per.setdefault(r.instruction_id, set()).add(r.input)
    assert len(per) == n_train and {len(v) for v in per.values()} == {execs}
    for n in data.ad_n if name == "ad" else ():
        assert stages[f"ad{n}"].eval_executions() == n


def test_stage1_from_another_domain(domains):
    """data.stage1_domain (the paper's ciphers: LeetCode in stage 1): the train instructions and their
    executions come from that domain, the eval instructions from the config's; nothing of the train
    instructions is held out (no train evaluation set), and every eval guarantee holds."""
    cfg = CurriculumConfig(**SMALL, stage1_domain="arithmetic", demos=2)
    cur = build_curriculum(domains["ciphers"], "proactive", cfg, domains["arithmetic"])
    assert {i.split("/")[0] for i in cur.train_ids} == {"arithmetic"}
    assert {i.split("/")[0] for i in cur.eval_ids} == {"ciphers"}
    assert (cur.domain, cur.stage1_domain) == ("ciphers", "arithmetic")
    assert sorted(cur.eval_sets) == ["eval", "in_context"]
    stage1, stage2 = cur.stages
    assert {r.instruction_id for r in stage1.rows} == set(cur.train_ids)
    assert {r.instruction_id for r in stage2.rows} == set(cur.eval_ids)
    executions = [r for r in stage1.rows if r.kind == "execution"]
    assert len(executions) == len(cur.train_ids) * SMALL["exec_per_instruction"]
    assert (
        "Answer: " in executions[0].completion
        and "def " in stage1.rows[0].completion + stage1.rows[1].completion
    )
    held_out = {(r.instruction_id, r.input) for r in cur.eval_sets["eval"]}
    demos = {(r.instruction_id, r.input) for r in stage2.rows if r.kind == "execution"}
    assert len(demos) == 2 * len(cur.eval_ids) and not demos & held_out
    same = build_curriculum(domains["ciphers"], "proactive", cfg, domains["arithmetic"])
    assert same.stages == cur.stages and same.eval_sets == cur.eval_sets, "deterministic"
    for name in ("mixture", "ad"):
        build_curriculum(domains["ciphers"], name, cfg, domains["arithmetic"])
    with pytest.raises(ValueError, match="not 'retroactive'"):
        build_curriculum(domains["ciphers"], "retroactive", cfg, domains["arithmetic"])
    with pytest.raises(ValueError, match="needs its domain"):
        build_curriculum(domains["ciphers"], "proactive", cfg)


def test_with_warmups_puts_an_sft_stage_of_the_same_rows_before_each_named_stage(domains):
    cur = build_curriculum(domains["arithmetic"], "retroactive", CurriculumConfig(**SMALL))
    warm = with_warmups(cur, ("stage2",))
    assert [s.name for s in warm.stages] == ["stage1", "stage2-warmup", "stage2"]
    stage1, warmup, stage2 = warm.stages
    assert stage1 == cur.stages[0] and stage2.rows == cur.stages[1].rows
    assert [dataclasses.replace(r, stage="stage2") for r in warmup.rows] == stage2.rows
    assert {r.stage for r in warmup.rows} == {"stage2-warmup"}
    assert warmup.start_from is None and stage2.start_from is None  # warm-up after stage1, then stage2
    assert (stage1.warmup_for, warmup.warmup_for, stage2.warmup_for) == (None, "stage2", None)
    ad = build_curriculum(domains["arithmetic"], "ad", CurriculumConfig(**SMALL))
    branched = with_warmups(ad, ("ad3",))  # a branch's warm-up takes the branch point; the branch follows it
    names = [s.name for s in branched.stages]
    i = names.index("ad3-warmup")
    assert names[i + 1] == "ad3"
    assert branched.stages[i].start_from == "stage1" and branched.stages[i + 1].start_from is None
    assert with_warmups(cur, ()).stages == cur.stages
