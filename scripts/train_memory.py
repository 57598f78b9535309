"""What one SFT train step needs on this machine's backend, by remat policy, layer scan and microbatches.

Compile-only (no weights are read: the model's ``config.json`` is enough): each variant's train step
(``pbbjax.training.sft.make_train_step``, AdamW, fp32) is lowered for a ``--batch x --seq`` batch and
compiled, and XLA's memory analysis is printed next to ``pbbjax.config.memory``'s estimate by arithmetic:

    python scripts/train_memory.py [--model DIR] [--batch 4] [--seq 1024] [--json OUT]

``--model`` defaults to the embedded SmolLM2-135M. Rows are GiB, as ``pbbjax.training.aot`` reports them: "XLA
temp" is the step's scratch memory, "XLA total" adds the arguments, outputs (the donated train state
counted once) and generated code. On XLA:CPU, remat without a layer scan saves almost nothing
(docs/results.md, leetcode, has the figures for SmolLM2-135M). The estimate assumes the scanned schedule,
where one layer is rebuilt at a time.
"""

from __future__ import annotations

import argparse
import json

VARIANTS = (  # (remat, scan_layers, one row per microbatch)
    ("none", False, False),
    ("full", False, False),
    ("none", True, False),
    ("full", True, False),
    ("none", False, True),
)


def measure(model_dir, batch: int, seq: int, remat: str, scan: bool, microbatches: int) -> dict:
    """One variant through ``pbbjax.training.aot``'s own path (abstract train state, SFT step, memory
    analysis), on this process's first device."""
    import jax

    from pbbjax.config.run_config import build_run_config
    from pbbjax.config.schema import base_config
    from pbbjax.training import aot

    config = base_config("proactive")
    config.model.update(path=str(model_dir), dtype="float32", scan_layers=scan, remat=remat)
    config.pipeline.update(batch_size=batch, seq_len=seq)
    config.train.microbatches = microbatches
    config.mesh.update(data=1, fsdp=1, tensor=1)
    step = aot.sft_steps(aot.build_context(build_run_config(config), jax.devices()[:1]))[0]
    row = aot.compile_step(step, hbm=2**62)  # no memory limit: report what it needs
    return {"remat": remat, "scan_layers": scan, "microbatches": microbatches} | {
        k: row[k] for k in ("temporaries", "total", "estimate")
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="an HF model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    import jax

    from pbbjax.models.default_model import default_model_path

    model_dir = args.model or default_model_path()
    print(f"train step, {args.batch} x {args.seq} tokens, fp32, {jax.default_backend()} backend: {model_dir}")
    print(f"{'remat':<6}{'scan':<7}{'micro':>6}{'XLA temp':>11}{'XLA total':>11}{'estimate':>10}  (GiB)")
    rows = []
    for remat, scan, per_row in VARIANTS:
        r = measure(model_dir, args.batch, args.seq, remat, scan, args.batch if per_row else 1)
        rows.append(r)
        print(
            f"{remat:<6}{scan!s:<7}{r['microbatches']:>6}{r['temporaries']:>11.2f}{r['total']:>11.2f}"
            f"{r['estimate']:>10.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            meta = {"batch": args.batch, "seq": args.seq, "backend": jax.default_backend()}
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
