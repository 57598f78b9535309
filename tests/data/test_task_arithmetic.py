"""The arithmetic domain, checked against Python itself.

The reference is an independent child process that ``exec``s each program's source: plain, for outputs, and
rewritten with the ``ast`` module so that every top-level statement records its value (and every ``if`` its
test), for the chain-of-thought lines and the bounds. Nothing here runs the domain's own evaluator.
"""

import ast
import dataclasses
import inspect
import itertools
import json
import keyword
import os
import re
import string
import subprocess
import sys

import pytest

from pbbjax.data.tasks.arithmetic import ArithmeticDomain
from pbbjax.data.tasks.arithmetic_programs import ProgramSpec
from pbbjax.data.tasks.base import Instruction, extract_answer, get_domain

SETTINGS = [  # (options, seed, number of programs): 300 programs in all
    ({}, 0, 120),
    ({"num_inputs": 1, "length": (4, 8)}, 1, 80),
    (
        dict(num_inputs=(2, 3), length=(2, 4), input_range=(-5, 5), constant_range=(1, 5), max_abs_value=200),
        2,
        60,
    ),
    ({"operations": ("+", "*", "if"), "length": (1, 3)}, 3, 40),
]
INPUTS_PER_PROGRAM = 4

_CHILD = r"""
import json, sys
out = []
for job in json.load(sys.stdin):
    namespace = {}
    exec(job["source"], namespace)
    fn = namespace[job["entry"]]
    out.append([fn(*args) for args in job["calls"]])
json.dump(out, sys.stdout)
"""


