"""Model FLOPs against counts of the real decoder, MFU, the JSONL/TensorBoard logger, progress, tables."""

import importlib.util
import json
import math
import struct
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest
from conftest import TINY
from flax import nnx

from pbbjax.core.tables import format_table
from pbbjax.models.architecture import ModelConfig
from pbbjax.models.decoder import Transformer
from pbbjax.training import metrics as M


def jaxpr_dot_flops(jaxpr, mult: int = 1) -> int:
    """2 * prod(out) * prod(contracted) summed over every dot_general, sub-jaxprs included (scan x length)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += mult * 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        inner = mult * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else mult
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    total += jaxpr_dot_flops(sub, inner)
    return total


def model_fns(name, **options):
    cfg = ModelConfig.from_hf(TINY[name], **options)
    # Abstract parameters (shapes only): tracing and lowering need no values, and skip the slow init.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    def loss(state, ids):  # a next-token loss, so the backward pass runs through every matmul
        logp = jax.nn.log_softmax(forward(state, ids)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    return cfg, state, forward, jax.grad(loss)


B, T = 2, 32
IDS = jax.ShapeDtypeStruct((B, T), jnp.int32)


@pytest.mark.parametrize(
    "name,options", [("llama_gqa", {}), ("qwen2_tied", {}), ("qwen3_head_dim", {"scan_layers": True})]
)
def test_formula_equals_matmul_flops_of_the_decoder(name, options):
    # Every dot_general the decoder traces, forward and forward+backward, counted from the jaxpr. The
    # decoder computes the full T x T score matrix, so the count matches the unhalved formula exactly;
    # MaxText's causal convention is that minus half of the attention term.
    cfg, state, forward, grad = model_fns(name, **options)
    fwd = jaxpr_dot_flops(jax.make_jaxpr(forward)(state, IDS).jaxpr)
    train = jaxpr_dot_flops(jax.make_jaxpr(grad)(state, IDS).jaxpr)
    assert fwd == M.forward_flops_per_token(cfg, T, causal=False) * B * T
    assert train == M.train_flops_per_token(cfg, T, causal=False) * B * T
    half_attention = M.attention_flops_per_token(cfg, T, causal=False) / 2
    assert (
        M.forward_flops_per_token(cfg, T) == M.forward_flops_per_token(cfg, T, causal=False) - half_attention
    )
    assert M.train_flops_per_token(cfg, T) == pytest.approx(3 * M.forward_flops_per_token(cfg, T))


def test_formula_against_xla_cost_analysis():
    # XLA's HLO cost analysis counts 2mnk per dot plus about one FLOP per element of each elementwise op
    # and reduction (norms, RoPE, masking, softmax, SiLU, the loss and their gradients). At this tiny
    # width those add a few percent to the matmuls (4-6% here, less for real widths); never less than 0.
    cfg, state, forward, grad = model_fns("llama_gqa")
    forward_flops = M.forward_flops_per_token(cfg, T, causal=False) * B * T
    train_flops = M.train_flops_per_token(cfg, T, causal=False) * B * T
    compiled = jax.jit(forward).lower(state, IDS).compile().cost_analysis()  # after XLA's optimisations
    compiled = compiled[0] if isinstance(compiled, list) else compiled
    assert 1.0 <= compiled["flops"] / forward_flops < 1.1
    # Forward + backward, analysed before optimisation (compiling the backward pass takes ~7 s).
    assert 1.0 <= jax.jit(grad).lower(state, IDS).cost_analysis()["flops"] / train_flops < 1.1


def test_formula_by_hand_and_maxtext_convention():
    cfg = ModelConfig.from_hf(TINY["llama_gqa"])  # d 64, f 96, 2 layers, 8 heads, 2 KV heads, head_dim 8
    per_layer = 64 * 8 * (8 + 8 + 2 + 2) + 3 * 64 * 96
    assert M.matmul_params(cfg) == 2 * per_layer + 64 * 128
    assert M.train_flops_per_token(cfg, 100) == 6 * M.matmul_params(cfg) + 12 * 2 * 8 * 8 * 100 / 2
    norms = cfg.num_layers * 2 * 64 + 64
    assert M.matmul_params(cfg) == cfg.num_params - norms - 128 * 64  # less the embedding table
    tied = ModelConfig.from_hf(TINY["qwen2_tied"])  # the tied head is still a matmul, as is counted
    assert M.matmul_params(tied) == tied.num_params - norms


def test_mfu_and_peak_flops():
    assert M.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert M.mfu(8000.0, 6e9, 1e13, num_chips=8) == pytest.approx(0.6)
    assert M.mfu(1000.0, 6e9, None) is None
    assert M.peak_flops_per_chip("TPU v5 lite") == M.PEAK_FLOPS["tpu v5e"]
    assert M.peak_flops_per_chip("TPU v5") == M.PEAK_FLOPS["tpu v5p"]
    assert M.peak_flops_per_chip("TPU v6 lite") == M.PEAK_FLOPS["tpu v6e"]
    assert M.peak_flops_per_chip("NVIDIA H100 80GB HBM3") == 989e12
    assert M.peak_flops_per_chip("cpu") is None
    assert M.peak_flops_per_chip() is None  # the tests run on CPU
    assert M.peak_flops_per_chip("cpu", override=2e12) == 2e12


def test_jsonl_lines_and_append_on_resume(tmp_path):
    with M.MetricsLogger(tmp_path, is_primary=True, tensorboard=False) as log:
        log.log(1, {"loss": jnp.float32(2.5), "tokens": 128, "lr": jnp.array([1e-4])}, prefix="train")
        log.log(2, {"loss": float("nan"), "grad_norm": float("inf")}, prefix="train/")
        # each line is on disk as soon as log() returns
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[0]) == {"step": 1, "train/loss": 2.5, "train/tokens": 128.0, "train/lr": 1e-4}
        assert json.loads(lines[1]) == {"step": 2, "train/loss": "nan", "train/grad_norm": "inf"}
    with M.MetricsLogger(tmp_path, is_primary=True, tensorboard=False) as log:  # a resumed run
        log.log(3, {"accuracy": 0.75}, prefix="eval")
    rows = M.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert math.isnan(rows[1]["train/loss"]) and rows[1]["train/grad_norm"] == math.inf
    assert rows[2] == {"step": 3, "eval/accuracy": 0.75}
    with M.MetricsLogger(tmp_path, is_primary=True, tensorboard=False) as log, pytest.raises(TypeError):
        log.log(4, {"name": "stage1"})


def read_tfrecords(path):
    """(step, tag, value) of each scalar in a TensorBoard event file, read record by record."""
    from tensorboardX.proto import event_pb2

    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4  # length, its CRC, the record, its CRC
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None, reason="tensorboardX is not installed")
def test_tensorboard_scalars(tmp_path):
    torch_was_loaded = "torch" in sys.modules
    log = M.MetricsLogger(tmp_path, is_primary=True)
    log.log(10, {"loss": 1.5, "lr": 0.25}, prefix="train")
    log.log(20, {"loss": 0.5})
    log.close()
    log.close()  # idempotent
    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    assert read_tfrecords(event_file) == [(10, "train/loss", 1.5), (10, "train/lr", 0.25), (20, "loss", 0.5)]
    assert "torch" not in sys.modules or torch_was_loaded  # tensorboardX did not pull torch in


def test_without_tensorboard_package_warns_once(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError("No module named 'tensorboardX'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    monkeypatch.setattr(M, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="TensorBoard is off"):
        M.MetricsLogger(tmp_path / "a", is_primary=True).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second logger does not warn again
        with M.MetricsLogger(tmp_path / "b", is_primary=True) as log:
            log.log(1, {"loss": 1.0})
    assert M.read_metrics(tmp_path / "b") == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "b" / "tensorboard").exists()


def test_non_primary_writes_nothing(tmp_path, capsys):
    with M.MetricsLogger(tmp_path / "run", is_primary=False) as log:
        log.log(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()
    progress = M.Progress("stage1", 10, is_primary=False, interval_s=0)
    progress.update(5, loss=1.0)
    progress.close()
    assert capsys.readouterr().out == ""
    with M.MetricsLogger(tmp_path / "default", tensorboard=False) as log:
        assert log.enabled  # process 0 of 1 is the primary


def test_progress_plain_lines_when_not_a_tty(capsys):
    now = [0.0]
    progress = M.Progress("stage1", 400, initial=100, is_primary=True, interval_s=30, clock=lambda: now[0])
    for step in range(101, 401):
        now[0] += 1.0  # one step a second: 300 steps, 10 intervals of 30 s
        progress.update(step, loss=0.5 + step / 1e4, tokens_per_s=412.0, lr=1e-4)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "stage1 step 101/400 loss 0.5101 tok/s 412 lr 1.0e-04 eta 4m59s"
    assert lines[1] == "stage1 step 131/400 loss 0.5131 tok/s 412 lr 1.0e-04 eta 4m29s"
    assert len(lines) == 11 and lines[-1].startswith("stage1 step 400/400") and "done in 5m00s" in lines[-1]
    assert all(line.startswith("stage1 step ") for line in lines)


def test_progress_close_prints_the_last_step_and_tqdm_on_a_tty(capsys):
    progress = M.Progress("stage2", None, is_primary=True, interval_s=3600)
    progress.update(1, loss=2.0)
    progress.update(7, loss=1.0)
    progress.close()
    assert capsys.readouterr().out.splitlines() == ["stage2 step 1 loss 2", "stage2 step 7 loss 1"]

    class Tty:
        text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    tty = Tty()
    progress = M.Progress("stage3", 50, is_primary=True, stream=tty)
    progress.update(25, loss=0.25, tokens_per_s=1234.0)
    progress.close()
    assert "stage3" in tty.text and "25/50" in tty.text and "loss=0.25" in tty.text and "1,234" in tty.text


def test_format_table():
    rows = [
        {"task": "arithmetic", "accuracy": 0.8125, "n": 64},
        {"task": "ciphers", "accuracy": None, "n": 1024, "note": "skipped"},
        {"task": "grammars", "accuracy": 1.5e-5, "n": 8},
    ]
    table = format_table(rows, ["task", "accuracy", "n", "note"])
    assert table.splitlines() == [
        "task         accuracy     n  note",
        "----------  ---------  ----  -------",
        "arithmetic     0.8125    64",
        "ciphers             -  1024  skipped",
        "grammars    1.500e-05     8",
    ]
    assert format_table([], ["a", "bb"]).splitlines() == ["a  bb", "-  --"]
    assert M.format_duration(59.6) == "1m00s" and M.format_duration(7500) == "2h05m"
