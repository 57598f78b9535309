"""Random context-free grammars: generation, validation, the text form, sampling, and conversion to lark.

Text form: BNF-like, one nonterminal per line (``S -> 'red' A 'fox' | 'sun' 'owl'``): terminals are quoted
words, nonterminals bare names, the start symbol is the left side of the first line. ``parse_grammar_text``
reads it (and ``validate``s the result), ``Grammar.text`` writes it, ``to_lark`` turns a grammar into lark's
syntax (for an independent parser), and ``Sampler`` draws leftmost derivations of bounded depth.

Generator (the paper gives none; every knob is a ``GrammarDomain`` option). Nonterminals S, A, B, ... get
a few alternatives each. Alternative 0 of nonterminal i only refers to nonterminals after i, so by induction
from the last one every nonterminal derives some sentence; every nonterminal after S is referred to by an
earlier one (a random tree), so every one is reachable. Further references to later nonterminals multiply
the sentences per grammar; a few alternatives refer back to the same nonterminal or a tree ancestor of it:
recursion, which the sampler bounds with ``max_depth``. ``validate`` re-checks productivity and reachability.
Every alternative holds at least two words and every word occurs once in the grammar. Then in any sentence
each word occurs exactly as often as its alternative was used, so all words of one alternative occur equally
often: replacing, inserting or deleting one word always breaks that, and random strings over the same words
almost never satisfy it. That is what makes the grammars discriminative.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections.abc import Sequence

_WORD_LIST = """
    acorn amber anchor apple arrow autumn badge bakery banner barn basket beacon beetle bell berry blanket
    bloom board bonnet bottle branch breeze brick bridge brook broom bubble bucket button cabin cactus camel
    candle canoe canyon carpet castle cedar cellar chalk cherry chimney cider circle clover coast comet copper
    coral cotton crane crater crystal cup curtain daisy dawn desert diamond dolphin dragon drum dune eagle
    ember engine falcon feather fence fern ferry fiddle flame flute forest fountain fox frost garden garlic
    giant glacier glove goat goose granite grape gravel hammer harbor harp hawk hazel helmet heron hill honey
    horizon island ivory jacket jungle kettle kite ladder lagoon lantern lemon lily linen lizard lobster
    maple marble meadow melon mirror mitten moss moth mountain mule needle nest nickel oak ocean olive onion
    orchard otter owl paddle palace panda parrot pearl pebble pepper piano pillow pine planet plum pond
    poppy puddle pumpkin quarry quilt rabbit raft raven reef ribbon river robin rocket saddle sail salmon
    scarf shell shovel silver sled snail sparrow spider spoon spruce squirrel stable statue stream sugar
    summit swan tablet teapot thistle thunder tiger timber tomato torch tower trumpet tulip tunnel turtle
    valley velvet violet wagon walnut walrus whale whistle willow window winter wizard wolf yarn zebra