def run_python(jobs: list[dict]) -> list[list]:
    """Each job's ``entry(*args)`` for its ``calls``, by exec of its ``source`` in a fresh Python process."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps(jobs), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def job(instruction: Instruction, calls: list[list]) -> dict:
    return dict(source=instruction.text, entry=instruction.meta["entry_point"], calls=calls)


def instrument(source: str, entry: str) -> str:
    """``source`` with ``entry`` returning (result, values, tests): the value of the variable each top-level
    statement assigns (the returned value last) and, in order, the truth of each ``if`` test."""
    tree = ast.parse(source)
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == entry)
    body = ast.parse("_values = []\n_tests = []").body
    for stmt in fn.body:
        if isinstance(stmt, ast.Return):
            body += ast.parse(f"_result = {ast.unparse(stmt.value)}\n_values.append(_result)").body
            body += ast.parse("return _result, _values, _tests").body
            continue
        if isinstance(stmt, ast.If):
            body += ast.parse(f"_tests.append(bool({ast.unparse(stmt.test)}))").body
            assigned = stmt.body[0].targets[0].id
        else:
            assigned = stmt.targets[0].id
        body += [stmt, *ast.parse(f"_values.append({assigned})").body]
    fn.body = body
    return ast.unparse(ast.fix_missing_locations(tree))


@pytest.fixture(scope="module")
def generated():
    """(domain, options, instruction, examples) for every generated program, executed through the domain."""
    out = []
    for options, seed, count in SETTINGS:
        domain = ArithmeticDomain(**options)
        instructions = domain.instructions(count, seed)
        inputs = [domain.sample_inputs(inst, INPUTS_PER_PROGRAM, seed) for inst in instructions]
        for inst, examples in zip(instructions, domain.execute_many(instructions, inputs), strict=True):
            out.append((domain, options, inst, examples))
    return out


@pytest.fixture(scope="module")
def reference(generated):
    """Per program: plain outputs on its sampled inputs, instrumented runs on them, and on the whole grid."""
    jobs = []
    for domain, _, inst, examples in generated:
        entry, calls = inst.meta["entry_point"], [e.input for e in examples]
        low, high = domain.spec.input_range
        grid = [list(v) for v in itertools.product(range(low, high + 1), repeat=inst.meta["num_inputs"])]
        traced = instrument(inst.text, entry)
        jobs += [
            job(inst, calls),
            dict(source=traced, entry=entry, calls=calls),
            dict(source=traced, entry=entry, calls=grid),
        ]
    results = run_python(jobs)
    return [tuple(results[i : i + 3]) for i in range(0, len(results), 3)]


def test_every_program_runs_and_execute_matches_python(generated, reference):
    assert len(generated) == sum(count for _, _, count in SETTINGS) >= 300
    for (_, _, inst, examples), (outputs, _, _) in zip(generated, reference, strict=True):
        assert len(examples) == INPUTS_PER_PROGRAM
        assert [json.loads(e.output) for e in examples] == outputs, inst.text
        assert all(isinstance(v, int) for v in outputs)


def test_cot_values_equal_step_by_step_python(generated, reference):
    pairs = 0
    for (_, _, inst, examples), (_, traced, _) in zip(generated, reference, strict=True):
        fn = ast.parse(inst.text).body[0]
        statements, params = fn.body, [a.arg for a in fn.args.args]
        for example, (result, values, tests) in zip(examples, traced, strict=True):
            lines = example.cot.split("\n")
            args = example.input
            assert lines[0] == f"{inst.meta['entry_point']}({', '.join(map(str, args))}):"
            assert lines[1 : 1 + len(args)] == [f"{p} = {v}" for p, v in zip(params, args, strict=True)]
            steps = lines[1 + len(args) :]
            assert len(steps) == len(statements) == len(values)
            tests = iter(tests)
            for line, stmt, value in zip(steps, statements, values, strict=True):
                assert int(re.search(r"(-?\d+)$", line).group(1)) == value, (inst.text, example.cot)
                if isinstance(stmt, ast.If):
                    taken = next(tests)
                    assert line.startswith(f"if {ast.unparse(stmt.test)}: ") and f" is {taken}, so " in line
                    branch = stmt.body if taken else stmt.orelse
                    assert not branch or f"so {ast.unparse(branch[0])} = " in line, line
                else:
                    assert line.startswith(f"{ast.unparse(stmt)} = "), line
                if " stays " not in line:  # the middle is the statement with its operands' values
                    substituted = line.rsplit(" = ", 2)[1]
                    assert re.fullmatch(r"(min|max|[-\d\s(),+*/%])+", substituted), line
                    assert eval(substituted, {"__builtins__": {}, "min": min, "max": max}) == value, line
            assert result == values[-1] == json.loads(example.output)
            pairs += 1
    assert pairs >= 1000


def test_natural_language_traces_follow_the_description(generated, reference):
    """``cot_nl`` (the trace under ``representation=nl``): the same values as the code trace, each statement
    stated as the English description states it and never as code, so neither condition gets a copy of
    its own text that the other lacks; ``recall`` finds each trace's program in its own form only."""
    domain = get_domain("arithmetic")
    for (_, _, inst, examples), (_, traced, _) in zip(generated, reference, strict=True):
        code_lines = {line.strip() for line in inst.text.splitlines()[1:]}
        for example, (_, values, _) in zip(examples, traced, strict=True):
            lines, header = example.cot_nl.split("\n"), 1 + len(example.input)
            assert lines[:header] == example.cot.split("\n")[:header]  # the call and its inputs
            steps = lines[header:]
            assert [int(re.search(r"(-?\d+)$", line).group(1)) for line in steps] == values, example.cot_nl
            stated = [line.split(": ")[0] + "." for line in steps if "checks whether" not in line]
            assert all(sentence in inst.text_nl for sentence in stated), example.cot_nl
            assert not code_lines & {line.split(" = ")[0].strip() for line in steps}, example.cot_nl
            assert domain.recall(inst, example.cot_nl, nl=True) == 1.0 == domain.recall(inst, example.cot)
            assert domain.recall(inst, example.cot_nl) == 0.0 == domain.recall(inst, example.cot, nl=True)


def test_descriptions_mention_every_input_and_constant(generated):
    for _, _, inst, _ in generated:
        fn = ast.parse(inst.text).body[0]
        assert inst.text_nl and inst.text_nl.startswith(f"{inst.name} takes ")
        for arg in fn.args.args:
            assert re.search(rf"\b{arg.arg}\b", inst.text_nl), (arg.arg, inst.text_nl)
        negated = {id(node.operand) for node in ast.walk(fn) if isinstance(node, ast.UnaryOp)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Constant):
                value = -node.value if id(node) in negated else node.value
                assert re.search(rf"(?<![\d-]){value}(?!\d)", inst.text_nl), (value, inst.text_nl)


PHRASES = {  # each operation of the source, and the words that describe it
    ast.Add: "adds ",
    ast.Sub: "subtracts ",
    ast.Mult: "multiplies ",
    ast.FloorDiv: ", rounding down,",
    ast.Mod: "the remainder of ",
    ast.Gt: " is greater than ",
    ast.GtE: " is at least ",
    ast.Lt: " is less than ",
    ast.LtE: " is at most ",
    "min": "the smaller of ",
    "max": "the larger of ",
}


