"""qvl.parallel.launch: the workers are one torchrun-style group, a worker's failure comes back as one exception
naming its rank (qvl's errors keep their class, hence the CLI's exit status), and no worker outlives a failure or
an interrupted parent. The worker functions are module-level: spawned processes import them by name."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

from qvl import errors
from qvl.parallel.group import TORCHRUN_VARIABLES
from qvl.parallel.launch import WorkerError, _qvl_class, run_workers
from qvl.processing.chat_template import ChatTemplateError

DEADLINE_S = 60  # each test spawns at most 2 workers (~3 s each to import torch); far past it, something hangs


@pytest.fixture(autouse=True)
def deadline():
    """Fails a test still waiting for its workers after DEADLINE_S; run_workers stops them on its way out."""

    def expire(signum, frame):
        raise TimeoutError(f"run_workers still waiting after {DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(DEADLINE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _join_and_record(folder: str) -> None:
    """Join the group from the environment the launcher set, all-reduce each rank's rank + 1, record what it saw."""
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    record = {name: os.environ[name] for name in TORCHRUN_VARIABLES}
    record |= {"sum": total.item(), "threads": torch.get_num_threads()}
    with open(os.path.join(folder, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)


def test_workers_are_one_group_with_torchruns_variables(tmp_path):
    run_workers(2, _join_and_record, (str(tmp_path),))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in records] == [("0", "0", "2"), ("1", "1", "2")]
    assert {r["MASTER_ADDR"] for r in records} == {"127.0.0.1"}
    assert len({r["MASTER_PORT"] for r in records}) == 1 and records[0]["MASTER_PORT"].isdigit()
    assert [r["sum"] for r in records] == [3.0, 3.0]  # the collective ran over both ranks
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared between the workers
        assert {r["threads"] for r in records} == {max(1, len(os.sched_getaffinity(0)) // 2)}


def _fail_on_rank_1(kind: str) -> None:
    """Rank 1 fails as `kind` says; rank 0 waits in the group's rendezvous for it, which only termination ends."""
    if os.environ["RANK"] == "1":
        if kind == "resource":
            raise errors.ResourceError("the KV cache needs 3.0 GiB, 1.0 GiB is free")
        if kind == "template":
            raise ChatTemplateError("the chat template failed:\n  line 2")  # a subclass, two lines
        if kind == "bug":
            raise ZeroDivisionError("division by zero")
        os.kill(os.getpid(), signal.SIGKILL)
    dist.init_process_group("gloo")
    dist.barrier()


@pytest.mark.parametrize("kind,error,message", [
    ("resource", errors.ResourceError, "rank 1: the KV cache needs 3.0 GiB, 1.0 GiB is free"),
    ("template", errors.InputError, "rank 1: the chat template failed:; line 2"),
    ("bug", WorkerError, "rank 1: ZeroDivisionError: division by zero"),
    ("signal", WorkerError, "rank 1 was killed by signal SIGKILL without raising an exception"),
])
def test_a_failing_rank_is_one_exception_and_the_others_are_stopped(kind, error, message):
    start = time.monotonic()
    with pytest.raises(error) as info:
        run_workers(2, _fail_on_rank_1, (kind,))
    assert type(info.value) is error and str(info.value) == message
    # rank 0 would wait 30 minutes for rank 1 in the rendezvous: it was terminated
    assert time.monotonic() - start < DEADLINE_S / 2


def _exit_3() -> None:
    os._exit(3)


def test_a_worker_exiting_non_zero_is_reported():
    with pytest.raises(WorkerError, match=r"^rank 0 exited with status 3 without raising an exception$"):
        run_workers(1, _exit_3)


def _record_pid_and_sleep(folder: str) -> None:
    with open(os.path.join(folder, f"{os.environ['RANK']}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(DEADLINE_S)


def test_an_interrupted_parent_stops_its_workers(tmp_path):
    pid_files = [tmp_path / f"{r}.pid" for r in range(2)]
    sent = threading.Event()

    def interrupt_when_both_run():  # Ctrl-C, once both workers are sleeping
        while not all(p.exists() and p.read_text() for p in pid_files):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        sent.set()

    # Ctrl-C as a foreground process takes it. A command a non-interactive shell starts in the background (`cmd &`,
    # as a script may start the suite) begins with SIGINT ignored, and Python then installs no handler of its own:
    # the signal would be dropped. So the handler is set here for this test and restored after.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_when_both_run, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_workers(2, _record_pid_and_sleep, (str(tmp_path),))
    except TimeoutError as e:  # say which step never came
        started = [p.exists() for p in pid_files]
        raise TimeoutError(f"{e}: workers started {started}, SIGINT sent: {sent.is_set()}") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    for p in pid_files:
        with pytest.raises(ProcessLookupError):  # stopped and reaped
            os.kill(int(p.read_text()), 0)


def test_the_class_sent_back_is_the_nearest_of_qvl_errors():
    assert _qvl_class(errors.NonFiniteError("nan")) == "NonFiniteError"
    assert _qvl_class(ChatTemplateError("x")) == "InputError"
    assert _qvl_class(ValueError("x")) is None


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_the_number_of_workers_is_checked(n):
    with pytest.raises(errors.ConfigError, match="number of workers must be an integer >= 1"):
        run_workers(n, _exit_3)
