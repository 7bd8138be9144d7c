"""The default engine: a pool of worker processes on this machine (one per GPU, or N CPU workers).

Built on ``concurrent.futures.ProcessPoolExecutor`` (spawned processes: safe with CUDA and threads).
Each worker builds the host once (``HostFactory``), then takes tasks. A worker that dies (SIGKILL, out of
memory) breaks the executor: every task not yet returned is charged one attempt and a fresh pool runs
the ones left with attempts to spare (``max_attempts``, default 3). A task that raises is charged one
attempt too. Per-step progress comes back through a queue, so one bar covers every worker.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import torch

from .concept_task import (
    ConceptOutcome,
    ConceptTask,
    HostFactory,
    TrainingJob,
    run_concept_task,
    worker_hosts,
)
from .engines import OnDone, OnStep
from .errors import MaceError

_WORKER: dict[str, Any] = {}  # this worker process's factory, job, progress queue and device


def _init_worker(factory: HostFactory, job: TrainingJob, progress: Any, devices: Any, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        device = devices.get_nowait()
    except queue_module.Empty:  # a replacement worker: the devices were handed out already
        device = None
    _WORKER.update(factory=factory, job=job, progress=progress, device=device)


def _run_in_worker(task: ConceptTask) -> list[ConceptOutcome]:
    w = _WORKER
    hosts = worker_hosts(w["factory"], w["job"], w["device"])
    return run_concept_task(hosts, w["job"], task, progress=lambda p, s, loss: w["progress"].put((p, s, loss)))


class LocalPool:
    """``workers`` processes on this machine; ``devices``: one torch device per worker (e.g.
    ``["cuda:0", "cuda:1"]``; default: the factory's choice, CPU). A run starts no more workers than it
    has tasks. ``threads_per_worker``: torch threads in each worker (default: this process's threads
    divided among the workers started, at least 1: a run of one task, e.g. a few concepts that the
    trainer batches together, trains at this process's thread count, as the one-process run would)."""

    shares_files = True

    def __init__(self, host_factory: HostFactory, workers: int = 2, *, devices: Sequence[str] | None = None,
                 max_attempts: int = 3, threads_per_worker: int | None = None) -> None:
        if workers < 1:
            raise MaceError(f"workers={workers}: give at least 1")
        if devices is not None and len(devices) != workers:
            raise MaceError(f"{len(devices)} devices for {workers} workers: give one device per worker")
        if max_attempts < 1:
            raise MaceError(f"max_attempts={max_attempts}: give at least 1")
        self.host_factory = host_factory
        self.workers = workers
        self.devices = list(devices) if devices is not None else [None] * workers
        self.max_attempts = max_attempts
        if threads_per_worker is not None and threads_per_worker < 1:
            raise MaceError(f"threads_per_worker={threads_per_worker}: give at least 1, or None to divide the threads")
        self.threads_per_worker = threads_per_worker
        self.driver_threads = torch.get_num_threads()

    def threads(self, started: int) -> int:
        """Torch threads per worker when ``started`` workers run."""
        return self.threads_per_worker or max(1, self.driver_threads // started)

    def _executor(self, job: TrainingJob, ctx: Any, progress: Any, started: int, threads: int) -> ProcessPoolExecutor:
        devices = ctx.Queue()
        for d in self.devices[:started]:
            devices.put(d)
        return ProcessPoolExecutor(started, mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.host_factory, job, progress, devices, threads))

    def run(self, job: TrainingJob, tasks: Sequence[ConceptTask], *, on_step: OnStep, on_done: OnDone,
            check_interrupt: Callable[[], None] | None = None) -> dict[str, str]:
        """See ``engines.Engine.run``."""
        ctx = mp.get_context("spawn")
        attempts, errors, finished = [0] * len(tasks), [""] * len(tasks), set()
        pending = list(range(len(tasks)))
        threads = self.threads(min(self.workers, len(tasks)))  # fixed for the run: a retried task rounds alike
        while pending:
            progress = ctx.Queue()  # a fresh queue per pool: a killed worker never leaves one half-read
            executor = self._executor(job, ctx, progress, min(self.workers, len(pending)), threads)
            futures: dict[Future, int] = {executor.submit(_run_in_worker, tasks[i]): i for i in pending}
            try:
                waiting = set(futures)
                while waiting:
                    done, waiting = wait(waiting, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(progress, on_step)
                    for f in done:
                        i = futures[f]
                        try:
                            outcomes = f.result()
                        except Exception as e:  # BrokenProcessPool (a worker died) or the task's own error
                            attempts[i] += 1
                            errors[i] = f"{type(e).__name__}: {e}"
                            continue
                        _drain(progress, on_step)
                        on_done(tasks[i], outcomes)
                        finished.add(i)
                    if check_interrupt is not None:
                        check_interrupt()
            except BaseException:
                _stop(executor)
                raise
            executor.shutdown(wait=True)
            pending = [i for i in pending if i not in finished and attempts[i] < self.max_attempts]
        return {tasks[i].label: f"{errors[i]} ({attempts[i]} attempts)" for i in range(len(tasks)) if i not in finished}


def _drain(progress: Any, on_step: OnStep) -> None:
    while True:
        try:
            phrase, step, loss = progress.get_nowait()
        except queue_module.Empty:
            return
        on_step(phrase, step, loss)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Stop every worker now (Ctrl-C, an interrupt): cancel what is queued, terminate what runs."""
    terminate = getattr(executor, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(executor, "_processes", None) or {}).values())  # before shutdown clears it
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


__all__ = ["LocalPool"]
