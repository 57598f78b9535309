"""What one SFT train step needs on this machine's backend, by remat policy, layer scan and microbatches.

Compile-only (no weights are read: the model's ``config.json`` is enough): each variant's train step
(``pbbjax.training.sft.make_train_step``, AdamW, fp32) is lowered for a ``--batch x --seq`` batch and
compiled, and XLA's memory analysis is printed next to ``pbbjax.memory``'s estimate by arithmetic:

    python scripts/train_memory.py [--model DIR] [--batch 4] [--seq 1024] [--json OUT]

``--model`` defaults to the embedded SmolLM2-135M. "XLA temp" is the step's scratch memory, "XLA total"
adds the arguments and outputs (the donated train state counted once). On XLA:CPU, remat without a layer
scan saves almost nothing (docs/results.md, leetcode, has the figures for SmolLM2-135M). The estimate
assumes the scanned schedule, where one layer is rebuilt at a time.
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
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pbbjax.memory import Layout, total, train_estimate
    from pbbjax.models.config import ModelConfig
    from pbbjax.models.decoder import Transformer
    from pbbjax.training import sft

    cfg = ModelConfig.from_dir(
        model_dir, param_dtype="float32", compute_dtype="float32", scan_layers=scan, remat=remat
    )
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    optim = sft.OptimConfig(microbatches=microbatches)
    optimizer = sft.make_optimizer(optim, 100)
    state = {
        "params": params,
        "opt_state": jax.eval_shape(optimizer.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    step = sft.make_train_step(graphdef, optimizer, optim, 100, None, None)
    row = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    batch_spec = dict.fromkeys(("tokens", "positions", "segment_ids", "loss_mask"), row)
    m = step.lower(state, batch_spec).compile().memory_analysis()
    compiled = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
    compiled -= m.alias_size_in_bytes
    estimate = total(train_estimate(cfg, Layout(), batch=batch, seq_len=seq, microbatches=microbatches))
    return {
        "remat": remat,
        "scan_layers": scan,
        "microbatches": microbatches,
        "xla_temp_bytes": int(m.temp_size_in_bytes),
        "xla_total_bytes": int(compiled),
        "estimate_bytes": int(estimate),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="an HF model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()

    import jax

    from pbbjax.default_model import default_model_path
    from pbbjax.memory import GIB

    model_dir = args.model or default_model_path()
    print(f"train step, {args.batch} x {args.seq} tokens, fp32, {jax.default_backend()} backend: {model_dir}")
    print(f"{'remat':<6}{'scan':<7}{'micro':>6}{'XLA temp':>11}{'XLA total':>11}{'estimate':>10}  (GiB)")
    rows = []
    for remat, scan, per_row in VARIANTS:
        r = measure(model_dir, args.batch, args.seq, remat, scan, args.batch if per_row else 1)
        rows.append(r)
        print(
            f"{remat:<6}{scan!s:<7}{r['microbatches']:>6}{r['xla_temp_bytes'] / GIB:>11.2f}"
            f"{r['xla_total_bytes'] / GIB:>11.2f}{r['estimate_bytes'] / GIB:>10.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            meta = {"batch": args.batch, "seq": args.seq, "backend": jax.default_backend()}
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
