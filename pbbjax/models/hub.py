"""``python -m pbbjax.export ... --push-to-hub ORG/NAME``: a model card for an export, and its upload.

``check_push`` runs before any compute: the name must be ``ORG/NAME``, a token must be at hand
(``HF_TOKEN``, else the login of ``hf auth login``: ``huggingface_hub.get_token``) and the Hub must accept
it. ``model_card`` writes the card from the run's ``results.json`` (curriculum, domain, base model, what
each stage trained on, and every stage's evaluation: set, mode, n, accuracy with its 95% interval, guessing
floor). ``push`` creates the repository, private unless ``public``, and uploads the export directory as
it is, deleting any other file an earlier push left there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

PAPER = "Programming by Backprop (Cook et al., [arXiv 2506.18777](https://arxiv.org/abs/2506.18777))"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(RuntimeError):
    """A Hub name, token or repository that a push cannot use."""


def check_push(repo_id: str, api: HfApi | None = None) -> str:
    """The token to push ``repo_id`` with, once the name, the token and the Hub's answer are checked."""
    try:
        validate_repo_id(repo_id)  # the Hub's own rules (characters, length, "--", "..", ".git")
        valid = bool(_REPO_ID.match(repo_id))  # and an owner: ORG/NAME, not NAME alone
    except HFValidationError:
        valid = False
    if not valid:
        raise HubError(
            f"--push-to-hub {repo_id!r} is not a Hub model name: expected ORG/NAME (your user or "
            "organisation, a slash, the model's name; letters, digits, '-', '_', '.')"
        )
    token = huggingface_hub.get_token()
    if not token:
        raise HubError(
            "--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN, or log in once with "
            "`hf auth login`"
        )
    try:
        me = (api or HfApi()).whoami(token=token)
    except Exception as e:  # refused (401), offline (HF_HUB_OFFLINE), unreachable: no push possible
        raise HubError(f"--push-to-hub: cannot check the Hugging Face token with the Hub: {e}") from e
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubError("--push-to-hub: the Hugging Face token is read-only; use a token with write access")
    return token


def push(folder: Path, repo_id: str, token: str, *, public: bool = False, api: HfApi | None = None) -> str:
    """Upload ``folder`` as the whole content of model repository ``repo_id``; its URL."""
    api = api or HfApi()
    url = api.create_repo(repo_id, token=token, private=not public, exist_ok=True)
    private = api.repo_info(repo_id, token=token).private
    if not private and not public:
        raise HubError(
            f"--push-to-hub: {repo_id} already exists and is public; pass --public to push to it, or name "
            "another repository (pushes are private by default)"
        )
    if private and public:
        print(f"{repo_id} already exists and is private: it stays private (change that on the Hub)")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message="Upload a pbbjax export",
        delete_patterns="*",  # the export replaces the repository's files (the Hub keeps .gitattributes)
    )
    return str(url)


# -- the model card ------------------------------------------------------------------------------------
def _checkpoint_words(checkpoint) -> str:
    if checkpoint.step is None:
        return f"the end of stage {checkpoint.stage}"
    return f"global step {checkpoint.step}: stage {checkpoint.stage}, step {checkpoint.stage_step} of it"


def _hub_id(name: str) -> str | None:
    return name if _REPO_ID.match(name) and not Path(name).exists() else None


def _cell(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _accuracy(r: dict) -> str:
    if r.get("accuracy") is None:
        return "- (not generated)"
    ci = f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r.get("ci_low") is not None else ""
    return f"{r['accuracy']:.2f}{ci}"


def _stages_table(results: dict) -> list[str]:
    stages = results.get("stages")
    if not stages:
        names = dict.fromkeys(r["after"] for r in results.get("records", []) if r["after"] != "start")
        return [f"Stages: {', '.join(names) or 'unknown'} (this run did not record what each trained on)."]
    lines = ["| stage | trainer | steps | starts from | trained on |", "|---|---|---|---|---|"]
    for s in stages:
        start = s.get("start_from") or "the base model"
        trainer = s.get("trainer", "sft").upper()
        lines.append(f"| {s['name']} | {trainer} | {s.get('steps', '-')} | {start} | {s['trained_on']} |")
    return lines


def _results_table(records: list[dict]) -> list[str]:
    finals = [r for r in records if r.get("final", True)]
    if not finals:
        return ["The run's results.json holds no evaluation yet."]
    lines = [
        "| after | set | mode | n | accuracy [95% CI] | guessing floor | answer loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in finals:
        row = (
            r["after"],
            r["set"],
            r["mode"],
            r["n"],
            _accuracy(r),
            _cell(r.get("floor")),
            _cell(r.get("loss"), 4),
        )
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return lines


def _which_rows(records: list[dict], checkpoint) -> str:
    ends = {r["after"]: r["step"] for r in records if r.get("final", True)}
    if checkpoint.stage in ends and checkpoint.step in (None, ends[checkpoint.stage]):
        return f"This checkpoint is the model that the rows after {checkpoint.stage} evaluate."
    return f"This checkpoint ({_checkpoint_words(checkpoint)}) is not one of the evaluated stage ends above."


def model_card(repo_id: str, results: dict | None, checkpoint) -> str:
    """The README.md of an export: ``results`` is the run's results.json (None: absent); ``checkpoint``
    has the ``stage``, ``step`` (None at a stage end) and ``stage_step`` of the exported checkpoint."""
    results = results or {}
    base = results.get("base_model") or "not recorded by this run"
    meta = ["---", "library_name: transformers", "tags:", "- pbbjax", "- programming-by-backprop"]
    if hub_id := _hub_id(base):
        meta.append(f"base_model: {hub_id}")
    lines = [*meta, "---", "", f"# {repo_id.split('/')[-1]}", ""]
    lines += [
        f"Finetuned with pbbjax, a JAX implementation of {PAPER}: trained on the text of instructions "
        "(programs, ciphers or grammars) and on executions of some of them, then evaluated on executing "
        "instructions whose executions it never saw.",
        "",
        f"- Base model: {base}",
        f"- Curriculum: {results.get('curriculum', 'unknown (no results.json)')}",
        f"- Domain: {results.get('domain', 'unknown (no results.json)')}",
        f"- Seed: {results.get('seed', 'unknown')}",
        f"- This checkpoint: {_checkpoint_words(checkpoint)}",
        "",
        "## Stages",
        "",
        *_stages_table(results),
        "",
        "## Evaluation",
        "",
    ]
    if not results:
        lines.append("No evaluation results: the run's workdir has no results.json.")
    else:
        lines += [
            "Accuracy on held-out inputs after each stage (`start`: before training), with a 95% bootstrap "
            "interval over instructions. The guessing floor is the accuracy of always answering each "
            "program's most frequent output: accuracy near it is not skill. Set `eval`: instructions whose "
            "executions training never showed; `train`: instructions whose executions it showed.",
            "",
            *_results_table(results.get("records", [])),
            "",
            _which_rows(results.get("records", []), checkpoint),
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def push_with_card(out: Path, results_path: Path, checkpoint, repo_id: str, token: str, *, public: bool):
    """Write the model card (from the run's ``results.json``, where it exists) into ``out``, then push."""
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    (out / "README.md").write_text(model_card(repo_id, results, checkpoint))
    url = push(out, repo_id, token, public=public)
    print(f"pushed {out} with its model card to {url} ({'public' if public else 'private'})")
    return url
