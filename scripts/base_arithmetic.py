"""How well the embedded SmolLM2-135M-Instruct adds and subtracts the numbers of the ``minimal`` study.

docs/results.md cites this to tell the model's arithmetic apart from PBB: in that study the traces state the
eval programs correctly, and the answers then fail on ``a + b`` / ``a - b`` with a in 0..20, b in 1..20.
Few-shot raw text (no chat template), greedy, through HF transformers (PyTorch, a test dependency):

    python scripts/base_arithmetic.py [--n 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20, help="problems per operation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pbbjax.models.default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    shots = "3 + 5 = 8\n12 - 7 = 5\n4 - 9 = -5\n17 + 6 = 23\n"
    rng = random.Random(args.seed)
    accuracy = {}
    for op in "+-":
        right = 0
        for _ in range(args.n):
            a, b = rng.randint(0, 20), rng.randint(1, 20)
            ids = tokenizer(f"{shots}{a} {op} {b} =", return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
            answer = tokenizer.decode(out[0, ids.shape[1] :]).split("\n")[0].strip()
            right += answer == str(a + b if op == "+" else a - b)
        accuracy[op] = right / args.n
    print(json.dumps({"model": str(path), "n_per_op": args.n, "seed": args.seed, "accuracy": accuracy}))


if __name__ == "__main__":
    main()
