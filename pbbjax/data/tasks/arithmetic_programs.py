"""Random arithmetic programs: their AST, options, seeded generator, evaluator, Python source and parser.

A program is a Python function with invented name of 1-4 integer inputs (x, y, z, w), whose body is a few
statements ending in a return. Each statement does one operation: ``+ - * // %`` with a constant or another
variable, ``min``/``max`` with a constant, or an ``if`` on a comparison with a constant that updates a
variable (``if b > 7: b = b - 3``) or assigns one of two results (if/else). Constants are positive and every
divisor is a constant >= 2, so nothing divides by zero. The generator evaluates each candidate statement over
every input of the input range at once (numpy) and keeps it only if every value stays within the bound, it
changes its operand's value, and it is not constant; comparison thresholds and min/max bounds are drawn from
the values the variable actually takes, so both branches run and clamps clamp. A program must use all of its
inputs and its output must take at least ``min_distinct_outputs`` values over the input range.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import keyword
import random

import numpy as np

INPUT_NAMES = ("x", "y", "z", "w")
_TEMP_NAMES = tuple("bcdefghkmnpqrstuv")  # no "a" or "i": they read as English words in descriptions
OPERATIONS = ("+", "-", "*", "//", "%", "min", "max", "if")
_ARITH = ("+", "-", "*", "//", "%")
_BINOPS = {"+": np.add, "-": np.subtract, "*": np.multiply, "//": np.floor_divide, "%": np.remainder}
_CALLS = {"min": np.minimum, "max": np.maximum}
_COMPARISONS = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal}
_AST_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}
_AST_COMPARISONS = {ast.Gt: ">", ast.Lt: "<", ast.GtE: ">=", ast.LtE: "<="}
_STATEMENT_TRIES = 20  # redraws of one statement before the whole program is abandoned
_MAX_GRID = 1_000_000  # inputs checked exhaustively: (input range size) ** inputs must stay below this

# Names are onset + vowel + coda (+ ending): Blorp, Zibble, Snurg, Kraxon.
_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "j", "k", "kl", "kr", "m", "n")
_ONSETS += ("p", "pl", "pr", "qu", "s", "sk", "sl", "sn", "sp", "st", "sw", "t", "tr", "v", "w", "z", "zw")
_VOWELS = ("a", "e", "i", "o", "u", "oo")
_CODAS = ("b", "bb", "ck", "dd", "g", "gg", "m", "mp", "nk", "nt", "p", "rb", "rg", "rk", "rp", "sh", "x")
_ENDINGS = ("", "", "", "le", "et", "o", "a", "on", "ix", "us")


@dataclasses.dataclass(frozen=True)
class Var:
    name: str


@dataclasses.dataclass(frozen=True)
class Const:
    value: int


@dataclasses.dataclass(frozen=True)
class BinOp:
    op: str  # one of _ARITH
    left: Var | Const
    right: Var | Const


@dataclasses.dataclass(frozen=True)
class Call:
    fn: str  # "min" or "max"
    args: tuple[Var | Const, Var | Const]


@dataclasses.dataclass(frozen=True)
class Assign:
    target: str
    expr: BinOp | Call


@dataclasses.dataclass(frozen=True)
class If:
    var: str
    cmp: str  # one of _COMPARISONS
    threshold: int
    then: Assign
    orelse: Assign | None  # None: the variable keeps its value when the test fails


@dataclasses.dataclass(frozen=True)
class Return:
    expr: BinOp | Call


Statement = Assign | If | Return


@dataclasses.dataclass(frozen=True)
class Program:
    name: str  # the Python function name (lowercase)
    params: tuple[str, ...]
    body: tuple[Statement, ...]  # the last statement is the Return


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """What programs the generator draws. Ranges are inclusive (min, max); an int means (n, n)."""

    num_inputs: tuple[int, int] = (1, 2)  # inputs per program (at most 4: x, y, z, w)
    length: tuple[int, int] = (1, 5)  # statements per program, the return included (>= inputs - 1)
    input_range: tuple[int, int] = (0, 20)  # every input value; also where bounds are checked
    constant_range: tuple[int, int] = (1, 9)  # operands of + - * // % (multipliers and divisors >= 2)
    max_abs_value: int = 1000  # |value| at every step, for every input in input_range
    operations: tuple[str, ...] = OPERATIONS  # statement kinds to draw from, uniformly
    min_distinct_outputs: int = 3  # over all inputs in input_range; rejects near-constant programs
    reassign_prob: float = 0.3  # a statement overwrites the current variable instead of naming a new one
    variable_operand_prob: float = 0.2  # + - * take another variable (unused inputs first) as operand
    operand_first_prob: float = 0.25  # "-" puts the other operand first (10 - b)
    else_prob: float = 0.5  # an if has an else branch (always when it tests an input: inputs stay fixed)

    def __post_init__(self):
        for field in ("num_inputs", "length", "input_range", "constant_range"):
            value = getattr(self, field)
            pair = (value, value) if isinstance(value, int) else tuple(value)
            if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or pair[0] > pair[1]:
                raise ValueError(f"arithmetic option {field}: expected (min, max) integers, got {value!r}")
            object.__setattr__(self, field, pair)
        object.__setattr__(self, "operations", tuple(self.operations))
        self._check()

    def _check(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                raise ValueError(f"arithmetic option {field}: {what}, got {getattr(self, field)!r}")

        need(self.num_inputs[0] >= 1 and self.num_inputs[1] <= len(INPUT_NAMES), "num_inputs", "within 1..4")
        need(self.length[0] >= 1 and self.length[1] <= len(_TEMP_NAMES) + 1, "length", "within 1..18")
        need(self.length[1] >= self.num_inputs[1] - 1, "length", "max >= max inputs - 1 to use every input")
        low, high = self.constant_range
        need(low >= 1 and high >= 2, "constant_range", "min >= 1 and max >= 2")
        need(max(map(abs, self.input_range)) <= self.max_abs_value, "max_abs_value", "at least every |input|")
        need(self.min_distinct_outputs >= 1, "min_distinct_outputs", "at least 1")
        size = (self.input_range[1] - self.input_range[0] + 1) ** self.num_inputs[1]
        need(size <= _MAX_GRID, "input_range", f"at most {_MAX_GRID} input combinations")
        need(bool(self.operations) and set(self.operations) <= set(OPERATIONS), "operations", str(OPERATIONS))
        arith = [op for op in self.operations if op in _ARITH]
        need(set(self.operations) != {"if"}, "operations", "something besides 'if' (returns need it)")
        need(bool(arith) or "if" not in self.operations, "operations", "an arithmetic op for 'if' branches")
        combining = {"+", "-", "*"} & set(arith)
        need(self.num_inputs[1] == 1 or bool(combining), "operations", "+, - or * to combine 2+ inputs")
        for field in ("reassign_prob", "variable_operand_prob", "operand_first_prob", "else_prob"):
            need(0.0 <= getattr(self, field) <= 1.0, field, "a probability")

    def grid(self, num_inputs: int) -> list[np.ndarray]:
        """Every combination of input values, one flat array per input."""
        values = np.arange(self.input_range[0], self.input_range[1] + 1, dtype=np.int64)
        return [axis.ravel() for axis in np.meshgrid(*[values] * num_inputs, indexing="ij")]


# ---------------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Step:
    env: dict[str, np.ndarray]  # every variable's values before the statement
    value: np.ndarray  # the assigned (or returned) values
    cond: np.ndarray | None = None  # the if's test, per input


def _operand(o: Var | Const, env: dict) -> np.ndarray | np.int64:
    return env[o.name] if isinstance(o, Var) else np.int64(o.value)


def _eval_expr(expr: BinOp | Call, env: dict) -> np.ndarray:
    if isinstance(expr, BinOp):
        return _BINOPS[expr.op](_operand(expr.left, env), _operand(expr.right, env))
    return _CALLS[expr.fn](*(_operand(a, env) for a in expr.args))


def run_statement(stmt: Statement, env: dict) -> Step:
    if isinstance(stmt, If):
        cond = _COMPARISONS[stmt.cmp](env[stmt.var], stmt.threshold)
        otherwise = _eval_expr(stmt.orelse.expr, env) if stmt.orelse else env[stmt.var]
        return Step(env, np.where(cond, _eval_expr(stmt.then.expr, env), otherwise), cond)
    return Step(env, _eval_expr(stmt.expr, env))


def target(stmt: Statement) -> str | None:
    return stmt.target if isinstance(stmt, Assign) else stmt.then.target if isinstance(stmt, If) else None


def run(program: Program, args: list[np.ndarray]) -> list[Step]:
    """Every statement's values, each input a column of ``args`` (vectorised over many calls)."""
    env = dict(zip(program.params, (np.asarray(a, dtype=np.int64) for a in args), strict=True))
    steps = []
    for stmt in program.body:
        steps.append(run_statement(stmt, env))
        if not isinstance(stmt, Return):
            env = {**env, target(stmt): steps[-1].value}
    return steps


