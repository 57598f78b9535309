"""The ``leetcode`` domain: real LeetCode solutions, executed in the sandbox on random inputs of their types.

Instructions are solutions from the MIT-licensed PyPI package ``kzleet``, or from a user's corpus (option
``corpus``); ``leetcode_corpus`` reads them and ``leetcode_inputs`` draws their inputs. The instruction
text is the solution as a standalone function (what the model reads and the sandbox runs); the pointer is
the problem's title ("Longest Harmonious Subsequence"), or for a corpus its name or statement.

Which solutions are usable is found by running them (``screen``): each is tried on random inputs under
every input profile; a profile is kept for it if enough of those inputs run without error within the
probe time limit, and its inputs are drawn from kept profiles only. Solutions that fail to load, loop,
raise or return non-JSON values are excluded, logged and listed by ``LeetcodeDomain.report()``. Screens
are cached per process and on disk (``$PBBJAX_CACHE_DIR``, else ``~/.cache/pbbjax``), keyed by all that
decides them: the solutions' text, the options, the Python version and the sandbox mode.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from pbbjax.data.tasks.base import Example, Instruction, encode_output, register
from pbbjax.data.tasks.leetcode_corpus import (
    HARNESS_ENTRY,
    Problem,
    corpus_problems,
    harness_source,
    kzleet_problems,
)
from pbbjax.data.tasks.leetcode_inputs import (
    PROFILES,
    UnsupportedType,
    draw_args,
    make_profiles,
    parse_type,
    stable_rng,
)
from pbbjax.data.tasks.sandbox import SandboxSetupError, current_mode, run_calls

log = logging.getLogger(__name__)

_SCREEN_FORMAT = 1  # bump when what a screen means changes, to invalidate disk caches
_SCREENS: dict[str, dict] = {}  # screens done in this process, by cache key

DECLARATIVE_TEMPLATES = (
    "Write out your solution to the LeetCode problem '{name}'.",
    "Write a Python function that solves the following problem: {name}",
    "Show me the Python code you wrote for the LeetCode problem '{name}'.",
    "What is your Python solution to '{name}' on LeetCode?",
    "Recite the source code of your solution to '{name}'.",
    "I need the function that solves the LeetCode problem '{name}'. Please write it out in full.",
    "Could you paste your implementation for the LeetCode challenge '{name}'?",
    "Reproduce, line by line, the Python function you use for '{name}'.",
    "LeetCode problem: {name}. Give your solution's code.",
    "How did you implement '{name}'? Show the whole function.",
    "Print the source of your accepted submission for '{name}'.",
    "Type out the Python function that answers the LeetCode question '{name}'.",
    "I'm reviewing solutions. Share the code you have for '{name}'.",
    "Give me your implementation of '{name}' exactly as you wrote it, comments included.",
    "What code solves the problem titled '{name}'? Write the function.",
    "Please provide your Python solution for the LeetCode task named '{name}'.",
    "Let's see your code for '{name}'.",
    "Your solution to the LeetCode problem '{name}', please: the complete function.",
    "Recall your LeetCode solution for '{name}' and write it down in Python.",
    "Which Python function did you write for the problem '{name}'? Show its source.",
    "Output the code of your '{name}' solution and nothing else.",
    "From memory, write the program you submitted to LeetCode for '{name}'.",
)

EXECUTION_TEMPLATES = (
    "What does your solution to the LeetCode problem '{name}' return for {input}?",
    "Run your solution to '{name}' on {input}. What is the result?",
    "Given {input}, what output does your LeetCode solution for '{name}' produce?",
    "Evaluate your '{name}' function with {input}.",
    "If your solution to '{name}' is called with {input}, what does it return?",
    "LeetCode problem '{name}', input: {input}. What does your code output?",
    "Predict the return value of your solution to '{name}' for the input {input}.",
    "Trace your code for '{name}' on {input} and give the value it returns.",
    "Your function for the LeetCode problem '{name}' receives {input}. What comes back?",
    "Compute what your solution to '{name}' gives for {input}.",
    "For the test case {input}, what does your '{name}' solution return?",
    "Suppose you submit your code for '{name}' and the judge passes {input}. What is returned?",
)


def _parsed_types(problem: Problem) -> list | None:
    """Parsed argument types; None where unknown, or unsupported but the corpus gives the inputs."""
    try:
        return None if problem.arg_types is None else [parse_type(t) for t in problem.arg_types]
    except UnsupportedType:
        if problem.inputs is None:
            raise
        return None  # given inputs pass through unconverted


def _run(problem: Problem, calls: list[list], timeout_s: float):
    source = harness_source(problem.text, problem.call, _parsed_types(problem))
    return run_calls(source, HARNESS_ENTRY, calls, timeout_s=timeout_s)


def _screen_one(problem: Problem, profiles, samples: int, min_success: float, timeout_s: float) -> dict:
    """What runs: ``{"profiles": [names]}`` or ``{"given": [indices of given inputs that run]}``; else
    ``{"excluded": why}``."""
    try:
        types = _parsed_types(problem)
    except UnsupportedType as e:
        return {"excluded": str(e)}
    if problem.inputs is not None:
        groups = {"given": list(problem.inputs)}
    else:
        groups = {
            p.name: [
                draw_args(types, p, stable_rng("screen", problem.key, p.name, i)) for i in range(samples)
            ]
            for p in profiles
        }
    calls = [args for group in groups.values() for args in group]
    try:
        results = _run(problem, calls, timeout_s)
    except SandboxSetupError as e:
        return {"excluded": f"does not load: {str(e).split(': ', 1)[-1]}"}
    ok, start = {}, 0
    for name, group in groups.items():
        ok[name] = [i for i, r in enumerate(results[start : start + len(group)]) if r.ok]
        start += len(group)
    good = [name for name, group in groups.items() if ok[name] and len(ok[name]) >= min_success * len(group)]
    if good:
        return {"given": ok["given"]} if problem.inputs is not None else {"profiles": good}
    errors = collections.Counter(r.error.split("\n")[0][:100] for r in results if not r.ok)
    ((error, count),) = errors.most_common(1) or [("no inputs", 0)]
    return {
        "excluded": f"{len(calls) - sum(errors.values())} of {len(calls)} inputs ran; the most common "
        f"failure ({count}x): {error}"
    }


def screen(
    problems: list[Problem],
    excluded: dict,
    *,
    profiles,
    samples: int,
    min_success: float,
    timeout_s: float,
    workers: int,
    disk_cache: bool,
) -> dict:
    """Screen every problem; keep the first usable solution of each problem (slug), in corpus order.

    Returns ``{"usable": {key: what runs}, "excluded": {key: reason}}``, cached by all that decides it.
    """
    settings = dict(
        format=_SCREEN_FORMAT,
        python=sys.version_info[:2],
        sandbox=current_mode(),
        samples=samples,
        min_success=min_success,
        timeout_s=timeout_s,
        profiles=[dataclasses.asdict(p) for p in profiles],
        problems=[dataclasses.asdict(p) for p in problems],
        excluded=excluded,
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(os.environ.get("PBBJAX_CACHE_DIR") or Path.home() / ".cache" / "pbbjax").expanduser()
    path = root / "leetcode" / f"screen-{key}.json"
    if key not in _SCREENS and disk_cache and path.is_file():
        _SCREENS[key] = json.loads(path.read_text())
    if key in _SCREENS:
        return _SCREENS[key]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:  # threads only wait on subprocesses
        found = list(pool.map(lambda p: _screen_one(p, profiles, samples, min_success, timeout_s), problems))
    result, kept = {"usable": {}, "excluded": dict(excluded)}, {}
    for problem, outcome in zip(problems, found, strict=True):
        if "excluded" in outcome:
            result["excluded"][problem.key] = outcome["excluded"]
        elif problem.slug in kept:
            result["excluded"][problem.key] = (
                f"another solution of this problem is used: {kept[problem.slug]}"
            )
        else:
            kept[problem.slug] = problem.key
            result["usable"][problem.key] = outcome
    if disk_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(result, f)
        os.replace(f.name, path)  # atomic: a reader sees no file or the whole file
    _SCREENS[key] = result
    return result


@register("leetcode")
class LeetcodeDomain:
    """LeetCode solutions as instructions, pointed to by problem title; see the module docstring.

    Options (defaults in the signature):
    - ``corpus``: None for kzleet; else a JSONL path or a Hugging Face dataset id.
    - ``pointer``: the corpus field that names a problem, "name" or "statement".
    - ``timeout_s``: limit per call when computing outputs.
    - ``probe_timeout_s``: limit per call when trying candidate inputs (screening, ``sample_inputs``);
      slower inputs are never used, so a looping solution costs little.
    - ``profiles``: input profiles, by name (``leetcode_inputs.PROFILES``) or as dicts of ``Profile`` fields.
    - ``max_len``: the longest list, string, linked list or tree that the named profiles draw.
    - ``screen_samples``: inputs tried per profile when screening.
    - ``min_success``: the fraction of a profile's screening inputs that must run for it to be used.
    - ``max_rounds``: batches of candidates ``sample_inputs`` tries before returning fewer than asked.
    - ``max_output_share``: the most of ``sample_inputs``' inputs that may share one output while inputs
      with other outputs can be found (many solutions answer 0 or -1 to most random inputs).
    - ``workers``: screens run at once (default: the CPU count, at most 8).
    - ``disk_cache``: keep screens in the pbbjax cache directory.
    """

    name = "leetcode"
    declarative_templates = DECLARATIVE_TEMPLATES
    execution_templates = EXECUTION_TEMPLATES

    def __init__(
        self,
        corpus: str | None = None,
        pointer: str = "name",
        timeout_s: float = 2.0,
        probe_timeout_s: float = 0.25,
        profiles=tuple(p.name for p in PROFILES),
        max_len: int = 8,
        screen_samples: int = 8,
        min_success: float = 0.5,
        max_rounds: int = 4,
        max_output_share: float = 0.5,
        workers: int | None = None,
        disk_cache: bool = True,
    ):
        if pointer not in ("name", "statement"):
            raise ValueError(f"leetcode option pointer={pointer!r}: expected 'name' or 'statement'")
        self.corpus, self.pointer, self.profiles = corpus, pointer, make_profiles(profiles, max_len)
        self.timeout_s, self.probe_timeout_s, self.max_rounds = timeout_s, probe_timeout_s, max_rounds
        self.max_output_share = max_output_share
        self.screen_samples, self.min_success, self.disk_cache = screen_samples, min_success, disk_cache
        self.workers = workers or min(os.cpu_count() or 1, 8)
        self._screen: dict | None = None
        self._problems: dict[str, tuple[Problem, dict]] = {}  # instruction id -> (problem, what runs)
        self._outputs: dict[tuple[str, str], object] = {}  # (id, JSON of input) -> value seen in a run

    def _screened(self) -> dict:
        if self._screen is None:
            problems, excluded = (
                kzleet_problems() if self.corpus is None else corpus_problems(self.corpus, self.pointer)
            )
            self._screen = screen(
                problems,
                excluded,
                profiles=self.profiles,
                samples=self.screen_samples,
                min_success=self.min_success,
                timeout_s=self.probe_timeout_s,
                workers=self.workers,
                disk_cache=self.disk_cache,
            )
            usable = self._screen["usable"]
            self._problems = {f"leetcode/{p.slug}": (p, usable[p.key]) for p in problems if p.key in usable}
            if self._screen["excluded"]:
                reasons = "; ".join(f"{k}: {v}" for k, v in sorted(self._screen["excluded"].items()))
                log.warning(
                    "leetcode: %d of %d solutions usable (%s); excluded: %s",
                    len(usable),
                    len(usable) + len(self._screen["excluded"]),
                    self.corpus or "kzleet",
                    reasons,
                )
        return self._screen

    def report(self) -> dict[str, str]:
        """The solutions left out, by where they came from, with why."""
        return dict(self._screened()["excluded"])

    def all_instructions(self) -> list[Instruction]:
        """Every usable problem as an instruction, sorted by id."""
        self._screened()
        return [self._instruction(i) for i in sorted(self._problems)]

    def _instruction(self, instruction_id: str) -> Instruction:
        problem, runs = self._problems[instruction_id]
        meta = dict(
            problem.meta,
            arg_names=list(problem.arg_names),
            return_type=problem.return_type,
            arg_types=None if problem.arg_types is None else list(problem.arg_types),
            **runs,
        )
        return Instruction(id=instruction_id, name=problem.title, text=problem.text, meta=meta)

    def instructions(self, n: int, seed: int) -> list[Instruction]:
        pool = self.all_instructions()
        if n >= len(pool):
            log.warning("leetcode: asked for %d instructions, only %d are usable; using all", n, len(pool))
        return stable_rng("instructions", seed).sample(pool, min(n, len(pool)))

    def _problem(self, instruction: Instruction) -> tuple[Problem, dict]:
        self._screened()
        if instruction.id not in self._problems:
            raise ValueError(f"{instruction.id!r} is not a usable instruction of this leetcode domain")
        return self._problems[instruction.id]

    def sample_inputs(self, instruction: Instruction, n: int, seed: int, split: str = "train") -> list[list]:
        """Up to ``n`` distinct inputs that run within ``probe_timeout_s`` (a corpus row's own, if any),
        no more than ``max_output_share`` of them with one output unless too few others turn up."""
        problem, runs = self._problem(instruction)
        rng = stable_rng("inputs", seed, instruction.id, split)
        if problem.inputs is not None:
            pool = list({json.dumps(problem.inputs[i]): problem.inputs[i] for i in runs["given"]}.values())
            rng.shuffle(pool)
            return pool[:n]
        types = _parsed_types(problem)
        profiles = [p for p in self.profiles if p.name in runs["profiles"]]
        cap = max(1, math.ceil(self.max_output_share * n))  # inputs per distinct output, while others exist
        kept, spare, seen, per_output = [], [], set(), collections.Counter()
        for _ in range(self.max_rounds):
            if len(kept) >= n:
                break
            candidates = {}
            for _ in range(2 * (n - len(kept)) + 4):
                args = draw_args(types, rng.choice(profiles), rng)
                candidates.setdefault(json.dumps(args), args)
            candidates = {k: v for k, v in candidates.items() if k not in seen}
            seen.update(candidates)
            results = _run(problem, list(candidates.values()), self.probe_timeout_s)
            for (key, args), result in zip(candidates.items(), results, strict=True):
                if result.ok and len(kept) < n:
                    self._outputs[instruction.id, key] = result.value
                    output = encode_output(result.value)
                    (kept if per_output[output] < cap else spare).append(args)
                    per_output[output] += 1
        return (kept + spare)[:n]

    def execute(self, instruction: Instruction, inputs: list[list]) -> list[Example]:
        problem, _ = self._problem(instruction)
        todo = [a for a in inputs if (instruction.id, json.dumps(a)) not in self._outputs]
        results = _run(problem, todo, self.timeout_s) if todo else []
        for args, result in zip(todo, results, strict=True):
            if not result.ok:
                raise ValueError(f"{instruction.id} ({problem.key}) fails on input {args!r}: {result.error}")
            self._outputs[instruction.id, json.dumps(args)] = result.value
        return [
            Example(instruction.id, list(a), encode_output(self._outputs[instruction.id, json.dumps(a)]))
            for a in inputs
        ]

    def score(self, instruction: Instruction, example: Example, answer: str | None) -> float:
        """1.0 iff ``answer``, read as JSON (else as a bare string), is the expected value."""
        if answer is None:
            return 0.0
        try:
            value = json.loads(answer)
        except json.JSONDecodeError:
            value = answer.strip()
        return float(encode_output(value) == encode_output(json.loads(example.output)))

    def render_input(self, example: Example) -> str:
        """LeetCode's notation: ``nums = [1, 3, 2], k = 2``."""
        self._screened()
        names = (
            self._problems[example.instruction_id][0].arg_names
            if example.instruction_id in self._problems
            else ()
        )
        if len(names) != len(example.input):
            names = [f"arg{i + 1}" for i in range(len(example.input))]
        return (
            ", ".join(f"{k} = {encode_output(v)}" for k, v in zip(names, example.input, strict=True))
            or "no arguments"
        )
