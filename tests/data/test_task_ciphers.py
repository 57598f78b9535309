"""The cipher domain: every cipher's source really runs, agrees with hand-computed vectors and with the
CoT trace, and inputs cover shifts as configured (eval: 1..25 equally; skewed train: the demonstrations)."""

import json
import re
from collections import Counter

import pytest

from pbbjax.data.tasks.base import Example, Instruction, get_domain
from pbbjax.data.tasks.ciphers import (
    CIPHERS,
    DEFAULT_DEMONSTRATION_SHIFTS,
    FAMILIES,
    CipherDomain,
    accuracy_by_shift,
    trace,
)

N_CIPHERS = len(CIPHERS)


@pytest.fixture(scope="module")
def domain():
    return get_domain("ciphers")


@pytest.fixture(scope="module")
def executed(domain):
    """Every cipher, run in the sandbox on 10 eval inputs each: [(instruction, examples)]."""
    out = []
    for ins in domain.instructions(N_CIPHERS, seed=0):
        out.append((ins, domain.execute(ins, domain.sample_inputs(ins, 10, seed=1, split="eval"))))
    return out


def _run(ins: Instruction, text: str, shift: int) -> str:
    """Our own generated source, exec'd in this process: the reference for the sandboxed run."""
    namespace: dict = {}
    exec(ins.text, namespace)
    return namespace[ins.meta["entry_point"]](text, shift)


def test_catalog_has_dozens_of_distinct_ciphers_in_every_family(domain):
    assert N_CIPHERS >= 50 and set(FAMILIES) == {c.family for c in CIPHERS.values()} and len(FAMILIES) >= 10
    instructions = domain.instructions(N_CIPHERS, seed=0)
    assert len({i.meta["cipher"] for i in instructions}) == N_CIPHERS
    assert len({i.text.split("\n", 1)[1] for i in instructions}) == N_CIPHERS  # distinct bodies
    # distinct behaviour: no two ciphers agree on a probe set that separates every family and parameter
    probes = [("hello world again", s) for s in (1, 2, 3, 5, 11)] + [("abc def ghi jkl", 4)]
    behaviours = {tuple(_run(i, t, s) for t, s in probes) for i in instructions}
    assert len(behaviours) == N_CIPHERS
    with pytest.raises(ValueError):
        domain.instructions(N_CIPHERS + 1, seed=0)


# Hand-computed vectors, one or more per family: (cipher key, text, shift, ciphertext).
VECTORS = [
    ("caesar_d1", "hello world", 3, "khoor zruog"),
    ("caesar_d1", "hello world", 13, "uryyb jbeyq"),
    ("caesar_d1", "xyz", 3, "abc"),
    ("caesar_d-1", "khoor zruog", 3, "hello world"),
    ("vowels_d1", "hello world", 1, "hfllp wprld"),
    ("vowels_d-1", "hello", 1, "hdlln"),
    ("consonants_d1", "hello world", 1, "iemmo xosme"),
    ("reverse_d1", "hello world", 3, "gourz roohk"),
    ("reverse_words_d1", "hello world", 3, "roohk gourz"),
    ("alternate_d1", "abc", 1, "bad"),
    ("alternate_d-1", "abc", 1, "zcb"),
    ("split_d1", "hello", 1, "gfkkp"),
    ("mirror_d1", "abc", 1, "azy"),
    ("mirror_d-1", "abc", 1, "yxw"),
    ("scaled_k3", "abc", 1, "def"),
    ("scaled_k23", "abc", 1, "xyz"),
    ("skip_k2_r0", "ab cd", 1, "bb dd"),
    ("skip_k3_r1", "aaaa", 5, "afaa"),
    ("progressive_m1_d1", "a a", 1, "b d"),
    ("progressive_m1_d-1", "aaa", 5, "fed"),
    ("progressive_m2_d1", "aaa", 1, "bdf"),
    ("running_m1", "a a", 1, "b c"),
    ("word_k1", "ab cd", 1, "bc ef"),
    ("word_k2", "a a a", 1, "b d f"),
]


def test_sources_match_hand_computed_vectors_in_sandbox_exec_and_trace(domain):
    instructions = {i.meta["cipher"]: i for i in domain.instructions(N_CIPHERS, seed=3)}
    assert {CIPHERS[key].family for key, *_ in VECTORS} == set(FAMILIES)
    for key, text, shift, expected in VECTORS:
        ins = instructions[key]
        assert _run(ins, text, shift) == expected, key
        assert trace(key, text, shift)[1] == expected, key
    ins = instructions["caesar_d1"]
    ex = domain.execute(ins, [["hello world", 3], ["hello world", 13]])
    assert [json.loads(e.output) for e in ex] == ["khoor zruog", "uryyb jbeyq"]


