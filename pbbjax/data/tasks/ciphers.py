"""The cipher domain: custom shift ciphers written as Python ``def name(text, shift)`` functions.

Each instruction is one cipher family with its parameters (plain Caesar, vowels only, shift then reverse,
alternating direction, every k-th letter, position-dependent shift, ...; 58 distinct ciphers in all), under
an invented pointer name such as "the Zanth cipher". Ciphers act on lowercase a-z, wrap modulo 26 and keep
every other character. Inputs are ``[text, shift]``: 1-3 common English words and a shift in 1..25. Train
shifts are uniform, or skewed to the "naturally occurring" demonstration distribution (the paper's
imbalanced demonstrations); eval shifts cover 1..25 equally, so accuracy can be reported per shift
(``accuracy_by_shift``). Ground truth comes from running the source in the sandbox; the CoT trace comes from
an independent per-family step function and must agree with it.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import keyword
import random
from collections import defaultdict
from collections.abc import Sequence

from pbbjax.core.seeds import derive_seed
from pbbjax.data.tasks.base import Example, Instruction, encode_output, register
from pbbjax.data.tasks.sandbox import run_calls

_WORD_TEXT = """
    able about above across after again against air all almost alone along already also always among animal
    another answer any apple area arm around ask away baby back bad ball bank base bear beautiful bed before
    begin behind believe below best better between big bird black blue board boat body book both box boy
    bread bring brother brown build busy buy call can car care carry case cat catch cause center chair change
    check child city class clean clear close cloud cold color come common cook cool corner could country
    course cover cross cup cut dance dark day dear deep dog door down draw dream dress drink drive dry during
    early earth east easy eat egg end enough even evening every eye face fact fall family far farm fast father
    feel field fight fill find fine fire first fish five floor flower fly follow food foot forest form four
    free friend front fruit full game garden gate girl give glass gold good grass great green ground group
    grow half hand happy hard hat have head hear heart heavy help here high hill hold home hope horse hot
    house hour idea inside island job join jump just keep key kind king kitchen know lake land large last
    late laugh learn leave left letter light like line lion list listen little live long look love low lunch
    make man many map mark market may mean meet milk mind minute money month moon morning mother mountain
    move music name near never new next nice night noise north nothing number ocean off often old open orange
    other over page paint paper park part party pass people picture piece place plan plant play point pool
    poor power pretty pull push queen question quick quiet rain read ready red remember rest rich ride right
    river road rock room round run safe salt same sand school sea season seat second see sell send seven shape
    ship shoe short show side sign simple sing sister sit sky sleep slow small smile snow soft song soon sound
    south space speak special spring square stand star start station stay step still stone stop story street
    strong study summer sun sure sweet table take talk tall teach tell ten thank thing think three time today
    together town train tree true turn under until up use valley very visit voice wait walk wall want warm
    wash watch water wave way weather week well west wheel white wide wild wind window winter wish wood word
    work world write year yellow young
