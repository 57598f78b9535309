"""Stop strings: cutting generated text at them, and the token sequences whose generation puts one into
the decoded text (which the sampler's decode loop watches for, so rows end inside the loop)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string; unchanged if none."""
    ends = [i for i in (text.find(s) for s in stop or ()) if i >= 0]
    return text[: min(ends)] if ends else text


_vocab_texts_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_texts(tokenizer, vocab_size: int) -> list[str]:
    """The decoded text of every single token id below ``vocab_size`` (cached per tokenizer)."""
    texts = _vocab_texts_cache.get(tokenizer)
    if texts is None or len(texts) < vocab_size:
        ids = [[i] for i in range(vocab_size)]
        if hasattr(tokenizer, "batch_decode"):
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        else:
            texts = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        _vocab_texts_cache[tokenizer] = texts
    return texts[:vocab_size]


def stop_token_sequences(tokenizer, stop: Sequence[str], vocab_size: int) -> list[tuple[int, ...]]:
    """Token sequences whose generation puts a stop string into the decoded text: every single token whose
    text contains one, and each stop string's tokenization, whole and character by character (kept only
    where it decodes to text containing the stop string)."""
    if not stop:
        return []
    seqs = {
        (i,) for i, text in enumerate(_vocab_texts(tokenizer, vocab_size)) if any(s in text for s in stop)
    }

    def encode(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    for s in stop:
        for ids in (encode(s), [t for c in s for t in encode(c)]):
            if ids and max(ids) < vocab_size and s in tokenizer.decode(ids, skip_special_tokens=True):
                seqs.add(tuple(ids))
    return sorted(seqs)
