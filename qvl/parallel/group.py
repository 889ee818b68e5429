"""The tensor-parallel group a model runs on: torch.distributed's default process group and a 1-D DeviceMesh.

Ranks are processes, started by torchrun (or by `qvl.parallel.launch`), which set RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. `join` starts the default process group from them (gloo on CPU, NCCL on CUDA) or uses
the one the caller started, and checks that the degree asked for is the group's size: qvl runs one tensor-parallel
group over the whole world (several nodes are torchrun's own flags).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import ConfigError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether this process is one of a torchrun-style group (WORLD_SIZE in the environment)."""
    return "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the group: `size` ranks, this one `rank`, their `mesh` (dimension "tp")."""

    mesh: DeviceMesh
    size: int
    rank: int

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    def replicas(self, kv_heads: int) -> dist.ProcessGroup | None:
        """The ranks holding the same KV head as this one when `kv_heads` < size (each head replicated over
        size / kv_heads consecutive ranks), else None. Every rank must call it (it creates process groups)."""
        if kv_heads >= self.size:
            return None
        mesh = init_device_mesh(self.mesh.device_type, (kv_heads, self.size // kv_heads),
                                mesh_dim_names=("kv", "replica"))
        return mesh["replica"].get_group()

    def __repr__(self) -> str:
        return f"TensorParallel(rank {self.rank} of {self.size}, {self.mesh.device_type})"


def _environment_int(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise ConfigError(f"environment variable {name} must be a non-negative integer under torchrun, got {value!r}")
    return int(value)


def torchrun_rank(tp: int, name: str) -> int:
    """This process's rank in a run of degree `tp`, named `name` in the error ("--tp 2"): RANK under torchrun,
    whose WORLD_SIZE must be tp (`ConfigError` otherwise), else 0. For commands that check before joining."""
    if not under_torchrun():
        return 0
    world = os.environ["WORLD_SIZE"]
    if world != str(tp):
        raise ConfigError(f"{name} but torchrun started WORLD_SIZE {world} processes: they must be equal")
    return _environment_int("RANK")


def check_rank_device(device: torch.device, tp: int, name: str) -> None:
    """At tp > 1 on CUDA each rank runs on cuda:LOCAL_RANK: a device with an index is refused, and outside torchrun
    (local workers, one GPU each) the machine must have tp GPUs. `ConfigError` naming `name` ("--tp 2")."""
    if tp == 1 or device.type != "cuda":
        return
    if device.index is not None:
        raise ConfigError(f"{name} runs each rank on cuda:LOCAL_RANK: pass the CUDA device without an index "
                          f"('cuda'), got {str(device)!r}")
    if not under_torchrun() and torch.cuda.device_count() < tp:
        raise ConfigError(f"{name} on CUDA starts {tp} local workers, one GPU each; this machine has "
                          f"{torch.cuda.device_count()}")


def local_device(device: torch.device) -> torch.device:
    """A rank's own device: cuda:LOCAL_RANK for a CUDA device without an index under torchrun."""
    if device.type == "cuda" and device.index is None and under_torchrun():
        return torch.device("cuda", _environment_int("LOCAL_RANK"))
    return device


def join(tp: int, device: torch.device) -> TensorParallel | None:
    """The group of `tp` ranks this process belongs to: the default process group, started here from torchrun's
    variables when nobody started it. `ConfigError` when the processes cannot be that group.

    tp 1 is no group (None), except in a default group of one process that the caller started: the model then
    runs its collectives over that one rank (how a single GPU checks the NCCL path, graph capture included). Under
    a larger group tp 1 is None too: the ranks are the caller's (data parallelism, say), each with a whole model."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tp must be an integer >= 1, got {tp!r}")
    if tp == 1 and not (dist.is_initialized() and dist.get_world_size() == 1):
        return None
    if not dist.is_initialized():
        if not under_torchrun():
            raise ConfigError(f"tp {tp} needs {tp} processes: run under `torchrun --nproc-per-node {tp}`, or let "
                              f"`qvl generate --tp {tp}` start them")
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ConfigError(f"tp {tp}: torchrun's variables {', '.join(missing)} are not set")
        world = _environment_int("WORLD_SIZE")
        if world != tp:
            raise ConfigError(f"tp {tp} but this group has {world} processes (WORLD_SIZE): they must be equal")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world != tp:
        raise ConfigError(f"tp {tp} but the process group has {world} ranks: they must be equal")
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    return TensorParallel(mesh, tp, dist.get_rank())


def agreed_seed(parallel: TensorParallel | None, seed: int | None) -> int:
    """`seed`, or a fresh one, the same on every rank (rank 0's): identical draws keep the ranks' tokens equal."""
    if seed is not None or parallel is None:
        return seed if seed is not None else torch.seed()
    value = torch.tensor([torch.seed() % 2**62 if parallel.rank == 0 else 0], dtype=torch.long,
                         device=parallel.mesh.device_type)
    dist.broadcast(value, group_src=0, group=parallel.group)
    return int(value)
