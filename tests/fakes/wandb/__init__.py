"""A stand-in for the ``wandb`` package in tests (put ``tests/fakes`` first on the path): it records each
call as a JSON line in ``<dir>/fake_wandb.jsonl``, with the JAX process that made it. Never the network."""

import json
import os
from pathlib import Path


def _record(directory, **entry):
    entry["process"] = os.environ.get("JAX_PROCESS_ID", "0")
    with (Path(directory) / "fake_wandb.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


class Run:
    def __init__(self, directory, id):
        self.dir, self.id = directory, id

    def log(self, data, step=None):
        _record(self.dir, call="log", data=data, step=step)

    def finish(self, exit_code=None):
        _record(self.dir, call="finish", exit_code=exit_code)


def init(*, dir, id, **kwargs):
    _record(dir, call="init", dir=dir, id=id, **kwargs)
    return Run(dir, id)


def calls(directory) -> list[dict]:
    """The calls recorded in ``directory``."""
    path = Path(directory) / "fake_wandb.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