"""
_WORDS = tuple(_WORD_TEXT.split())
VOWELS = "aeiou"

# ROT13 and Caesar's own shift of 3 are the shift ciphers that dominate naturally occurring text (spoiler
# and puzzle forums, textbooks); the remaining 10% is spread evenly so no shift is entirely unseen.
DEFAULT_DEMONSTRATION_SHIFTS = {13: 0.45, 3: 0.45} | {s: 0.10 / 23 for s in range(1, 26) if s not in (3, 13)}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_ONSETS += ("br", "dr", "gr", "kr", "th", "zh")
_NUCLEI = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("n", "r", "l", "m", "x", "th", "nth", "rn", "sk", "rd", "lk", "s", "v", "")

_LETTER = '"a" <= ch <= "z"'
_ENUM = "for i, ch in enumerate(text):"


def _moved(amount: str) -> str:
    """The expression moving letter ``ch`` by ``amount`` (e.g. "+ shift") places, wrapping modulo 26."""
    return f'chr((ord(ch) - ord("a") {amount}) % 26 + ord("a"))'


def _loop(
    amount: str = "", cond: str = _LETTER, loop: str = "for ch in text:", ret: str = "result", new: str = ""
):
    """A one-loop cipher: each character meeting ``cond`` moves by ``amount`` (or becomes ``new``)."""
    return (
        f'def __fn__(text, shift):\n    result = ""\n    {loop}\n        if {cond}:\n'
        f"            ch = {new or _moved(amount)}\n        result += ch\n    return {ret}\n"
    )


def _counted(amount: str, only_if: str = "") -> str:
    """A cipher that numbers letters (``count``, from 0) and moves a letter by ``amount`` (if ``only_if``)."""
    move = f"            ch = {_moved(amount)}\n"
    if only_if:
        move = f"            if {only_if}:\n    {move}"
    return (
        'def __fn__(text, shift):\n    result = ""\n    count = 0\n    for ch in text:\n'
        f"        if {_LETTER}:\n{move}            count += 1\n        result += ch\n    return result\n"
    )


_SPLIT = (
    'def __fn__(text, shift):\n    result = ""\n    for ch in text:\n        if ch in "aeiou":\n'
    f"            ch = {_moved('{op} shift')}\n        elif {_LETTER}:\n"
    f"            ch = {_moved('{back} shift')}\n        result += ch\n    return result\n"
)
_WORD = (
    'def __fn__(text, shift):\n    result = ""\n    word = 0\n    for ch in text:\n        if ch == " ":\n'
    f"            word += 1\n        elif {_LETTER}:\n            ch = {_moved('+ shift + {k_word}')}\n"
    "        result += ch\n    return result\n"
)
_KEEP = ", wrapping around the alphabet; other characters stay as they are."
_BOTH = ({"d": 1}, {"d": -1})

# family -> (parameter sets, source template, sentence template, step). Templates take the fields of
# ``_fields``. The step gives the amount added to a letter's index (None: the letter is kept) from the
# letter ``c``, its position ``i`` in the text, its letter number ``n`` (spaces not counted), its word
# number ``w`` (spaces before it), the shift ``s`` and the parameters ``p``; it is written independently of
# the source, and the tests prove the two agree.
_FAMILIES = {
    "caesar": (
        _BOTH,
        _loop("{op} shift"),
        "Moves every lowercase letter {way} by `shift` places" + _KEEP,
        lambda c, i, n, w, s, p: p["d"] * s,
    ),
    "vowels": (
        _BOTH,
        _loop("{op} shift", cond='ch in "aeiou"'),
        "Moves only the vowels (a, e, i, o, u) {way} by `shift` places"
        + _KEEP.replace("other", "consonants and other"),
        lambda c, i, n, w, s, p: p["d"] * s if c in VOWELS else None,
    ),
    "consonants": (
        _BOTH,
        _loop("{op} shift", cond=f'{_LETTER} and ch not in "aeiou"'),
        "Moves only the consonants {way} by `shift` places" + _KEEP.replace("other", "vowels and other"),
        lambda c, i, n, w, s, p: None if c in VOWELS else p["d"] * s,
    ),
    "reverse": (
        _BOTH,
        _loop("{op} shift", ret="result[::-1]"),
        "Moves every lowercase letter {way} by `shift` places, wrapping around the alphabet, then"
        " reverses the whole text.",
        lambda c, i, n, w, s, p: p["d"] * s,
    ),
    "reverse_words": (
        _BOTH,
        _loop("{op} shift", ret='" ".join(word[::-1] for word in result.split(" "))'),
        "Moves every lowercase letter {way} by `shift` places, wrapping around the alphabet, then"
        " reverses the letters of each word, keeping the words in their order.",
        lambda c, i, n, w, s, p: p["d"] * s,
    ),
    "alternate": (
        _BOTH,
        _loop("+ ({first} if i % 2 == 0 else {second})", loop=_ENUM),
        "Moves the lowercase letters at even positions of the text (every character counts, from 0)"
        " {way} and those at odd positions the other way, by `shift` places" + _KEEP,
        lambda c, i, n, w, s, p: (p["d"] if i % 2 == 0 else -p["d"]) * s,
    ),
    "split": (
        _BOTH,
        _SPLIT,
        "Moves vowels {way} and consonants the other way by `shift` places" + _KEEP,
        lambda c, i, n, w, s, p: (p["d"] if c in VOWELS else -p["d"]) * s,
    ),
    "mirror": (
        _BOTH,
        _loop(new='chr((25 - (ord(ch) - ord("a")) {op} shift) % 26 + ord("a"))'),
        "Replaces each lowercase letter by its mirror in the alphabet (a and z swap, b and y, ...), then"
        " moves it {way} by `shift` places" + _KEEP,
        lambda c, i, n, w, s, p: p["d"] * s,
    ),
    # k odd and not 13, so k * shift is never a multiple of 26 (no identity cipher at any shift).
    "scaled": (
        [{"k": k} for k in (3, 5, 7, 9, 11, 15, 17, 19, 21, 23)],
        _loop("+ {k} * shift"),
        "Moves every lowercase letter forward by {k} times `shift` places" + _KEEP,
        lambda c, i, n, w, s, p: p["k"] * s,
    ),
    "skip": (
        [{"k": k, "r": r} for k in (2, 3, 4, 5) for r in range(k)],
        _counted("+ shift", only_if="count % {k} == {r}"),
        "Moves forward by `shift` places only the letters whose letter number (the first letter is 0; other"
        " characters are not counted) leaves remainder {r} when divided by {k}"
        + _KEEP.replace("other", "all other"),
        lambda c, i, n, w, s, p: s if n % p["k"] == p["r"] else None,
    ),
    "progressive": (
        [{"m": m, "d": d} for m in (1, 2, 3, 4, 5) for d in (1, -1)],
        _loop("+ shift {op} {m_i}", loop=_ENUM),
        "Moves each lowercase letter forward by `shift` {plus} {m} times its position in the text"
        " (every character counts, from 0) places" + _KEEP,
        lambda c, i, n, w, s, p: s + p["d"] * p["m"] * i,
    ),
    "running": (
        [{"m": m} for m in (1, 2, 3)],
        _counted("+ shift + {m_count}"),
        "Moves letter number n (the first letter is 0; other characters are not counted) forward by"
        " `shift` plus {m} times n places" + _KEEP,
        lambda c, i, n, w, s, p: s + p["m"] * n,
    ),
    "word": (
        [{"k": k} for k in (1, 2, 3, 4, 5)],
        _WORD,
        "Moves each lowercase letter forward by `shift` plus {k} times the number of spaces before it"
        " places" + _KEEP,
        lambda c, i, n, w, s, p: s + p["k"] * w,
    ),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _times(m: int, var: str) -> str:
    return var if m == 1 else f"{m} * {var}"


def _fields(p: dict) -> dict:
    """What the templates of a cipher with parameters ``p`` fill in."""
    f = dict(p)
    if "d" in p:
        names = ("way", "op", "back", "first", "second", "plus")
        fwd, back = (
            ("forward", "+", "-", "shift", "-shift", "plus"),
            ("backward", "-", "+", "-shift", "shift", "minus"),
        )
        f |= dict(zip(names, fwd if p["d"] > 0 else back, strict=True))
    if "k" in p:
        f["k_word"] = _times(p["k"], "word")
    if "m" in p:
        f |= dict(m_i=_times(p["m"], "i"), m_count=_times(p["m"], "count"))
    return f


@dataclasses.dataclass(frozen=True)
class _Cipher:
    key: str  # family and parameters, e.g. "skip_k3_r1"; stable across seeds
    family: str
    params: dict
    source: str  # Python source, with "__fn__" where the function's name goes
    nl: str  # one sentence saying what it does


def _ciphers() -> dict[str, _Cipher]:
    out = {}
    for family, (variants, source, nl, _) in _FAMILIES.items():
        for p in variants:
            key = "_".join([family, *(f"{k}{v}" for k, v in p.items())])
            out[key] = _Cipher(key, family, p, source.format(**_fields(p)), nl.format(**_fields(p)))
    return out


CIPHERS: dict[str, _Cipher] = _ciphers()


def trace(cipher_key: str, text: str, shift: int) -> tuple[str, str]:
    """(CoT trace, ciphertext) of one cipher, stepped character by character with its family's step."""
    cipher = CIPHERS[cipher_key]
    step = _FAMILIES[cipher.family][3]
    lines, chars, n, w = [], [], 0, 0
    for i, ch in enumerate(text):
        amount = step(ch, i, n, w, shift, cipher.params) if "a" <= ch <= "z" else None
        n, w = n + ("a" <= ch <= "z"), w + (ch == " ")
        if amount is None:
            lines.append("(space) kept" if ch == " " else f"{ch} kept")
            chars.append(ch)
            continue
        x = ord(ch) - ord("a")
        y = ((25 - x if cipher.family == "mirror" else x) + amount) % 26
        shown = amount % 26 if amount >= 0 else -(-amount % 26)  # the amount that matters, sign kept
        how = f"25-{x}{shown:+d}" if cipher.family == "mirror" else f"{shown:+d}"
        lines.append(f"{ch} ({x}) {how} -> {chr(ord('a') + y)} ({y})")
        chars.append(chr(ord("a") + y))
    result = "".join(chars)
    if cipher.family == "reverse":
        result = result[::-1]
        lines.append(f"reverse the text: {result}")
    elif cipher.family == "reverse_words":
        result = " ".join(word[::-1] for word in result.split(" "))
        lines.append(f"reverse each word: {result}")
    return "\n".join(lines), result


