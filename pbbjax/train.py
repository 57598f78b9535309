"""``python -m pbbjax.train --config configs/proactive.py``: the main job.

Training arrives with the trainer; until then this entry point loads the configured model (by default the
embedded SmolLM2-135M-Instruct) on the configured mesh and greedily answers ``config.demo.prompt`` through
the model's chat template, which proves the install, the weights and the sampler end to end.
"""

from __future__ import annotations

import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file, optionally :preset", lock_config=True
)


def main(argv):
    del argv
    import jax

    import pbbjax

    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/proactive.py")
    path = cfg.model.path or pbbjax.default_model_path()
    mesh = pbbjax.make_mesh(**cfg.mesh)
    t0 = time.perf_counter()
    model, tokenizer = pbbjax.load_model(
        path, dtype=cfg.model.dtype, mesh=mesh, compute_dtype=cfg.model.compute_dtype or None
    )
    print(
        f"loaded {path} on {jax.device_count()} {jax.devices()[0].platform} device(s) "
        f"in {time.perf_counter() - t0:.1f}s ({model.cfg.num_params / 1e6:.1f}M parameters)"
    )
    messages = [{"role": "user", "content": cfg.demo.prompt}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    t0 = time.perf_counter()
    [answer] = pbbjax.generate(model, tokenizer, [prompt], max_new_tokens=cfg.demo.max_new_tokens)
    print(f"\nprompt:\n{cfg.demo.prompt}\n\nanswer ({time.perf_counter() - t0:.1f}s): {answer.strip()}\n")
    print(
        f"The PBB trainer for the {cfg.curriculum!r} curriculum arrives with the trainer issue; "
        "this run checked the model, its weights and generation."
    )


if __name__ == "__main__":
    app.run(main)
