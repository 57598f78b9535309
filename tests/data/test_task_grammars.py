"""The grammars domain, judged by an independent parser: lark's Earley parser on a lark grammar that this file
builds straight from the instruction text (not from pbbjax's own reading of it). Measured rates are printed
(``pytest -s``)."""

import random
import re

import lark
import pytest

from pbbjax.data.tasks.base import Example, extract_answer, get_domain
from pbbjax.data.tasks.context_free import GrammarError, diversity, parse_grammar_text, validate
from pbbjax.data.tasks.grammars import GrammarDomain

SEEDS = (0, 1, 2)
N_GRAMMARS = 30
N_SENTENCES = 50


def _rules(text: str) -> dict[str, list[list[str]]]:
    """The test's own reading of the text format: ``LHS -> sym sym | sym``, one nonterminal per line."""
    rules = {}
    for line in text.splitlines():
        lhs, rhs = line.split(" -> ")
        rules[lhs] = [alt.split() for alt in rhs.split(" | ")]
    return rules


def _judge(text: str):
    """A membership test for the grammar ``text`` by lark's Earley parser."""
    rules = _rules(text)
    lark_rules = [
        f"nt_{lhs.lower()}: "
        + " | ".join(
            " ".join(f'"{s[1:-1]}"' if s[0] == "'" else f"nt_{s.lower()}" for s in alt) for alt in alts
        )
        for lhs, alts in rules.items()
    ]
    start = f"nt_{next(iter(rules)).lower()}"
    parser = lark.Lark("\n".join(lark_rules) + '\n%ignore " "', start=start, parser="earley", lexer="basic")

    def accepts(sentence: str) -> bool:
        try:
            parser.parse(sentence)
        except lark.exceptions.LarkError:
            return False
        return True

    return accepts


def _vocab(text: str) -> list[str]:
    return sorted(set(re.findall(r"'([^']+)'", text)))


@pytest.fixture(scope="module")
def domain():
    return GrammarDomain()


@pytest.fixture(scope="module")
def corpus(domain):
    """(instruction, judge, sentences) for N_GRAMMARS grammars of each seed."""
    out = []
    for seed in SEEDS:
        for inst in domain.instructions(N_GRAMMARS, seed):
            sentences = [e.output for e in domain.execute(inst, [None] * N_SENTENCES)]
            out.append((inst, _judge(inst.text), sentences))
    return out


def test_registered_and_options_checked():
    assert isinstance(get_domain("grammars", max_depth=4), GrammarDomain)
    with pytest.raises(ValueError, match="n_alternatives"):
        GrammarDomain(n_alternatives=(3, 2))
    with pytest.raises(ValueError, match="prefix_fraction"):
        GrammarDomain(prefix_fraction=1.5)


def test_parser_accepts_every_sampled_sentence(domain, corpus):
    n = 0
    for inst, accepts, sentences in corpus:
        for sentence in sentences:
            assert accepts(sentence), f"{inst.name} rejects its own sample {sentence!r}\n{inst.text}"
            assert domain.score(inst, Example(inst.id, None, sentence), sentence) == 1.0
            assert 1 <= len(sentence.split()) <= domain.max_words
            n += 1
    lengths = [len(s.split()) for _, _, ss in corpus for s in ss]
    print(
        f"\n{n} sampled sentences of {len(corpus)} grammars all accepted by lark;"
        f" length mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}"
    )


def test_rejects_random_baseline_and_single_word_mutations(domain, corpus):
    rng = random.Random(0)
    rejected = {"baseline": [], "replace": [], "insert": [], "delete": []}
    base_lengths, lengths = [], []
    for inst, accepts, sentences in corpus:
        baseline = domain.random_baseline(inst, N_SENTENCES, seed=1)
        rejected["baseline"] += [not accepts(s) for s in baseline]
        base_lengths += [len(s.split()) for s in baseline]
        lengths += [len(s.split()) for s in sentences]
        vocab = _vocab(inst.text)
        assert all(set(s.split()) <= set(vocab) for s in baseline)
        for sentence in sentences[:20]:
            words = sentence.split()
            i = rng.randrange(len(words))
            replaced = words[:i] + [rng.choice([w for w in vocab if w != words[i]])] + words[i + 1 :]
            j = rng.randrange(len(words) + 1)
            inserted = words[:j] + [rng.choice(vocab)] + words[j:]
            rejected["replace"].append(not accepts(" ".join(replaced)))
            rejected["insert"].append(not accepts(" ".join(inserted)))
            if len(words) > 1:
                rejected["delete"].append(not accepts(" ".join(words[:i] + words[i + 1 :])))
    rates = {kind: sum(r) / len(r) for kind, r in rejected.items()}
    print(
        "\nrejection rates over",
        len(corpus),
        "grammars:",
        {k: f"{v:.4f} of {len(rejected[k])}" for k, v in rates.items()},
    )
    assert all(rate >= 0.95 for rate in rates.values()), rates
    # the baseline's lengths follow the sentences' (both drawn from the same sampler)
    assert abs(sum(base_lengths) / len(base_lengths) - sum(lengths) / len(lengths)) < 1.0


