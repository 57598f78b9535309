"""LoRA: adapters against peft on the transformers model, merged export against transformers, the sampler,
the frozen base (no gradient, no optimizer state, bit-identical after training), sharding, GRPO, the
runner's resume and export CLI, the memory estimate, and the errors of a bad ``model.lora`` config."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model, hf_logits, load_config
from flax import nnx
from jax.sharding import PartitionSpec as P

from pbbjax.config import memory
from pbbjax.config.run_config import build_run_config
from pbbjax.config.schema import lora_config
from pbbjax.inference.sampler import generate_arrays
from pbbjax.models.architecture import LORA_TARGETS, LoRAConfig, ModelConfig
from pbbjax.models.hf_io import load_model, save_model
from pbbjax.models.lora import LoRAParam, trainable_split
from pbbjax.models.lora_io import save_adapter
from pbbjax.models.sharding import logical_to_spec, make_mesh
from pbbjax.training import aot, sft
from pbbjax.training.grpo import GRPOConfig
from pbbjax.training.rollout import GRPOStepper, grpo_optimizer

TOL = 1e-4  # fp32 logits: pbbjax's LoRA model vs peft on transformers, and vs its own merged export


def _randomise_adapters(model, seed=0):
    """Nonzero B (a fresh adapter is the identity), so that the adapters change every logit."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, LoRAParam)
    for _, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(rng.normal(0, 0.05, var.shape), var.dtype))
    nnx.update(model, state)


def _ids(vocab=128, shape=(2, 11), seed=1):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize(
    "name,targets",
    [("qwen3_head_dim", LORA_TARGETS), ("qwen2_tied", ("q_proj", "v_proj", "o_proj", "down_proj"))],
)
def test_peft_adapter_and_merged_export_give_pbbjax_logits(hf_dirs, tmp_path, name, targets):
    import transformers
    from peft import PeftModel

    _, path = hf_dirs[name]
    model, _ = load_model(path, tokenizer=False, lora=LoRAConfig(rank=4, alpha=8.0, targets=targets))
    ids = _ids()
    base = np.asarray(load_model(path, tokenizer=False)[0](ids))
    np.testing.assert_array_equal(np.asarray(model(ids)), base)  # B = 0: a fresh adapter changes nothing
    _randomise_adapters(model)
    ours = np.asarray(model(ids))
    assert np.abs(ours - base).max() > 100 * TOL, "the adapters move the logits"

    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and set(config["target_modules"]) == set(targets)
    peft_model = PeftModel.from_pretrained(build_hf_model(name), tmp_path / "adapter").eval()
    assert np.abs(hf_logits(peft_model, ids) - ours).max() < TOL

    save_model(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert np.abs(hf_logits(merged, ids) - ours).max() < TOL


def test_sampler_runs_the_adapters(hf_dirs):
    """Greedy decoding with random adapters on every projection: the sampler's tokens and log-probs are
    the full forward's over the sequence it produced."""
    model, _ = load_model(hf_dirs["qwen2_tied"][1], tokenizer=False, lora=LoRAConfig(rank=4, alpha=8.0))
    _randomise_adapters(model)
    prompt, new = [5, 17, 33, 4, 9], 8
    g = generate_arrays(model, [prompt], new, eos_ids=(), pad_id=0)
    logits = np.asarray(model(np.asarray([prompt + g.tokens[0].tolist()])))[0, len(prompt) - 1 : -1]
    logps = np.asarray(jax.nn.log_softmax(logits, -1))
    assert g.tokens[0].tolist() == logits.argmax(-1).tolist()
    np.testing.assert_allclose(g.logprobs[0], logps[np.arange(new), g.tokens[0]], rtol=0, atol=TOL)


def test_optimizer_state_holds_only_the_adapters_sharded_like_their_base(hf_dirs):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model, _ = load_model(hf_dirs["llama_gqa"][1], mesh=mesh, tokenizer=False, lora=LoRAConfig(rank=4))
    adapters, frozen = trainable_split(nnx.state(model))
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(adapters)}
    assert len(flat) == 2 * len(LORA_TARGETS)
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(frozen))
    for path, var in flat.items():
        stem, _, which = path.rpartition("_lora_")
        base = dict(nnx.to_flat_state(frozen))[tuple(stem.split("."))]
        base_spec, spec = logical_to_spec(base.axes, base.shape, mesh), var.get_value().sharding.spec
        k = len(spec) - 1  # A shares its base's leading (input) axes, B its trailing (output) axes
        shared = (spec[:k], base_spec[:k]) if which == "a" else (spec[-k + 1 :], base_spec[-k + 1 :])
        assert shared[0] == shared[1], (path, spec, base_spec)
        assert (spec[-1] if which == "a" else spec[1]) is None  # the rank axis is replicated
    assert flat["layers.attn.q_proj_lora_a"].get_value().sharding.spec == P(None, "fsdp", None)
    assert flat["layers.attn.q_proj_lora_b"].get_value().sharding.spec == P(None, None, "tensor", None)

    state = sft.init_state(model, sft.make_optimizer(sft.OptimConfig(), 10), mesh)
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
    shapes = sorted(v.shape for v in flat.values())
    assert sorted(x.shape for x in moments) == sorted(shapes + shapes)  # AdamW's mu and nu, adapters only
    by_shape = {v.shape: v.get_value().sharding for v in flat.values()}
    assert all(x.sharding == by_shape[x.shape] for x in moments)


