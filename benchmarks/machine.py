"""The machine a benchmark figure comes from, named in every result: CPU model, cores, the CPU kernels'
vector ISA, threads, torch (or the GPU)."""
import functools
import os

import cpuinfo  # py-cpuinfo, which pytest-benchmark depends on
import torch

import svd_fast


@functools.lru_cache(maxsize=1)
def cpu_model():
    return cpuinfo.get_cpu_info().get("brand_raw", "unknown CPU")


def describe(device="cpu"):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{cpu_model()}, {os.cpu_count()} cores (widest ISA: {svd_fast.supported_cpu_isas()[0]}), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
