"""Train-step throughput: pbbjax (jitted, XLA) vs transformers on PyTorch, same model, batch and optimizer.

    python benchmarks/train_step.py [--batch 8] [--seq 256] [--steps 3] [--warmup 1] [--model DIR]
                                    [--microbatches K] [--back-to-back] [--sequential]
                                    [--peak-flops F | --measure-peak] [--json OUT]

One full SFT step on each side: forward, completion-only masked cross-entropy (mean over completion tokens),
backward, global-norm clipping, AdamW (decoupled weight decay on matrices only, the same lr, betas, eps and
decay on both sides), fp32 throughout. The batch is fixed and synthetic: random token ids over the whole
vocabulary, one segment per row, loss on the second half of each row. pbbjax runs ``pbbjax.training.sft``'s
``make_train_step``; PyTorch runs ``AutoModelForCausalLM`` (its default attention, SDPA) and computes the
same masked cross-entropy from ``model(input_ids).logits``.

Each side runs in its own subprocess (this script re-invoked with ``--side jax|torch``), so its peak RSS
(``ru_maxrss``) is its own and the two runtimes' thread pools never share a process. Both children load,
compile and take ``--warmup`` untimed steps (the first step's loss and gradient norm are compared: same
weights, same batch); then the parent asks them for one timed step at a time, alternating sides (ABBA
order), so that drifting load on a shared machine hits both alike. Reported: median seconds per step,
tokens/s (batch x seq / step), MFU and peak RSS of each side, and the ratio pbbjax / transformers; also
the median process CPU seconds per step (user + sys of the child: less sensitive to other jobs than wall
time, but it counts spin-waiting threads too), of which kernel (sys) seconds, and the minor page faults per
step: XLA:CPU maps its temporaries afresh each execution (~4 GiB, a million 4 KiB pages, at the defaults),
and faulting them in costs kernel time, several times more right after the other side's step (the
interleaving penalty, benchmarks/README.md). ``--back-to-back`` gives each turn an untimed step right
before the timed one, so that every timed step follows its own side's step as in a training run (twice
the steps; the sides still alternate). ``--microbatches K`` splits the batch into K parts on both sides
(pbbjax's ``train.microbatches``; PyTorch accumulates the parts' gradients). At the defaults the two
children hold ~16 GiB together;
``--sequential`` runs one child after the other instead (less memory at once, but no interleaving).

MFU = tokens/s x model FLOPs per token (``pbbjax.training.metrics.train_flops_per_token``: 6 per matmul
weight incl. the LM head, plus causal attention) / peak FLOP/s. A CPU has no spec-sheet entry, so pass
``--peak-flops`` (cores x clock x FLOPs per cycle per core: 32 in fp32 with AVX2 and two FMA units, 64 with
AVX-512 and two; e.g. 2 x 2.5e9 x 32 = 160e9), or ``--measure-peak`` to time a 2048 x 2048 fp32 matmul in
each side's backend (``jnp.dot``, ``torch.mm``; the best of several runs, before the children start) and
take each side's MFU against its own backend's attainable peak. Without either, MFU is None.

Environment variables (``XLA_FLAGS``, ``OMP_NUM_THREADS``, ...) pass through to the children, so XLA or
PyTorch settings can be tried without editing the script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import machine  # benchmarks/machine.py: the script's own folder is on sys.path
import numpy as np

SIDES = ("jax", "torch")
LABELS = {"jax": "pbbjax", "torch": "transformers"}


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, one segment per row, loss on the second half of each row (int32 [batch, seq])."""
    tokens = np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    return {
        "tokens": tokens,
        "positions": positions,
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": loss_mask,
    }


def _vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------------------------- children


