"""``python -m pbbjax.data --config configs/proactive.py --out DIR``: dump every stage and evaluation set.

For each stage and each evaluation set it writes ``DIR/<name>.jsonl`` and ``DIR/<name>/`` (a ``datasets``
``save_to_disk`` directory), plus ``DIR/instructions.jsonl`` and ``DIR/summary.json``, and prints a table of
rows and tokens (tokenized with the configured model's tokenizer and chat template) per set.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from pbbjax import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file, optionally :preset", lock_config=True
)
_OUT = flags.DEFINE_string("out", None, "output directory (replaced whole)")
_VERBOSE = flags.DEFINE_bool("verbose", False, console.VERBOSE_HELP)


def build(config):
    """The curriculum the config describes."""
    from pbbjax.config import build_config_curriculum

    return build_config_curriculum(config)[1]


def dump(curriculum, out: Path, tokenizer=None) -> list[dict]:
    """Write every set as JSONL + a datasets directory; returns the summary rows."""
    import datasets

    from pbbjax.pipeline import tokenize_rows

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else None))
    summary = []
    sets = [(s.name, "stage", s.rows) for s in curriculum.stages]
    sets += [(f"eval_{name}", "eval", rows) for name, rows in curriculum.eval_sets.items()]
    for name, kind, rows in sets:
        records = [r.to_json() for r in rows]
        with open(tmp / f"{name}.jsonl", "w") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        columns = list(records[0]) if records else ["stage"]
        datasets.Dataset.from_dict({k: [r[k] for r in records] for k in columns}).save_to_disk(
            str(tmp / name)
        )
        tokens = sum(len(x["tokens"]) for x in tokenize_rows(rows, tokenizer)) if tokenizer and rows else None
        summary.append(
            dict(
                set=name,
                kind=kind,
                rows=len(rows),
                tokens=tokens,
                declarative=sum(r.kind == "declarative" for r in rows),
                execution=sum(r.kind == "execution" for r in rows),
            )
        )
    with open(tmp / "instructions.jsonl", "w") as f:
        for ins in curriculum.instructions.values():
            split = "train" if ins.id in curriculum.train_ids else "eval"
            f.write(
                json.dumps(
                    dict(
                        id=ins.id,
                        name=ins.name,
                        split=split,
                        text=ins.text,
                        text_nl=ins.text_nl,
                        meta=ins.meta,
                    ),
                    ensure_ascii=False,
                    sort_keys=True,
                )
                + "\n"
            )
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return summary


def format_table(summary: list[dict]) -> str:
    header = f"{'set':22s}{'rows':>8s}{'decl':>8s}{'exec':>8s}{'tokens':>10s}"
    lines = [header, "-" * len(header)]
    for s in summary:
        tokens = "-" if s["tokens"] is None else str(s["tokens"])
        lines.append(f"{s['set']:22s}{s['rows']:8d}{s['declarative']:8d}{s['execution']:8d}{tokens:>10s}")
    return "\n".join(lines)


def main(argv):
    del argv
    console.configure(_VERBOSE.value)
    import pbbjax
    from pbbjax.models.hf_io import load_tokenizer, resolve_model_dir

    config = _CONFIG.value
    if config is None or _OUT.value is None:
        raise app.UsageError("usage: python -m pbbjax.data --config configs/<curriculum>.py --out DIR")
    curriculum = build(config)
    tokenizer = load_tokenizer(resolve_model_dir(config.model.path or pbbjax.default_model_path()))
    summary = dump(curriculum, Path(_OUT.value), tokenizer)
    print(f"{config.curriculum} curriculum, domain {config.domain}, seed {config.seed} -> {_OUT.value}")
    print(format_table(summary))


if __name__ == "__main__":
    app.run(main)
