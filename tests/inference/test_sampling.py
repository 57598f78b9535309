"""The sampler's controls: temperature / top-k / top-p, n samples, log-probs, stop strings, bad input."""

import jax
import numpy as np
import pytest
from scipy import stats

from pbbjax import generate, load_model
from pbbjax.inference.sampler import (
    generate_arrays,
    generate_tokens,
    process_logits,
    prompt_bucket,
    segment_count,
    segment_ends,
)
from pbbjax.inference.stops import cut_at_stop, stop_token_sequences

PROMPT = [5, 17, 33, 2, 9, 101, 64]
NO_EOS = dict(eos_ids=(-1,), pad_id=0)  # no token ends a row, so the first token is always kept


@pytest.fixture(scope="module")
def tiny(hf_dirs):
    model, _ = load_model(hf_dirs["llama_gqa"][1])
    return model


def _last_logits(model, ids) -> np.ndarray:
    return np.asarray(model(np.asarray([ids], np.int32)))[0, -1].astype(np.float64)


def _np_process(logits, temperature, top_k=0, top_p=1.0) -> np.ndarray:
    """An independent numpy version of process_logits, float64."""
    x = logits / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    if top_p < 1:
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        m = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # first cumulative sum >= top_p
        keep = np.zeros(x.shape, bool)
        keep[order[:m]] = True
        x = np.where(keep, x, -np.inf)
    return x


def _log_softmax(x):
    return x - x.max() - np.log(np.sum(np.exp(x - x.max())))


def test_process_logits_by_hand():
    logits = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    inf = -np.inf
    np.testing.assert_allclose(process_logits(logits, 2.0), [[0.5, 1.0, 1.5, 2.0]])
    np.testing.assert_allclose(process_logits(logits, 0.0), logits)  # greedy: no scaling
    np.testing.assert_allclose(process_logits(logits, 1.0, top_k=2), [[inf, inf, 3.0, 4.0]])
    np.testing.assert_allclose(process_logits(logits, 1.0, top_k=9), logits)
    p = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    np.testing.assert_allclose(process_logits(p, 1.0, top_p=0.5), [[inf, inf, p[0, 2], p[0, 3]]])
    np.testing.assert_allclose(process_logits(p, 1.0, top_p=0.35), [[inf, inf, inf, p[0, 3]]])
    np.testing.assert_allclose(process_logits(p, 1.0, top_p=1e-4), [[inf, inf, inf, p[0, 3]]])
    np.testing.assert_allclose(process_logits(p, 1.0, top_p=0.85), [[inf, *p[0, 1:]]])
    np.testing.assert_allclose(process_logits(p, 1.0, top_p=0.95), p)
    # top-p acts on the top-k distribution renormalised: 0.4 / 0.7 >= 0.5 alone.
    np.testing.assert_allclose(process_logits(p, 1.0, top_k=2, top_p=0.5), [[inf, inf, inf, p[0, 3]]])
    # Traced options (one compile for all values) agree with the static ones, row by row.
    jitted = jax.jit(process_logits)
    rows = np.concatenate([p, p[:, ::-1]])
    for t, k, top_p in [(1.0, 0, 0.5), (0.5, 3, 1.0), (2.0, 2, 0.6), (1.0, 0, 1.0)]:
        want = process_logits(rows, t, k, top_p)
        np.testing.assert_allclose(jitted(rows, t, k, top_p), want)
        np.testing.assert_allclose(want, np.stack([_np_process(r, t, k, top_p) for r in rows]), rtol=1e-6)


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef END", ["END", "\n\n"]) == "abc"
    assert cut_at_stop("abc END\n\n", ["\n\n", "END"]) == "abc "
    assert cut_at_stop("abc", ["zzz"]) == "abc"
    assert cut_at_stop("abc", None) == "abc"
    assert cut_at_stop("abc", []) == "abc"


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9)])
def test_first_token_frequencies_match_softmax(tiny, temperature, top_k, top_p):
    n = 2000
    out = generate_tokens(
        tiny, [PROMPT], 1, temperature=temperature, top_k=top_k, top_p=top_p, n=n, seed=1, **NO_EOS
    )
    first = np.array([t[0] for t in out])
    x = _np_process(_last_logits(tiny, PROMPT), temperature, top_k, top_p)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    assert set(first) <= set(np.flatnonzero(probs > 0))
    # Bins in decreasing expected count; the rarest merged into one until every bin expects >= 5.
    order = np.argsort(-probs)
    expected, observed = n * probs[order], np.bincount(first, minlength=len(probs))[order]
    cut = max(1, int(np.sum(expected >= 5)))
    expected = np.append(expected[:cut], expected[cut:].sum())
    observed = np.append(observed[:cut], observed[cut:].sum())
    if expected[-1] < 5:
        expected[-2:], observed[-2:] = [expected[-2:].sum(), 0], [observed[-2:].sum(), 0]
        expected, observed = expected[:-1], observed[:-1]
    assert len(expected) >= 5
    p = stats.chisquare(observed, expected).pvalue
    assert p > 1e-3, f"chi-square p = {p}"