"""
WORDS = tuple(_WORD_LIST.split())  # the pool each grammar draws its vocabulary from
NONTERMINALS = ("S",) + tuple(c for c in "ABCDEFGHIJKLMNOPQRTUVWXYZ")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"[^\s'\"#|\\]+")  # one whitespace-free word, no character the text format reserves
_QUOTED = re.compile(f"'{_WORD.pattern}'")


class GrammarError(ValueError):
    """A grammar text that does not parse, or a grammar that is not a proper CFG (names the culprit)."""


@dataclasses.dataclass
class Grammar:
    """Nonterminal -> alternatives; a symbol is a quoted word ("'fox'") or a nonterminal ("A")."""

    name: str
    rules: dict[str, list[tuple[str, ...]]]

    @property
    def start(self) -> str:
        return next(iter(self.rules))

    @property
    def words(self) -> set[str]:
        return {s[1:-1] for alts in self.rules.values() for alt in alts for s in alt if _is_word(s)}

    def text(self) -> str:
        return "\n".join(
            f"{nt} -> {' | '.join(' '.join(alt) for alt in alts)}" for nt, alts in self.rules.items()
        )


def _is_word(symbol: str) -> bool:
    return symbol.startswith("'")


def parse_grammar_text(text: str, name: str = "grammar") -> Grammar:
    """The grammar a BNF-like text spells (``#`` starts a comment; a repeated left side adds alternatives),
    checked with ``validate``."""
    rules: dict[str, list[tuple[str, ...]]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        lhs, arrow, rhs = (part.strip() for part in line.partition("->"))
        if not arrow or not _NAME.fullmatch(lhs):
            raise GrammarError(f"{name}, line {lineno}: expected 'NAME -> alternatives', got {raw!r}")
        for alt_text in rhs.split("|"):
            alt = tuple(alt_text.split())
            if not alt or not all(_NAME.fullmatch(s) or _QUOTED.fullmatch(s) for s in alt):
                raise GrammarError(
                    f"{name}, line {lineno}: bad alternative {alt_text.strip()!r} (symbols are"
                    " NAMEs or 'quoted words'; empty alternatives are not allowed)"
                )
            rules.setdefault(lhs, []).append(alt)
    grammar = Grammar(name, rules)
    validate(grammar)
    return grammar


def _heights(grammar: Grammar) -> dict[str, int]:
    """Least derivation-tree height of each productive nonterminal (the unproductive ones are missing)."""
    height: dict[str, int] = {}
    while True:  # heights only shrink or appear, so this settles within len(rules) + 1 rounds
        fits = {
            nt: [h for alt in alts if (h := _alt_height(alt, height)) is not None]
            for nt, alts in grammar.rules.items()
        }
        new = {nt: min(hs) for nt, hs in fits.items() if hs}
        if new == height:
            return height
        height = new


def _alt_height(alt: tuple[str, ...], height: dict[str, int]) -> int | None:
    refs = [s for s in alt if not _is_word(s)]
    if any(s not in height for s in refs):
        return None
    return 1 + max((height[s] for s in refs), default=0)


def validate(grammar: Grammar) -> None:
    """Raise ``GrammarError`` naming an undefined nonterminal, or all unproductive or unreachable ones."""
    if not grammar.rules:
        raise GrammarError(f"{grammar.name}: no rules")
    for nt, alts in grammar.rules.items():
        for alt in alts:
            if not alt:
                raise GrammarError(f"{grammar.name}: nonterminal {nt!r} has an empty alternative")
            for s in alt:
                if _is_word(s) and not _WORD.fullmatch(s[1:-1]):
                    raise GrammarError(f"{grammar.name}: terminal {s} of {nt!r} is not a single word")
                if not _is_word(s) and s not in grammar.rules:
                    raise GrammarError(f"{grammar.name}: nonterminal {s!r} (used by {nt!r}) has no rules")
    height = _heights(grammar)
    unproductive = [nt for nt in grammar.rules if nt not in height]
    if unproductive:
        raise GrammarError(
            f"{grammar.name}: unproductive nonterminal(s) {', '.join(map(repr, unproductive))}: they derive"
            " no string of words (every alternative needs an unproductive nonterminal, maybe itself)"
        )
    reached, todo = {grammar.start}, [grammar.start]
    while todo:
        for alt in grammar.rules[todo.pop()]:
            for s in alt:
                if not _is_word(s) and s not in reached:
                    reached.add(s)
                    todo.append(s)
    unreachable = [nt for nt in grammar.rules if nt not in reached]
    if unreachable:
        raise GrammarError(
            f"{grammar.name}: unreachable nonterminal(s) {', '.join(map(repr, unreachable))}: no derivation"
            f" from the start symbol {grammar.start!r} uses them"
        )


def generate_grammar(
    rng: random.Random,
    name: str,
    n_nonterminals=(4, 6),
    n_alternatives=(2, 4),
    vocab_size=(24, 40),
    words_per_alternative=(2, 3),
    extra_references=(2, 4),
    nested_fraction=1.0,
    recursive_alternatives=(1, 2),
) -> Grammar:
    """A random grammar as the module docstring describes; each ``(lo, hi)`` range is drawn inclusively.

    ``extra_references``: references to later nonterminals added on top of the spanning tree (more of them,
    more sentences per grammar); ``nested_fraction``: chance that a words-only alternative of any but the last
    nonterminal refers to a later one; ``recursive_alternatives``: alternatives that refer back to the same
    nonterminal or one it descends from in the tree (recursion). The vocabulary size is clipped to what the
    alternatives hold.
    """
    k = rng.randint(*n_nonterminals)
    refs = [[[] for _ in range(rng.randint(*n_alternatives))] for _ in range(k)]  # refs[i][a]: indices
    parent = [0] * k
    for child in range(1, k):  # a random tree rooted at S; the child goes to one of the parent's emptiest
        parent[child] = rng.randrange(child)
        alts = refs[parent[child]]
        rng.choice([a for a in alts if len(a) == min(map(len, alts))]).append(child)
    for _ in range(rng.randint(*extra_references) if k > 1 else 0):  # more nonterminals used twice: variety
        i = rng.randrange(k - 1)
        rng.choice(refs[i]).append(rng.randrange(i + 1, k))
    for i in range(k - 1):  # words-only alternatives make short, samey sentences: most get nested
        for alt in refs[i]:
            if not alt and rng.random() < nested_fraction:
                alt.append(rng.randrange(i + 1, k))
    slots = [(i, a) for i in range(k) for a in range(1, len(refs[i]))]  # never alternative 0: it must end
    for i, a in rng.sample(slots, min(len(slots), rng.randint(*recursive_alternatives))):
        ancestors = [i]  # a reference to one of these closes a cycle
        while ancestors[-1]:
            ancestors.append(parent[ancestors[-1]])
        refs[i][a].append(rng.choice(ancestors))
    flat = [alt for alts in refs for alt in alts]
    lo, hi = words_per_alternative
    n_words = min(max(rng.randint(*vocab_size), lo * len(flat)), hi * len(flat))
    if n_words > len(WORDS):
        raise ValueError(f"{name}: needs {n_words} distinct words, the built-in list has {len(WORDS)}")
    counts = [lo] * len(flat)
    for _ in range(n_words - lo * len(flat)):
        counts[rng.choice([j for j, c in enumerate(counts) if c < hi])] += 1
    words = iter(rng.sample(WORDS, n_words))
    rules: dict[str, list[tuple[str, ...]]] = {}
    j = 0
    for i in range(k):
        alts = []
        for alt_refs in refs[i]:
            symbols = [f"'{next(words)}'" for _ in range(counts[j])] + [NONTERMINALS[r] for r in alt_refs]
            rng.shuffle(symbols)
            alts.append(tuple(symbols))
            j += 1
        rng.shuffle(alts)
        rules[NONTERMINALS[i]] = alts
    return Grammar(name, rules)


class Sampler:
    """Leftmost derivations of a grammar, bounded in depth: at depth d a nonterminal picks uniformly among
    the alternatives whose least completion fits in ``max_depth - d`` more levels, or, when none does, among
    those of least height. A sentence longer than ``max_words`` is redrawn, up to ``tries`` times (then the
    next one is kept whatever its length). A derivation is returned as its (nonterminal, alternative index)
    choices in leftmost order; ``derive`` turns those into the sentence and the CoT."""

    def __init__(self, grammar: Grammar, max_depth: int, max_words: int, tries: int = 100):
        self.grammar, self.max_depth, self.max_words, self.tries = grammar, max_depth, max_words, tries
        height = _heights(grammar)
        self.alt_heights = {
            nt: [_alt_height(alt, height) for alt in alts] for nt, alts in grammar.rules.items()
        }
        self.first: dict[str, set[str]] = {nt: set() for nt in grammar.rules}  # words a nonterminal can start
        changed = True
        while changed:
            changed = False
            for nt, alts in grammar.rules.items():
                for s in (alt[0] for alt in alts):
                    new = {s[1:-1]} if _is_word(s) else self.first[s]
                    changed |= not new <= self.first[nt]
                    self.first[nt] |= new

    def _options(self, nt: str, depth: int) -> list[int]:
        hs = self.alt_heights[nt]
        fit = [a for a, h in enumerate(hs) if h is not None and depth + h <= self.max_depth]
        least = min(h for h in hs if h is not None)
        return fit or [a for a, h in enumerate(hs) if h == least]

    def sample(self, rng: random.Random, prefix: Sequence[str] = ()) -> list[tuple[str, int]]:
        """A random derivation; with ``prefix``, of a sentence starting with those words (a depth-first
        search over alternatives in random order, pruned by the words each nonterminal can start with)."""
        for attempt in itertools.count():
            choices: list[tuple[str, int]] = []
            stack = self._match([(self.grammar.start, 0)], list(prefix), rng, choices)  # leftmost last
            n_words = len(prefix)
            while stack:
                symbol, depth = stack.pop()
                if _is_word(symbol):
                    n_words += 1
                    if n_words > self.max_words and attempt < self.tries:
                        break
                    continue
                a = rng.choice(self._options(symbol, depth))
                choices.append((symbol, a))
                stack.extend((s, depth + 1) for s in reversed(self.grammar.rules[symbol][a]))
            else:
                return choices

    def _match(self, stack, prefix, rng, choices, max_steps: int = 100_000):
        """Expand leftmost symbols until they have produced ``prefix``; the symbols still pending."""
        steps = 0

        def search(stack, pos):
            nonlocal steps
            steps += 1
            if steps > max_steps:
                raise GrammarError(
                    f"{self.grammar.name}: gave up looking for a sentence starting with"
                    f" {' '.join(prefix)!r} after {max_steps} steps"
                )
            if pos == len(prefix):
                return stack
            if not stack:
                return None
            (symbol, depth), rest = stack[-1], stack[:-1]
            if _is_word(symbol):
                return search(rest, pos + 1) if symbol[1:-1] == prefix[pos] else None
            if prefix[pos] not in self.first[symbol]:
                return None
            options = self._options(symbol, depth)
            rng.shuffle(options)
            for a in options:
                choices.append((symbol, a))
                found = search(rest + [(s, depth + 1) for s in reversed(self.grammar.rules[symbol][a])], pos)
                if found is not None:
                    return found
                choices.pop()
            return None

        found = search(stack, 0)
        if found is None:
            raise GrammarError(
                f"{self.grammar.name}: no sentence within depth {self.max_depth} starts with"
                f" {' '.join(prefix)!r}"
            )
        return found

    def derive(self, choices: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
        """(sentence words, sentential forms) of a leftmost derivation."""
        form = [self.grammar.start]
        forms = [" ".join(form)]
        for nt, a in choices:
            i = next(k for k, s in enumerate(form) if not _is_word(s))
            assert form[i] == nt, f"derivation expands {nt!r} where the leftmost nonterminal is {form[i]!r}"
            form[i : i + 1] = self.grammar.rules[nt][a]
            forms.append(" ".join(s[1:-1] if _is_word(s) else s for s in form))
        return [s[1:-1] for s in form], forms


def to_lark(grammar: Grammar) -> str:
    """The grammar in lark's syntax: nonterminal i becomes rule ``r<i>``, each word a string literal."""
    ids = {nt: f"r{i}" for i, nt in enumerate(grammar.rules)}
    lines = [
        f"{ids[nt]}: "
        + " | ".join(" ".join(f'"{s[1:-1]}"' if _is_word(s) else ids[s] for s in alt) for alt in alts)
        for nt, alts in grammar.rules.items()
    ]
    return "\n".join([*lines, '%ignore " "'])


def diversity(sentences: Sequence[str]) -> float:
    """Fraction of distinct sentences (whitespace-normalised); 0.0 for none."""
    return len({" ".join(s.split()) for s in sentences}) / len(sentences) if sentences else 0.0
