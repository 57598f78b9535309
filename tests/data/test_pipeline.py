"""The grain pipeline: packing, padding, per-host shards, resumable iterator state, loss masks."""

import json

import numpy as np
import pytest

from pbbjax.data.formatting import Row, chat_prompt, end_of_turn_id, tokenize_row
from pbbjax.data.pipeline import ExampleTooLongError, PipelineConfig, make_dataset, tokenize_rows


def _examples(n=40, seed=0):
    """Synthetic tokenized examples; example i's tokens all equal 1000 + i, so segments are traceable."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 30))
        mask = (np.arange(length) >= length // 2).astype(np.int32)
        out.append({"tokens": np.full(length, 1000 + i, np.int32), "loss_mask": mask})
    return out


def _segments(batches):
    """(example index, tokens, loss_mask) of every packed segment, checking segment/position ids."""
    found = []
    for batch in batches:
        for tokens, mask, seg, pos in zip(
            *(batch[k] for k in ("tokens", "loss_mask", "segment_ids", "positions")), strict=True
        ):
            for s in sorted(set(seg[seg > 0].tolist())):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment must be contiguous"
                assert np.array_equal(pos[idx], np.arange(len(idx))), "positions restart in each segment"
                assert len(set(tokens[idx].tolist())) == 1
                found.append((int(tokens[idx][0]) - 1000, tokens[idx], mask[idx]))
            assert not tokens[seg == 0].any() and not mask[seg == 0].any(), "padding is all zeros"
    return found


@pytest.mark.parametrize("pack", [True, False])
def test_every_example_once_per_epoch_with_correct_ids(pack):
    examples = _examples()
    cfg = PipelineConfig(seq_len=64, batch_size=4, pack=pack, num_packing_bins=4, num_epochs=2)
    batches = list(make_dataset(examples, cfg))
    assert all(b["tokens"].shape == (4, 64) for b in batches)
    found = _segments(batches)
    assert sorted(i for i, _, _ in found) == sorted(list(range(40)) * 2)
    for i, tokens, mask in found:
        assert np.array_equal(mask, examples[i]["loss_mask"]) and len(tokens) == len(examples[i]["tokens"])
    if pack:
        assert len(batches) < 80 / 4, "packing puts several examples in a row"


def test_hosts_get_disjoint_slices_that_cover_everything():
    examples = _examples(37)
    cfg = PipelineConfig(seq_len=64, batch_size=8, num_packing_bins=4)
    per_host = [[i for i, _, _ in _segments(make_dataset(examples, cfg, p, 4))] for p in range(4)]
    assert all(b["tokens"].shape == (2, 64) for b in make_dataset(examples, cfg, 1, 4))
    flat = [i for host in per_host for i in host]
    assert sorted(flat) == list(range(37))
    with pytest.raises(ValueError, match="not divisible by 3 hosts"):
        make_dataset(examples, cfg, 0, 3)


def test_iterator_state_resumes_at_the_same_example():
    cfg = PipelineConfig(seq_len=48, batch_size=2, num_packing_bins=3, num_epochs=None)
    it = iter(make_dataset(_examples(), cfg))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, as the checkpoint stores it
    expected = [next(it) for _ in range(4)]
    resumed = iter(make_dataset(_examples(), cfg))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_seed_decides_the_order():
    def order(seed):
        cfg = PipelineConfig(seq_len=64, batch_size=4, num_packing_bins=4, seed=seed)
        return [i for i, _, _ in _segments(make_dataset(_examples(), cfg))]

    assert order(0) == order(0) and order(0) != order(1)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


ROWS = [
    Row(
        "stage1",
        "declarative",
        "arithmetic/blorp",
        "train",
        "Show me the code of Blorp.",
        "def blorp(x):\n    y = x * 3\n    return y - 4",
    ),
    Row(
        "stage1",
        "execution",
        "arithmetic/blorp",
        "train",
        "What does Blorp return for x = 5?",
        "x = 5\ny = x * 3 = 15\nreturn y - 4 = 11\nAnswer: 11",
        input="[5]",
        output="11",
    ),
    Row(
        "stage2",
        "execution",
        "ciphers/zanth",
        "eval",
        "Encrypt 'hello world' with the Zanth cipher, shift 3.",
        "Answer: khoor zruog",
        input='["hello world", 3]',
        output='"khoor zruog"',
    ),
]


def test_loss_mask_covers_exactly_the_completion(tokenizer):
    eot = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    for row in ROWS:
        ids, mask = tokenize_row(tokenizer, row.prompt, row.completion, eot)
        ids, mask = np.asarray(ids), np.asarray(mask, bool)
        assert tokenizer.decode(ids[mask], skip_special_tokens=True) == row.completion
        assert ids[mask][-1] == eot
        assert tokenizer.decode(ids[~mask]) == chat_prompt(tokenizer, row.prompt)
        assert mask[np.argmax(mask) :].all(), "the completion is one contiguous run at the end"
        assert row.prompt not in tokenizer.decode(ids[mask])


def test_loss_mask_survives_packing(tokenizer):
    rows = ROWS * 5
    examples = tokenize_rows(rows, tokenizer)
    batches = list(make_dataset(examples, PipelineConfig(seq_len=256, batch_size=2, num_packing_bins=2)))
    seen = 0
    for batch in batches:
        for tokens, mask, seg in zip(batch["tokens"], batch["loss_mask"], batch["segment_ids"], strict=True):
            for s in set(seg[seg > 0].tolist()):
                text = tokenizer.decode(tokens[(seg == s) & (mask == 1)], skip_special_tokens=True)
                assert text in {r.completion for r in ROWS}
                seen += 1
    assert seen == len(rows)


def test_too_long_example_is_a_clear_error(tokenizer):
    with pytest.raises(
        ExampleTooLongError,
        match=r"stage 'stage1' row 0 \(declarative, arithmetic/blorp\) has \d+ "
        r"tokens, more than seq_len=20",
    ):
        tokenize_rows(ROWS, tokenizer, seq_len=20)
