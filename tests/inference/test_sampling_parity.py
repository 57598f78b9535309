"""The sampler against transformers on every tiny family, sharded against single-device, and on the params
being trained (used in place, no recompile)."""

import jax
import numpy as np
import pytest
import torch
from conftest import TINY
from flax import nnx

from pbbjax import generate, load_model, make_mesh
from pbbjax.inference import sampler as sampling
from pbbjax.inference.sampler import generate_arrays, generate_tokens

# Left padding of different lengths in one batch (token 2, the llama configs' EOS, is avoided).
PROMPTS = [[5, 17, 33, 4, 9, 101, 64, 12, 90, 3, 44], [7, 7, 3], [120, 1, 55, 60, 61], [8], [30, 31, 32, 33]]
NEW = 32


class IdTokenizer:
    """Text is token ids written out, space-separated; so ``pbbjax.generate`` runs on any tiny model."""

    eos_token_id, pad_token_id = None, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def hf_greedy(hf_model, prompts, new_tokens) -> list[list[int]]:
    """transformers generate(do_sample=False) on left-padded prompts with an attention mask. EOS is an id
    outside the vocabulary, so no row ends early: every row has ``new_tokens`` tokens."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=hf_model.config.vocab_size,
            pad_token_id=0,
        )
    return out[:, width:].tolist()


@pytest.mark.parametrize("name", list(TINY))
def test_greedy_matches_transformers(hf_dirs, name):
    """32 greedy tokens, token for token, batched with left padding. ``generate_tokens`` with EOS disabled
    on both sides matches every token (with layer weights unstacked once per call, the CPU default, and
    sliced per step); ``pbbjax.generate`` (the checkpoint's own EOS: id 2 for the llama
    configs, none for qwen) matches transformers' tokens up to the first EOS."""
    hf_model, path = hf_dirs[name]
    model, _ = load_model(path)
    ref = hf_greedy(hf_model, PROMPTS, NEW)
    assert [len(r) for r in ref] == [NEW] * len(PROMPTS)
    assert generate_tokens(model, PROMPTS, NEW, eos_ids=(), pad_id=0) == ref
    # The accelerator path: layer weights sliced inside the decode loop instead of once per call; and the
    # decode loop in 3 segments, the cache growing between them (the default at 32 new tokens is one).
    sliced = generate_arrays(model, PROMPTS, NEW, eos_ids=(), pad_id=0, unstack_layers=False)
    assert sliced.tokens.tolist() == ref
    segmented = generate_arrays(model, PROMPTS, NEW, eos_ids=(), pad_id=0, decode_segments=3)
    assert segmented.tokens.tolist() == ref

    eos = model.cfg.generation_config.get("eos_token_id")
    texts = generate(model, IdTokenizer(), [" ".join(map(str, p)) for p in PROMPTS], NEW)
    want = [r[: r.index(eos)] if eos in r else r for r in ref]
    assert texts == [" ".join(map(str, r)) for r in want]


def _shard_pointers(x: jax.Array) -> list[int]:
    return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1), (1, 2, 4)])
def test_sharded_sampler_equals_single_device(hf_dirs, shape, monkeypatch):
    """Rows sharded over data+fsdp (5 prompts x n=1 or 2, padded with dummy rows to a multiple of the batch
    shards) give the single-device tokens, lengths and log-probs; greedy and sampled, and with the decode
    loop in 3 segments (the cache extended between them) against one."""
    assert jax.device_count() == 8
    _, path = hf_dirs["llama_gqa"]
    single, _ = load_model(path)
    mesh = make_mesh(*shape)
    model, _ = load_model(path, mesh=mesh)
    seen = []
    original = sampling.sample_program

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((getattr(args[2], "sharding", None), out[0].sharding))  # prompt tokens in, tokens out
        return out

    monkeypatch.setattr(sampling, "sample_program", spy)
    sampled = dict(temperature=1.0, top_k=20, n=2, seed=3)
    for options in (dict(), sampled, dict(unstack_layers=False), dict(decode_segments=3, **sampled)):
        kwargs = dict(eos_ids=(2,), pad_id=0, **options)
        want = generate_arrays(
            single, PROMPTS, 12, **{**kwargs, "unstack_layers": None, "decode_segments": 1}
        )
        got = generate_arrays(model, PROMPTS, 12, **kwargs)
        assert got.tokens.shape == (len(PROMPTS) * options.get("n", 1), 12)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.ended, want.ended)
        assert got.steps == want.steps
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    rows_in, rows_out = seen[-1]
    spec = rows_in.spec[0]
    assert (spec if isinstance(spec, tuple) else (spec,)) == batch_axes  # the rows were sharded
    assert rows_in.mesh.shape == mesh.shape
    assert rows_out.is_fully_replicated  # and every host can read every row of the result


def test_params_in_place_and_no_recompile(hf_dirs):
    """A trainer's params state (sharded on a mesh) is used as it is: the same buffers, unchanged, not
    deleted, usable afterwards; passing it (or another state of the same structure) compiles nothing new,
    and new prompts of the same bucket reuse the program."""
    _, path = hf_dirs["llama_gqa"]
    model, _ = load_model(path, mesh=make_mesh(2, 2, 2))
    graphdef, params = nnx.split(model)
    leaves = jax.tree.leaves(params)
    before = [(np.asarray(x).copy(), _shard_pointers(x), x.sharding) for x in leaves]
    kwargs = dict(eos_ids=(), pad_id=0)
    own = generate_arrays(model, PROMPTS, 8, **kwargs)
    compiled = sampling.sample_program._cache_size()
    from_state = generate_arrays(graphdef, PROMPTS, 8, params=params, **kwargs)
    np.testing.assert_array_equal(from_state.tokens, own.tokens)
    other = [[p[0] + 1] + p[1:] for p in PROMPTS]  # new prompts, same lengths
    generate_arrays(model, other, 8, params=params, **kwargs)
    assert sampling.sample_program._cache_size() == compiled
    for x, (value, pointers, sharding) in zip(leaves, before, strict=True):
        assert not x.is_deleted()
        assert _shard_pointers(x) == pointers and x.sharding == sharding
        np.testing.assert_array_equal(np.asarray(x), value)
    # Still usable: the forward and another call run on the same buffers.
    assert np.isfinite(np.asarray(model(np.asarray([PROMPTS[0]], np.int32)))).all()
    again = generate_arrays(graphdef, PROMPTS, 8, params=params, **kwargs)
    np.testing.assert_array_equal(again.tokens, own.tokens)
    with pytest.raises(ValueError, match="GraphDef without params"):
        generate_arrays(graphdef, PROMPTS, 8, **kwargs)
