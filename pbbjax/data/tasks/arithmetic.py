"""The arithmetic domain: random named integer functions (Blorp, Zibble) and their compositions.

Instructions come from ``arithmetic_programs`` (generator, AST, evaluator). This module renders each program
three ways from its AST: the Python source (``Instruction.text``, which the sandbox really runs for ground
truth), an equivalent English description (``Instruction.text_nl``), and a chain-of-thought trace per input
from the step evaluator, one line per statement with its concrete values::

    blorp(5):
    x = 5
    b = x * 3 = 5 * 3 = 15
    if b > 7: 15 > 7 is True, so b = b - 3 = 15 - 3 = 12
    return b - 4 = 12 - 4 = 8

A composition ``Blorp(Zibble(x))`` is f(g(x)) for two single-input programs; its trace is Zibble's trace
then Blorp's, each under its call header, so it is exactly the two traces a model learnt separately.
"""

from __future__ import annotations

import json
import random

import numpy as np

from pbbjax.core.seeds import derive_seed
from pbbjax.data.tasks.arithmetic_programs import (
    INPUT_NAMES,
    Assign,
    BinOp,
    Call,
    If,
    Program,
    ProgramSpec,
    Return,
    Step,
    generate_programs,
    parse_chain,
    render_expr,
    render_operand,
    render_source,
    run,
    target,
)
from pbbjax.data.tasks.base import Example, Instruction, encode_output, register
from pbbjax.data.tasks.sandbox import run_calls

# Phrased to fit the code and the natural-language rendering alike (the code-vs-NL ablation).
DECLARATIVE_TEMPLATES = (
    "What is the definition of the function {name}?",
    "How is {name} defined?",
    "Write out the function {name} in full.",
    "Show me how {name} is defined.",
    "Spell out exactly what {name} computes.",
    "Recite the definition of {name}.",
    "I need the complete definition of {name}. Can you write it down?",
    "Describe {name} precisely, one statement at a time.",
    "Give me the body of the function called {name}.",
    "Reproduce {name} exactly as it was defined.",
    "What steps does {name} carry out on its input?",
    "Can you remind me how {name} works?",
    "Explain precisely how {name} turns its inputs into an output.",
    "Please write down {name}.",
    "What is {name}? Give its full definition.",
    "Lay out the computation that {name} performs.",
    "From memory, write the function named {name}.",
    "Which operations make up {name}, and in what order?",
    "Define {name}.",
    "I forgot how {name} goes. What is its definition?",
    "Walk me through the definition of {name}, line by line.",
    "Tell me what {name} does to the numbers it is given.",
)

EXECUTION_TEMPLATES = (
    "What does {name} return when {input}?",
    "Compute {name} for {input}.",
    "What is the output of {name} given {input}?",
    "If {input}, what is the result of {name}?",
    "Run {name} with {input}. What do you get?",
    "Evaluate {name} on the input {input}.",
    "Suppose {input}. What value does {name} produce?",
    "Apply {name} to {input} and tell me the result.",
    "With {input}, what would {name} give back?",
    "Calculate the value that {name} returns for {input}.",
    "Give me the result of calling {name} with {input}.",
    "What number comes out of {name} when {input}?",
)

_COMPARISON_WORDS = {">": "is greater than", "<": "is less than", ">=": "is at least", "<=": "is at most"}
_HOW_MANY = {2: "two numbers", 3: "three numbers", 4: "four numbers"}