def test_top_k_and_top_p_stay_inside(tiny):
    logits = _last_logits(tiny, PROMPT)
    top5 = set(np.argsort(-logits)[:5])
    out = generate_tokens(tiny, [PROMPT], 1, temperature=1.5, top_k=5, n=2000, seed=2, **NO_EOS)
    seen = {t[0] for t in out}
    assert seen <= top5 and len(seen) == 5
    nucleus = set(np.flatnonzero(np.isfinite(_np_process(logits, 1.0, top_p=0.5))))
    assert 1 < len(nucleus) < 100  # the tiny model's next-token distribution is flat
    out = generate_tokens(tiny, [PROMPT], 1, temperature=1.0, top_p=0.5, n=2000, seed=3, **NO_EOS)
    seen = {t[0] for t in out}
    assert seen <= nucleus and len(seen) >= 10


def test_n_samples_shape_order_and_seed(tiny):
    """n samples per prompt are the prompt's row repeated, prompt-major: the same as repeating the prompts
    (one batch shape, so one compile, for every call here)."""
    prompts, short = [PROMPT, [7, 7, 3]], [7, 7, 3]
    repeated = [PROMPT] * 3 + [short] * 3
    greedy3 = generate_tokens(tiny, prompts, 5, n=3, **NO_EOS)
    assert greedy3 == generate_tokens(tiny, repeated, 5, **NO_EOS)
    assert greedy3[:3] == [greedy3[0]] * 3 and greedy3[3:] == [greedy3[3]] * 3 and greedy3[0] != greedy3[3]
    sampled = generate_tokens(tiny, prompts, 5, temperature=1.0, n=3, seed=4, **NO_EOS)
    assert len(sampled) == 6 and all(len(t) == 5 for t in sampled)
    assert sampled == generate_tokens(tiny, repeated, 5, temperature=1.0, seed=4, **NO_EOS)
    assert sampled != generate_tokens(tiny, prompts, 5, temperature=1.0, n=3, seed=5, **NO_EOS)
    assert len({tuple(t) for t in sampled[:3]}) > 1  # the repeated rows draw independently


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 10, 0.9), (0.0, 0, 1.0)])
def test_logprobs_of_chosen_tokens(tiny, temperature, top_k, top_p):
    steps = 5  # the shapes of test_n_samples_shape_order_and_seed's sampled call: no new compile
    tokens, logprobs = generate_tokens(
        tiny, [PROMPT, PROMPT], steps, temperature=temperature, top_k=top_k, top_p=top_p, n=3, seed=6,
        return_logprobs=True, **NO_EOS,
    )  # fmt: skip
    assert [len(t) for t in tokens] == [len(lp) for lp in logprobs] == [steps] * 6
    for row, lps in zip(tokens[:3], logprobs[:3], strict=True):
        # One full forward over prompt + generated tokens scores every step independently of the cache.
        full = np.asarray(tiny(np.asarray([PROMPT + row], np.int32)))[0].astype(np.float64)
        for j, (tok, lp) in enumerate(zip(row, lps, strict=True)):
            logits = full[len(PROMPT) - 1 + j]
            if temperature == 0:
                assert tok == np.argmax(logits)
                want = _log_softmax(logits)[tok]  # greedy: the temperature-1 softmax of the raw logits
            else:
                want = _log_softmax(_np_process(logits, temperature, top_k, top_p))[tok]
            assert lp == pytest.approx(want, abs=1e-3 if j else 1e-4)


