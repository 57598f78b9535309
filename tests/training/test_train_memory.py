"""scripts/train_memory.py: compiled train-step memory by remat, layer scan and microbatches, against
XLA's own memory analysis (the independent reference) and ``pbbjax.config.memory``'s estimate."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "train_memory.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remat_saves_memory_only_with_a_layer_scan_on_cpu(hf_dirs):
    measure = _script().measure
    _, model_dir = hf_dirs["smollm2_shaped"]
    none = measure(model_dir, batch=2, seq=256, remat="none", scan=False, microbatches=1)
    unrolled = measure(model_dir, batch=2, seq=256, remat="full", scan=False, microbatches=1)
    scanned = measure(model_dir, batch=2, seq=256, remat="full", scan=True, microbatches=1)
    rowwise = measure(model_dir, batch=2, seq=256, remat="none", scan=False, microbatches=2)
    for row in (none, unrolled, scanned, rowwise):
        assert row["total"] >= row["temporaries"] > 0
    assert rowwise["microbatches"] == 2
    # measured 0.61x and 0.72x of `none` (2026-12-06): smaller savings than before, since `none` itself lost
    # the softmax's and the logits' extra copies (hand-written attention / SwiGLU gradients, chunked loss)
    assert scanned["temporaries"] < 0.7 * none["temporaries"]
    assert rowwise["temporaries"] < 0.8 * none["temporaries"]
    # what the runner's warning and docs/results.md claim of XLA:CPU; if a JAX upgrade makes unrolled remat
    # effective, this fails and the warning should go
    assert unrolled["temporaries"] > 0.9 * none["temporaries"]
    # the estimate by arithmetic, where it claims to hold (not unrolled remat), within 1.5x of XLA's total
    # (measured 1.07x, 1.14x scanned with full remat, 0.83x with 2 microbatches: 2026-12-07, the attention in
    # causal query blocks)
    for row in (none, scanned, rowwise):
        assert 1 / 1.5 < row["estimate"] / row["total"] < 1.5, row