def test_every_cipher_runs_in_the_sandbox_and_matches_exec_and_a_plain_caesar(executed):
    for ins, examples in executed:
        assert len(examples) == 10 and ins.text.startswith(f"def {ins.meta['entry_point']}(text, shift):")
        for ex in examples:
            text, shift = ex.input
            assert json.loads(ex.output) == _run(ins, text, shift)
            assert ex.meta == {"shift": shift} and ex.instruction_id == ins.id
            if ins.meta["family"] == "caesar":
                d = ins.meta["params"]["d"]
                plain = "".join(c if c == " " else chr((ord(c) - 97 + d * shift) % 26 + 97) for c in text)
                assert json.loads(ex.output) == plain


LINE = re.compile(r"^([a-z]) \((\d+)\) (25-\d+)?([+-]\d+) -> ([a-z]) \((\d+)\)$")


def _replay(text: str, cot: str, mirror: bool) -> str:
    """Check each CoT line's arithmetic and return the text it spells (after a final reverse line)."""
    lines = cot.split("\n")
    chars = []
    for ch, line in zip(text, lines, strict=False):
        if line in ("(space) kept", f"{ch} kept"):
            chars.append(ch)
            continue
        m = LINE.match(line)
        assert m and m[1] == ch, line
        x, amount, y = int(m[2]), int(m[4]), int(m[6])
        assert x == ord(ch) - 97 and bool(m[3]) == mirror and -26 < amount < 26
        assert y == ((25 - x if mirror else x) + amount) % 26 and m[5] == chr(97 + y), line
        chars.append(m[5])
    spelled = "".join(chars)
    extra = lines[len(text) :]
    if not extra:
        return spelled
    (last,) = extra
    if last.startswith("reverse the text: "):
        assert last.removeprefix("reverse the text: ") == spelled[::-1]
        return spelled[::-1]
    assert last.startswith("reverse each word: ")
    assert last.removeprefix("reverse each word: ") == " ".join(w[::-1] for w in spelled.split(" "))
    return last.removeprefix("reverse each word: ")


def test_cot_trace_steps_add_up_to_the_sandboxed_output(executed):
    checked = 0
    for ins, examples in executed:
        for ex in examples:
            assert "Answer" not in ex.cot
            mirror = ins.meta["family"] == "mirror"
            assert _replay(ex.input[0], ex.cot, mirror) == json.loads(ex.output), (ins.meta["cipher"], ex)
            checked += 1
    assert checked >= 500


def test_trace_keeps_other_characters_like_the_source(domain):
    for ins in domain.instructions(N_CIPHERS, seed=5):
        for text, shift in [("hello, world! 42", 7), ("zebra-crossing  at noon.", 19)]:
            assert trace(ins.meta["cipher"], text, shift)[1] == _run(ins, text, shift), ins.meta["cipher"]


def test_eval_inputs_cover_every_shift_equally(domain):
    ins = domain.instructions(3, seed=0)[1]
    for n in (25, 50, 60, 7):
        inputs = domain.sample_inputs(ins, n, seed=2, split="eval")
        counts = Counter(s for _, s in inputs)
        assert len(inputs) == n and len({json.dumps(x) for x in inputs}) == n
        assert set(counts) <= set(range(1, 26)) and max(counts.values()) - min(counts.values()) <= 1
        assert len(counts) == min(n, 25)
    assert Counter(s for _, s in domain.sample_inputs(ins, 50, seed=2, split="eval")) == {
        s: 2 for s in range(1, 26)
    }
    with pytest.raises(ValueError):
        domain.sample_inputs(ins, 5, seed=0, split="test")


def test_train_shifts_uniform_or_following_the_configured_demonstrations(domain):
    ins = domain.instructions(1, seed=0)[0]
    n = 4000
    uniform = Counter(s for _, s in domain.sample_inputs(ins, n, seed=4))
    assert set(uniform) == set(range(1, 26)) and all(0.025 < c / n < 0.055 for c in uniform.values())
    skewed = Counter(s for _, s in domain.sample_inputs(ins, n, seed=4, skewed=True))
    assert abs(sum(DEFAULT_DEMONSTRATION_SHIFTS.values()) - 1) < 1e-9
    for s in (3, 13):
        assert abs(skewed[s] / n - 0.45) < 0.03
    assert abs((n - skewed[3] - skewed[13]) / n - 0.10) < 0.02
    # a configured distribution, keyed by strings as config dicts are: chi-square against it (1 dof,
    # 99.9% critical value 10.83)
    custom = CipherDomain(demonstration_shifts={"5": 1.0, "7": 3.0})
    counts = Counter(s for _, s in custom.sample_inputs(ins, n, seed=4, skewed=True))
    assert set(counts) == {5, 7}
    chi2 = sum((counts[s] - n * p) ** 2 / (n * p) for s, p in ((5, 0.25), (7, 0.75)))
    assert chi2 < 10.83
    # eval ignores the skew
    assert len(set(s for _, s in custom.sample_inputs(ins, 25, seed=4, split="eval", skewed=True))) == 25