def accuracy_by_shift(examples: Sequence[Example], scores: Sequence[float]) -> dict[int, float]:
    """Mean score per shift (``Example.meta["shift"]``), for the evaluator's per-shift table."""
    totals: dict[int, list[float]] = defaultdict(list)
    for example, score in zip(examples, scores, strict=True):
        totals[int(example.meta["shift"])].append(float(score))
    return {s: sum(v) / len(v) for s, v in sorted(totals.items())}


DECLARATIVE_TEMPLATES = (
    "Show me the code of {name}.",
    "What is the Python source of {name}?",
    "Write out the implementation of {name}.",
    "How is {name} implemented? Give me the function.",
    "I need the exact Python function behind {name}.",
    "Print the source code that defines {name}.",
    "Could you recall how {name} is written in Python?",
    "Reproduce the definition of {name} word for word.",
    "Give me the function that implements {name}.",
    "Which code carries out {name}?",
    "Recite {name} as Python code.",
    "I'd like to see how {name} works. Paste its source, please.",
    "Type out the program for {name}.",
    "What does the definition of {name} look like?",
    "Provide the Python function for {name} and nothing else.",
    "Please write down {name} exactly as it is defined.",
    "From memory, what is the code of {name}?",
    "Share the implementation of {name} in Python.",
    "Show the function that encrypts text with {name}.",
    "I forgot how {name} works. What's its code?",
    "Return the full source listing of {name}.",
    "Spell out the Python that defines {name}.",
)
EXECUTION_TEMPLATES = (
    "Use {name} to encrypt {input}.",
    "Encrypt {input} using {name}.",
    "What does {name} produce for {input}?",
    "Apply {name} to {input}. What is the ciphertext?",
    "Run {name} on {input}.",
    "Compute the output of {name} for {input}.",
    "If I feed {input} into {name}, what comes out?",
    "Encode {input} with {name} and give me the result.",
    "What ciphertext does {name} give for {input}?",
    "Pass {input} through {name}. What do you get?",
    "Here is my input: {input}. What does {name} turn it into?",
    "Call {name} on {input} and report its return value.",
)