def test_generated_grammars_are_proper(corpus):
    for inst, _, _ in corpus:
        rules = _rules(inst.text)
        assert next(iter(rules)) == "S"
        productive, changed = set(), True
        while changed:
            changed = False
            for lhs, alts in rules.items():
                if lhs not in productive and any(
                    all(s[0] == "'" or s in productive for s in alt) for alt in alts
                ):
                    productive.add(lhs)
                    changed = True
        reached, todo = {"S"}, ["S"]
        while todo:
            for alt in rules[todo.pop()]:
                new = {s for s in alt if s[0] != "'"} - reached
                reached |= new
                todo += new
        assert productive == reached == set(rules), inst.text
        # the construction behind the rejection rates: >= 2 words per alternative, each word used once
        words = re.findall(r"'([^']+)'", inst.text)
        assert len(words) == len(set(words)) == inst.meta["n_words"]
        assert all(sum(s[0] == "'" for s in alt) >= 2 for alts in rules.values() for alt in alts)
        # recursion: some nonterminal reaches itself, so the language is infinite and the depth bound matters
        calls = {lhs: {s for alt in alts for s in alt if s[0] != "'"} for lhs, alts in rules.items()}
        below = {lhs: set(c) for lhs, c in calls.items()}
        for _ in rules:
            below = {lhs: b.union(*(below[c] for c in b)) for lhs, b in below.items()}
        assert any(lhs in b for lhs, b in below.items()), inst.text


def test_validate_names_the_bad_nonterminal():
    with pytest.raises(GrammarError, match=r"unproductive nonterminal\(s\) 'B'"):
        parse_grammar_text("S -> 'a' 'b' | 'c' B\nB -> 'd' B", "loopy")
    with pytest.raises(GrammarError, match=r"unreachable nonterminal\(s\) 'C', 'D'"):
        parse_grammar_text("S -> 'a' 'b'\nC -> 'c' D\nD -> 'd'")
    with pytest.raises(GrammarError, match="'X'.*has no rules"):
        parse_grammar_text("S -> 'a' X")
    with pytest.raises(GrammarError, match="line 2"):
        parse_grammar_text("S -> 'a' A\nA = 'b'")
    grammar = parse_grammar_text("# a comment\nS -> 'a' A | 'b'\nA -> 'c'\nA -> S 'd'  # more alternatives")
    assert grammar.rules == {"S": [("'a'", "A"), ("'b'",)], "A": [("'c'",), ("S", "'d'")]}
    grammar.rules["A"] = [("A", "'c'")]
    with pytest.raises(GrammarError, match=r"unproductive nonterminal\(s\) 'A':"):
        validate(grammar)


def test_grammar_file(tmp_path):
    path = tmp_path / "grammars.txt"
    path.write_text("# the Toy grammar\nS -> 'a' A 'b' | 'c' 'd'\nA -> 'e' 'f'\n\nS -> 'x' 'y' | 'x' S 'y'\n")
    domain = GrammarDomain(grammar_file=str(path))
    insts = domain.instructions(2, seed=0)
    assert {i.name for i in insts} == {"the Toy grammar", "grammar U2"}
    for inst in insts:
        accepts = _judge(inst.text)
        assert all(accepts(e.output) for e in domain.execute(inst, [None] * 10))
    path.write_text("S -> 'a' 'b' | B\nB -> B 'c'\n")
    with pytest.raises(GrammarError, match="'B'"):
        GrammarDomain(grammar_file=str(path)).instructions(1, seed=0)


def test_prefixes_are_honoured(domain, corpus):
    for inst, accepts, _ in corpus[:20]:
        inputs = domain.sample_inputs(inst, 10, seed=3, prefix_fraction=1.0)
        assert inputs and all(x is not None for x in inputs) and len({x[0] for x in inputs}) == len(inputs)
        for ex in domain.execute(inst, inputs):
            assert ex.output.split()[: len(ex.input[0].split())] == ex.input[0].split()
            assert accepts(ex.output) and domain.score(inst, ex, ex.output) == 1.0
    inst, accepts, sentences = corpus[0]
    ex = domain.execute(inst, [[sentences[0].split()[0]]])[0]
    other = next(s for s in sentences if s.split()[0] != ex.input[0])  # grammatical, but wrong start
    assert accepts(other) and domain.score(inst, ex, other) == 0.0
    # each word occurs once, in an alternative of >= 2 words: a word that ends a sentence never starts one
    with pytest.raises(GrammarError, match="starts with"):
        domain.execute(inst, [[sentences[0].split()[-1]]])
    default = domain.sample_inputs(inst, 20, seed=0)
    assert default == [None] * 20  # prefix_fraction defaults to 0: plain generation
    mixed = GrammarDomain(prefix_fraction=0.5).sample_inputs(inst, 100, seed=0)
    assert 25 < sum(x is not None for x in mixed) < 75