def test_initial_adapters_come_from_the_seed_whatever_the_mesh(hf_dirs):
    path = hf_dirs["llama_gqa"][1]

    def a_matrices(seed, mesh=None):
        model, _ = load_model(path, mesh=mesh, tokenizer=False, lora=LoRAConfig(rank=4, seed=seed))
        return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}

    one, sharded = a_matrices(3), a_matrices(3, make_mesh(data=2, fsdp=2, tensor=2))
    other = a_matrices(4)
    for p, x in one.items():
        assert np.array_equal(x, sharded[p]), p
        is_a = p[-1].endswith("_a")
        assert (np.abs(x).max() > 0) == is_a and (not np.array_equal(x, other[p])) == is_a, p


def _batch(rows=4, length=16, vocab=128):
    tokens = _ids(vocab, (rows, length), seed=3).astype(np.int32)
    ones = np.ones_like(tokens)
    return {
        "tokens": tokens,
        "loss_mask": ones,
        "segment_ids": ones,
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
    }


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_lora_memorises_a_batch_and_leaves_the_base_bit_identical(tmp_path, base_dtype):
    # Weights at std 0.2 (not 0.02): the frozen LM head must be able to give large logits for a batch of
    # random tokens to be memorised at all.
    build_hf_model("llama_gqa", initializer_range=0.2).save_pretrained(tmp_path)
    lora = LoRAConfig(rank=8, alpha=16.0, seed=5)
    model, _ = load_model(tmp_path, dtype=base_dtype, tokenizer=False, lora=lora)
    before = {
        p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainable_split(nnx.state(model))[1])
    }
    steps, optim = 30, sft.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    optimizer = sft.make_optimizer(optim, steps)
    state = sft.init_state(model, optimizer)
    graphdef = nnx.split(model)[0]
    step = sft.make_train_step(graphdef, optimizer, optim, steps, sft.state_shardings(state), None)
    batch = _batch()
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    print(f"\nLoRA on a {base_dtype} base: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.1 * losses[0], losses
    adapters, frozen = trainable_split(state["params"])
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(adapters))
    after = dict(nnx.to_flat_state(frozen))
    assert before.keys() == after.keys()
    for p, x in before.items():
        assert x.dtype == jnp.dtype(base_dtype) and np.array_equal(x, np.asarray(after[p].get_value())), p


def test_adapter_dropout_in_train_steps_only_and_from_the_step(hf_dirs):
    """lora.dropout: a train step's loss depends on its dropout key, which is a function of the seed and the
    step (so a resumed run repeats it); without a key (evaluation, sampling) the forward is dropout-free;
    dropout 0 gives no key at all. Microbatches draw their own keys."""
    from pbbjax.models.lora import dropout_key

    path = hf_dirs["llama_gqa"][1]
    model, _ = load_model(path, tokenizer=False, lora=LoRAConfig(rank=4, dropout=0.5, seed=3))
    graphdef, params = nnx.split(model)
    trainable, frozen = trainable_split(params)
    trainable = jax.tree.map(lambda x: jnp.full_like(x, 0.05), trainable)  # B off 0: adapters count
    params = nnx.merge_state(trainable, frozen)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    loss = sft.make_loss_fn(graphdef, "token")
    ratio = lambda key: float(loss(params, batch, key)[0] / loss(params, batch, key)[1])
    keys = [dropout_key(model.cfg, jnp.int32(s)) for s in (0, 0, 1)]
    assert ratio(keys[0]) == ratio(keys[1]) != ratio(keys[2])  # the step's key decides what is dropped
    assert ratio(None) != ratio(keys[0])  # no key: no dropout
    plain, _ = load_model(path, tokenizer=False, lora=LoRAConfig(rank=4, seed=3))
    assert (
        dropout_key(plain.cfg, jnp.int32(0)) is None
        and dropout_key(nnx.merge(graphdef, params).cfg, jnp.int32(7)) is not None
    )
    grads = {}
    for k in (1, 2):
        grad_fn = sft.make_grad_fn(graphdef, "token", k)
        grads[k] = grad_fn(params, batch, keys[0])[0]
    assert float(grads[1]) != float(grads[2]), "each microbatch draws its own dropout"