@register("ciphers")
class CipherDomain:
    """Custom shift ciphers as Python code; inputs ``[text, shift]``; ``Example.meta == {"shift": s}``.

    Options: ``min_words``/``max_words`` (1, 3): words per input text, drawn from a built-in list of common
    English words; ``demonstration_shifts`` (None: ``DEFAULT_DEMONSTRATION_SHIFTS``): shift -> weight of
    the imbalanced demonstrations that ``sample_inputs(..., skewed=True)`` draws train shifts from (keys may
    be strings, as config dicts need); ``families`` (None: all of ``FAMILIES``): the families instructions
    come from; ``cot`` (True): attach the character-by-character trace; ``timeout_s`` (2.0): sandbox limit
    per call.
    """

    name = "ciphers"
    declarative_templates = DECLARATIVE_TEMPLATES
    execution_templates = EXECUTION_TEMPLATES

    def __init__(
        self,
        min_words: int = 1,
        max_words: int = 3,
        demonstration_shifts: dict | None = None,
        families: Sequence[str] | None = None,
        cot: bool = True,
        timeout_s: float = 2.0,
    ):
        if not 1 <= min_words <= max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        weights = {
            int(s): float(w) for s, w in (demonstration_shifts or DEFAULT_DEMONSTRATION_SHIFTS).items()
        }
        if any(not 1 <= s <= 25 or w < 0 for s, w in weights.items()) or sum(weights.values()) <= 0:
            raise ValueError(
                f"demonstration_shifts needs shifts in 1..25 and weights >= 0, some > 0: {weights}"
            )
        unknown = set(families or ()) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown cipher families {sorted(unknown)}; families: {', '.join(FAMILIES)}")
        self.min_words, self.max_words, self.cot, self.timeout_s = min_words, max_words, cot, timeout_s
        self.demonstration_shifts = weights
        self.families = tuple(families or FAMILIES)

    def instructions(self, n: int, seed: int) -> list[Instruction]:
        """``n`` ciphers, families taken in turn (seeded order) so that small ``n`` still mixes families."""
        rng = random.Random(derive_seed("ciphers", "instructions", seed, encoding="path"))
        pools = [[c for c in CIPHERS.values() if c.family == f] for f in self.families]
        if n > sum(map(len, pools)):
            raise ValueError(f"{n} ciphers asked for; families {self.families} have {sum(map(len, pools))}")
        for pool in pools:
            rng.shuffle(pool)
        rng.shuffle(pools)
        chosen = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)][:n]
        return [self._instruction(c, name) for c, name in zip(chosen, _names(n, rng), strict=True)]

    @staticmethod
    def _instruction(cipher: _Cipher, name: str) -> Instruction:
        fn = name.lower()
        return Instruction(
            id=f"ciphers/{fn}",
            name=f"the {name} cipher",
            text=cipher.source.replace("__fn__", fn),
            text_nl=f"The {name} cipher, {fn}(text, shift): {cipher.nl}",
            meta={
                "entry_point": fn,
                "cipher": cipher.key,
                "family": cipher.family,
                "params": dict(cipher.params),
            },
        )

    def sample_inputs(
        self, instruction: Instruction, n: int, seed: int, split: str = "train", skewed: bool = False
    ) -> list[list]:
        """Up to ``n`` distinct ``[text, shift]``. Eval: every shift 1..25 equally (``skewed`` is ignored)."""
        rng = random.Random(derive_seed("ciphers", "inputs", seed, instruction.id, split, encoding="path"))
        if split == "eval":
            order = list(range(1, 26))
            rng.shuffle(order)  # which shifts get the extra one when 25 does not divide n
            shifts = [order[i % 25] for i in range(n)]
        elif split == "train":
            population = sorted(self.demonstration_shifts) if skewed else list(range(1, 26))
            weights = [self.demonstration_shifts[s] for s in population] if skewed else None
            shifts = rng.choices(population, weights=weights, k=n)
        else:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        inputs, seen = [], set()
        for shift in shifts:
            for _ in range(100):  # redraw the text on a repeat; give up if the space is that small
                text = self._text(rng)
                if (text, shift) not in seen:
                    seen.add((text, shift))
                    inputs.append([text, shift])
                    break
        return inputs

    def _text(self, rng: random.Random) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(self.min_words, self.max_words)))

    def execute(self, instruction: Instruction, inputs: list[list]) -> list[Example]:
        """Run the cipher's source in the sandbox; the CoT is the independent trace, checked against it."""
        entry = instruction.meta["entry_point"]
        results = run_calls(instruction.text, entry, [list(x) for x in inputs], timeout_s=self.timeout_s)
        examples = []
        for (text, shift), result in zip(inputs, results, strict=True):
            if not result.ok or not isinstance(result.value, str):
                raise RuntimeError(f"{instruction.id} on {[text, shift]}: {result.error or result.value!r}")
            cot, traced = trace(instruction.meta["cipher"], text, shift)
            if traced != result.value:
                raise RuntimeError(
                    f"{instruction.id} on {[text, shift]}: trace {traced!r} != {result.value!r}"
                )
            cot = cot if self.cot else None
            examples.append(
                Example(instruction.id, [text, shift], encode_output(result.value), cot, {"shift": shift})
            )
        return examples

    def score(self, instruction: Instruction, example: Example, answer: str | None) -> float:
        """1.0 iff the answer, stripped of whitespace and quotes at its ends, is the ciphertext."""
        if answer is None:
            return 0.0
        return float(answer.strip().strip("\"'").strip() == json.loads(example.output))

    def render_input(self, example: Example) -> str:
        text, shift = example.input
        return f"'{text}' with shift {shift}"


def _names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct invented, pronounceable names ("Zanth", "Korvel"): 5-9 letters, not in the word list,
    not a Python keyword or builtin."""
    names: list[str] = []
    taken = (
        set(_WORDS) | set(keyword.kwlist) | set(dir(builtins)) | {"text", "shift", "result", "count", "word"}
    )
    while len(names) < n:
        name = rng.choice(_ONSETS) + rng.choice(_NUCLEI)
        if rng.random() < 0.5:  # a second, plain syllable
            name += rng.choice(_ONSETS) + rng.choice(VOWELS)
        name += rng.choice(_CODAS)
        if 5 <= len(name) <= 9 and name not in taken:
            taken.add(name)
            names.append(name.capitalize())
    return names
