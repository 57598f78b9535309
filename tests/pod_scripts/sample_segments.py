"""The sampler on whatever pod this process belongs to (``python -m pbbjax.local_pod``): the tiny model in
``argv[1]`` on a mesh of every device of every host, 5 prompts x 2 samples, 24 new tokens, the decode loop
in one segment and in three (the KV cache extended between them, its rows over the hosts); process 0
writes both generations to ``argv[2]`` (an .npz file)."""

import sys

import jax
import numpy as np

from pbbjax import load_model, make_mesh
from pbbjax.core.distributed import initialize
from pbbjax.inference.sampler import generate_arrays

PROMPTS = [[5, 17, 33, 4, 9, 101, 64, 12, 90, 3, 44], [7, 7, 3], [120, 1, 55, 60, 61], [8], [30, 31, 32]]


def main(model_dir: str, out: str) -> None:
    initialize("auto")
    model, _ = load_model(model_dir, mesh=make_mesh(data=2, fsdp=-1, tensor=2))
    arrays = {}
    for k in (1, 3):
        g = generate_arrays(
            model, PROMPTS, 24, eos_ids=(2,), pad_id=0, temperature=1.0, n=2, seed=5, decode_segments=k
        )
        arrays.update({f"{name}{k}": np.asarray(getattr(g, name)) for name in g._fields})
    if jax.process_index() == 0:
        np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:3])
