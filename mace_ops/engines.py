"""Spread the per-concept tasks (``mace_ops.concept_task``) over workers and gather them for fusion.

    plan:    key_c = task_key(job, c) for every concept c; finished ones are read from <cache>/tasks/
    scatter: engine.run(job, tasks)   (LocalPool: processes on this machine; RayEngine: a Ray cluster)
    gather:  each outcome is written under its key as it arrives; the bank holds every concept's LoRA
    fuse:    once, on the driver (``pipeline.fuse_weights``)

A task is one of the groups that the in-process trainer batches together (``TrainConfig.concepts_per_batch``
concepts in one forward, ``train.train_concept_loras``), and a worker trains it with that very call, so
every LoRA comes out of the same operations on the same batch whatever the engine: at one torch thread
(per task and on the driver), 1 process, N local workers and Ray give bit-identical LoRAs and erasure.
At more threads CPU kernels split their sums by thread and the last bits differ across thread counts, and
on a loaded machine even between two runs at 2 threads (``tests/_engine_case.py`` states the tolerance).
Faults (a worker killed, a node lost, a task raising) are retried by the engine, a bounded number of
times; concepts that fail every attempt are named in a ``MaceError`` after the others are saved.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from torch import Tensor

from .concept_task import (
    KILL_ONCE_ENV,
    ConceptOutcome,
    ConceptTask,
    DataSettings,
    TrainingJob,
    gather_bank,
    load_outcome,
    save_outcome,
    task_key,
)
from .concepts import Concept
from .errors import MaceError
from .lora import LoRABank
from .progress import ProgressCallback
from .train import TrainConfig

#: on_step(phrase, step, loss): a worker finished step ``step`` (from 1) of a concept's training.
OnStep = Callable[[str, int, float], None]
#: on_done(task, outcomes): a task's results arrived on the driver.
OnDone = Callable[[ConceptTask, list[ConceptOutcome]], None]


class Engine(Protocol):
    """Runs tasks on workers. ``shares_files``: the workers see the driver's file system (then they
    keep their training images and LoRA checkpoints in the driver's cache)."""

    workers: int
    shares_files: bool

    def run(self, job: TrainingJob, tasks: Sequence[ConceptTask], *, on_step: OnStep, on_done: OnDone,
            check_interrupt: Callable[[], None] | None = None) -> dict[str, str]:
        """Run every task; call ``on_done`` for each success; return ``{task label: last error}`` for
        the tasks that failed every attempt. Interrupts (KeyboardInterrupt or what ``check_interrupt``
        raises) stop every worker and propagate."""
        ...


def make_job(refined: Mapping[str, Tensor], fingerprint: str, data: DataSettings, train: TrainConfig,
             worker_cache: str | os.PathLike[str] | None) -> TrainingJob:
    """The shared part of every task of a run (``job_id`` names it in the workers' host cache)."""
    return TrainingJob({k: v.detach().float().cpu() for k, v in refined.items()}, fingerprint, data, train,
                       None if worker_cache is None else str(worker_cache), uuid.uuid4().hex)


