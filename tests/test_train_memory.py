"""scripts/train_memory.py: compiled train-step memory by remat, layer scan and microbatches."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "train_memory.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scanned_full_remat_keeps_less_than_no_remat(hf_dirs):
    measure = _script().measure
    _, model_dir = hf_dirs["smollm2_shaped"]
    none = measure(model_dir, batch=2, seq=256, remat="none", scan=False, microbatches=1)
    full = measure(model_dir, batch=2, seq=256, remat="full", scan=True, microbatches=1)
    rowwise = measure(model_dir, batch=2, seq=256, remat="none", scan=False, microbatches=2)
    for row in (none, full, rowwise):
        assert row["total"] >= row["temporaries"] > 0 and row["estimate"] > 0
    assert full["temporaries"] < none["temporaries"]
    assert rowwise["microbatches"] == 2 and rowwise["temporaries"] < none["temporaries"]