# ---------------------------------------------------------------------------------------------- generation


def generate_programs(spec: ProgramSpec, n: int, seed: int) -> list[Program]:
    """``n`` programs with distinct names and distinct bodies, deterministic in ``seed``."""
    rng = random.Random(seed)
    grids = {k: spec.grid(k) for k in range(spec.num_inputs[0], spec.num_inputs[1] + 1)}
    names: set[str] = set()
    seen: set[tuple] = set()
    programs: list[Program] = []
    for _ in range(200 * n + 1000):
        if len(programs) == n:
            break
        k = rng.randint(*spec.num_inputs)
        length = rng.randint(max(spec.length[0], k - 1), spec.length[1])
        program = _draw_program(rng, spec, k, length, grids[k])
        if program is None or (program.params, program.body) in seen:
            continue
        seen.add((program.params, program.body))
        name = _draw_name(rng, names)
        names.add(name)
        programs.append(dataclasses.replace(program, name=name))
    if len(programs) < n:
        raise RuntimeError(f"arithmetic: only {len(programs)} of {n} distinct programs fit {spec}")
    return programs


def _draw_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) + rng.choice(_ENDINGS)
        if name not in taken and not keyword.iskeyword(name) and not hasattr(builtins, name):
            return name


def _draw_program(rng, spec: ProgramSpec, k: int, length: int, grid: list[np.ndarray]) -> Program | None:
    params = INPUT_NAMES[:k]
    env = dict(zip(params, grid, strict=True))
    current = rng.choice(params)
    unused = [p for p in params if p != current]
    body = []
    for i in range(length):
        # each statement takes at most one unused input, so force one when no slack is left
        forced = len(unused) > length - 1 - i
        for _ in range(_STATEMENT_TRIES):
            stmt = _draw_statement(rng, spec, env, current, unused, forced, i == length - 1)
            if stmt is None:
                continue
            value = run_statement(stmt, env).value
            if (
                np.abs(value).max() <= spec.max_abs_value
                and value.min() != value.max()
                and not np.array_equal(value, env[current])
            ):
                break
        else:
            return None
        body.append(stmt)
        unused = [p for p in unused if p not in _variables(stmt)]
        if not isinstance(stmt, Return):
            current = target(stmt)
            env = {**env, current: value}
    if unused or len(np.unique(value)) < spec.min_distinct_outputs:
        return None
    return Program(name="", params=params, body=tuple(body))


