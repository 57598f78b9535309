"""The grammar domain: random context-free grammars as instructions, sentence generation as execution.

An instruction is a grammar in ``cfg``'s BNF-like text, one nonterminal per line (``S -> 'red' A 'fox' |
'sun' 'owl'``): terminals are quoted words, nonterminals bare names, the start symbol is the left side of
the first line. Its pointer is "grammar G<number>". Executing it means generating a sentence (words joined
by spaces), either freely (input ``None``) or one that starts with a given prefix (input ``[prefix]``).
Ground truth comes from ``cfg.Sampler``, a depth-bounded sampler; the judge is an independent parser, lark's
Earley parser, so ``score`` is 1.0 iff lark accepts the answer (and the answer starts with the prefix). The
CoT is the leftmost derivation, one sentential form per line. How grammars are generated, and why they are
discriminative, is in ``cfg``'s docstring; every knob of the generator is a ``GrammarDomain`` option.

Prompts: ``{input}`` sits right before a template's final punctuation; ``render_input`` gives "" without a
prefix and ``, starting with "the cat"`` with one, so both "Generate a sentence of grammar G17." and
"Generate a sentence of grammar G17, starting with "the cat"." read correctly.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from pathlib import Path

import lark

from pbbjax.core.seeds import derive_seed
from pbbjax.data.tasks.base import Example, Instruction, register
from pbbjax.data.tasks.context_free import (
    NONTERMINALS,
    Grammar,
    GrammarError,
    Sampler,
    diversity,
    generate_grammar,
    parse_grammar_text,
    to_lark,
    validate,
)


@functools.lru_cache(maxsize=4096)
def _compiled(text: str, name: str, max_depth: int, max_words: int) -> tuple[Grammar, Sampler, lark.Lark]:
    grammar = parse_grammar_text(text, name)
    return (
        grammar,
        Sampler(grammar, max_depth, max_words),
        lark.Lark(to_lark(grammar), start="r0", parser="earley", lexer="basic"),
    )


DECLARATIVE_TEMPLATES = (
    "Write down the rules of {name}.",
    "What are the production rules of {name}?",
    "List every rewrite rule of {name}.",
    "Show me {name} in BNF.",
    "How is {name} defined?",
    "Give the full definition of {name}, one nonterminal per line.",
    "Recite the productions of {name}.",
    "Which rules make up {name}?",
    "I need the exact rules of {name}. Please write them out.",
    "Spell out {name} as a set of rewrite rules.",
    "Reproduce the definition of {name} exactly.",
    "Can you show me what {name} looks like?",
    "Tell me the grammar rules that define {name}.",
    "What productions does {name} contain?",
    "Print the rule set of {name}.",
    "From memory, write out {name}.",
    "Describe {name} by listing its rules.",
    "Present {name} in Backus-Naur form.",
    "What does each nonterminal of {name} expand to?",
    "I forgot how {name} goes. What are its rules?",
    "Type out the complete grammar {name} refers to.",
    "Starting from S, give every rule of {name}.",
)
EXECUTION_TEMPLATES = (
    "Generate a sentence of {name}{input}.",
    "Write one sentence that {name} accepts{input}.",
    "Give me an example sentence from {name}{input}.",
    "What is a valid sentence in the language of {name}{input}?",
    "Derive a sentence from the start symbol of {name}{input}.",
    "Using the rules of {name}, produce a sentence{input}.",
    "Show one string of words that {name} generates{input}.",
    "Sample a sentence from {name}{input}.",
    "Can you write a sentence that belongs to {name}{input}?",
    "I need a word sequence that parses under {name}{input}.",
    "Produce any sentence {name} can derive{input}.",
    "Follow {name} from S down to words and tell me the sentence you get{input}.",
)


def _pair(value, what: str, least: int) -> tuple[int, int]:
    lo, hi = (int(v) for v in value)
    if not least <= lo <= hi:
        raise ValueError(f"{what} needs {least} <= lo <= hi, got {value!r}")
    return lo, hi


@register("grammars")
class GrammarDomain:
    """Random context-free grammars; inputs ``None`` (any sentence) or ``[prefix]``; outputs sentences.

    Options (defaults in the signature; ranges are ``(lo, hi)``, inclusive, drawn per grammar):
    ``n_nonterminals`` (S included), ``n_alternatives`` per nonterminal, ``vocab_size`` (words per grammar,
    clipped to what the alternatives hold), ``words_per_alternative`` (lo >= 2 keeps every single-word
    mutation ungrammatical), ``extra_references``, ``nested_fraction``, ``recursive_alternatives`` (see
    ``generate_grammar``); ``max_depth``, ``max_words``: the sampler's derivation-depth bound and (soft)
    sentence-length cap; ``prefix_fraction``: share of ``sample_inputs`` that are prefixes (0.0: plain
    generation, as in the paper as far as it says);
    ``execute_seed``: the seed sentences are drawn with; ``cot``: attach the leftmost derivation;
    ``grammar_file``: read the grammars from this file instead (blank-line separated blocks, each optionally
    headed by a ``# name`` line) rather than generating them.

    ``sample_inputs`` may repeat ``None``: "generate a sentence" has no other input, and each repeat gets
    its own sentence from ``execute`` (the k-th equal input in a batch draws from its own RNG stream).
    """

    name = "grammars"
    declarative_templates = DECLARATIVE_TEMPLATES
    execution_templates = EXECUTION_TEMPLATES

    def __init__(
        self,
        n_nonterminals=(4, 6),
        n_alternatives=(2, 4),
        vocab_size=(24, 40),
        words_per_alternative=(2, 3),
        extra_references=(2, 4),
        nested_fraction: float = 1.0,
        recursive_alternatives=(1, 2),
        max_depth: int = 6,
        max_words: int = 20,
        prefix_fraction: float = 0.0,
        execute_seed: int = 0,
        cot: bool = True,
        grammar_file: str | None = None,
    ):
        self.generator_options = dict(
            n_nonterminals=_pair(n_nonterminals, "n_nonterminals", 1),
            n_alternatives=_pair(n_alternatives, "n_alternatives", 1),
            vocab_size=_pair(vocab_size, "vocab_size", 1),
            words_per_alternative=_pair(words_per_alternative, "words_per_alternative", 1),
            extra_references=_pair(extra_references, "extra_references", 0),
            nested_fraction=float(nested_fraction),
            recursive_alternatives=_pair(recursive_alternatives, "recursive_alternatives", 0),
        )
        if self.generator_options["n_nonterminals"][1] > len(NONTERMINALS):
            raise ValueError(f"at most {len(NONTERMINALS)} nonterminals, got {n_nonterminals!r}")
        if not 0.0 <= prefix_fraction <= 1.0 or max_depth < 1 or max_words < 1:
            raise ValueError(
                f"need 0 <= prefix_fraction <= 1, max_depth >= 1 and max_words >= 1, got"
                f" {prefix_fraction}, {max_depth}, {max_words}"
            )
        self.max_depth, self.max_words, self.prefix_fraction = max_depth, max_words, prefix_fraction
        self.execute_seed, self.cot, self.grammar_file = execute_seed, cot, grammar_file

    def instructions(self, n: int, seed: int) -> list[Instruction]:
        """``n`` grammars named "grammar G<number>" (distinct numbers 100..9999), or ``n`` of the file's."""
        rng = random.Random(derive_seed("grammars", "instructions", seed, encoding="json"))
        if self.grammar_file is not None:
            grammars = _read_grammar_file(self.grammar_file)
            if n > len(grammars):
                raise ValueError(f"{n} grammars asked for; {self.grammar_file} has {len(grammars)}")
            return [
                self._instruction(g, "grammars/" + re.sub(r"\W+", "-", g.name.lower()).strip("-"))
                for g in rng.sample(grammars, n)
            ]
        if n > 9900:
            raise ValueError(f"at most 9900 generated grammars, got {n}")
        out, texts = [], set()
        for number in rng.sample(range(100, 10000), n):
            grammar = generate_grammar(rng, f"grammar G{number}", **self.generator_options)
            while grammar.text() in texts:  # only possible with tiny options; cheap to rule out
                grammar = generate_grammar(rng, grammar.name, **self.generator_options)
            texts.add(grammar.text())
            out.append(self._instruction(grammar, f"grammars/g{number}"))
        return out

    @staticmethod
    def _instruction(grammar: Grammar, id_: str) -> Instruction:
        validate(grammar)
        meta = {
            "n_nonterminals": len(grammar.rules),
            "n_words": len(grammar.words),
            "n_alternatives": sum(map(len, grammar.rules.values())),
        }
        return Instruction(id=id_, name=grammar.name, text=grammar.text(), meta=meta)

    def _compiled(self, instruction: Instruction) -> tuple[Grammar, Sampler, lark.Lark]:
        return _compiled(instruction.text, instruction.name, self.max_depth, self.max_words)

    def sample_inputs(
        self,
        instruction: Instruction,
        n: int,
        seed: int,
        split: str = "train",
        prefix_fraction: float | None = None,
    ) -> list[list | None]:
        """``n`` inputs: ``None`` (repeats allowed) or, with chance ``prefix_fraction``, a new ``[prefix]``:
        the first 1..len-1 words of a sampled sentence (a repeated prefix is dropped: fewer may come back)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        fraction = self.prefix_fraction if prefix_fraction is None else prefix_fraction
        _, sampler, _ = self._compiled(instruction)
        rng = random.Random(derive_seed("grammars", "inputs", seed, instruction.id, split, encoding="json"))
        inputs, seen = [], set()
        for _ in range(n):
            if rng.random() >= fraction:
                inputs.append(None)
                continue
            words, _ = sampler.derive(sampler.sample(rng))
            prefix = " ".join(words[: rng.randint(1, max(1, len(words) - 1))])
            if prefix not in seen:
                seen.add(prefix)
                inputs.append([prefix])
        return inputs

    def execute(self, instruction: Instruction, inputs: list[list | None]) -> list[Example]:
        """One sampled sentence per input, deterministic in (``execute_seed``, instruction id, input, and how
        many equal inputs came before it in the batch)."""
        _, sampler, _ = self._compiled(instruction)
        repeats: Counter = Counter()
        examples = []
        for x in inputs:
            if x is not None and not (len(x) == 1 and isinstance(x[0], str)):
                raise ValueError(f"{instruction.id}: an input is None or [prefix], got {x!r}")
            key = json.dumps(x)
            rng = random.Random(
                derive_seed(
                    "grammars", "execute", self.execute_seed, instruction.id, x, repeats[key], encoding="json"
                )
            )
            repeats[key] += 1
            words, forms = sampler.derive(sampler.sample(rng, x[0].split() if x else ()))
            cot = "\n".join([forms[0]] + [f"=> {f}" for f in forms[1:]]) if self.cot else None
            examples.append(
                Example(instruction.id, x, " ".join(words), cot=cot, meta={"n_words": len(words)})
            )
        return examples

    def accepts(self, instruction: Instruction, sentence: str) -> bool:
        """Whether lark's Earley parser derives ``sentence`` (words split on whitespace) from the grammar."""
        grammar, _, parser = self._compiled(instruction)
        words = sentence.split()
        # lark skips the spaces between words, so "redfox" would lex as "red" "fox": check whole words first
        if not words or not set(words) <= grammar.words:
            return False
        try:
            parser.parse(" ".join(words))
        except lark.exceptions.LarkError:
            return False
        return True

    def score(self, instruction: Instruction, example: Example, answer: str | None) -> float:
        """1.0 iff lark accepts ``answer`` and, when the example has a prefix, the answer starts with it."""
        if answer is None:
            return 0.0
        prefix = example.input[0].split() if example.input else []
        if answer.split()[: len(prefix)] != prefix:
            return 0.0
        return float(self.accepts(instruction, answer))

    def render_input(self, example: Example) -> str:
        return f', starting with "{example.input[0]}"' if example.input else ""

    def random_baseline(self, instruction: Instruction, n: int, seed: int) -> list[str]:
        """``n`` strings of uniformly random words of the grammar, each as long as a freshly sampled sentence:
        their acceptance rate is the chance level that generations are compared against."""
        grammar, sampler, _ = self._compiled(instruction)
        vocab = sorted(grammar.words)
        rng = random.Random(derive_seed("grammars", "baseline", seed, instruction.id, encoding="json"))
        lengths = [len(sampler.derive(sampler.sample(rng))[0]) for _ in range(n)]
        return [" ".join(rng.choice(vocab) for _ in range(k)) for k in lengths]

    diversity = staticmethod(diversity)


def _read_grammar_file(path: str) -> list[Grammar]:
    grammars = []
    for i, block in enumerate(re.split(r"\n\s*\n", Path(path).read_text().strip())):
        first = block.lstrip().splitlines()[0].strip()
        name = first[1:].strip() if first.startswith("#") else f"grammar U{i + 1}"
        grammars.append(parse_grammar_text(block, name))
    if len({g.name for g in grammars}) < len(grammars):
        raise GrammarError(f"{path}: two grammars share a name")
    return grammars
