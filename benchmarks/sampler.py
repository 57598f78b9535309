"""Sampler throughput: pbbjax vs transformers ``generate`` (PyTorch) vs Tunix's sampler, same weights, and
the weight-streaming ceiling of XLA on this machine.

    python benchmarks/sampler.py [--batches 8 32] [--new-tokens 64] [--repeats 3] [--model DIR]
                                 [--tunix-python /tmp/tunix-venv/bin/python] [--torch-threads N] [--json OUT]
                                 [--one-segment-too]

Greedy decoding of ``--new-tokens`` tokens for each of ``--batches`` chat prompts (SmolLM2's chat template
over questions of different lengths, cycled to the batch size), fp32, on this machine's CPU:

- pbbjax: ``pbbjax.inference.sampler.generate_tokens`` (what ``pbbjax.generate`` runs between tokenizing and
  decoding), from the prompts' token ids.
- transformers: ``AutoModelForCausalLM.generate(do_sample=False)`` on left-padded tensors with an
  attention mask (its default attention, SDPA); ``--torch-threads`` sets ``torch.set_num_threads`` (on a
  loaded machine, PyTorch's default OpenMP team can be many times slower than one thread).
- ceiling: the weight products of the same call and nothing else, which no XLA sampler can beat here. A
  decode step must read every weight (SmolLM2-135M: 538 MB in fp32) for a handful of rows, so on a CPU it
  is bound by how fast XLA's small-batch matmul streams weights. This side runs the prefill's products
  (each weight matrix once through a ``[B x prompt bucket, k]`` product, the LM head for the last position
  only) and then ``--new-tokens`` - 1 decode steps of each matrix once through a ``[B, k]`` product (each
  step depending on the last), in four layouts: separate or fused (q|k|v and gate|up concatenated)
  matrices, stored ``[k, n]`` or ``[n, k]``. Its figure is the fastest layout's (all four are reported).
- Tunix (only with ``--tunix-python``: a Python that has ``google-tunix`` installed, e.g. its own venv, see
  benchmarks/README.md): ``tunix.generate.sampler.Sampler`` over Tunix's Llama3 model, its config filled
  from the model's ``config.json`` by hand (Tunix has no SmolLM2 preset) and its weights loaded from the
  same safetensors by ``tunix.models.llama3.params.create_model_from_safe_tensors``. Its tokenizer pads
  with ``<|endoftext|>``: Tunix masks every pad-id token of a prompt, and SmolLM2's own pad token is
  ``<|im_end|>``, which chat prompts contain.
- pbbjax-1seg (only with ``--one-segment-too``): pbbjax with its decode loop in one segment, so every step
  attends over the whole cache (the sampler's default below 128 new tokens; ``segment_count``).

Every side generates exactly ``--new-tokens`` tokens per row (EOS disabled: an id outside the vocabulary),
so all do equal work; only generated tokens count towards tokens/s. Each side runs in its own subprocess
(this script re-invoked with ``--side``; Tunix under ``--tunix-python``), so thread pools never share a
process and Tunix's pinned dependencies stay out of ours. Each child first makes one untimed call per
batch size (for the JAX sides: tracing and compilation; reported as "first call" and "compile" = first call
minus the median timed call); then the parent asks for timed calls round-robin over sides and batch
sizes, rotating which side goes first, so drifting load on a shared machine hits all sides alike.
Reported: median seconds per call, tokens/s, the ratios pbbjax / transformers and pbbjax / Tunix, the
compile times, and how often each side's greedy tokens equal transformers' (token for token, per
position, over all rows; a row counts as matching only when all its tokens do).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import machine  # benchmarks/machine.py: the script's own folder is on sys.path

QUESTIONS = [
    "What is the capital of France?",
    "def blorp(x):\n    return x * 3 - 4\n\nWhat does blorp(5) return? Explain step by step.",
    "Write a haiku about gradient descent.",
    "Hi",
    "List three prime numbers larger than 100 and say why each one is prime.",
    "Translate 'good morning' into French, Spanish and German.",
    "Explain the difference between a list and a tuple in Python, with an example of each.",
    "What is 17 * 23?",
]
SIDES = ("pbbjax", "transformers", "ceiling", "tunix", "pbbjax-1seg")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- children


def _pbbjax_side(model_dir: str, new_tokens: int, segments: int | None = None):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    import pbbjax
    from pbbjax.inference.sampler import generate_tokens

    model, tokenizer = pbbjax.load_model(model_dir)

    def run(prompts: list[str]) -> list[list[int]]:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        pad = tokenizer.pad_token_id
        return generate_tokens(model, ids, new_tokens, eos_ids=(), pad_id=pad, decode_segments=segments)

    return run


def _ceiling_child(model_dir: str, new_tokens: int):
    sys.path.insert(0, REPO)
    from sampler_ceiling import ceiling_side

    return ceiling_side(model_dir, new_tokens)


def _transformers_side(model_dir: str, new_tokens: int, torch_threads: int = 0):
    import torch
    import transformers

    if torch_threads:
        torch.set_num_threads(torch_threads)

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    never = model.config.vocab_size  # an EOS id no token has: every row runs to new_tokens

    def run(prompts: list[str]) -> list[list[int]]:
        batch = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=never,
                pad_token_id=tokenizer.pad_token_id,
            )
        return out[:, batch["input_ids"].shape[1] :].tolist()

    return run


def _tunix_side(model_dir: str, new_tokens: int):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import transformers
    from tunix.generate import sampler as sampler_lib
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params

    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg = llama3.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(theta),  # Tunix's attention ignores it (uses 1e6): its tokens differ from HF's
        norm_eps=hf["rms_norm_eps"],
        weight_tying=hf.get("tie_word_embeddings", False),
        shd_config=llama3.ShardingConfig.get_default_sharding(is_sampling=True),
    )
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto)
    model = llama3_params.create_model_from_safe_tensors(model_dir, cfg, mesh, dtype=jnp.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|endoftext|>"  # see the module docstring
    samplers = {}

    def run(prompts: list[str]) -> list[list[int]]:
        longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) + 1
        cache = 1 << (longest - 1).bit_length()  # Tunix's own prompt bucket, plus the new tokens
        key = (len(prompts), cache)
        if key not in samplers:
            cache_cfg = sampler_lib.CacheConfig(
                cache_size=cache + new_tokens,
                num_layers=cfg.num_layers,
                num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
            )
            samplers[key] = sampler_lib.Sampler(model, tokenizer, cache_cfg)
        out = samplers[key](prompts, max_generation_steps=new_tokens, eos_tokens=[-1], temperature=0.0)
        return [list(map(int, t)) for t in out.tokens]

    return run


def child_main(args):
    def send(**msg):
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    t0 = time.perf_counter()
    make = {
        "pbbjax": _pbbjax_side,
        "transformers": _transformers_side,
        "ceiling": _ceiling_child,
        "tunix": _tunix_side,
        "pbbjax-1seg": functools.partial(_pbbjax_side, segments=1),
    }[args.side]
    extra = {"torch_threads": args.torch_threads} if args.side == "transformers" else {}
    run = make(args.model, args.new_tokens, **extra)
    send(event="ready", setup_s=time.perf_counter() - t0)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "done":
            break
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = run(req["prompts"])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if isinstance(tokens, dict):  # the ceiling: its fastest layout's time; no tokens
            forms = tokens["forms"]
            best = min(forms, key=forms.get)
            n = len(req["prompts"]) * args.new_tokens
            send(
                event="call",
                seconds=forms[best],
                cpu_seconds=cpu,
                tokens=None,
                generated=n,
                forms=forms,
                best=best,
            )
            continue
        send(event="call", seconds=seconds, cpu_seconds=cpu, tokens=tokens if req.get("tokens") else None,
             generated=sum(len(t) for t in tokens))  # fmt: skip


# ----------------------------------------------------------------------------------------------- parent


class Child:
    def __init__(self, side: str, python: str, args, model_dir: str):
        cmd = [python, os.path.abspath(__file__), "--side", side, "--model", model_dir]
        cmd += ["--new-tokens", str(args.new_tokens), "--torch-threads", str(args.torch_threads)]
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the {self.side} child exited (code {self.proc.wait()}); see its stderr above"
            )
        return json.loads(line)

    def call(self, prompts: list[str], tokens: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "call", "prompts": prompts, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "done"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def chat_prompts(model_dir: str, batch: int) -> list[str]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(batch)
    ]


def match(tokens: list[list[int]], ref: list[list[int]]) -> dict:
    same = [sum(a == b for a, b in zip(t, r, strict=False)) for t, r in zip(tokens, ref, strict=True)]
    total = sum(len(r) for r in ref)
    rows = sum(t == r for t, r in zip(tokens, ref, strict=True))
    return {"token_match_rate": sum(same) / total, "rows_identical": rows, "rows": len(ref)}


def run_children(args, model_dir: str, sides: list[str]) -> dict:
    prompts = {b: chat_prompts(model_dir, b) for b in args.batches}
    python = {s: sys.executable for s in SIDES} | {"tunix": args.tunix_python}
    children = {s: Child(s, python[s], args, model_dir) for s in sides}
    res = {s: {b: {"times": [], "cpu": []} for b in args.batches} for s in sides}
    try:
        for s, child in children.items():
            print(f"{s} ready: setup {child.receive()['setup_s']:.1f}s", flush=True)
        for b in args.batches:
            for s, child in children.items():
                reply = child.call(prompts[b], tokens=True)
                res[s][b].update(
                    first_s=reply["seconds"], tokens=reply["tokens"], generated=reply["generated"]
                )
                res[s][b]["forms"] = []
                print(f"  B={b:3d} {s:12s} first call {reply['seconds']:8.2f}s", flush=True)
        for rep in range(args.repeats):
            for bi, b in enumerate(args.batches):
                shift = (rep + bi) % len(sides)
                for s in sides[shift:] + sides[:shift]:
                    reply = children[s].call(prompts[b])
                    res[s][b]["times"].append(reply["seconds"])
                    res[s][b]["cpu"].append(reply["cpu_seconds"])
                    if "forms" in reply:
                        res[s][b]["forms"].append(reply["forms"])
                    print(
                        f"  rep {rep + 1}/{args.repeats} B={b:3d} {s:12s} {reply['seconds']:8.2f}s",
                        flush=True,
                    )
    finally:
        for child in children.values():
            child.close()
    return res


def summarize(res: dict, args, sides: list[str]) -> dict:
    out = {}
    for b in args.batches:
        row = {}
        for s in sides:
            r = res[s][b]
            med = statistics.median(r["times"])
            want = b * args.new_tokens
            row[s] = {
                "median_s": med,
                "tokens_per_s": want / med,
                "first_call_s": r["first_s"],
                "compile_s": max(r["first_s"] - med, 0.0),
                "median_cpu_s": statistics.median(r["cpu"]),
                "all_times_s": r["times"],
                "generated_tokens": r["generated"],
                "expected_tokens": want,
            }
        ref = res["transformers"][b]["tokens"]
        for s in sides:
            if s not in ("transformers", "ceiling"):
                row[s]["vs_transformers"] = match(res[s][b]["tokens"], ref)
        forms = res["ceiling"][b]["forms"]
        row["ceiling"]["layouts_median_s"] = {f: statistics.median(c[f] for c in forms) for f in forms[0]}
        row["ratio_pbbjax_over_ceiling"] = row["pbbjax"]["tokens_per_s"] / row["ceiling"]["tokens_per_s"]
        row["ratio_pbbjax_over_transformers"] = (
            row["pbbjax"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        )
        if "tunix" in row:
            row["ratio_pbbjax_over_tunix"] = row["pbbjax"]["tokens_per_s"] / row["tunix"]["tokens_per_s"]
        if "pbbjax-1seg" in row:
            row["ratio_pbbjax_over_one_segment"] = (
                row["pbbjax"]["tokens_per_s"] / row["pbbjax-1seg"]["tokens_per_s"]
            )
        out[b] = row
    return out


def print_table(summary: dict, sides: list[str], args):
    head = f"{'B':>4s} {'side':12s} {'tokens/s':>9s} {'s/call':>8s} {'CPU s':>8s} {'first':>8s}"
    print(f"\n{head} {'compile':>8s}  greedy tokens vs transformers")
    for b, row in summary.items():
        for s in sides:
            r = row[s]
            m = r.get("vs_transformers")
            agree = (
                f"{m['token_match_rate']:.1%} of tokens, {m['rows_identical']}/{m['rows']} rows" if m else "-"
            )
            if r["generated_tokens"] != r["expected_tokens"]:
                agree += f"  (generated {r['generated_tokens']} tokens, expected {r['expected_tokens']}!)"
            print(f"{b:4d} {s:12s} {r['tokens_per_s']:9.1f} {r['median_s']:8.2f} {r['median_cpu_s']:8.1f} "
                  f"{r['first_call_s']:8.1f} {r['compile_s']:8.1f}  {agree}")  # fmt: skip
        layouts = ", ".join(
            f"{f} {b * args.new_tokens / s:.1f}" for f, s in row["ceiling"]["layouts_median_s"].items()
        )
        print(f"     ceiling tokens/s by weight layout: {layouts}")
        line = f"     pbbjax / transformers: {row['ratio_pbbjax_over_transformers']:.2f}x (target >= 2.5x)"
        line += f"   pbbjax / ceiling: {row['ratio_pbbjax_over_ceiling']:.0%} (target >= 80%)"
        if "ratio_pbbjax_over_tunix" in row:
            line += f"   pbbjax / Tunix: {row['ratio_pbbjax_over_tunix']:.2f}x (target >= 2x)"
        if "ratio_pbbjax_over_one_segment" in row:
            line += f"   pbbjax / one segment: {row['ratio_pbbjax_over_one_segment']:.2f}x"
        print(line)


def tunix_available(python: str) -> str | None:
    """None if ``python`` can import Tunix's sampler and Llama3 model, else why not."""
    if not python:
        return "no --tunix-python given"
    probe = "import tunix.generate.sampler, tunix.models.llama3.params"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as e:
        return f"{python} cannot run: {e}"
    return None if done.returncode == 0 else f"{python} cannot import Tunix: {done.stderr.strip()[-300:]}"