def test_descriptions_describe_each_statement_and_operation(generated):
    for _, _, inst, _ in generated:
        fn = ast.parse(inst.text).body[0]
        sentences = re.findall(r"\.(?: |$)", inst.text_nl)
        assert len(sentences) == 1 + len(fn.body), inst.text_nl  # one sentence per statement
        found = {key: 0 for key in PHRASES}
        for node in ast.walk(fn):
            if isinstance(node, ast.BinOp):
                found[type(node.op)] += 1
            elif isinstance(node, ast.Compare):
                found[type(node.ops[0])] += 1
            elif isinstance(node, ast.Call):
                found[node.func.id] += 1
        assert found == {key: inst.text_nl.count(phrase) for key, phrase in PHRASES.items()}, inst.text_nl


def test_every_value_stays_bounded_for_every_input(generated, reference):
    for (domain, _, inst, _), (_, _, grid_runs) in zip(generated, reference, strict=True):
        low, high = domain.spec.input_range
        assert len(grid_runs) == (high - low + 1) ** inst.meta["num_inputs"]
        assert max(abs(v) for _, values, _ in grid_runs for v in values) <= domain.spec.max_abs_value
        assert len({result for result, _, _ in grid_runs}) >= domain.spec.min_distinct_outputs


def test_programs_follow_their_options(generated):
    for domain, options, inst, _ in generated:
        spec = domain.spec
        fn = ast.parse(inst.text).body[0]
        assert spec.length[0] <= len(fn.body) == inst.meta["length"] <= spec.length[1]
        assert spec.num_inputs[0] <= len(fn.args.args) == inst.meta["num_inputs"] <= spec.num_inputs[1]
        used = {node.id for node in ast.walk(fn) if isinstance(node, ast.Name)}
        assert {a.arg for a in fn.args.args} <= used, inst.text  # every input is used
        for node in ast.walk(fn):
            if isinstance(node, ast.BinOp):
                constant = node.right if isinstance(node.right, ast.Constant) else node.left
                if isinstance(constant, ast.Constant):
                    assert spec.constant_range[0] <= constant.value <= spec.constant_range[1]
                if isinstance(node.op, (ast.FloorDiv, ast.Mod)):
                    assert isinstance(node.right, ast.Constant) and node.right.value >= 2  # no division by 0
        if "operations" in options:  # + * and if only
            assert not any(isinstance(node, ast.Call) for node in ast.walk(fn)), inst.text
            ops = {type(node.op) for node in ast.walk(fn) if isinstance(node, ast.BinOp)}
            assert ops <= {ast.Add, ast.Mult}, inst.text


def test_names_ids_and_meta(generated):
    for options, _, count in SETTINGS:
        instructions = [inst for _, o, inst, _ in generated if o is options]
        names = [inst.name for inst in instructions]
        assert len(set(names)) == len({inst.id for inst in instructions}) == count
        assert len({inst.text.split("\n", 1)[1] for inst in instructions}) == count  # distinct bodies too
    for _, _, inst, _ in generated:
        entry = inst.meta["entry_point"]
        assert re.fullmatch(r"[a-z]{3,}", entry) and not keyword.iskeyword(entry)
        assert inst.name == entry.capitalize() and inst.id == f"arithmetic/{entry}"
        assert ast.parse(inst.text).body[0].name == entry


def test_same_seed_same_programs_other_seed_different():
    domain = ArithmeticDomain()
    first, again, other = domain.instructions(40, 5), domain.instructions(40, 5), domain.instructions(40, 6)
    assert first == again
    assert [(i.text_nl, i.meta) for i in first] == [(i.text_nl, i.meta) for i in again]
    assert {i.id for i in first} != {i.id for i in other}
    assert {i.text for i in first} != {i.text for i in other}