def plan_tasks(
    job: TrainingJob,
    concepts: Sequence[Concept],
    *,
    user_images: Mapping[str, Tensor] | None = None,
    user_masks: Mapping[str, Tensor] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    concepts_per_task: int | None = None,
) -> tuple[dict[str, ConceptOutcome], list[ConceptTask]]:
    """``(finished, tasks)``: the concepts already in ``cache_dir`` and tasks for the others.

    ``concepts_per_task``: None (default) groups the concepts still to train exactly as the in-process
    trainer batches them (``job.train.concepts_per_batch``, None: all in one), which makes the result
    independent of the engine; another value trades that for finer tasks (a concept then rounds as in
    a batch of that size)."""
    if concepts_per_task is not None and concepts_per_task < 1:
        raise MaceError(f"concepts_per_task={concepts_per_task}: give at least 1, or None for the trainer's batches")
    user_images, user_masks = dict(user_images or {}), dict(user_masks or {})
    names = list(job.refined)
    finished: dict[str, ConceptOutcome] = {}
    todo: list[tuple[Concept, str]] = []
    for c in concepts:
        key = task_key(job, c, user_images.get(c.phrase), user_masks.get(c.phrase))
        hit = None if cache_dir is None else load_outcome(cache_dir, c.phrase, key, names)
        if hit is None:
            todo.append((c, key))
        else:
            finished[c.phrase] = hit
    kill_once = os.environ.get(KILL_ONCE_ENV) or None
    per_task = concepts_per_task or job.train.concepts_per_batch or max(len(todo), 1)  # train_concept_loras' rule
    tasks = []
    for start in range(0, len(todo), per_task):
        chunk = todo[start : start + per_task]
        phrases = {c.phrase for c, _ in chunk}
        tasks.append(ConceptTask(
            [c for c, _ in chunk],
            {p: t for p, t in user_images.items() if p in phrases},
            {p: t for p, t in user_masks.items() if p in phrases},
            [k for _, k in chunk],
            kill_once,
        ))
    return finished, tasks


def train_on_engine(
    engine: Engine,
    job: TrainingJob,
    concepts: Sequence[Concept],
    *,
    user_images: Mapping[str, Tensor] | None = None,
    user_masks: Mapping[str, Tensor] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    concepts_per_task: int | None = None,
    progress: ProgressCallback | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> tuple[LoRABank, dict[str, list[float]]]:
    """Train every concept's LoRA on ``engine``; returns the bank (rows in the order of ``concepts``)
    and each concept's losses, like ``train.train_concept_loras``. With ``cache_dir`` each finished
    concept is written there as it arrives and a rerun submits only the missing ones.
    ``concepts_per_task``: see ``plan_tasks`` (default: the trainer's batches, engine-independent result)."""
    tasks_dir = None if cache_dir is None else Path(cache_dir)
    outcomes, tasks = plan_tasks(job, concepts, user_images=user_images, user_masks=user_masks,
                                 cache_dir=tasks_dir, concepts_per_task=concepts_per_task)
    steps = job.train.steps
    total = steps * len(concepts)
    at: dict[str, int] = {p: steps for p in outcomes}  # concept -> steps done (a retried one restarts)

    def emit(phrase: str, info: dict[str, object]) -> None:
        if progress is not None:
            progress("train", sum(at.values()), total, {"concept": phrase, **info, "workers": engine.workers})

    def on_step(phrase: str, step: int, loss: float) -> None:
        at[phrase] = min(step, steps)
        emit(phrase, {"loss": loss})

    def on_done(task: ConceptTask, results: list[ConceptOutcome]) -> None:
        got = [o.phrase for o in results]
        if got != [c.phrase for c in task.concepts]:
            raise MaceError(f"a worker returned {got!r} for the task {task.label!r}: mixed versions of mace_ops?")
        for key, outcome in zip(task.keys, results, strict=True):
            if tasks_dir is not None:
                save_outcome(tasks_dir, key, outcome, job)
            outcomes[outcome.phrase] = outcome
            at[outcome.phrase] = steps
            emit(outcome.phrase, {"loss": outcome.losses[-1] if outcome.losses else float("nan")})

    if outcomes:
        emit(next(iter(outcomes)), {"cached": len(outcomes)})
    failed = engine.run(job, tasks, on_step=on_step, on_done=on_done, check_interrupt=check_interrupt) if tasks else {}
    if failed:
        detail = "; ".join(f"{label!r}: {why}" for label, why in failed.items())
        raise MaceError(
            f"{len(failed)} task(s) failed every attempt: {detail}. The other concepts are finished"
            + (f" and kept in {str(tasks_dir)!r}; rerun to train only these" if tasks_dir is not None else "")
        )
    bank = gather_bank(job, concepts, outcomes)
    return bank, {c.phrase: outcomes[c.phrase].losses for c in concepts}


__all__ = ["Engine", "OnDone", "OnStep", "make_job", "plan_tasks", "train_on_engine"]