def parent_main(args):
    sys.path.insert(0, REPO)
    import pbbjax

    model_dir = str(args.model or pbbjax.default_model_path())
    why_not = tunix_available(args.tunix_python)
    sides = ["pbbjax", "transformers", "ceiling"] + ["tunix"] * (why_not is None)
    sides += ["pbbjax-1seg"] * args.one_segment_too
    if why_not:
        print(f"Tunix not measured: {why_not}.", flush=True)
    res = run_children(args, model_dir, sides)
    summary = summarize(res, args, sides)
    print_table(summary, sides, args)
    if args.json:
        from importlib.metadata import version

        versions = {p: version(p) for p in ("jax", "flax", "torch", "transformers")}
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine.describe(),
            "load_average": os.getloadavg(),
            "model": model_dir,
            "new_tokens": args.new_tokens,
            "torch_threads": args.torch_threads or "default",
            "tunix": "measured" if why_not is None else f"not measured: {why_not}",
            "sides": sides,
            "versions": versions,
            "results": {str(b): {k: v for k, v in row.items()} for b, row in summary.items()},
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and batch size")
    parser.add_argument("--model", default="", help="HF directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--tunix-python", default="", help="a Python with google-tunix installed")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads for transformers (0: its default)"
    )
    parser.add_argument(
        "--one-segment-too",
        action="store_true",
        help="also run pbbjax with its decode loop in one segment (the sampler's policy before 2026-12-07)",
    )
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run as a child
    args = parser.parse_args()
    if args.side:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