def test_same_seed_same_programs_in_another_process():
    """Nothing depends on Python's per-process hash salt."""
    script = (
        "import json; from pbbjax.data.tasks.arithmetic import ArithmeticDomain; d = ArithmeticDomain()\n"
        "print(json.dumps([[i.text, i.text_nl, d.sample_inputs(i, 5, 1)] for i in d.instructions(30, 5)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    domain = ArithmeticDomain()
    here = [[i.text, i.text_nl, domain.sample_inputs(i, 5, 1)] for i in domain.instructions(30, 5)]
    assert json.loads(proc.stdout) == here


def test_sample_inputs_distinct_in_range_and_seeded():
    domain = ArithmeticDomain(num_inputs=2, input_range=(-3, 3))
    inst = domain.instructions(1, 0)[0]
    inputs = domain.sample_inputs(inst, 30, 1)
    assert len({tuple(v) for v in inputs}) == 30
    assert all(len(v) == 2 and all(-3 <= a <= 3 and isinstance(a, int) for a in v) for v in inputs)
    assert domain.sample_inputs(inst, 30, 1) == inputs
    assert domain.sample_inputs(inst, 30, 2) != inputs
    assert domain.sample_inputs(inst, 30, 1, split="eval") != inputs
    assert sorted(map(tuple, domain.sample_inputs(inst, 1000, 1))) == list(
        itertools.product(range(-3, 4), repeat=2)
    )


def test_compositions_equal_f_of_g_by_real_execution():
    domain = ArithmeticDomain(num_inputs=1)
    programs = domain.instructions(30, 11)
    by_id = {p.id: p for p in programs}
    composed = domain.compositions(programs, 15, seed=3)
    assert composed == domain.compositions(programs, 15, seed=3)
    assert composed != domain.compositions(programs, 15, seed=4)
    pairs = [tuple(c.meta["composition"]) for c in composed]
    assert len(set(pairs)) == 15 and all(f != g for f, g in pairs)
    assert len({c.id for c in composed}) == len({c.name for c in composed}) == 15
    parts = [(by_id[f], by_id[g]) for f, g in pairs]
    for c, (f, g) in zip(composed, parts, strict=True):
        assert c.name == f"{f.name}({g.name}(x))"
        assert c.meta["length"] == f.meta["length"] + g.meta["length"] and c.meta["num_inputs"] == 1
    inputs = [domain.sample_inputs(c, 5, 0) for c in composed]
    executed = domain.execute_many(composed, inputs)
    # the reference: g's own source on the inputs, then f's own source on g's outputs
    inner = run_python([job(g, xs) for (_, g), xs in zip(parts, inputs, strict=True)])
    middles = [[[v] for v in values] for values in inner]
    outer = run_python([job(f, m) for (f, _), m in zip(parts, middles, strict=True)])
    for examples, expected in zip(executed, outer, strict=True):
        assert [json.loads(e.output) for e in examples] == expected
    # the trace is g's trace, then f's
    g_runs = domain.execute_many([g for _, g in parts], inputs)
    f_runs = domain.execute_many([f for f, _ in parts], middles)
    for examples, g_examples, f_examples in zip(executed, g_runs, f_runs, strict=True):
        for example, g_example, f_example in zip(examples, g_examples, f_examples, strict=True):
            assert example.cot == g_example.cot + "\n" + f_example.cot


def test_compose_rejects_multi_input_programs_and_nests():
    domain = ArithmeticDomain(num_inputs=(1, 2))
    programs = domain.instructions(20, 0)
    one = [p for p in programs if p.meta["num_inputs"] == 1]
    two = next(p for p in programs if p.meta["num_inputs"] == 2)
    with pytest.raises(ValueError, match="single-input"):
        domain.compose(one[0], two)
    nested = domain.compose(domain.compose(one[0], one[1]), one[2])
    assert nested.name == f"{one[0].name}({one[1].name}({one[2].name}(x)))"
    (example,) = domain.execute(nested, [[4]])
    expected = run_python([job(nested, [[4]])])[0][0]
    assert json.loads(example.output) == expected
    calls = [line.split("(")[0] for line in example.cot.split("\n") if line.endswith("):")]
    assert calls == [one[2].meta["entry_point"], one[1].meta["entry_point"], one[0].meta["entry_point"]]


def test_execute_many_keeps_clashing_names_apart():
    meta = {"length": 1, "num_inputs": 1, "entry_point": "blorp"}
    plus = Instruction("arithmetic/blorp", "Blorp", "def blorp(x):\n    return x + 1", meta=meta)
    times = dataclasses.replace(plus, text="def blorp(x):\n    return x * 2")
    domain = ArithmeticDomain()
    one, two = domain.execute_many([plus, times], [[[3], [5]], [[3]]])
    assert [e.output for e in one] == ["4", "6"] and [e.output for e in two] == ["6"]
    assert one[0].cot == "blorp(3):\nx = 3\nreturn x + 1 = 3 + 1 = 4"


def test_templates():
    domain = get_domain("arithmetic")
    declarative, execution = domain.declarative_templates, domain.execution_templates
    assert len(set(declarative)) == len(declarative) >= 20
    assert len(set(execution)) == len(execution) >= 10
    fields = lambda t: {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
    assert all(fields(t) == {"name"} for t in declarative)
    assert all(fields(t) == {"name", "input"} for t in execution)
    prompt = execution[0].format(name="Blorp", input="x = 5")
    assert "Blorp" in prompt and "x = 5" in prompt


def test_render_input_extract_answer_and_score():
    domain = ArithmeticDomain(num_inputs=2)
    inst = domain.instructions(1, 0)[0]
    (example,) = domain.execute(inst, [[5, 2]])
    assert domain.render_input(example) == "x = 5, y = 2"
    right = f"{example.cot}\nAnswer: {example.output}"
    assert domain.score(inst, example, extract_answer(right)) == 1.0
    assert domain.score(inst, example, f" {example.output} ") == 1.0
    wrong = str(json.loads(example.output) + 1)
    assert domain.score(inst, example, extract_answer(f"Answer: {wrong}")) == 0.0
    for bad in (None, "", "eight", f"{example.output}.0", "true", f"[{example.output}]"):
        assert domain.score(inst, example, bad) == 0.0, bad
    assert extract_answer("no marker here") is None


def test_options_are_checked():
    # configs pass lists (ml_collections) and read the options from the signature
    domain = get_domain("arithmetic", length=[2, 3], operations=["+", "min"])
    assert domain.spec.length == (2, 3) and domain.spec.operations == ("+", "min")
    options = inspect.signature(ArithmeticDomain).parameters
    assert {f.name for f in dataclasses.fields(ProgramSpec)} | {"sandbox_timeout_s"} == set(options)
    assert all(options[f.name].default == f.default for f in dataclasses.fields(ProgramSpec))
    with pytest.raises(TypeError, match="lenght"):
        ArithmeticDomain(lenght=3)
    with pytest.raises(ValueError, match="input_range"):
        ArithmeticDomain(input_range=(5, 1))
    with pytest.raises(ValueError, match="operations"):
        ArithmeticDomain(operations=("if",))
    with pytest.raises(ValueError, match="length"):
        ArithmeticDomain(num_inputs=4, length=(1, 2))
    domain = ArithmeticDomain(num_inputs=1)
    with pytest.raises(ValueError, match="takes 1 input"):
        domain.execute(domain.instructions(1, 0)[0], [[1, 2]])


def test_recall_reads_the_statements_a_trace_states_not_its_values():
    domain = ArithmeticDomain()
    blorp = Instruction(
        "arithmetic/blorp",
        "Blorp",
        "def blorp(x):\n    b = x * 3\n    return b - 4",
        meta={"entry_point": "blorp"},
    )
    wrong_sums = "blorp(5):\nx = 5\nb = x * 3 = 5 * 3 = 16\nreturn b - 4 = 16 - 4 = 11\nAnswer: 11"
    assert domain.recall(blorp, wrong_sums) == 1.0  # the program retrieved, the arithmetic wrong
    assert domain.recall(blorp, wrong_sums.replace("x * 3 =", "x * 4 =")) == 0.0  # another constant
    assert domain.recall(blorp, "blorp(5):\nreturn b - 4 = 11\nb = x * 3 = 15") == 0.0  # out of order
    assert domain.recall(blorp, "Answer: 11") == 0.0
    # every generated program (and composition) recalls its own reference traces
    programs = ArithmeticDomain(num_inputs=1, length=(1, 5)).instructions(40, 5)
    composed = domain.compositions(programs, 10, seed=0)
    for ins in [*programs, *composed]:
        for example in domain.execute(ins, domain.sample_inputs(ins, 3, 0)):
            assert domain.recall(ins, example.cot) == 1.0, (ins.text, example.cot)
    trace = domain.execute(composed[0], domain.sample_inputs(composed[0], 1, 0))[0].cot
    outer = composed[0].meta["composition"][0].split("/")[1]
    assert domain.recall(composed[0], trace[: trace.index(f"\n{outer}(")]) == 0.0  # g's trace alone