@register("arithmetic")
class ArithmeticDomain:
    """Random arithmetic programs. Every option but ``sandbox_timeout_s`` (the time limit of one call in
    the sandbox) is the ``ProgramSpec`` field of that name, documented there with its default."""

    name = "arithmetic"
    declarative_templates = DECLARATIVE_TEMPLATES
    execution_templates = EXECUTION_TEMPLATES

    def __init__(
        self,
        *,
        num_inputs: tuple[int, int] = ProgramSpec.num_inputs,
        length: tuple[int, int] = ProgramSpec.length,
        input_range: tuple[int, int] = ProgramSpec.input_range,
        constant_range: tuple[int, int] = ProgramSpec.constant_range,
        max_abs_value: int = ProgramSpec.max_abs_value,
        operations: tuple[str, ...] = ProgramSpec.operations,
        min_distinct_outputs: int = ProgramSpec.min_distinct_outputs,
        reassign_prob: float = ProgramSpec.reassign_prob,
        variable_operand_prob: float = ProgramSpec.variable_operand_prob,
        operand_first_prob: float = ProgramSpec.operand_first_prob,
        else_prob: float = ProgramSpec.else_prob,
        sandbox_timeout_s: float = 2.0,
    ):
        self.spec = ProgramSpec(
            num_inputs=num_inputs,
            length=length,
            input_range=input_range,
            constant_range=constant_range,
            max_abs_value=max_abs_value,
            operations=operations,
            min_distinct_outputs=min_distinct_outputs,
            reassign_prob=reassign_prob,
            variable_operand_prob=variable_operand_prob,
            operand_first_prob=operand_first_prob,
            else_prob=else_prob,
        )
        self.sandbox_timeout_s = sandbox_timeout_s

    def instructions(self, n: int, seed: int) -> list[Instruction]:
        return [_instruction(p) for p in generate_programs(self.spec, n, seed)]

    def input_space(self, instruction: Instruction) -> int:
        """How many distinct argument lists the instruction takes: every input ranges over ``input_range``."""
        low, high = self.spec.input_range
        return (high - low + 1) ** instruction.meta["num_inputs"]

    def sample_inputs(self, instruction: Instruction, n: int, seed: int, split: str = "train") -> list[list]:
        """Up to ``n`` distinct argument lists from the input range (train and eval draw alike, but with
        different seeds, so they rarely collide)."""
        k = instruction.meta["num_inputs"]
        low, high = self.spec.input_range
        width = high - low + 1
        rng = random.Random(derive_seed(seed, instruction.id, split, encoding="path"))
        picks = rng.sample(range(width**k), min(n, width**k))
        return [[low + index // width**j % width for j in range(k)] for index in picks]

    def execute(self, instruction: Instruction, inputs: list[list]) -> list[Example]:
        return self.execute_many([instruction], [inputs])[0]

    def execute_many(self, instructions: list[Instruction], inputs: list[list[list]]) -> list[list[Example]]:
        """``execute`` for many instructions in one sandbox process (one process per call is slow)."""
        for instruction, batch in zip(instructions, inputs, strict=True):
            k = instruction.meta["num_inputs"]
            if any(not isinstance(args, list) or len(args) != k for args in batch):
                raise ValueError(f"arithmetic: {instruction.id} takes {k} input(s) per call, got {batch}")
        calls = [[i, *args] for i, batch in enumerate(inputs) for args in batch]
        source = _batch_source(instructions)
        results = iter(run_calls(source, "_call", calls, timeout_s=self.sandbox_timeout_s))
        return [
            _examples(instruction, batch, [next(results) for _ in batch])
            for instruction, batch in zip(instructions, inputs, strict=True)
        ]

    def score(self, instruction: Instruction, example: Example, answer: str | None) -> float:
        """1.0 iff ``answer`` is the expected integer, as JSON ("8" scores, "8.0" and "eight" don't)."""
        if answer is None:
            return 0.0
        expected = json.loads(example.output)
        try:
            got = json.loads(answer)
        except json.JSONDecodeError:
            return float(answer.strip() == example.output.strip())
        return float(type(got) is type(expected) and got == expected)

    def recall(self, instruction: Instruction, text: str, nl: bool = False) -> float:
        """1.0 iff a generated CoT trace states every statement of the program symbolically, in order
        (``return x - 14``, ``b = x * 3``, ``if b > 7``; with ``nl``, as the natural-language trace says
        them: ``subtracts 14 from x and returns the result:``), whatever values it then computes: whether the
        model retrieved the program it learnt, apart from its arithmetic. For a composition, every program
        of the chain."""
        heads = []
        for program in parse_chain(instruction.text, instruction.meta["entry_point"]):
            known = set(program.params)
            for stmt in program.body:
                heads.append(_head_nl(stmt, known) if nl else _head(stmt))
                known.add(target(stmt))
        at = 0
        for head in heads:
            found = text.find(head, at)
            if found < 0:
                return 0.0
            at = found + len(head)
        return 1.0

    def render_input(self, example: Example) -> str:
        return ", ".join(f"{name} = {value}" for name, value in zip(INPUT_NAMES, example.input, strict=False))

    def compose(self, f: Instruction, g: Instruction) -> Instruction:
        """f(g(x)) for single-input f and g, named "F(G(x))"; its source holds both functions."""
        for part in (f, g):
            if part.meta.get("num_inputs") != 1:
                raise ValueError(f"arithmetic: compose needs single-input programs; {part.id} is not")
        outer, inner = f.meta["entry_point"], g.meta["entry_point"]
        entry = f"{outer}_{inner}"
        head, _, tail = _call_form(f).rpartition("x")
        name = head + _call_form(g) + tail
        functions = dict.fromkeys(g.text.split("\n\n\n") + f.text.split("\n\n\n"))  # ordered, without repeats
        text = "\n\n\n".join([*functions, f"def {entry}(x):\n    return {outer}({inner}(x))"])
        overview = f"{name} computes {_call_form(g)} first, then uses that result as the x of {f.name}."
        return Instruction(
            id=f"arithmetic/{entry}",
            name=name,
            text=text,
            text_nl=f"{overview} {g.text_nl} {f.text_nl}",
            meta={
                "composition": [f.id, g.id],
                "length": f.meta["length"] + g.meta["length"],
                "num_inputs": 1,
                "entry_point": entry,
            },
        )

    def compositions(self, instructions: list[Instruction], n: int, seed: int) -> list[Instruction]:
        """``n`` compositions f(g(x)) of distinct random ordered pairs f != g of the single-input
        instructions, keeping only those whose every value stays within ``max_abs_value`` on all inputs."""
        singles = [i for i in instructions if i.meta.get("num_inputs") == 1]
        m = len(singles)
        grid = self.spec.grid(1)
        chosen: list[Instruction] = []
        for index in random.Random(seed).sample(range(m * (m - 1)), m * (m - 1)):
            if len(chosen) == n:
                break
            outer, inner = divmod(index, m - 1)
            composed = self.compose(singles[outer], singles[inner + (inner >= outer)])
            if _bounded(composed, grid[0], self.spec.max_abs_value):
                chosen.append(composed)
        if len(chosen) < n:
            raise ValueError(f"arithmetic: only {len(chosen)} of {n} bounded compositions of {m} programs")
        return chosen


def _bounded(instruction: Instruction, inputs: np.ndarray, bound: int) -> bool:
    """Whether every value the instruction computes stays within ``bound`` for all ``inputs``."""
    for program in parse_chain(instruction.text, instruction.meta["entry_point"]):
        values = [step.value for step in run(program, [inputs])]
        if max(int(np.abs(v).max()) for v in values) > bound:
            return False
        inputs = values[-1]
    return True


def _instruction(program: Program) -> Instruction:
    pointer = program.name.capitalize()
    return Instruction(
        id=f"arithmetic/{program.name}",
        name=pointer,
        text=render_source(program),
        text_nl=describe(program, pointer),
        meta={"length": len(program.body), "num_inputs": len(program.params), "entry_point": program.name},
    )


def _call_form(instruction: Instruction) -> str:
    return instruction.name if "composition" in instruction.meta else f"{instruction.name}(x)"


def _batch_source(instructions: list[Instruction]) -> str:
    """One module that loads every instruction's source in its own namespace (their names may clash)."""
    sources = [[i.text, i.meta["entry_point"]] for i in instructions]
    return (
        f"_SOURCES = {sources!r}\n_FUNCTIONS = []\nfor _text, _entry in _SOURCES:\n    _namespace = {{}}\n"
        "    exec(compile(_text, _entry, 'exec'), _namespace)\n"
        "    _FUNCTIONS.append(_namespace[_entry])\n\n\n"
        "def _call(index, *args):\n    return _FUNCTIONS[index](*args)\n"
    )


def _examples(instruction: Instruction, inputs: list[list], results: list) -> list[Example]:
    """Examples from the sandbox's results, with traces from the step evaluator, which must agree."""
    if not inputs:
        return []
    args = [np.array(column, dtype=np.int64) for column in zip(*inputs, strict=True)]
    traces: list[list[str]] = [[] for _ in inputs]
    traces_nl: list[list[str]] = [[] for _ in inputs]
    for program in parse_chain(instruction.text, instruction.meta["entry_point"]):
        steps = run(program, args)
        for i, (lines, lines_nl) in enumerate(zip(traces, traces_nl, strict=True)):
            lines += trace_lines(program, steps, i)
            lines_nl += trace_lines_nl(program, steps, i)
        args = [steps[-1].value]
    examples = []
    for i, (arguments, result) in enumerate(zip(inputs, results, strict=True)):
        if not result.ok or result.value != int(args[0][i]):
            raise RuntimeError(
                f"arithmetic: {instruction.id}{tuple(arguments)}: sandbox gave "
                f"{result.error or result.value}, the step evaluator {int(args[0][i])}"
            )
        output = encode_output(result.value)
        cot, cot_nl = "\n".join(traces[i]), "\n".join(traces_nl[i])
        examples.append(Example(instruction.id, list(arguments), output, cot, cot_nl=cot_nl))
    return examples


def trace_lines(program: Program, steps: list[Step], i: int) -> list[str]:
    """The chain-of-thought lines of call ``i``: the call, its inputs, then each statement's values."""
    args = [int(steps[0].env[p][i]) for p in program.params]
    lines = [f"{program.name}({', '.join(map(str, args))}):"]
    lines += [f"{p} = {a}" for p, a in zip(program.params, args, strict=True)]
    for stmt, step in zip(program.body, steps, strict=True):
        values = {name: int(column[i]) for name, column in step.env.items()}
        result = int(step.value[i])
        if isinstance(stmt, If):
            taken = bool(step.cond[i])
            comparison = f"{stmt.cmp} {stmt.threshold}"
            test = f"{_head(stmt)} {values[stmt.var]} {comparison}"
            branch = stmt.then if taken else stmt.orelse
            if branch is None:
                lines.append(f"{test} is {taken}, so {stmt.var} stays {result}")
                continue
            lines.append(f"{test} is {taken}, so {branch.target} = {_worked(branch.expr, values, result)}")
        else:
            lines.append(f"{_head(stmt)}{render_expr(stmt.expr, values)} = {result}")
    return lines


def trace_lines_nl(program: Program, steps: list[Step], i: int) -> list[str]:
    """``trace_lines`` in the words of ``describe`` (the instruction's natural-language form): each statement
    as its sentence says it, then its values, so that a trace restates the English the model read, as the
    code trace restates the code (``representation=nl``)."""
    lines = trace_lines(program, steps, i)[: 1 + len(program.params)]  # the call and its inputs
    known = set(program.params)
    for position, (stmt, step) in enumerate(zip(program.body, steps, strict=True)):
        values = {name: int(column[i]) for name, column in step.env.items()}
        result = int(step.value[i])
        lead = "It" if position == 0 else "Finally, it" if isinstance(stmt, Return) else "Then it"
        if isinstance(stmt, If):
            taken = bool(step.cond[i])
            test = f"{lead} {_head_nl(stmt)} {values[stmt.var]} {stmt.cmp} {stmt.threshold} is {taken}"
            branch = stmt.then if taken else stmt.orelse
            if branch is None:
                lines.append(f"{test}, so it leaves {stmt.var} unchanged: {result}")
            else:
                worked = f"{render_expr(branch.expr, values)} = {result}"
                lines.append(f"{test}, so it {_head_nl(branch, known)} {worked}")
        else:
            lines.append(f"{lead} {_head_nl(stmt, known)} {render_expr(stmt.expr, values)} = {result}")
        known.add(target(stmt))
    return lines


def _head_nl(stmt: Assign | If | Return, known: frozenset | set = frozenset()) -> str:
    """A statement as its natural-language trace line states it, before any value (``recall`` under nl)."""
    if isinstance(stmt, If):
        return f"checks whether {stmt.var} {_COMPARISON_WORDS[stmt.cmp]} {stmt.threshold}:"
    if isinstance(stmt, Return):
        return f"{_action(stmt.expr)} and returns the result:"
    return f"{_assignment(stmt, known)}:"


def _head(stmt: Assign | If | Return) -> str:
    """A statement as its trace line starts, before any value: what ``recall`` looks for."""
    if isinstance(stmt, If):
        return f"if {stmt.var} {stmt.cmp} {stmt.threshold}:"
    head = "return" if isinstance(stmt, Return) else f"{stmt.target} ="
    return f"{head} {render_expr(stmt.expr)} = "


def _worked(expr: BinOp | Call, values: dict[str, int], result: int) -> str:
    return f"{render_expr(expr)} = {render_expr(expr, values)} = {result}"


def describe(program: Program, pointer: str) -> str:
    """The program in English, statement by statement, naming every variable and constant."""
    params = program.params
    if len(params) == 1:
        sentences = [f"{pointer} takes a number {params[0]}."]
    else:
        sentences = [f"{pointer} takes {_HOW_MANY[len(params)]}, {', '.join(params[:-1])} and {params[-1]}."]
    known = set(params)
    for position, stmt in enumerate(program.body):
        first = position == 0
        if isinstance(stmt, Return):
            lead = "It" if first else "Finally, it"
            sentences.append(f"{lead} {_action(stmt.expr)} and returns the result.")
        elif isinstance(stmt, Assign):
            sentences.append(f"{'It' if first else 'Then it'} {_assignment(stmt, known)}.")
        else:
            test = f"{stmt.var} {_COMPARISON_WORDS[stmt.cmp]} {stmt.threshold}"
            otherwise = _assignment(stmt.orelse, known) if stmt.orelse else f"leaves {stmt.var} unchanged"
            lead = "If" if first else "Then, if"
            sentences.append(f"{lead} {test}, it {_assignment(stmt.then, known)}; otherwise it {otherwise}.")
        known.add(target(stmt))
    return " ".join(sentences)


def _assignment(stmt: Assign, known: set[str]) -> str:
    naming = "stores the result back in" if stmt.target in known else "calls the result"
    return f"{_action(stmt.expr)} and {naming} {stmt.target}"


def _action(expr: BinOp | Call) -> str:
    if isinstance(expr, Call):
        a, b = map(render_operand, expr.args)
        return f"takes the {'smaller' if expr.fn == 'min' else 'larger'} of {a} and {b}"
    left, right = render_operand(expr.left), render_operand(expr.right)
    return {
        "+": f"adds {right} to {left}",
        "-": f"subtracts {right} from {left}",
        "*": f"multiplies {left} by {right}",
        "//": f"divides {left} by {right}, rounding down,",
        "%": f"takes the remainder of {left} divided by {right}",
    }[expr.op]
