"""torch.distributed, as the pipeline uses it (torchrun: gloo on CPUs, NCCL on GPUs): who this process is,
and the few collectives the warm start, calibration and evaluation need. Without an initialised process
group every function acts as the one process of a world of one."""
import contextlib
import os

import torch

from .devices import resolve_device


def rank_and_world():
    """(rank, world size); (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main():
    return rank_and_world()[0] == 0


def all_reduce_sum(tensor):
    """Sums the tensor over the ranks, in place; returns it."""
    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def gather_objects(obj):
    """Every rank's picklable object, in rank order (on every rank)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def gather_tensors(tensors):
    """Concatenates each rank's 1-D tensors in rank order (on every rank)."""
    if rank_and_world()[1] == 1:
        return tensors
    gathered = gather_objects([t.cpu() for t in tensors])
    return [torch.cat([g[i] for g in gathered]) for i in range(len(tensors))]


def barrier():
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def process_group_from_torchrun(device="auto"):
    """Under torchrun (WORLD_SIZE > 1 in the environment) a process group for the length of the block: NCCL
    with one GPU per process (LOCAL_RANK) where the device is CUDA, else gloo. Yields the device this process
    uses; elsewhere it yields `device` and does nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        yield device
        return
    cuda = device in ("auto", "cuda") and torch.cuda.is_available() or str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        resolve_device(device)  # a GPU this process lacks: one clear error, before any CUDA call
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()
