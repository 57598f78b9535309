"""The real SmolLM2-135M-Instruct weights: pbbjax against transformers loading the same GGUF file."""

import numpy as np
import pytest
import torch
from conftest import hf_logits

from pbbjax import generate, load_model
from pbbjax.inference.sampler import generate_tokens, generation_ids

QUESTIONS = [
    "What is the capital of France?",
    "def blorp(x):\n    return x * 3 - 4\n\nWhat does blorp(5) return?",
    "Write a haiku about gradient descent.",
    "Hi",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir)


def _chat(tokenizer, question):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_logits_match_transformers_gguf(smollm2, smollm2_reference, question):
    model, tokenizer = smollm2
    ref_model, ref_tokenizer = smollm2_reference
    ids = tokenizer(_chat(tokenizer, question), add_special_tokens=False)["input_ids"]
    assert ids == ref_tokenizer(_chat(ref_tokenizer, question), add_special_tokens=False)["input_ids"]
    ids = np.asarray([ids], np.int32)
    diff = np.abs(np.asarray(model(ids)) - hf_logits(ref_model, ids)).max()
    assert diff <= 1e-3, f"max |Δlogit| = {diff}"


def test_batched_greedy_generation_matches_transformers(smollm2, smollm2_reference):
    """Four chat prompts of different lengths, left-padded into one batch, 32 greedy tokens each; rows end
    at EOS on both sides (transformers pads the rest of a finished row, and decoding drops the padding)."""
    model, tokenizer = smollm2
    ref_model, _ = smollm2_reference
    prompts = [_chat(tokenizer, q) for q in QUESTIONS]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(prompts)
    ours = generate(model, tokenizer, prompts, max_new_tokens=32)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = ref_model.generate(
            **batch, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[:, batch["input_ids"].shape[1] :]
    assert ours == tokenizer.batch_decode(new, skip_special_tokens=True)
    # Token for token too: transformers' rows up to their first EOS.
    eos_ids, pad_id = generation_ids(model, tokenizer)
    ref = [row[: next((i for i, t in enumerate(row) if t in eos_ids), len(row))] for row in new.tolist()]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert generate_tokens(model, ids, 32, eos_ids=eos_ids, pad_id=pad_id) == ref
