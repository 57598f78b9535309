"""Random arguments for leetcode solutions: their parameter types, parsed, and inputs drawn under profiles.

``parse_type`` reads a declared type (LeetCode's docstring notation ``List[int]``, ``Optional[ListNode]``,
or a Python annotation). Arguments are JSON in LeetCode's own notation: a linked list is the list of its
values, a binary tree its level-order list with ``None`` for missing children
(``leetcode_corpus.harness_source`` turns them into nodes inside the sandboxed process).

Inputs are drawn under one of several *profiles* (``PROFILES``), because real problems carry constraints no
type states (indices below a length, equal-length parallel lists, binary strings). Which profiles a
solution runs under is found by running it (``leetcode.screen``), never guessed from its text.
"""

from __future__ import annotations

import dataclasses
import random
import re

from pbbjax.core.seeds import derived_rng

SCALARS = ("int", "str", "bool")
NODES = ("ListNode", "TreeNode")


class UnsupportedType(ValueError):
    """A type annotation that inputs cannot be generated for."""


def parse_type(text: str):
    """``"List[List[int]]"`` -> ``["list", ["list", "int"]]``; scalars and node classes stay strings.

    ``Optional[X]`` is read as ``X`` (inputs never draw ``None`` for it; an empty list is a ``None`` node).
    """
    text = text.replace(" ", "").removeprefix("typing.")
    if text in SCALARS or text in NODES:
        return text
    match = re.fullmatch(r"(List|list|Optional)\[(.+)\]", text)
    if match is None:
        raise UnsupportedType(f"unsupported argument type {text!r}")
    inner = parse_type(match.group(2))
    return inner if match.group(1) == "Optional" else ["list", inner]


@dataclasses.dataclass(frozen=True)
class Profile:
    """How one random input is drawn. ``index_ints``: ints lie in ``[0, L-1]`` where ``L`` is one length
    shared by every list and string argument (indices, node ids, parallel arrays), and rows are pairs."""

    name: str
    int_range: tuple[int, int] = (0, 20)
    alphabet: str = "abc"
    max_len: int = 8  # lists, strings, linked lists and trees have 1..max_len elements
    index_ints: bool = False


PROFILES = (  # what each reaches that the others miss:
    Profile("values"),  # small non-negative values, strings over a small alphabet (repeats are common)
    Profile("signed", int_range=(-10, 10), alphabet="abcdefghijklmnopqrstuvwxyz"),  # negatives, any letter
    Profile("indices", index_ints=True),  # indices, node ids and k below a length that all lists share
    Profile("binary", int_range=(0, 1), alphabet="01"),  # bit strings, 0/1 flags
)


def make_profiles(specs, max_len: int) -> tuple[Profile, ...]:
    """Profiles named in ``PROFILES`` (drawing up to ``max_len`` elements), or given as dicts of fields."""
    known = {p.name: p for p in PROFILES}
    out = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in known:
                raise ValueError(
                    f"unknown input profile {spec!r}; known: {sorted(known)}, or a dict of fields"
                )
            out.append(dataclasses.replace(known[spec], max_len=max_len))
            continue
        try:
            profile = Profile(**spec)
        except TypeError as e:
            raise ValueError(f"input profile {spec!r}: {e}") from e
        out.append(dataclasses.replace(profile, int_range=tuple(profile.int_range)))
    return tuple(out)


def stable_rng(*parts) -> random.Random:
    """A generator seeded by a stable hash of JSON-able ``parts`` (``hash()`` is salted per process)."""
    return derived_rng(*parts, encoding="json")


def draw_args(types: list, profile: Profile, rng: random.Random) -> list:
    """One random argument list for parameters of ``types`` (parsed), drawn under ``profile``."""
    shared = rng.randint(1, profile.max_len)
    return [_draw(t, profile, rng, shared) for t in types]


def _draw(t, p: Profile, rng: random.Random, shared: int, length: int | None = None):
    if length is None:
        length = shared if p.index_ints else rng.randint(1, p.max_len)
    lo, hi = (0, shared - 1) if p.index_ints else p.int_range
    if t == "int":
        return rng.randint(lo, hi)
    if t == "bool":
        return rng.random() < 0.5
    if t == "str":
        return "".join(rng.choice(p.alphabet) for _ in range(length))
    if t == "ListNode":
        return [rng.randint(lo, hi) for _ in range(length)]
    if t == "TreeNode":
        return _random_tree(length, lo, hi, rng)
    inner = t[1]
    if isinstance(inner, list):  # a matrix: rows of one width; pairs under index_ints (edges, intervals)
        width = 2 if p.index_ints else rng.randint(1, p.max_len)
        return [_draw(inner, p, rng, shared, width) for _ in range(length)]
    return [_draw(inner, p, rng, shared) for _ in range(length)]


def _random_tree(size: int, lo: int, hi: int, rng: random.Random) -> list:
    """A random binary tree of ``size`` nodes as a level-order list (``None`` for a missing child)."""
    out, open_slots = [rng.randint(lo, hi)], 2
    while len(out) - out.count(None) < size:
        if open_slots == 1 or rng.random() < 0.75:
            out.append(rng.randint(lo, hi))
            open_slots += 1  # the node fills a slot and opens two
        else:
            out.append(None)
            open_slots -= 1
    return out
