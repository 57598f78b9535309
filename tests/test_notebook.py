"""The Colab TPU demo notebook, executed headless on CPU with the tiny preset, so that it cannot rot.

The parameters are injected the papermill way, without papermill: a cell tagged ``injected-parameters``
goes right after the cell tagged ``parameters``, and nbclient runs the notebook in a fresh kernel. With
``PRESET = "tiny"`` nothing is downloaded (``HF_HUB_OFFLINE=1``), and ``INSTALL = False`` uses the pbbjax
of this environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "pbb_colab_tpu.ipynb"


def inject_parameters(nb, values: dict) -> None:
    """Put ``NAME = value`` lines in a cell right after the ``parameters`` cell (papermill's convention)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell.id = "injected-parameters"
    nb.cells.insert(tagged[0] + 1, cell)


def cell_tagged(nb, tag: str):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def text_output(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_is_valid_and_every_parameter_is_a_plain_assignment():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = cell_tagged(nb, "parameters").source
    names = {line.split("=")[0].strip() for line in params.splitlines() if line and not line.startswith("#")}
    assert {"PRESET", "INSTALL", "PBBJAX_SOURCE", "WORKDIR", "OVERRIDES", "PUSH_TO_HUB"} <= names
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"


def _fields(c, prefix=""):
    """Every leaf field of a ConfigDict, dotted."""
    out = set()
    for key, value in c.items():
        out |= _fields(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key}
    return out


def test_colab_preset_sets_only_existing_fields():
    """The TPU branch (not run in CI): its config has exactly the base config's fields, none misspelt."""
    from pbbjax.config import base_config

    nb = nbformat.read(NOTEBOOK, as_version=4)
    (config_cell,) = [c.source for c in nb.cells if "def colab_preset" in c.source]
    namespace = {}
    exec(cell_tagged(nb, "parameters").source, namespace)
    assert namespace["PRESET"] == "colab" and namespace["INSTALL"] is True, "the defaults are for Colab"
    exec(config_cell, namespace)
    config = namespace["config"]
    assert _fields(config) == _fields(base_config("proactive"))
    assert config.model.path == "Qwen/Qwen3-0.6B"
    assert (config.model.dtype, config.model.compute_dtype) == ("float32", "bfloat16")
    assert config.model.scan_layers and config.model.remat == "full"


def test_notebook_runs_the_tiny_preset_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits this environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the tiny preset must download nothing
    # One CPU device: the sharded path is tested elsewhere, and on a small machine this is the fastest.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    workdir = tmp_path / "run"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(
        nb,
        {
            "PRESET": "tiny",
            "INSTALL": False,
            "WORKDIR": str(workdir),
            # Smaller than the tiny preset: one epoch per stage, no evaluation before training.
            "OVERRIDES": {"train.epochs": 1, "eval.at_start": False},
            "NUM_SAMPLES": 2,
        },
    )
    # The python3 kernel runs this interpreter (jupyter_client swaps a kernelspec's "python" for it).
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": tmp_path}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look at what failed

    table = text_output(cell_tagged(nb, "results"))
    assert "accuracy" in table and "stage1" in table and "stage2" in table, table
    records = json.loads((workdir / "results.json").read_text())["records"]
    assert {(r["after"], r["set"]) for r in records} >= {("stage2", "eval"), ("stage2", "train")}

    pngs = sorted((workdir / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
    shown = [o for o in cell_tagged(nb, "plots").outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(pngs)

    generated = text_output(cell_tagged(nb, "export"))
    assert generated.count("(expected ") == 2, generated

    # The export is a Hugging Face directory that transformers itself loads.
    transformers = pytest.importorskip("transformers")
    export = workdir / "export" / "stage2"
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert model.config.num_hidden_layers == 2
    assert transformers.AutoTokenizer.from_pretrained(export)("x")["input_ids"]
