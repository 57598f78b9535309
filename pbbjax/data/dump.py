"""Every stage and evaluation set of a curriculum on disk: JSONL, a ``datasets`` directory and a summary
(the library of ``python -m pbbjax.data``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import datasets

from pbbjax.data.pipeline import tokenize_rows


def dump(curriculum, out: Path, tokenizer=None) -> list[dict]:
    """Write every set as JSONL + a datasets directory; returns the summary rows."""
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
