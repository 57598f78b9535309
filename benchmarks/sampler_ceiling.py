"""The ``ceiling`` side of ``sampler.py`` (see its docstring): the weight products of a sampler call and
nothing else, timed in four weight layouts."""

from __future__ import annotations

import os
import time


def ceiling_side(model_dir: str, new_tokens: int):
    """XLA's weight-streaming ceiling: every weight matrix of the model once through the prefill's
    ``[B x prompt bucket, k]`` product, then once per decode step through a ``[B, k]`` product, and nothing
    else (no attention, cache, norms or sampling); a call times that per layout."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pbbjax
    from pbbjax.inference.sampler import prompt_bucket

    model, tokenizer = pbbjax.load_model(model_dir)
    cfg, layers = model.cfg, model.layers
    a, m = layers.attn, layers.mlp
    d = cfg.hidden_size
    per_layer = []
    for i in range(cfg.num_layers):
        w = lambda p, i=i: np.asarray(p[...][i])  # noqa: E731
        per_layer.append(
            {
                "q": w(a.q_proj).reshape(d, -1),
                "k": w(a.k_proj).reshape(d, -1),
                "v": w(a.v_proj).reshape(d, -1),
                "o": w(a.o_proj).reshape(-1, d),
                "gate": w(m.gate_proj),
                "up": w(m.up_proj),
                "down": w(m.down_proj),
            }
        )
    head = np.asarray(model.embed[...] if cfg.tie_word_embeddings else model.lm_head[...].T)  # [V, d]
    del model

    def layout(fused: bool, transposed: bool) -> list:
        mats = []
        for ws in per_layer:
            group = (
                [np.concatenate([ws["q"], ws["k"], ws["v"]], 1), ws["o"]]
                if fused
                else [ws[n] for n in "qkv"] + [ws["o"]]
            )
            group += (
                [np.concatenate([ws["gate"], ws["up"]], 1), ws["down"]]
                if fused
                else [ws[n] for n in ("gate", "up", "down")]
            )
            mats += group
        mats = [w.T if transposed else w for w in mats] + [head if transposed else head.T]
        return [jax.device_put(np.ascontiguousarray(w)) for w in mats]

    def steps_fn(transposed: bool):
        def one(x, ws):
            acc = jnp.zeros((), jnp.float32)
            for w in ws:
                k = w.shape[1] if transposed else w.shape[0]
                dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
                acc = acc + jax.lax.dot_general(x[:, :k], w, dims).sum()
            return acc

        @jax.jit
        def run(x, prompt_rows, ws):
            # The prefill's products (the LM head for the last position only, as pbbjax's prefill), then
            # new_tokens - 1 decode steps, each depending on the last.
            x = x + (one(prompt_rows, ws[:-1]) + one(x, ws[-1:])) * 1e-30
            return jax.lax.fori_loop(1, new_tokens, lambda _, x: x + one(x, ws) * 1e-30, x)

        return run

    forms = {
        f"{'fused' if fused else 'separate'} {'[n,k]' if tr else '[k,n]'}": (steps_fn(tr), layout(fused, tr))
        for fused in (False, True)
        for tr in (False, True)
    }
    width = max(max(w.shape) for w in forms["separate [k,n]"][1][:-1])

    def run(prompts: list[str]) -> dict:
        x = jnp.ones((len(prompts), width), jnp.float32)
        longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        prompt_rows = jnp.ones((len(prompts) * prompt_bucket(longest), width), jnp.float32)
        seconds = {}
        for name, (fn, ws) in forms.items():
            fn(x, prompt_rows, ws).block_until_ready()  # compiled on the first call per shape; untimed
            t0 = time.perf_counter()
            fn(x, prompt_rows, ws).block_until_ready()
            seconds[name] = time.perf_counter() - t0
        return {"forms": seconds}

    return run