def test_input_texts_are_common_words_and_word_counts_configurable(domain):
    ins = domain.instructions(1, seed=0)[0]
    texts = [t for t, _ in domain.sample_inputs(ins, 300, seed=9)]
    assert all(re.fullmatch(r"[a-z]+( [a-z]+){0,2}", t) for t in texts)
    assert {len(t.split()) for t in texts} == {1, 2, 3} and len({w for t in texts for w in t.split()}) > 150
    single = CipherDomain(max_words=1).sample_inputs(ins, 50, seed=9)
    assert all(" " not in t for t, _ in single)
    pairs = CipherDomain(min_words=4, max_words=4).sample_inputs(ins, 50, seed=9)
    assert all(len(t.split()) == 4 for t, _ in pairs)


def test_determinism(domain):
    a, b = domain.instructions(20, seed=7), domain.instructions(20, seed=7)
    assert a == b and [i.meta for i in a] == [i.meta for i in b]
    assert {i.name for i in domain.instructions(20, seed=8)} != {i.name for i in a}
    ins = a[0]
    inputs = domain.sample_inputs(ins, 30, seed=1)
    assert inputs == domain.sample_inputs(ins, 30, seed=1) != domain.sample_inputs(ins, 30, seed=2)
    assert domain.sample_inputs(ins, 30, seed=1, split="eval") != inputs
    assert domain.execute(ins, inputs[:5]) == domain.execute(ins, inputs[:5])


def test_names_are_unique_invented_identifiers(domain):
    for seed in range(5):
        instructions = domain.instructions(N_CIPHERS, seed=seed)
        names = [i.name for i in instructions]
        assert len(set(names)) == len({i.id for i in instructions}) == N_CIPHERS
        for ins in instructions:
            m = re.fullmatch(r"the ([A-Z][a-z]{4,8}) cipher", ins.name)
            assert m and ins.id == f"ciphers/{m[1].lower()}" and ins.meta["entry_point"] == m[1].lower()
            assert ins.text_nl.startswith(f"The {m[1]} cipher, {m[1].lower()}(text, shift): ")
    # few ciphers still come from different families
    assert len({i.meta["family"] for i in domain.instructions(len(FAMILIES), seed=0)}) == len(FAMILIES)
    only = CipherDomain(families=["caesar", "vowels"]).instructions(4, seed=0)
    assert {i.meta["family"] for i in only} == {"caesar", "vowels"}


def test_templates(domain):
    decl, exe = domain.declarative_templates, domain.execution_templates
    assert len(decl) >= 20 and len(exe) >= 10 and len(set(decl)) == len(decl) and len(set(exe)) == len(exe)
    assert all("{name}" in t and "{input}" not in t for t in decl)
    assert all("{name}" in t and "{input}" in t for t in exe)
    ex = Example("ciphers/zanth", ["hello world", 3], '"khoor zruog"', meta={"shift": 3})
    rendered = domain.render_input(ex)
    assert rendered == "'hello world' with shift 3"
    assert exe[0].format(name="the Zanth cipher", input=rendered) == (
        "Use the Zanth cipher to encrypt 'hello world' with shift 3."
    )


def test_score(domain, executed):
    ins, examples = executed[0]
    ex = examples[0]
    right = json.loads(ex.output)
    for answer in (right, f'"{right}"', f"  '{right}' ", ex.output):
        assert domain.score(ins, ex, answer) == 1.0
    for answer in (None, "", right[:-1], right + "x", right.upper(), f'"{right} "x'):
        assert domain.score(ins, ex, answer) == 0.0


def test_accuracy_by_shift():
    exs = [Example("ciphers/a", ["a", s], '"b"', meta={"shift": s}) for s in (3, 13, 3, 13, 3, 25)]
    assert accuracy_by_shift(exs, [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]) == {3: 2 / 3, 13: 0.0, 25: 1.0}
    with pytest.raises(ValueError):
        accuracy_by_shift(exs, [1.0])


def test_options_validated_and_cot_optional(domain):
    for bad in (
        dict(min_words=0),
        dict(min_words=3, max_words=2),
        dict(demonstration_shifts={26: 1.0}),
        dict(demonstration_shifts={3: -1.0}),
        dict(demonstration_shifts={3: 0.0}),
        dict(families=["x"]),
    ):
        with pytest.raises(ValueError):
            CipherDomain(**bad)
    ins = domain.instructions(1, seed=0)[0]
    (ex,) = CipherDomain(cot=False).execute(ins, [["hello", 3]])
    assert ex.cot is None and ex.output == json.dumps(_run(ins, "hello", 3))
