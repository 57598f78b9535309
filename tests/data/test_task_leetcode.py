"""The leetcode domain: kzleet solutions screened in the sandbox, outputs checked by a plain ``exec`` in a
fresh subprocess, bad solutions isolated and reported, determinism (also across processes), the JSONL
loader and its errors, the offline dataset-id error, and ListNode/TreeNode conversion checked against the
test's own tree code."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from pbbjax.data.tasks import leetcode
from pbbjax.data.tasks.base import Example, get_domain
from pbbjax.data.tasks.leetcode import LeetcodeDomain
from pbbjax.data.tasks.leetcode_corpus import CorpusError, title_from_slug

# Runs each solution with plain exec in a fresh interpreter: its own ListNode, no harness, no sandbox.
_REFERENCE = r"""
import json, sys
class ListNode:
    def __init__(self, val=0, next=None):
        self.val, self.next = val, next
def to_list_node(values):
    head = None
    for v in reversed(values):
        head = ListNode(v, head)
    return head
out = []
for case in json.load(sys.stdin):
    namespace = {"ListNode": ListNode}
    exec(case["text"], namespace)
    args = [to_list_node(a) if "ListNode" in t else a for a, t in zip(case["args"], case["types"])]
    out.append(namespace[case["entry_point"]](*args))