def _jax_side(args):
    """A (step() -> (loss, grad_norm)) closure running pbbjax's train step, and facts about the setup."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import pbbjax
    from pbbjax.training.sft import (
        OptimConfig,
        batch_sharding,
        init_state,
        make_optimizer,
        make_train_step,
        state_shardings,
    )

    model, _ = pbbjax.load_model(args.model, tokenizer=False, remat=args.remat, scan_layers=args.scan_layers)
    graphdef, _ = nnx.split(model)
    cfg = OptimConfig(
        learning_rate=args.lr,
        warmup_steps=0,
        schedule="constant",
        weight_decay=args.weight_decay,
        b1=args.b1,
        b2=args.b2,
        eps=args.eps,
        max_grad_norm=args.max_grad_norm,
        microbatches=args.microbatches,
    )
    total = args.warmup + args.steps
    optimizer = make_optimizer(cfg, total)
    state = {"value": init_state(model, optimizer)}
    del model  # the state holds the parameters (and donates them each step)
    train_step = make_train_step(graphdef, optimizer, cfg, total, state_shardings(state["value"]), None)
    host = synthetic_batch(args.batch, args.seq, _vocab_size(args.model), args.seed)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in host.items()}, batch_sharding(None))

    def step():
        new, metrics = train_step(state["value"], batch)
        jax.block_until_ready((new, metrics))
        state["value"] = new
        return float(metrics["loss"]), float(metrics["grad_norm"])

    info = {
        "device": jax.devices()[0].device_kind,
        "remat": args.remat,
        "scan_layers": args.scan_layers,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch_imported": "torch" in sys.modules,
    }
    return step, info


def _torch_side(args):
    import torch
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    params = list(model.parameters())  # tied embedding counted once
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(args.b1, args.b2),
        eps=args.eps,
    )
    host = synthetic_batch(args.batch, args.seq, model.config.vocab_size, args.seed)
    ids = torch.as_tensor(host["tokens"], dtype=torch.long)
    weight = torch.as_tensor(host["loss_mask"][:, 1:], dtype=torch.float32)

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = weight.sum().clamp_min(1e-9)
        loss = 0.0
        for part, w in zip(ids.chunk(args.microbatches), weight.chunk(args.microbatches), strict=True):
            logits = model(input_ids=part, use_cache=False).logits
            ce = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1), reduction="none"
            )
            part_loss = (ce.view_as(w) * w).sum() / total  # the parts' losses sum to the batch's mean
            part_loss.backward()
            loss = loss + part_loss.detach()
        if args.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        optimizer.step()
        return float(loss.detach()), float(grad_norm)

    info = {
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "jax_imported": "jax" in sys.modules,
    }
    return step, info


def child_main(args):
    """Protocol on the original stdout (one JSON line per message); anything else printed goes to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(**msg):
        channel.write(json.dumps(msg) + "\n")

    t0 = time.perf_counter()
    step, info = (_jax_side if args.side == "jax" else _torch_side)(args)
    setup_s = time.perf_counter() - t0
    warmup = []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        loss, grad_norm = step()
        warmup.append({"seconds": time.perf_counter() - t0, "loss": loss, "grad_norm": grad_norm})
    send(event="ready", setup_s=setup_s, warmup=warmup, info=info)
    for line in sys.stdin:
        if line.strip() in ("step", "steps"):
            if line.strip() == "steps":  # --back-to-back: an untimed step right before the timed one
                step()
            t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            loss, grad_norm = step()
            seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            send(
                event="step",
                seconds=seconds,
                cpu_seconds=(r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                sys_seconds=r1.ru_stime - r0.ru_stime,
                page_faults=r1.ru_minflt - r0.ru_minflt,
                loss=loss,
                grad_norm=grad_norm,
            )
        else:
            break
    send(event="done", max_rss_mib=_max_rss_mib())


# ----------------------------------------------------------------------------------------------- parent


class Child:
    def __init__(self, side: str, args, model_dir: str):
        forwarded = [
            f"--{name.replace('_', '-')}={getattr(args, name)}"
            for name in ("batch", "seq", "warmup", "steps", "seed", "lr", "b1", "b2", "eps")
            + ("weight_decay", "max_grad_norm", "remat", "microbatches")
        ]
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", model_dir, *forwarded]
        if args.scan_layers:
            cmd.append("--scan-layers")
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the {self.side} child exited (code {code}) without answering; see stderr")
        return json.loads(line)

    def request(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def finish(self) -> dict:
        done = self.request("done")
        self.proc.stdin.close()
        self.proc.wait()
        return done


def measure_peak_flops(side: str, n: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n fp32 matmul in ``side``'s backend (XLA's ``jnp.dot`` or
    ``torch.mm``): the matmul peak that backend attains on this CPU."""
    if side == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        dot = jax.jit(jnp.dot)
        run = lambda: dot(a, b).block_until_ready()  # noqa: E731
    else:
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
        run = lambda: torch.mm(a, b)  # noqa: E731
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def run_children(args, model_dir: str) -> dict[str, dict]:
    """{side: {"ready": ..., "steps": [...], "done": ...}}, timed steps alternating between the sides."""
    results = {side: {"steps": []} for side in SIDES}
    groups = [[s] for s in SIDES] if args.sequential else [list(SIDES)]
    for group in groups:
        children = {side: Child(side, args, model_dir) for side in group}
        try:
            for side, child in children.items():
                results[side]["ready"] = child.receive()
                print(f"{LABELS[side]} ready: {_ready_line(results[side]['ready'])}", flush=True)
            for i in range(args.steps):
                order = group if i % 2 == 0 else group[::-1]  # ABBA: neither side always goes first
                for side in order:
                    reply = children[side].request("steps" if args.back_to_back else "step")
                    results[side]["steps"].append(reply)
                    print(
                        f"  step {i + 1}/{args.steps} {LABELS[side]:12s} {reply['seconds']:7.2f}s "
                        f"(CPU {reply['cpu_seconds']:6.1f}s, sys {reply['sys_seconds']:5.1f}s, "
                        f"{reply['page_faults'] / 1e3:6.0f}k faults) loss {reply['loss']:.4f}",
                        flush=True,
                    )
            for side, child in children.items():
                results[side]["done"] = child.finish()
        finally:
            for child in children.values():
                if child.proc.poll() is None:
                    child.proc.kill()
    return results


def _ready_line(ready: dict) -> str:
    warm = ", ".join(f"{w['seconds']:.1f}s" for w in ready["warmup"])
    return f"setup {ready['setup_s']:.1f}s, warm-up steps {warm or '-'}; {ready['info']}"


def parent_main(args):
    from importlib.metadata import version

    import pbbjax
    from pbbjax.models.architecture import ModelConfig
    from pbbjax.training.metrics import mfu, train_flops_per_token

    model_dir = str(args.model or pbbjax.default_model_path())
    cfg = ModelConfig.from_dir(model_dir)
    flops_per_token = train_flops_per_token(cfg, args.seq)
    peaks = {side: args.peak_flops for side in SIDES}
    peak_source = "--peak-flops" if args.peak_flops else None
    if args.measure_peak:
        peaks = {side: measure_peak_flops(side) for side in SIDES}
        peak_source = "measured: best 2048x2048 fp32 matmul of each side's backend (jnp.dot, torch.mm)"
        for side, peak in peaks.items():
            print(f"measured peak {LABELS[side]}: {peak / 1e9:.1f} GFLOP/s (2048 x 2048 fp32, best of 10)")

    results = run_children(args, model_dir)
    tokens = args.batch * args.seq
    sides = {}
    for side in SIDES:
        r = results[side]
        seconds = statistics.median(s["seconds"] for s in r["steps"])
        first = r["ready"]["warmup"][0] if r["ready"]["warmup"] else r["steps"][0]
        sides[side] = {
            "tokens_per_s": tokens / seconds,
            "seconds_per_step": seconds,
            "step_seconds": [s["seconds"] for s in r["steps"]],
            "cpu_seconds_per_step": statistics.median(s["cpu_seconds"] for s in r["steps"]),
            "sys_seconds_per_step": statistics.median(s["sys_seconds"] for s in r["steps"]),
            "page_faults_per_step": statistics.median(s["page_faults"] for s in r["steps"]),
            "warmup_seconds": [w["seconds"] for w in r["ready"]["warmup"]],
            "setup_seconds": r["ready"]["setup_s"],
            "mfu": mfu(tokens / seconds, flops_per_token, peaks[side]),
            "peak_flops": peaks[side],
            "peak_rss_mib": r["done"]["max_rss_mib"],
            "first_step_loss": first["loss"],
            "first_step_grad_norm": first["grad_norm"],
            "last_step_loss": r["steps"][-1]["loss"],
            "info": r["ready"]["info"],
        }
    jx, th = sides["jax"], sides["torch"]
    ratio = th["seconds_per_step"] / jx["seconds_per_step"]
    loss_diff = abs(jx["first_step_loss"] - th["first_step_loss"])
    grad_norm_diff = abs(jx["first_step_grad_norm"] - th["first_step_grad_norm"])

    print()
    head = ("tokens/s", "s/step", "CPU s/step", "sys s/step", "faults/step", "MFU", "peak RSS MiB")
    head += ("1st loss",)
    print(f"{'':14s}" + "".join(f"{h:>13s}" for h in head))
    for side in SIDES:
        s = sides[side]
        m = f"{s['mfu']:.1%}" if s["mfu"] is not None else "None"
        print(
            f"{LABELS[side]:14s}{s['tokens_per_s']:13.1f}{s['seconds_per_step']:13.2f}"
            f"{s['cpu_seconds_per_step']:13.2f}{s['sys_seconds_per_step']:13.2f}"
            f"{s['page_faults_per_step'] / 1e3:12.0f}k{m:>13s}{s['peak_rss_mib']:13.0f}"
            f"{s['first_step_loss']:13.6f}"
        )
    print(
        f"ratio pbbjax / transformers: {ratio:.2f}x   first-step |Δloss| {loss_diff:.2e}, "
        f"|Δgrad norm| {grad_norm_diff:.2e}"
    )
    print(
        f"model FLOPs per token {flops_per_token / 1e6:.1f} M; peak FLOP/s: "
        + (
            ", ".join(f"{LABELS[s]} {p / 1e9:.1f} G" for s, p in peaks.items()) + f" ({peak_source})"
            if peak_source
            else "None (pass --peak-flops or --measure-peak)"
        )
    )

    if args.json:
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine.describe(),
            "model": model_dir,
            "batch": args.batch,
            "microbatches": args.microbatches,
            "back_to_back": args.back_to_back,
            "seq": args.seq,
            "dtype": "float32",
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "interleaved": not args.sequential,
            "optimizer": {
                "name": "adamw",
                "lr": args.lr,
                "b1": args.b1,
                "b2": args.b2,
                "eps": args.eps,
                "weight_decay": args.weight_decay,
                "max_grad_norm": args.max_grad_norm,
            },
            "model_flops_per_token": flops_per_token,
            "peak_flops": peaks,
            "peak_flops_source": peak_source,
            "pbbjax": jx,
            "transformers": th,
            "ratio_pbbjax_over_transformers": ratio,
            "first_step_abs_loss_diff": loss_diff,
            "first_step_abs_grad_norm_diff": grad_norm_diff,
            "versions": {
                "jax": version("jax"),
                "torch": version("torch"),
                "transformers": version("transformers"),
            },
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile, first call)")
    parser.add_argument("--model", default="", help="HF directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--b1", type=float, default=0.9)
    parser.add_argument("--b2", type=float, default=0.95)
    parser.add_argument("--eps", type=float, default=1e-8)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="on matrices only, both sides")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument(
        "--microbatches", type=int, default=1, help="both sides: accumulate gradients over this many parts"
    )
    parser.add_argument("--remat", default="none", help="pbbjax remat policy (none, full, dots, ...)")
    parser.add_argument("--scan-layers", action="store_true", help="pbbjax: run the layers as a lax.scan")
    parser.add_argument("--peak-flops", type=float, default=None, help="FLOP/s of this CPU, for MFU")
    parser.add_argument("--measure-peak", action="store_true", help="time 2048^2 matmuls as peaks")
    parser.add_argument(
        "--back-to-back",
        action="store_true",
        help="each turn: an untimed step right before the timed one (steady state, as in a training run)",
    )
    parser.add_argument("--sequential", action="store_true", help="run the sides one after the other")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    args = parser.parse_args()
    if args.warmup + args.steps < 1 or args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.microbatches < 1 or args.batch % args.microbatches:
        parser.error(f"--microbatches {args.microbatches} must be >= 1 and divide --batch {args.batch}")
    if args.side:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
