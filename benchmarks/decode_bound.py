"""The floor under one greedy decode step on this machine: every weight matrix of the model, once, through a
[B, hidden] matrix product, in XLA (what pbbjax's sampler compiles to), PyTorch and NumPy (BLAS).

    python benchmarks/decode_bound.py [--model DIR] [--batches 8 32] [--repeats 3]

A decode step must read all the model's weights (SmolLM2-135M: 538 MB in fp32) for a handful of rows, so
on a CPU it is bound by how fast the backend's small-batch matmul streams weights, not by FLOPs. This
script times exactly that work (no attention, no cache, no sampling) with the model's real matrix shapes,
each matrix a separate array, and prints ms per step and the tokens/s ceiling it implies, B / step time,
next to which ``benchmarks/sampler.py``'s figures can be read.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def shapes(cfg: dict) -> list[tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer = [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
    return layer * cfg["num_hidden_layers"] + [(h, cfg["vocab_size"])]


def time_backend(name: str, mats, batch: int, repeats: int) -> float:
    import numpy as np

    rows = np.ones((batch, max(m.shape[0] for m in mats)), np.float32)
    if name == "xla":
        import jax

        ws = [jax.device_put(m) for m in mats]

        @jax.jit
        def step(ws, x):
            acc = 0.0
            for w in ws:
                acc = acc + (x[:, : w.shape[0]] @ w)[:, :1]
            return acc

        x = jax.device_put(rows)
        step(ws, x).block_until_ready()
        run = lambda: step(ws, x).block_until_ready()  # noqa: E731
    elif name == "torch":
        import torch

        ws = [torch.from_numpy(m.copy()) for m in mats]
        x = torch.from_numpy(rows)

        def run():
            with torch.no_grad():
                return sum((x[:, : w.shape[0]] @ w)[:, :1] for w in ws)
    else:
        ws = mats

        def run():
            return sum((rows[:, : w.shape[0]] @ w)[:, :1] for w in ws)

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import numpy as np

    import pbbjax

    model = args.model or str(pbbjax.default_model_path())
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal(s, dtype=np.float32) * 0.01 for s in shapes(cfg)]
    mb = sum(m.nbytes for m in mats) / 1e6
    print(f"{len(mats)} weight matrices, {mb:.0f} MB fp32, one [B, k] @ [k, n] product each per step")
    print(f"{'B':>3} {'backend':8s} {'ms/step':>8s} {'GB/s':>6s} {'tokens/s ceiling':>17s}")
    for b in args.batches:
        for name in ("xla", "torch", "numpy"):
            s = time_backend(name, mats, b, args.repeats)
            print(f"{b:>3} {name:8s} {s * 1e3:8.1f} {mb / 1e3 / s:6.2f} {b / s:17.1f}", flush=True)


if __name__ == "__main__":
    main()