def _draw_statement(rng, spec, env, current, unused, forced, last) -> Statement | None:
    if forced:
        kind = rng.choice([op for op in ("+", "-", "*") if op in spec.operations])
    else:
        kind = rng.choice([op for op in spec.operations if not (last and op == "if")])
    if kind == "if":
        return _draw_if(rng, spec, env, current)
    # a variable operand is an unused input while there is one, so that every input gets used
    candidates = unused or [v for v in env if v != current]
    expr = _draw_expr(rng, spec, kind, env[current], current, candidates, forced)
    if expr is None:
        return None
    return Return(expr) if last else Assign(_draw_target(rng, spec, env, current), expr)


def _draw_target(rng, spec, env, current) -> str:
    if current not in INPUT_NAMES and rng.random() < spec.reassign_prob:
        return current
    return next(name for name in _TEMP_NAMES if name not in env)


def _draw_expr(rng, spec, op, values, current, candidates, force_variable) -> BinOp | Call | None:
    low, high = spec.constant_range
    if op in ("min", "max"):  # a bound strictly inside the variable's values, so some clamp and some don't
        bound = _draw_inside(rng, values, 1, 1)
        return None if bound is None else Call(op, (Var(current), Const(bound)))
    if op in ("*", "//", "%"):
        low = max(low, 2)
    operand: Var | Const = Const(rng.randint(low, high))
    if op in ("+", "-", "*") and candidates and (force_variable or rng.random() < spec.variable_operand_prob):
        operand = Var(rng.choice(candidates))
    if op == "-" and rng.random() < spec.operand_first_prob:
        return BinOp(op, operand, Var(current))
    return BinOp(op, Var(current), operand)


def _draw_if(rng, spec, env, current) -> If | None:
    values = env[current]
    cmp = rng.choice(tuple(_COMPARISONS))
    # thresholds for which the test holds for some inputs and fails for others
    threshold = _draw_inside(rng, values, *{">": (0, 1), ">=": (1, 0), "<": (1, 0), "<=": (0, 1)}[cmp])
    arith = [op for op in spec.operations if op in _ARITH]
    if threshold is None:
        return None
    then = _draw_expr(rng, spec, rng.choice(arith), values, current, [], False)
    if current in INPUT_NAMES or rng.random() < spec.else_prob:
        orelse = _draw_expr(rng, spec, rng.choice(arith), values, current, [], False)
        if orelse == then:
            return None
        name = _draw_target(rng, spec, env, current)
        return If(current, cmp, threshold, Assign(name, then), Assign(name, orelse))
    return If(current, cmp, threshold, Assign(current, then), None)