class CharTokenizer:
    """One token per ASCII character (the tiny model's vocabulary is 128)."""

    eos_token_id, pad_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_generate_stop_strings(tiny):
    tok = CharTokenizer()
    prompts = ["hello", "abc"]
    texts = generate(tiny, tok, prompts, 12, temperature=1.0, seed=7, n=4)
    assert len(texts) == 8
    longest = max(texts, key=len)
    assert len(longest) >= 4
    stop = longest[len(longest) // 2 : len(longest) // 2 + 2]
    cut = generate(tiny, tok, prompts, 12, temperature=1.0, seed=7, n=4, stop=[stop, "\u2603"])
    assert cut == [t[: t.index(stop)] if stop in t else t for t in texts]
    assert cut != texts
    assert generate(tiny, tok, prompts, 12, temperature=1.0, seed=7, n=4, stop=["\u2603"]) == texts


def test_stop_string_ends_rows_early(tiny):
    """A stop string that the greedy text contains: the text is cut before it, and the row stops decoding
    right after the token that completes it (fewer decode steps). CharTokenizer: one token per character."""
    tok = CharTokenizer()
    full = generate(tiny, tok, ["hello"], 24)[0]
    plain = generate_arrays(tiny, [tok("hello")["input_ids"]], 24, eos_ids=(2,), pad_id=0)
    assert len(full) == 24 and plain.steps == 24 and not plain.ended[0]  # no EOS in the 24 greedy tokens
    stop = full[6:8]
    end = full.index(stop) + len(stop)  # the first occurrence may start before 6
    assert generate(tiny, tok, ["hello"], 24, stop=[stop])[0] == full[: full.index(stop)]
    seqs = stop_token_sequences(tok, [stop], 128)
    assert seqs == [tuple(map(ord, stop))]
    cut = generate_arrays(tiny, [tok("hello")["input_ids"]], 24, eos_ids=(2,), pad_id=0, stop_sequences=seqs)
    assert cut.lengths[0] == end and cut.ended[0] and cut.steps == end < 24
    assert "".join(map(chr, cut.tokens[0, :end])) == full[:end]  # the stop sequence itself is kept
    assert (cut.tokens[0, end:] == 0).all() and (cut.logprobs[0, end:] == 0).all()
    np.testing.assert_allclose(cut.logprobs[0, :end], plain.logprobs[0, :end])
    # A one-character stop string is a single stop token; in a batch, only the rows that emit it stop.
    texts = generate(tiny, tok, ["hello", "abc"], 24)
    char = texts[0][3]
    assert generate(tiny, tok, ["hello", "abc"], 24, stop=char) == [
        t[: t.index(char)] if char in t else t for t in texts
    ]


def test_stop_string_that_never_appears(tiny):
    """Stop strings absent from the text (one of in-vocabulary characters, one outside the vocabulary)
    change nothing: the same texts, token counts and decode steps as without."""
    tok = CharTokenizer()
    prompts = ["hello", "abc"]
    texts = generate(tiny, tok, prompts, 16)
    absent = next(s for s in ("~~", "}{", "^^|") if all(s not in t for t in texts))
    assert generate(tiny, tok, prompts, 16, stop=[absent, "\u2603"]) == texts
    ids = [tok(p)["input_ids"] for p in prompts]
    seqs = stop_token_sequences(tok, [absent, "\u2603"], 128)
    assert seqs == [tuple(map(ord, absent))]
    plain = generate_arrays(tiny, ids, 16, eos_ids=(2,), pad_id=0)
    with_stop = generate_arrays(tiny, ids, 16, eos_ids=(2,), pad_id=0, stop_sequences=seqs)
    for name in ("tokens", "lengths", "ended", "eos", "steps"):  # integers and booleans: exactly
        np.testing.assert_array_equal(getattr(plain, name), getattr(with_stop, name), err_msg=name)
    # float32 log-probs: watching for stops changes the compiled decode loop, which XLA may fuse and round
    # differently on another CPU; the same values up to float32 rounding
    np.testing.assert_allclose(plain.logprobs, with_stop.logprobs, rtol=1e-6, atol=1e-6)


def test_buckets():
    assert [prompt_bucket(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 64, 65, 100)] == [
        16, 16, 24, 24, 32, 48, 48, 64, 64, 96, 128,
    ]  # fmt: skip


def test_decode_segments_by_hand():
    assert segment_ends(48, 256, 4) == (63, 127, 191, 255)  # the 256th token is chosen after the loop
    assert segment_ends(48, 10, 3) == (3, 6, 9)
    assert segment_ends(16, 2, 4) == (1,) and segment_ends(16, 1, 4) == (0,)  # at most one segment per step
    assert [segment_count(p, n) for p, n in ((48, 256), (48, 64), (16, 128), (16, 1024))] == [4, 1, 2, 4]
    assert segment_ends(48, 256) == (63, 127, 191, 255) and segment_ends(48, 64) == (63,)  # by default
    assert segment_count(512, 255) == 1  # fewer new tokens than half the prompt bucket: one segment


def test_decode_segments_change_nothing(tiny):
    """The decode loop in 3 segments (steps 0-7, 8-15, 16-22; the cache extended between them) against one,
    sampled, with rows that end by EOS in different segments, by a stop sequence, and all before the
    last segment: the same tokens, lengths, ends and decode steps, log-probs to float32 rounding."""
    ids = [PROMPT, [7, 7, 3]]
    free = generate_arrays(tiny, ids, 24, temperature=1.0, n=4, seed=11, **NO_EOS)
    cases = {
        "eos in several segments": dict(eos_ids=(int(free.tokens[0, 12]),), pad_id=0),
        "every row ends by step 10": dict(eos_ids=tuple(set(free.tokens[:, 10].tolist())), pad_id=0),
        "a stop sequence": dict(stop_sequences=[free.tokens[1, 9:11].tolist()], **NO_EOS),
    }
    for name, kwargs in cases.items():
        one, three = (
            generate_arrays(tiny, ids, 24, temperature=1.0, n=4, seed=11, decode_segments=k, **kwargs)
            for k in (1, 3)
        )
        for field in ("tokens", "lengths", "ended", "eos", "steps"):
            np.testing.assert_array_equal(
                getattr(three, field), getattr(one, field), err_msg=f"{name}: {field}"
            )
        np.testing.assert_allclose(three.logprobs, one.logprobs, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(one.tokens[one.tokens != 0], free.tokens[one.tokens != 0])
        if name == "every row ends by step 10":
            assert one.ended.all() and one.steps <= 11
        else:
            assert one.ended.any() and not one.ended.all()
    eos_ends = generate_arrays(
        tiny, ids, 24, temperature=1.0, n=4, seed=11, **cases["eos in several segments"]
    )
    ended_at = {int(n) // 8 for n in eos_ends.lengths[eos_ends.ended]}
    assert len(ended_at) > 1  # rows ended in more than one segment


def test_cache_limit(tiny):
    """Prompt tokens + max_new_tokens must fit the cache: the model's max_position_embeddings (128 here) or
    an explicit max_cache_len. Exactly fitting works, and the capped cache gives the same tokens."""
    with pytest.raises(ValueError, match=r"prompt 1 has 120 tokens.*needs 136 cache positions.*=128"):
        generate_tokens(tiny, [[1] * 10, [1] * 120], 16, **NO_EOS)
    with pytest.raises(
        ValueError, match=r"prompt 1 has 10 tokens.*needs 22 cache positions.*max_cache_len=20"
    ):
        generate(tiny, CharTokenizer(), ["abc", "a" * 10], 12, max_cache_len=20)
    prompt = [[5, 17, 33, 2, 9, 101, 64, 1]]  # 8 + 12 = 20: the bucket (16) is capped to 8
    assert generate_tokens(tiny, prompt, 12, max_cache_len=20, **NO_EOS) == generate_tokens(
        tiny, prompt, 12, **NO_EOS
    )


def test_bad_input(tiny):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(tiny, tok, [])
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_tokens(tiny, [], 4, **NO_EOS)
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        generate(tiny, tok, ["a", "b", ""])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_tokens(tiny, [[1], []], 4, **NO_EOS)
    with pytest.raises(ValueError, match=r"prompt 1 has 5 tokens.*max_prompt_len=4"):
        generate(tiny, tok, ["abc", "abcde"], max_prompt_len=4)
    with pytest.raises(ValueError, match=r"prompt 0 has 3 tokens.*max_prompt_len=2"):
        generate_tokens(tiny, [[1, 2, 3]], 4, max_prompt_len=2, **NO_EOS)
    with pytest.raises(ValueError, match=r"prompt 1 holds token id 128, outside the model's vocabulary"):
        generate_tokens(tiny, [[1], [3, 128]], 4, **NO_EOS)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generate_tokens(tiny, [[1]], 0, **NO_EOS)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate(tiny, tok, ["abc"], 4, stop=["x", ""])
