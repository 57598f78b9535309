"""The machine a benchmark ran on, for its JSON: architecture, CPU model, the vector extensions that decide
XLA's and PyTorch's CPU kernels (AVX2 / AVX-512 / AMX), and the core count. Figures move between CPU
families (the train step's ratio on an AMD EPYC and an Intel Xeon differed by 1.4x), so each one records
its CPU."""

import os
import platform

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def describe() -> str:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        model = platform.processor()
    extensions = " ".join(f for f in VECTOR_FLAGS if f in flags)
    cpu = f"{model or 'unknown CPU'} ({extensions or 'no AVX2'})"
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} CPU cores"
