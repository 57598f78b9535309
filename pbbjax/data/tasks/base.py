"""What every PBB task domain provides, and the registry that configs pick domains from by name.

A domain knows instructions and their execution; it knows nothing about tokens, chat templates or stages
(those belong to ``formatting.py`` and ``curriculum.py``). Its contract:

- ``instructions(n, seed)``: ``n`` distinct instructions, deterministic in ``seed``.
- ``sample_inputs(instruction, n, seed, split="train", **kw)``: up to ``n`` distinct inputs (a JSON-able
  list of positional arguments each, or ``None`` where execution takes no input, e.g. "generate a
  sentence"), deterministic.
  ``split="eval"`` may draw differently (ciphers: every shift equally); ciphers take ``skewed=True`` for
  the imbalanced demonstration distribution.
- ``input_space(instruction)`` (optional): how many distinct inputs the instruction has, where that is
  known and finite (arithmetic); the curriculum refuses to ask for more.
- ``execute(instruction, inputs)``: one ``Example`` per input, with the ground-truth output (computed by
  really running the instruction, in a sandbox where it is code) and, where the domain has one, a
  chain-of-thought trace.
- ``score(instruction, example, answer)``: 1.0 if the extracted ``answer`` is correct, else 0.0 (grammars:
  accepted by an independent parser).
- ``declarative_templates`` (>= 20, with ``{name}``) and ``execution_templates`` (>= 10, with ``{name}``
  and ``{input}``): the paraphrased pointers that prompt augmentation draws from; the first of each is
  the one used when augmentation is off.
- ``render_input(example)``: the input as it appears in an execution prompt.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

ANSWER_MARKER = "Answer:"  # the fixed final-answer marker: completions end with "Answer: <output>"


@dataclasses.dataclass(frozen=True)
class Instruction:
    id: str  # unique within the domain, stable across runs with the same seed ("arithmetic/blorp")
    name: str  # the pointer's name as prompts show it ("Blorp", "the Zanth cipher", "grammar G17")
    text: str  # the instruction as the model reads it in declarative examples (source code, rules)
    text_nl: str | None = None  # a natural-language rendering, where the domain has one
    meta: dict = dataclasses.field(default_factory=dict, compare=False)  # domain specifics (length, family)


@dataclasses.dataclass(frozen=True)
class Example:
    instruction_id: str
    input: list | None  # positional arguments (JSON-able), or None where execution takes no input
    output: str  # the JSON-encoded result, or the generated sentence
    cot: str | None = None  # the step-by-step trace, ending before the answer line
    meta: dict = dataclasses.field(default_factory=dict, compare=False)  # e.g. {"shift": 13}
    cot_nl: str | None = None  # the trace in the words of the instruction's natural-language form


def encode_output(value: Any) -> str:
    """The canonical text of a program's result (JSON, compact, keys sorted)."""
    return json.dumps(value, separators=(", ", ": "), sort_keys=True, ensure_ascii=False)


def extract_answer(text: str) -> str | None:
    """The text after the last answer marker, first line only, stripped; None without a marker."""
    head, marker, tail = text.rpartition(ANSWER_MARKER)
    if not marker:
        return None
    return tail.strip().split("\n", 1)[0].strip()


class Domain(Protocol):
    name: str
    declarative_templates: tuple[str, ...]
    execution_templates: tuple[str, ...]

    def instructions(self, n: int, seed: int) -> list[Instruction]: ...

    def sample_inputs(
        self, instruction: Instruction, n: int, seed: int, split: str = "train", **kwargs
    ) -> list[list | None]: ...

    def execute(self, instruction: Instruction, inputs: list[list | None]) -> list[Example]: ...

    def score(self, instruction: Instruction, example: Example, answer: str | None) -> float: ...

    def render_input(self, example: Example) -> str: ...


# Optional abilities: a domain that has one implements the method; callers check with isinstance.


@runtime_checkable
class FiniteInputs(Protocol):
    def input_space(self, instruction: Instruction) -> int | None:
        """How many distinct inputs ``instruction`` has (None: unknown or unbounded)."""


@runtime_checkable
class BatchExecution(Protocol):
    def execute_many(self, instructions: list[Instruction], inputs: list[list]) -> list[list[Example]]:
        """``execute`` for many instructions at once (one sandbox process instead of one per call)."""


@runtime_checkable
class Compositions(Protocol):
    def compositions(self, instructions: list[Instruction], n: int, seed: int) -> list[Instruction]:
        """``n`` new instructions composed of the given ones (f(g(x))), for the compositions eval set."""


@runtime_checkable
class Recall(Protocol):
    def recall(self, instruction: Instruction, text: str, nl: bool = False) -> float:
        """1.0 iff a generated trace states the instruction's steps (CoT evaluation's ``recall``)."""


@runtime_checkable
class Generative(Protocol):
    """A domain whose execution generates (grammars): no guessing floor; chance level and diversity."""

    def random_baseline(self, instruction: Instruction, n: int, seed: int) -> list[str]: ...

    def diversity(self, sentences: list[str]) -> float: ...


_REGISTRY: dict[str, Callable[..., Domain]] = {}


def register(name: str):
    """Class decorator: make a domain available to configs as ``domain=<name>``."""

    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_domain(name: str, **options) -> Domain:
    """The domain called ``name``, built with its config ``options``."""
    import pbbjax.data.tasks  # noqa: F401  (imports every domain module, which registers itself)

    if name not in _REGISTRY:
        raise ValueError(f"unknown domain {name!r}; domains: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)
