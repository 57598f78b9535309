"""Data pipeline throughput vs what the SmolLM2 train step consumes, in one run.

    python benchmarks/pipeline.py [--instructions 200] [--seq 256] [--batch 8] [--step-batch 2]

Builds the proactive curriculum on random arithmetic (stage 1: declarative + execution rows), then times
the pipeline (chat-template tokenization, loss masks, first-fit packing, batching) in tokens/s, and a
jitted SmolLM2-135M gradient step (fp32 forward + backward of the masked cross-entropy, the bulk of a train
step) in tokens/s. The pipeline must feed at least 10x faster than the step consumes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instructions", type=int, default=200)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--step-batch", type=int, default=2, help="batch of the timed gradient step")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import pbbjax
    from pbbjax.data.curriculum import CurriculumConfig, build_curriculum
    from pbbjax.data.pipeline import PipelineConfig, make_dataset, tokenize_rows
    from pbbjax.data.tasks.base import get_domain
    from pbbjax.models.hf_io import load_tokenizer

    path = pbbjax.default_model_path()
    tokenizer = load_tokenizer(path)
    cfg = CurriculumConfig(num_train_instructions=args.instructions, num_eval_instructions=10, cot=True)
    t0 = time.perf_counter()
    rows = build_curriculum(get_domain("arithmetic"), "proactive", cfg).stages[0].rows
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    examples = tokenize_rows(rows, tokenizer, args.seq)
    tokenize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = list(make_dataset(examples, PipelineConfig(seq_len=args.seq, batch_size=args.batch)))
    pack_s = time.perf_counter() - t0
    tokens = sum(len(x["tokens"]) for x in examples)
    fill = np.mean([(b["segment_ids"] > 0).mean() for b in batches])
    pipeline_tps = tokens / (tokenize_s + pack_s)

    model, _ = pbbjax.load_model(path)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v[: args.step_batch]) for k, v in batches[0].items()}

    @jax.jit
    def grad_step(params, batch):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(
                batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
            mask = batch["loss_mask"][:, 1:]
            return (ce * mask).sum() / jnp.maximum(mask.sum(), 1)

        return jax.value_and_grad(loss_fn)(params)

    jax.block_until_ready(grad_step(params, batch))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(grad_step(params, batch))
    step_s = time.perf_counter() - t0
    step_tps = args.step_batch * args.seq / step_s

    print(
        f"curriculum: {len(rows)} stage-1 rows from {args.instructions} instructions, built in {build_s:.1f}s"
    )
    print(
        f"pipeline:   {tokens} tokens; tokenize {tokenize_s:.2f}s, pack+batch {pack_s:.2f}s "
        f"-> {pipeline_tps:,.0f} tokens/s ({len(batches)} batches of {args.batch}x{args.seq}, "
        f"{fill:.0%} filled)"
    )
    print(
        f"train step: SmolLM2-135M fp32 value_and_grad, {args.step_batch}x{args.seq} tokens in {step_s:.2f}s "
        f"-> {step_tps:,.0f} tokens/s"
    )
    print(f"ratio pipeline / train step: {pipeline_tps / step_tps:,.0f}x  (must be >= 10x)")


if __name__ == "__main__":
    main()
