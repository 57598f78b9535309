"""``python -m pbbjax.export ... --push-to-hub ORG/NAME`` against a recording stand-in for the Hub's API
(never the network): a private repository by default, exactly the export's files plus the model card, the
card's content from the run's results.json, and bad names / no token refused before any compute."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import train_cli

import pbbjax.export
from pbbjax.models import hub
from pbbjax.training.export import export_checkpoint

ROOT = Path(__file__).parents[2]
RUN = ["--config", "configs/proactive.py:tiny", "--config.train.steps=2", "--config.train.checkpoint_every=2"]


class FakeHfApi:
    """The four calls ``pbbjax.models.hub`` makes, recorded; repositories are {name: private}."""

    def __init__(self, repos=None):
        self.repos, self.calls, self.uploaded = dict(repos or {}), [], None

    def whoami(self, token):
        self.calls.append(("whoami", token))
        return {"name": "lab", "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo_id, *, token, private, exist_ok):
        self.calls.append(("create_repo", repo_id, token, private, exist_ok))
        self.repos.setdefault(repo_id, private)
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, *, token):
        return SimpleNamespace(private=self.repos[repo_id])

    def upload_folder(self, *, repo_id, folder_path, token, commit_message, delete_patterns):
        self.calls.append(("upload_folder", repo_id, token, delete_patterns))
        files = sorted(p for p in Path(folder_path).rglob("*") if p.is_file())
        self.uploaded = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_cli(RUN, workdir)
    return workdir


@pytest.fixture
def fake_hub(monkeypatch):
    api = FakeHfApi()
    monkeypatch.setattr(hub, "HfApi", lambda: api)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    return api


def test_push_uploads_the_export_and_its_card_to_a_private_repo(run, tmp_path, fake_hub, capsys):
    out = tmp_path / "hf"
    pbbjax.export.main(["--checkpoint", str(run), "--out", str(out), "--push-to-hub", "lab/pbb-tiny"])
    assert fake_hub.calls == [
        ("whoami", "hf_fake_token"),
        ("create_repo", "lab/pbb-tiny", "hf_fake_token", True, True),  # private
        ("upload_folder", "lab/pbb-tiny", "hf_fake_token", "*"),  # older files of the repo go
    ]
    plain = export_checkpoint(run, tmp_path / "plain")
    want = {p.name: p.read_bytes() for p in plain.iterdir()}
    assert set(fake_hub.uploaded) == {*want, "README.md"} and "model.safetensors" in want
    assert all(fake_hub.uploaded[name] == data for name, data in want.items())
    assert "to https://huggingface.co/lab/pbb-tiny (private)" in capsys.readouterr().out

    card = fake_hub.uploaded["README.md"].decode()
    assert card == (out / "README.md").read_text()
    results = json.loads((run / "results.json").read_text())
    lines = card.splitlines()
    assert lines[:5] == [
        "---",
        "library_name: transformers",
        "tags:",
        "- pbbjax",
        "- programming-by-backprop",
    ]
    assert "base_model:" not in card  # a tiny random model, not a Hub model
    assert "# pbb-tiny" in lines and "- Curriculum: proactive" in lines and "- Domain: arithmetic" in lines
    assert "- Base model: a tiny random llama built from model.tiny (seed 0)" in lines
    assert "- This checkpoint: global step 4: stage stage2, step 2 of it" in lines
    assert (
        "| stage1 | SFT | 2 | the base model | code of 4 train programs (12 rows), executions of 4 train "
        in card
    )
    assert "| stage2 | SFT | 2 | stage1 | code of 2 eval programs (6 rows) |" in lines
    finals = [r for r in results["records"] if r["final"]]
    assert {r["after"] for r in finals} == {"stage1", "stage2"}
    for r in finals:  # each evaluation: set, mode, n, accuracy [95% CI], guessing floor, answer loss
        accuracy = f"{r['accuracy']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        row = f"| {r['after']} | {r['set']} | {r['mode']} | {r['n']} | {accuracy} | {r['floor']:.2f} |"
        assert f"{row} {r['loss']:.4f} |" in lines, row
    assert "This checkpoint is the model that the rows after stage2 evaluate." in lines
    assert 'model = AutoModelForCausalLM.from_pretrained("lab/pbb-tiny")' in lines


def test_public_and_an_existing_public_repo(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    api = FakeHfApi(repos={"lab/old": False})
    with pytest.raises(hub.HubError, match="lab/old already exists and is public; pass --public"):
        hub.push(tmp_path, "lab/old", "tok", api=api)
    assert api.uploaded is None
    hub.push(tmp_path, "lab/old", "tok", public=True, api=api)
    hub.push(tmp_path, "lab/new", "tok", public=True, api=api)
    assert [c[3] for c in api.calls if c[0] == "create_repo"] == [True, False, False]  # private=
    assert api.uploaded == {"config.json": b"{}"}


def test_card_without_results_json():
    stage_end = SimpleNamespace(stage="stage1", step=None, stage_step=None)
    card = hub.model_card("lab/m", None, stage_end)
    assert (
        "- Curriculum: unknown (no results.json)" in card
        and "- This checkpoint: the end of stage stage1" in card
    )
    assert "No evaluation results: the run's workdir has no results.json." in card
    results = {"base_model": "Qwen/Qwen3-0.6B", "records": [], "curriculum": "ad"}
    card = hub.model_card("lab/m", results, stage_end)
    assert "base_model: Qwen/Qwen3-0.6B" in card.split("---")[1]  # a Hub id: the card's metadata links it
    assert "Stages: unknown (this run did not record what each trained on)." in card


@pytest.mark.parametrize("name", ["pbb-tiny", "lab/pbb/tiny", "lab/", "/pbb", "lab/pbb tiny", "lab--x/m"])
def test_a_name_that_is_not_org_name_fails_before_any_compute(name, tmp_path, fake_hub, capsys):
    with pytest.raises(
        SystemExit, match=rf"--push-to-hub '{name}' is not a Hub model name: expected ORG/NAME"
    ):
        pbbjax.export.main(
            ["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "hf"), "--push-to-hub", name]
        )
    assert fake_hub.calls == [] and not (tmp_path / "hf").exists()


def test_no_token_fails_before_any_compute(tmp_path):
    """No HF_TOKEN and no login (an empty Hugging Face home): the error names the flag and what to do,
    before the export looks at the checkpoint (which does not exist)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")
    }
    env["HF_HOME"] = str(tmp_path / "hf-home")
    cmd = [
        sys.executable,
        "-m",
        "pbbjax.export",
        "--checkpoint",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "hf"),
    ]
    done = subprocess.run(
        [*cmd, "--push-to-hub", "lab/pbb"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "pbbjax.export: error: --push-to-hub needs a Hugging Face token" in done.stderr
    assert (
        "HF_TOKEN" in done.stderr
        and "hf auth login" in done.stderr
        and "is not a directory" not in done.stderr
    )
    assert not (tmp_path / "hf").exists()
    done = subprocess.run([*cmd, "--public"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "--public is for --push-to-hub" in done.stderr
