"""The Colab TPU demo notebook, executed headless on CPU with the tiny preset, so that it cannot rot.

The parameters are injected the papermill way, without papermill: a cell tagged ``injected-parameters``
goes right after the cell tagged ``parameters``, and nbclient runs the notebook in a fresh kernel. With
``PRESET = "tiny"`` nothing is downloaded (``HF_HUB_OFFLINE=1``), and ``INSTALL = False`` uses the pbbjax
of this environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
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


def parameters(nb) -> dict:
    namespace = {}
    exec(cell_tagged(nb, "parameters").source, namespace)
    return {k: v for k, v in namespace.items() if k.isupper()}


def test_notebook_is_valid_and_runs_unedited_by_default():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    values = parameters(nb)
    assert {"PRESET", "INSTALL", "PBBJAX_SOURCE", "STORAGE", "WORKDIR", "OVERRIDES", "PUSH_TO_HUB"} <= set(
        values
    )
    # The defaults are for Colab, and none is a placeholder to edit: pbbjax is found (or uploaded), the
    # preset follows the accelerator, the run is kept on Drive.
    assert (values["PRESET"], values["INSTALL"], values["STORAGE"]) == ("auto", True, "auto")
    assert values["PBBJAX_SOURCE"] == "" and values["WORKDIR"] == ""
    assert not any("<" in v for v in values.values() if isinstance(v, str)), values
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"


def _fields(c, prefix=""):
    """Every leaf field of a ConfigDict, dotted."""
    out = set()
    for key, value in c.items():
        out |= _fields(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key}
    return out


def _config(preset: str, workdir: str = "runs/x"):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {**parameters(nb), "preset": preset, "workdir_location": workdir}
    exec(cell_tagged(nb, "config").source, namespace)
    return namespace["config"]


@pytest.mark.parametrize("preset", ["lora", "colab"])
def test_one_chip_presets_set_only_existing_fields(preset):
    """The TPU branches (not run in CI): their configs have exactly the base config's fields, none misspelt.
    What they compile to on one v5e chip is in the notebook's table (pbbjax.training.aot, topology
    v5e:1x1)."""
    from pbbjax.config.schema import base_config, lora_config

    config = _config(preset)
    assert _fields(config) == _fields(base_config("proactive"))
    assert (config.model.dtype, config.model.compute_dtype) == ("float32", "bfloat16")
    assert config.model.scan_layers and config.model.remat == "full"
    assert config.workdir == "runs/x"
    if preset == "lora":
        assert config.model.path == "Qwen/Qwen3-1.7B"
        assert (config.model.lora.rank, config.model.lora.base_dtype) == (16, "bfloat16")
        assert lora_config(config).targets == tuple(base_config("proactive").model.lora.targets)
    else:
        assert config.model.path == "Qwen/Qwen3-0.6B" and config.model.lora.rank == 0


def _cell_namespace(*tags: str, **values) -> dict:
    """The namespace after running the parameters with ``values`` in place, then the cells ``tags``."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    namespace = {**parameters(nb), **values}
    for tag in tags:
        exec(cell_tagged(nb, tag).source, namespace)
    return namespace


def test_storage_puts_the_workdir_where_asked(tmp_path):
    assert _cell_namespace("storage", STORAGE="local")["workdir_location"] == "runs/pbb-colab"
    assert (
        _cell_namespace("storage", STORAGE="auto", RUN_NAME="r")["workdir_location"] == "runs/r"
    )  # no Colab
    bucket = {"STORAGE": "gcs", "GCS_BUCKET": "gs://b/runs/", "RUN_NAME": "r"}
    assert _cell_namespace("storage", **bucket)["workdir_location"] == "gs://b/runs/r"
    assert _cell_namespace("storage", WORKDIR=str(tmp_path))["workdir_location"] == str(tmp_path)
    with pytest.raises(ValueError, match="GCS_BUCKET"):
        _cell_namespace("storage", STORAGE="gcs")
    with pytest.raises(ValueError, match="'auto', 'drive', 'gcs' or 'local'"):
        _cell_namespace("storage", STORAGE="dropbox")


def test_install_finds_an_uploaded_wheel_and_pip_installs_it(tmp_path, pbbjax_wheel):
    """No placeholder: the install cell finds a wheel where a user puts one, and the requirement it makes
    installs it (into a folder of its own, without dependencies, which this environment has)."""
    install = _cell_namespace("storage", "install", INSTALL=False, STORAGE="local")
    find, requirement = install["find_pbbjax"], install["pip_requirement"]
    empty, content, drive = tmp_path / "empty", tmp_path / "content", tmp_path / "drive"
    for folder in (empty, content, drive):
        folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no pbbjax to install") as e:
        find([str(empty)])
    assert str(empty) in str(e.value) and "PBBJAX_SOURCE" in str(e.value)

    (drive / "pbbjax-0.0.9.tar.gz").write_bytes(b"an older source archive")
    assert find([str(content), str(drive)]) == str(drive / "pbbjax-0.0.9.tar.gz")
    wheel = content / pbbjax_wheel.name
    shutil.copy(pbbjax_wheel, wheel)
    assert find([str(content), str(drive)]) == str(wheel)  # the first folder that has one
    (content / "pbbjax").mkdir()
    (content / "pbbjax" / "pyproject.toml").write_text("")
    assert find([str(content)]) == str(wheel), "an archive in a folder comes before a checkout in it"
    assert find([str(drive / "nothing"), str(content)]) == str(wheel)

    assert requirement(str(wheel)) == f"pbbjax[tpu] @ {wheel.resolve().as_uri()}"
    url = "git+https://github.com/someone/pbbjax.git"
    assert requirement(url) == f"pbbjax[tpu] @ {url}"
    assert _cell_namespace("storage", "install", INSTALL=False, PBBJAX_SOURCE=url)["find_pbbjax"]() == url
    with pytest.raises(FileNotFoundError, match="does not exist"):
        requirement(str(tmp_path / "pbbjax-missing.whl"))

    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    subprocess.run([*pip, requirement(str(wheel))], check=True, capture_output=True, timeout=300)
    probe = (
        "import pbbjax, pbbjax.config.presets as p; "
        "print(pbbjax.__file__, p.model_file('qwen3-1.7b').is_file())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    assert out == [str(target / "pbbjax" / "__init__.py"), "True"], out


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
            "PRESET": "auto",  # the tiny preset, on this CPU
            "INSTALL": False,
            "STORAGE": "local",
            "WORKDIR": str(workdir),
            # Smaller than the tiny preset: one epoch per stage, no evaluation before training. No export by
            # the runner: the export cell then writes it from the checkpoint, as it does for models over 1B.
            "OVERRIDES": {"train.epochs": 1, "eval.at_start": False, "train.export": False},
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
