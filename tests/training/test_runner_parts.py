"""The runner's parts, each alone: the plan of stages (``training.stages``) and the results store
(``training.results``). The checkpoints part (``training.resume``) is exercised by the resume tests of
``test_train.py`` and ``test_workdir.py``, which kill and restart whole runs."""

import json

from pbbjax.data.curriculum import Stage
from pbbjax.data.formatting import Row
from pbbjax.training.results import ResultsStore
from pbbjax.training.stages import StagePlan


def _row(kind: str, split: str, program: str) -> Row:
    return Row(stage="s", kind=kind, instruction_id=program, split=split, prompt="p", completion="c")


def _ad_plan(rl=()) -> StagePlan:
    """The AD curriculum's shape: stage 1, then two branches that both start from its end."""
    s1 = Stage("stage1", [_row("execution", "train", "f"), _row("declarative", "train", "f")])
    ad1 = Stage("ad1", [_row("execution", "eval", "g")], start_from="stage1")
    ad2 = Stage("ad2", [_row("execution", "eval", "g"), _row("execution", "eval", "h")], start_from="stage1")
    return StagePlan((s1, ad1, ad2), (5, 3, 4), frozenset(rl))


def test_stage_plan_offsets_starts_and_ends_read_back():
    plan = _ad_plan()
    assert plan.offsets == [0, 5, 8, 12]
    assert [plan.start_of(i) for i in range(3)] == [None, "stage1", "stage1"]
    assert plan.ends_read_back(kl_reference=False) == {"stage1"}


def test_stage_plan_with_grpo_keeps_the_reference_stage_only_with_a_kl_term():
    s1, s2 = (
        Stage("stage1", [_row("execution", "train", "f")]),
        Stage("stage2", [_row("execution", "eval", "g")]),
    )
    plan = StagePlan((s1, s2), (2, 2), frozenset({"stage2"}))
    assert [plan.is_rl(i) for i in range(2)] == [False, True]
    assert plan.start_of(1) == "stage1"  # the previous stage, without start_from
    assert plan.ends_read_back(kl_reference=False) == set()
    assert plan.ends_read_back(kl_reference=True) == {"stage1"}
    assert [s["trainer"] for s in plan.summary()] == ["sft", "grpo"]


def test_stage_plan_summary_says_what_each_stage_trained_on():
    summary = _ad_plan().summary()
    assert [(s["name"], s["steps"], s["start_from"]) for s in summary] == [
        ("stage1", 5, None),
        ("ad1", 3, "stage1"),
        ("ad2", 4, "stage1"),
    ]
    assert (
        summary[0]["trained_on"] == "code of 1 train program (1 rows), executions of 1 train program (1 rows)"
    )
    assert summary[2]["trained_on"] == "executions of 2 eval programs (2 rows)"


def test_results_store_stamps_replaces_and_reads_back(tmp_path):
    pushed = []

    def push(*names):
        pushed.append(names)

    path = tmp_path / "results.json"
    store = ResultsStore(path, {"curriculum": "ad", "seed": 3}, primary=True, push=push)
    store.stages = [{"name": "stage1"}]
    assert store.records == [] and not store.evaluated("stage1")
    store.add([{"set": "eval", "accuracy": 0.1}], "stage1", 5, final=False)  # a mid-stage evaluation
    assert not store.evaluated("stage1")
    out = store.add([{"set": "eval", "accuracy": 0.5}], "stage1", 5, final=True)  # the same step again
    assert out == [{"after": "stage1", "step": 5, "final": True, "set": "eval", "accuracy": 0.5}]
    assert store.evaluated("stage1")
    data = json.loads(path.read_text())
    assert list(data) == ["curriculum", "seed", "stages", "records"]  # the header first, in its order
    assert data["records"] == out and data["stages"] == [{"name": "stage1"}]
    assert pushed == [("results.json", "metrics.jsonl")] * 2 and not path.with_suffix(".tmp").exists()
    again = ResultsStore(path, {"curriculum": "ad", "seed": 3}, primary=True, push=push)
    assert again.records == out and again.evaluated("stage1")  # a resumed run skips that evaluation


def test_results_store_writes_on_process_0_only(tmp_path):
    path = tmp_path / "results.json"
    store = ResultsStore(path, {}, primary=False, push=lambda *names: None)
    store.add([{"set": "eval"}], "start", 0, final=True)
    assert store.evaluated("start") and not path.exists()