def _draw_inside(rng, values: np.ndarray, above_min: int, below_max: int) -> int | None:
    """A value the variable takes, clipped into [min + above_min, max - below_max]; None if that is empty."""
    low, high = int(values.min()) + above_min, int(values.max()) - below_max
    if low > high:
        return None
    return min(max(int(values[rng.randrange(len(values))]), low), high)


def _variables(stmt: Statement) -> set[str]:
    if isinstance(stmt, If):
        return {stmt.var} | _variables(stmt.then) | (_variables(stmt.orelse) if stmt.orelse else set())
    operands = (stmt.expr.left, stmt.expr.right) if isinstance(stmt.expr, BinOp) else stmt.expr.args
    return {o.name for o in operands if isinstance(o, Var)}


# ---------------------------------------------------------------------------------------------- source


def render_operand(o: Var | Const, values: dict[str, int] | None = None, parenthesise: bool = False) -> str:
    """A variable's name (or its value from ``values``) or a constant; negatives in parentheses if asked."""
    if isinstance(o, Var) and values is None:
        return o.name
    v = values[o.name] if isinstance(o, Var) else o.value
    return f"({v})" if parenthesise and v < 0 else str(v)


def render_expr(expr: BinOp | Call, values: dict[str, int] | None = None) -> str:
    """The expression as Python, or with each variable replaced by its value in ``values``."""
    if isinstance(expr, BinOp):
        left, right = (render_operand(o, values, parenthesise=True) for o in (expr.left, expr.right))
        return f"{left} {expr.op} {right}"
    return f"{expr.fn}({', '.join(render_operand(a, values) for a in expr.args)})"


def render_source(program: Program) -> str:
    lines = [f"def {program.name}({', '.join(program.params)}):"]
    for stmt in program.body:
        if isinstance(stmt, Return):
            lines.append(f"    return {render_expr(stmt.expr)}")
        elif isinstance(stmt, Assign):
            lines.append(f"    {stmt.target} = {render_expr(stmt.expr)}")
        else:
            lines += [f"    if {stmt.var} {stmt.cmp} {stmt.threshold}:", f"        {_assign(stmt.then)}"]
            if stmt.orelse:
                lines += ["    else:", f"        {_assign(stmt.orelse)}"]
    return "\n".join(lines)


def _assign(stmt: Assign) -> str:
    return f"{stmt.target} = {render_expr(stmt.expr)}"


def parse_chain(source: str, entry_point: str) -> list[Program]:
    """The programs that ``entry_point`` applies, innermost first: one, or several for a composition
    (a function whose body is ``return f(g(x))`` over functions defined in the same source)."""
    functions = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    if entry_point not in functions:
        raise ValueError(f"arithmetic: no function {entry_point!r} in the instruction's source")
    return _chain(functions, entry_point)


def _chain(functions: dict[str, ast.FunctionDef], name: str) -> list[Program]:
    match functions[name].body:
        case [ast.Return(value=ast.Call(func=ast.Name(id=callee)) as call)] if callee in functions:
            callees = []
            while isinstance(call, ast.Call):
                callees.append(call.func.id)
                call = call.args[0]
            return [p for callee in reversed(callees) for p in _chain(functions, callee)]
    fn = functions[name]
    return [Program(fn.name, tuple(a.arg for a in fn.args.args), tuple(_parse_statement(s) for s in fn.body))]


def _parse_statement(node: ast.stmt) -> Statement:
    match node:
        case ast.Return(value=value):
            return Return(_parse_expr(value))
        case ast.Assign(targets=[ast.Name(id=name)], value=value):
            return Assign(name, _parse_expr(value))
        case ast.If(test=ast.Compare(left=ast.Name(id=var), ops=[op], comparators=[limit]), body=[then]):
            threshold = _parse_operand(limit).value
            orelse = _parse_statement(node.orelse[0]) if node.orelse else None
            return If(var, _AST_COMPARISONS[type(op)], threshold, _parse_statement(then), orelse)
    raise ValueError(f"arithmetic: unsupported statement {ast.unparse(node)!r}")


def _parse_expr(node: ast.expr) -> BinOp | Call:
    match node:
        case ast.BinOp(left=left, op=op, right=right) if type(op) in _AST_BINOPS:
            return BinOp(_AST_BINOPS[type(op)], _parse_operand(left), _parse_operand(right))
        case ast.Call(func=ast.Name(id="min" | "max" as fn), args=[a, b]):
            return Call(fn, (_parse_operand(a), _parse_operand(b)))
    raise ValueError(f"arithmetic: unsupported expression {ast.unparse(node)!r}")


def _parse_operand(node: ast.expr) -> Var | Const:
    match node:
        case ast.Name(id=name):
            return Var(name)
        case ast.Constant(value=int(v)):
            return Const(v)
        case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=int(v))):
            return Const(-v)
    raise ValueError(f"arithmetic: unsupported operand {ast.unparse(node)!r}")
