"""Forward throughput: pbbjax (jitted, XLA) vs transformers on PyTorch, same weights, same batch, one run.

    python benchmarks/forward.py [--batch 8] [--seq 256] [--repeats 5] [--model DIR] [--json OUT]

Default model: the embedded SmolLM2-135M-Instruct, fp32. Prints tokens/s of each and the ratio; timings
are the median of ``--repeats`` runs after a warm-up (compile for pbbjax, first call for PyTorch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import machine  # benchmarks/machine.py: the script's own folder is on sys.path
import numpy as np


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="", help="HF directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()

    import jax
    import torch
    import transformers
    from flax import nnx

    import pbbjax

    path = args.model or pbbjax.default_model_path()
    ids = np.random.RandomState(0).randint(0, 1000, (args.batch, args.seq)).astype(np.int32)
    tokens = ids.size

    model, _ = pbbjax.load_model(path)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x = jax.device_put(ids)
    jax_s = _median_seconds(lambda: forward(state, x).block_until_ready(), args.repeats)
    ours = np.asarray(forward(state, x))

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tx = torch.as_tensor(ids, dtype=torch.long)

    def torch_forward():
        with torch.inference_mode():
            return hf(tx).logits

    torch_s = _median_seconds(torch_forward, args.repeats)
    diff = float(np.abs(torch_forward().numpy() - ours).max())

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{machine.describe()}, {jax.devices()[0].platform}",
        "model": str(path),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": "float32",
        "pbbjax_tokens_per_s": tokens / jax_s,
        "transformers_tokens_per_s": tokens / torch_s,
        "ratio_pbbjax_over_transformers": torch_s / jax_s,
        "max_abs_logit_diff": diff,
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    print(f"{'':14s}{'tokens/s':>12s}{'s/forward':>12s}")
    print(f"{'pbbjax':14s}{tokens / jax_s:12.0f}{jax_s:12.3f}")
    print(f"{'transformers':14s}{tokens / torch_s:12.0f}{torch_s:12.3f}")
    print(f"ratio pbbjax / transformers: {torch_s / jax_s:.2f}x   (max |Δlogit| {diff:.2e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
