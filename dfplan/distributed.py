"""Process groups for sensitivity sharding and data-parallel distillation (torch.distributed).

Two ways in:
  torchrun --nproc_per_node 2 -m dfplan sensitivity --model M --corpus C --out run/sensitivity.csv
  dfplan sensitivity ... --nproc 2          (spawns the processes itself, gloo over localhost)

Every rank computes the teacher cache itself, scores the jobs jobs.shard() assigns it
(whole units, so every number is computed by the same code on the same batch as in a
single process), and rank 0 gathers the job results and writes the one table. With the
same thread count per process the table is bit-identical to a single-process run.
Backend: gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import DfplanError


def backend_for(device: str | None) -> str:
    return "nccl" if device and str(device).startswith("cuda") and dist.is_nccl_available() else "gloo"


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun described in the environment; -> True if this call created it."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if str(device or "").startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device))
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_to_all(obj) -> list:
    """Every rank's object, in rank order (picklable objects; small: job results only)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_error(msg: str | None) -> str | None:
    """Rank 0's error message (or None) on every rank, so all ranks stop together."""
    _, world = rank_world()
    if world == 1:
        return msg
    box = [msg]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, fn, args, result_path: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        try:
            out = ("ok", fn(*args))
        except DfplanError as e:        # a user error: every rank hits it the same way
            out = ("error", str(e))
        if rank == 0:
            with open(result_path, "wb") as f:
                pickle.dump(out, f)
        # no rank tears the group down while another still talks in it (a full test run once
        # saw rank 1 abort in teardown: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, args: tuple, nproc: int, threads: int | None = None):
    """Run fn(*args) in `nproc` fresh processes joined in a gloo group; -> rank 0's return value.

    fn must be a module-level function. Errors raised in a worker re-raise here
    (torch.multiprocessing.ProcessRaisedException carries the worker's traceback).
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, torch.get_num_threads() // nproc)
    with tempfile.TemporaryDirectory(prefix="dfplan-sens-") as tmp:
        result = str(Path(tmp) / "rank0.pkl")
        mp.spawn(_worker, args=(nproc, _free_port(), threads, fn, args, result), nprocs=nproc, join=True)
        with open(result, "rb") as f:
            status, value = pickle.load(f)
    if status == "error":
        raise DfplanError(value)
    return value