print(json.dumps(out))
"""


def _write_corpus(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _row(name, code, entry_point, **extra):
    return dict(
        name=name,
        statement=f"The problem {name}.",
        code=textwrap.dedent(code),
        entry_point=entry_point,
        **extra,
    )


@pytest.fixture(scope="module")
def kz():
    """kzleet screened once for the module (fresh: no disk cache)."""
    domain = LeetcodeDomain(disk_cache=False)
    start = time.time()
    instructions = domain.all_instructions()
    print(f"\nkzleet: {len(instructions)} usable problems, screened in {time.time() - start:.1f} s")
    return domain, instructions


def test_kzleet_has_at_least_60_usable_problems_and_reports_the_rest(kz):
    domain, instructions = kz
    print(f"usable kzleet problems: {len(instructions)}; excluded: {len(domain.report())}")
    assert len(instructions) >= 60
    assert len({i.id for i in instructions}) == len({i.name for i in instructions}) == len(instructions)
    report = domain.report()
    assert "a design problem" in report["Solution_1865"]  # FindSumPairs is a class
    assert ":type lines do not cover" in report["Solution_440.findKthNumber"]
    assert "another solution of this problem" in report["Solution_2016_B.maximumDifference"]
    assert all(reason for reason in report.values())
    lhs = next(i for i in instructions if i.id == "leetcode/longest-harmonious-subsequence")
    assert lhs.name == "Longest Harmonious Subsequence"
    assert lhs.text.startswith("def findLHS(nums):")  # self dropped
    assert "# counts.keys()" in lhs.text  # comments kept
    assert (lhs.meta["number"], lhs.meta["difficulty"], lhs.meta["arg_types"]) == (594, "Easy", ["List[int]"])


def test_kzleet_outputs_match_plain_exec_in_a_fresh_process(kz):
    domain, instructions = kz
    cases, examples = [], []
    for instruction in instructions:
        inputs = domain.sample_inputs(instruction, 3, seed=0)
        assert inputs, instruction.id
        for example in domain.execute(instruction, inputs):
            examples.append(example)
            cases.append(
                dict(
                    text=instruction.text,
                    entry_point=instruction.meta["entry_point"],
                    args=example.input,
                    types=instruction.meta["arg_types"],
                )
            )
    env = dict(os.environ, PYTHONHASHSEED="0")  # set iteration order as in the sandbox
    proc = subprocess.run(
        [sys.executable, "-c", _REFERENCE],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    reference = json.loads(proc.stdout)
    mismatches = [
        (e.instruction_id, e.input, e.output, r)
        for e, r in zip(examples, reference, strict=True)
        if json.loads(e.output) != r
    ]
    print(f"{len(examples)} outputs of {len(instructions)} problems re-run with plain exec")
    assert not mismatches
    good_arrays = next(i for i in instructions if i.meta["entry_point"] == "countGoodArrays")
    assert good_arrays.text.startswith("MOD = 10 ** 9 + 7")  # the module-level helpers it calls are kept


def test_instructions_and_inputs_are_deterministic(kz):
    domain, instructions = kz
    first = domain.instructions(12, seed=3)
    assert first == domain.instructions(12, seed=3) and len(set(first)) == 12
    assert {i.id for i in first} != {i.id for i in domain.instructions(12, seed=4)}
    fresh = LeetcodeDomain(disk_cache=False)  # same screen (in-process cache), new instance
    assert fresh.instructions(12, seed=3) == first
    instruction = first[0]
    inputs = domain.sample_inputs(instruction, 8, seed=5)
    assert inputs == fresh.sample_inputs(instruction, 8, seed=5)
    assert len({json.dumps(a) for a in inputs}) == len(inputs)
    assert inputs != domain.sample_inputs(instruction, 8, seed=6)
    assert inputs != domain.sample_inputs(instruction, 8, seed=5, split="eval")
    assert len(domain.instructions(10_000, seed=0)) == len(instructions)


def test_inputs_are_the_same_in_another_process(tmp_path):
    corpus = _write_corpus(
        tmp_path / "c.jsonl", [_row("Pairs", "def f(a: List[List[int]], s: str):\n    return s\n", "f")]
    )
    script = (
        "import json, sys; from pbbjax.data.tasks.leetcode import LeetcodeDomain\n"
        "d = LeetcodeDomain(corpus=sys.argv[1], profiles=['values'], screen_samples=2, disk_cache=False)\n"
        "print(json.dumps(d.sample_inputs(d.instructions(1, seed=0)[0], 12, seed=7)))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="random")
    proc = subprocess.run(
        [sys.executable, "-c", script, corpus], capture_output=True, text=True, env=env, check=True
    )
    domain = LeetcodeDomain(corpus=corpus, profiles=["values"], screen_samples=2, disk_cache=False)
    assert json.loads(proc.stdout) == domain.sample_inputs(domain.instructions(1, seed=0)[0], 12, seed=7)


def test_render_input_and_score(kz):
    domain, instructions = kz
    instruction = next(i for i in instructions if i.meta["entry_point"] == "maxSubsequence")
    (example,) = domain.execute(instruction, [[[1, 3, 2], 2]])
    assert domain.render_input(example) == "nums = [1, 3, 2], k = 2"
    assert example.output == "[3, 2]"
    assert domain.score(instruction, example, "[3,2]") == 1.0
    assert domain.score(instruction, example, " [3, 2] ") == 1.0
    assert domain.score(instruction, example, "[2, 3]") == 0.0
    assert domain.score(instruction, example, None) == 0.0
    as_bool = Example(instruction.id, [], "true")
    assert domain.score(instruction, as_bool, "true") == 1.0
    assert domain.score(instruction, as_bool, "1") == 0.0  # not JSON-equal, though Python's 1 == True
    as_str = Example(instruction.id, [], '"abc"')
    assert domain.score(instruction, as_str, '"abc"') == 1.0
    assert domain.score(instruction, as_str, "abc") == 1.0  # a bare string is read as that string


def test_templates():
    domain = get_domain("leetcode")
    assert isinstance(domain, LeetcodeDomain)
    assert len(set(domain.declarative_templates)) == len(domain.declarative_templates) >= 20
    assert len(set(domain.execution_templates)) == len(domain.execution_templates) >= 10
    assert all("{name}" in t for t in domain.declarative_templates)
    assert all("{name}" in t and "{input}" in t for t in domain.execution_templates)
    canonical = "Write out your solution to the LeetCode problem 'Candy'."
    assert domain.declarative_templates[0].format(name="Candy") == canonical


def test_bad_solutions_are_isolated_excluded_and_reported(tmp_path):
    rows = [
        _row("Loops", "def f(n: int) -> int:\n    while True:\n        n += 1\n", "f"),
        _row("Raises", "def f(nums: list[int]) -> int:\n    return nums[100]\n", "f"),
        _row("Broken", "def f(n: int) -> int\n    return n\n", "f"),
        _row("Returns a set", "def f(n: int):\n    return {n}\n", "f"),
        _row("Loads badly", "import no_such_module_anywhere\ndef f(n: int) -> int:\n    return n\n", "f"),
        _row("Untyped", "def f(n):\n    return n\n", "f"),
        _row("Unsupported type", "def f(d: dict) -> int:\n    return len(d)\n", "f"),
        _row("No entry point", "def g(n: int) -> int:\n    return n\n", "f"),
        _row("Double It", "def double(n: int) -> int:\n    # twice n\n    return 2 * n\n", "double"),
    ]
    corpus = _write_corpus(tmp_path / "bad.jsonl", rows)
    domain = LeetcodeDomain(corpus=corpus, profiles=("values",), screen_samples=3, disk_cache=False)
    start = time.time()
    (good,) = domain.all_instructions()
    assert time.time() - start < 30  # the loop is killed by the time limit
    report = {key.rsplit("line ", 1)[1]: reason for key, reason in domain.report().items()}
    assert set(report) == {"1", "2", "3", "4", "5", "6", "7", "8"}
    assert "timeout" in report["1"]
    assert "IndexError" in report["2"]
    assert "SyntaxError" in report["3"]
    assert "not JSON serializable" in report["4"]
    assert "does not load" in report["5"] and "no_such_module_anywhere" in report["5"]
    assert "no type hints" in report["6"]
    assert "unsupported argument type 'dict'" in report["7"]
    assert "no function 'f'" in report["8"]
    assert good.id == "leetcode/double-it" and good.name == "Double It" and good.text == rows[-1]["code"]
    examples = domain.execute(good, domain.sample_inputs(good, 5, seed=0))
    assert [json.loads(e.output) for e in examples] == [2 * e.input[0] for e in examples]


def test_corpus_with_given_inputs_pointer_and_solution_class(tmp_path):
    rows = [
        _row(
            "Two Sum",
            """
            class Solution:
                def twoSum(self, nums, target):
                    seen = {}
                    for i, x in enumerate(nums):
                        if target - x in seen:
                            return [seen[target - x], i]
                        seen[x] = i
            """,
            "twoSum",
            inputs=[[[2, 7, 11, 15], 9], [[3, 2, 4], 6], [[3, 3], 6], [[1], "x"]],
        ),
    ]
    corpus = _write_corpus(tmp_path / "good.jsonl", rows)
    domain = LeetcodeDomain(corpus=corpus, pointer="statement", disk_cache=False)
    (instruction,) = domain.instructions(5, seed=0)
    assert instruction.name == "The problem Two Sum." and instruction.meta["entry_point"] == "twoSum"
    inputs = domain.sample_inputs(instruction, 10, seed=0)
    assert sorted(map(json.dumps, inputs)) == sorted(
        map(json.dumps, rows[0]["inputs"][:3])
    )  # the raising one dropped
    outputs = {json.dumps(e.input): e.output for e in domain.execute(instruction, inputs)}
    assert outputs[json.dumps([[2, 7, 11, 15], 9])] == "[0, 1]"
    assert domain.render_input(Example(instruction.id, [[3, 3], 6], "")) == "nums = [3, 3], target = 6"


def test_jsonl_errors_name_file_and_line(tmp_path):
    good = _row("Id", "def f(n: int) -> int:\n    return n\n", "f")
    cases = {
        "invalid JSON": [json.dumps(good), json.dumps(good), '{"name": "x", ', json.dumps(good)],
        "missing field 'code'": [json.dumps({k: v for k, v in good.items() if k != "code"})],
        "field 'entry_point' must be a string, got int": ["", json.dumps(dict(good, entry_point=3))],
        "field 'inputs' must be a list of argument lists": [json.dumps(dict(good, inputs=[1, 2]))],
        "expected a JSON object, got list": ["[1, 2]"],
    }
    lines = {"invalid JSON": 3, "missing field 'code'": 1, "field 'entry_point' must be a string, got int": 2}
    for problem, content in cases.items():
        path = tmp_path / "corpus.jsonl"
        path.write_text("\n".join(content) + "\n")
        with pytest.raises(CorpusError) as error:
            LeetcodeDomain(corpus=str(path), disk_cache=False).all_instructions()
        assert str(path) in str(error.value) and problem in str(error.value)
        assert f"line {lines.get(problem, 1)}:" in str(error.value)
    with pytest.raises(CorpusError, match="no such file"):
        LeetcodeDomain(corpus=str(tmp_path / "missing.jsonl")).all_instructions()


def test_dataset_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match="'someorg/leetcode-solutions'.*HF_HUB_OFFLINE is set"):
        LeetcodeDomain(corpus="someorg/leetcode-solutions").all_instructions()


def _level_order_to_inorder(values):
    """In-order values of a LeetCode level-order tree, computed from the list alone (no node objects)."""
    if not values:
        return []
    children, queue, i = {}, [0], 1  # position in ``values`` -> (left position, right position)
    for node in queue:
        kids = []
        for _ in range(2):
            kids.append(i if i < len(values) and values[i] is not None else None)
            if kids[-1] is not None:
                queue.append(i)
            i += 1
        children[node] = kids

    def walk(node):
        if node is None:
            return []
        left, right = children.get(node, (None, None))
        return walk(left) + [values[node]] + walk(right)

    return walk(0)


def test_list_node_and_tree_node_round_trip(tmp_path):
    rows = [
        _row(
            "Same List",
            "def same(head: Optional[ListNode]) -> Optional[ListNode]:\n    return head\n",
            "same",
        ),
        _row(
            "Same Tree",
            "def same(root: Optional[TreeNode]) -> Optional[TreeNode]:\n    return root\n",
            "same",
        ),
        _row(
            "Reverse List",
            """
            def reverse(head: Optional[ListNode]) -> Optional[ListNode]:
                previous = None
                while head:
                    head.next, previous, head = previous, head, head.next
                return previous
            """,
            "reverse",
        ),
        _row(
            "Inorder",
            """
            def inorder(root: Optional[TreeNode]) -> List[int]:
                return inorder(root.left) + [root.val] + inorder(root.right) if root else []
            """,
            "inorder",
        ),
        _row("Forest", "def roots(trees: List[TreeNode]) -> List[TreeNode]:\n    return trees\n", "roots"),
    ]
    corpus = _write_corpus(tmp_path / "nodes.jsonl", rows)
    domain = LeetcodeDomain(corpus=corpus, disk_cache=False)
    by_name = {i.name: i for i in domain.all_instructions()}
    assert set(by_name) == {r["name"] for r in rows}, domain.report()
    outputs = {}
    for name, instruction in by_name.items():
        examples = domain.execute(instruction, domain.sample_inputs(instruction, 20, seed=1))
        assert len(examples) >= 10
        outputs[name] = [(e.input[0], json.loads(e.output)) for e in examples]
    assert all(value == arg for arg, value in outputs["Same List"] + outputs["Same Tree"] + outputs["Forest"])
    assert all(value == arg[::-1] for arg, value in outputs["Reverse List"])
    assert all(value == _level_order_to_inorder(arg) for arg, value in outputs["Inorder"])
    trees = [arg for arg, _ in outputs["Same Tree"]]
    assert any(None in t for t in trees) and all(t[-1] is not None for t in trees)  # gaps, trimmed tail


def test_screens_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PBBJAX_CACHE_DIR", str(tmp_path / "cache"))
    corpus = _write_corpus(
        tmp_path / "c.jsonl", [_row("Inc", "def inc(n: int) -> int:\n    return n + 1\n", "inc")]
    )
    first = LeetcodeDomain(corpus=corpus).all_instructions()
    assert len(list((tmp_path / "cache" / "leetcode").glob("screen-*.json"))) == 1
    leetcode._SCREENS.clear()
    monkeypatch.setattr(
        leetcode, "_screen_one", lambda *a: pytest.fail("screened again despite the disk cache")
    )
    assert LeetcodeDomain(corpus=corpus).all_instructions() == first


def test_title_from_slug():
    assert (
        title_from_slug("find-the-k-th-character-in-string-game-ii")
        == "Find the K-th Character in String Game II"
    )
    assert title_from_slug("bitwise-ors-of-subarrays") == "Bitwise ORs of Subarrays"
    assert title_from_slug("two-sum") == "Two Sum"