def test_determinism_and_variety(domain, corpus):
    a, b = domain.instructions(10, seed=7), domain.instructions(10, seed=7)
    assert a == b and len({i.id for i in a}) == len({i.text for i in a}) == 10
    assert {i.id for i in domain.instructions(10, seed=8)} != {i.id for i in a}
    assert all(i.id == "grammars/" + i.name.split()[-1].lower() for i in a)
    inst = a[0]
    inputs = [None, None] + domain.sample_inputs(inst, 5, seed=1, prefix_fraction=1.0)
    assert domain.execute(inst, inputs) == domain.execute(inst, inputs)
    assert domain.sample_inputs(inst, 5, 1, prefix_fraction=1.0) == inputs[2:]
    assert domain.sample_inputs(inst, 5, 1, "eval", prefix_fraction=1.0) != inputs[2:]
    first = [e.output for e in domain.execute(inst, [None] * 30)]
    assert domain.execute(inst, [None])[0].output == first[0]  # the k-th None draws from its own stream
    other = [e.output for e in GrammarDomain(execute_seed=1).execute(inst, [None] * 30)]
    assert first != other
    divs = [diversity(sentences) for _, _, sentences in corpus]
    print(f"\ndiversity of {N_SENTENCES} samples: mean {sum(divs) / len(divs):.2f}, min {min(divs):.2f}")
    assert sum(divs) / len(divs) > 0.5


def test_diversity_on_known_inputs():
    assert diversity(["a b", "a b", "c", "d"]) == 0.75
    assert diversity(["a  b ", "a b"]) == 0.5
    assert diversity([]) == 0.0
    assert GrammarDomain.diversity(["x", "y"]) == 1.0


def test_cot_is_the_leftmost_derivation(domain, corpus):
    inst, _, _ = corpus[0]
    rules = _rules(inst.text)
    for ex in domain.execute(inst, [None] * 10):
        lines = ex.cot.split("\n")
        assert lines[0] == "S" and lines[-1] == "=> " + ex.output
        forms = [lines[0].split()] + [line.removeprefix("=> ").split() for line in lines[1:]]
        for before, after in zip(forms, forms[1:], strict=False):  # one rule, on the leftmost nonterminal
            i = next(k for k, s in enumerate(before) if s in rules)
            grown = len(after) - len(before) + 1
            assert before[:i] == after[:i] and before[i + 1 :] == after[i + grown :]
            assert [s.strip("'") for s in after[i : i + grown]] in [
                [s.strip("'") for s in alt] for alt in rules[before[i]]
            ]
    assert GrammarDomain(cot=False).execute(inst, [None])[0].cot is None


def test_templates_and_rendering(domain, corpus):
    dec, exe = domain.declarative_templates, domain.execution_templates
    assert len(set(dec)) == len(dec) >= 20 and all("{name}" in t for t in dec)
    assert len(set(exe)) == len(exe) >= 10 and all("{name}" in t and "{input}" in t for t in exe)
    inst = corpus[0][0]
    plain = Example(inst.id, None, "x")
    prefixed = Example(inst.id, ["tiger raft"], "x")
    assert domain.render_input(plain) == ""
    assert domain.render_input(prefixed) == ', starting with "tiger raft"'
    for t in exe:
        assert t.format(name=inst.name, input="")[-1] in ".?"
        text = t.format(name=inst.name, input=domain.render_input(prefixed))
        assert re.search(r', starting with "tiger raft"[.?]$', text), text
    assert dec[0].format(name="grammar G17") == "Write down the rules of grammar G17."


def test_score(domain, corpus):
    inst, accepts, sentences = corpus[0]
    ex = Example(inst.id, None, sentences[0])
    assert domain.score(inst, ex, None) == 0.0
    assert domain.score(inst, ex, extract_answer(f"S\n=> ...\nAnswer: {sentences[1]}")) == 1.0
    assert (
        domain.score(inst, ex, "  " + sentences[1].replace(" ", "  ") + " ") == 1.0
    )  # spacing is not judged
    assert domain.score(inst, ex, sentences[1] + ".") == 0.0
    assert (
        domain.score(inst, ex, sentences[1].replace(" ", "")) == 0.0
    )  # lark alone would lex the glued words
    assert domain.score(inst, ex, "") == 0.0
    foreign = corpus[1][2][0]  # a sentence of another grammar: different words
    assert not accepts(foreign) and domain.score(inst, ex, foreign) == 0.0
