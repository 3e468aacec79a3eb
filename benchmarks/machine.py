"""The machine a benchmark figure comes from, named in every result: CPU model, cores, the CPU kernels'
vector ISA, threads, torch (or the GPU)."""
import os
import platform

import torch

import svd_fast


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe(device="cpu"):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{cpu_model()}, {os.cpu_count()} cores (widest ISA: {svd_fast.supported_cpu_isas()[0]}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