def test_grpo_trains_only_the_adapters(hf_dirs):
    model, _ = load_model(hf_dirs["llama_gqa"][1], tokenizer=False, lora=LoRAConfig(rank=2))
    cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_new_tokens=4, learning_rate=1e-2)
    optimizer, schedule = grpo_optimizer(sft.OptimConfig(warmup_steps=0), cfg, 2)
    state = sft.init_state(model, optimizer)
    adapters0, frozen0 = (jax.tree.map(np.asarray, s) for s in trainable_split(state["params"]))
    reward = lambda tasks, completions: (np.array([np.mean(np.asarray(c) < 64) for c in completions]), {})
    stepper = GRPOStepper(
        nnx.split(model)[0],
        cfg,
        optimizer,
        schedule,
        sft.state_shardings(state),
        None,
        prompts=[[1, 2, 3], [4, 5, 6, 7]],
        reward_fn=reward,
        eos_ids=(-1,),
        pad_id=0,
        seed=0,
    )
    for step in range(2):
        state, metrics, _ = stepper(state, step)
        assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    adapters, frozen = trainable_split(state["params"])
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen), strict=True):
        assert np.array_equal(a, np.asarray(b))
    pairs = zip(jax.tree.leaves(adapters0), jax.tree.leaves(adapters), strict=True)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in pairs)


def test_bad_lora_config_names_the_field():
    with pytest.raises(ValueError, match=r"model.lora.targets .*'qproj'.* match no weight; the projections"):
        LoRAConfig(rank=4, targets=("qproj", "v_proj"))
    with pytest.raises(ValueError, match=r"model.lora.alpha must be >= 0, got -1"):
        LoRAConfig(rank=4, alpha=-1.0)
    with pytest.raises(ValueError, match=r"model.lora.rank must be >= 1"):
        LoRAConfig(rank=-2)
    with pytest.raises(ValueError, match=r"model.lora.dropout must be in \[0, 1\), got 1.0"):
        LoRAConfig(rank=4, dropout=1.0)
    tiny = load_config("configs/proactive.py:tiny")
    tiny.model.lora.update(rank=48, targets=("q_proj", "k_proj"))
    cfg = ModelConfig.from_hf({**tiny.model.tiny.to_dict(), "vocab_size": 100})  # k_proj: 64 in, 32 out
    with pytest.raises(
        ValueError, match=r"model.lora.rank=48 exceeds the smaller dimension of k_proj \(64 in"
    ):
        cfg.replace(lora=lora_config(tiny))
    assert lora_config(load_config("configs/proactive.py:tiny")) is None  # rank 0: off, the default


def test_memory_estimate_counts_adapters_only_in_the_optimizer():
    config = load_config("configs/proactive.py:qwen3-1.7b")
    config.model.lora.update(rank=16, base_dtype="bfloat16")
    ctx = aot.build_context(build_run_config(config), jax.devices())  # 8 CPU devices: fsdp=8
    est = memory.train_estimate(ctx.cfg, ctx.layout, batch=64, seq_len=1024)
    assert est["params"] == pytest.approx(aot.shard_bytes(ctx.params), rel=0.01)
    assert est["optimizer"] == pytest.approx(aot.shard_bytes(ctx.opt_state), rel=0.01)
    assert est["gradients"] == est["optimizer"] // 2 == memory.adapter_bytes(ctx.cfg, ctx.layout)
    full_cfg = ctx.cfg.replace(lora=None, param_dtype="float32")
    full = memory.train_estimate(full_cfg, ctx.layout, batch=64, seq_len=1024)
    assert est["optimizer"] < 0.1 * full["optimizer"] and est["params"] < 0.6 * full["params"]


def test_bad_lora_field_on_the_command_line_fails_before_any_compute(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pbbjax.train", "--config", "configs/proactive.py:tiny",
           "--config.model.lora.rank=4", "--config.model.lora.targets=q_proj,qkv_proj",
           f"--config.workdir={tmp_path}"]  # fmt: skip
    root = Path(__file__).parents[2]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "model.lora.targets ['q_proj', 'qkv_proj']: ['qkv_proj'] match no weight" in done.stderr
    assert not (tmp_path / "tiny_model").exists()  # failed before writing the tiny model


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="compile-only mode needs libtpu")
def test_compile_only_tiny_lora_on_one_v5e_chip():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pbbjax.train", "--config", "configs/proactive.py:tiny",
           "--config.model.lora.rank=4", "--config.compile_only_topology=v5e-1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 devices (TPU v5 lite)" in done.stdout and "LoRA rank 4 on q_proj," in done.stdout
    assert "all steps fit" in done.stdout
