"""Start the ranks of a tensor-parallel group on this machine, as ``torchrun --nproc-per-node N`` would.

`run_workers(n, fn, args)` spawns n processes (torch.multiprocessing, spawn start method: safe with CUDA), sets
torchrun's variables in each (RANK = LOCAL_RANK = its index, WORLD_SIZE n, MASTER_ADDR 127.0.0.1, MASTER_PORT a
free port) and calls ``fn(*args)`` there; `fn` must be a module-level function. Every rank runs the same `fn`
(SPMD) and reads its place from the environment, so the same code runs under an external torchrun too.

A worker that raises reports (rank, class, one-line message) in a JSON file of its own; the parent raises one
exception naming the rank: the same `qvl.errors` class for qvl's errors (so the CLI's exit status is the one the
worker would have had), `WorkerError` for anything else, a worker killed by a signal or exiting non-zero. When one
rank fails the others are terminated (SIGTERM, then SIGKILL): a rank blocked in a collective with a dead peer
would otherwise wait for the collective's timeout. KeyboardInterrupt (or any exception) interrupting the parent's
wait stops every worker.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from .. import errors

_STOP_GRACE_S = 10.0  # when the parent's wait is interrupted: how long a worker has to exit on SIGTERM before SIGKILL


class WorkerError(RuntimeError):
    """A worker failed otherwise than with one of qvl's errors: another exception, a signal, a non-zero exit."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it); rank 0's store binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qvl_class(e: BaseException) -> str | None:
    """The nearest class of `e` that qvl.errors defines (ChatTemplateError -> InputError), or None."""
    return next((c.__name__ for c in type(e).__mro__ if c.__module__ == errors.__name__), None)


def _worker(index: int, n: int, port: int, reports: str, fn: Callable, args: tuple) -> None:
    """One rank (`index` from torch.multiprocessing): torchrun's variables, a share of the cores, then fn(*args)."""
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:  # n ranks each using every core would oversubscribe the CPU
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // n))
    try:
        fn(*args)
    except Exception as e:
        report = {"rank": index, "time": time.time(), "qvl_class": _qvl_class(e), "type": type(e).__name__,
                  "message": errors.one_line(e)}
        path = os.path.join(reports, f"rank{index}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(report, f)
        os.replace(path + ".tmp", path)  # the parent never reads half a report
        raise  # torch's wrapper exits 1 and hands the traceback to the parent (QVL_DEBUG=1 shows it)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _failure(failed: mp.ProcessRaisedException | mp.ProcessExitedException, processes, reports: str) -> Exception:
    """The one exception the parent raises. A rank that ended without raising (a signal such as the OOM killer's
    SIGKILL, os._exit) is the cause: its peers' failing collectives follow from it. SIGTERM is what the survivors
    were sent. Otherwise the earliest report is the cause, for the same reason."""
    found = []
    for name in os.listdir(reports):
        if name.endswith(".json"):
            with open(os.path.join(reports, name), encoding="utf-8") as f:
                found.append(json.load(f))
    reported = {r["rank"] for r in found}
    silent = [i for i, p in enumerate(processes) if i not in reported and p.exitcode not in (0, -signal.SIGTERM)]
    if failed.error_index not in reported:
        silent.insert(0, failed.error_index)
    if silent:
        code = processes[silent[0]].exitcode
        how = (f"was killed by signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
               else f"exited with status {code}")
        return WorkerError(f"rank {silent[0]} {how} without raising an exception")
    first = min(found, key=lambda r: r["time"])
    if first["qvl_class"] in errors.__all__:
        return getattr(errors, first["qvl_class"])(f"rank {first['rank']}: {first['message']}")
    return WorkerError(f"rank {first['rank']}: {first['type']}: {first['message']}")


def _stop(processes) -> None:
    """SIGTERM every worker still running, then SIGKILL those still running after _STOP_GRACE_S."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_workers(n: int, fn: Callable, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in `n` local worker processes, ranks 0 to n-1 of one torchrun-style group, and return
    when every one has returned (their return values are dropped). Raises one exception if any fails (see the
    module docstring)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise errors.ConfigError(f"the number of workers must be an integer >= 1, got {n!r}")
    # torch logs a warning for each survivor it terminates after a failure: expected here, and not one line
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    with tempfile.TemporaryDirectory(prefix="qvl-workers-") as reports:
        context = mp.start_processes(_worker, args=(n, free_port(), reports, fn, tuple(args)), nprocs=n,
                                     join=False, start_method="spawn")
        spawn_log.setLevel(logging.ERROR)
        try:
            while not context.join():  # returns as each worker ends; raises (others terminated) at a failure
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise _failure(e, context.processes, reports) from e
        except BaseException:  # KeyboardInterrupt, SIGTERM made one, a caller's timeout: no worker outlives the wait
            _stop(context.processes)
            raise
        finally:
            spawn_log.setLevel(level)


__all__ = ["WorkerError", "free_port", "run_workers"]
