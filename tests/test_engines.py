"""Scale-out engines on the tiny host: a local pool of 2 worker processes gives the erasure of the
one-process run, bit for bit at one thread per task and within ``_engine_case.THREADS_TOL`` when the
driver's threads are divided among the workers; a worker SIGKILLed mid-concept is retried with the same result,
finished concepts are never trained again, and a task that fails every attempt is named."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _engine_case import (
    CONCEPTS,
    SETTINGS,
    assert_same_erasure,
    driver_threads,
    erase,
    one_worker_erasure,
    torch_threads,
)

from mace_ops.concept_task import KILL_ONCE_ENV, DataSettings, HostRecipe
from mace_ops.engines import make_job, plan_tasks
from mace_ops.errors import MaceError
from mace_ops.local_pool import LocalPool
from mace_ops.train import TrainConfig


@pytest.fixture(scope="module")
def one_worker(tiny_host):
    """The one-process run at 1 thread: the reference of the bit-for-bit tests."""
    return one_worker_erasure(tiny_host, threads=1)


def test_tasks_are_the_batches_of_the_in_process_trainer():
    job = make_job({"k": torch.ones(2, 3)}, "fp", DataSettings(), TrainConfig(concepts_per_batch=2), None)
    _, tasks = plan_tasks(job, CONCEPTS)
    assert [[c.phrase for c in t.concepts] for t in tasks] == [["Taylor Swift", "airplane"], ["Van Gogh"]]
    job.train = TrainConfig(concepts_per_batch=None)  # None: all in one batch, so all in one task
    assert [len(t.concepts) for t in plan_tasks(job, CONCEPTS)[1]] == [3]
    assert [len(t.concepts) for t in plan_tasks(job, CONCEPTS, concepts_per_task=1)[1]] == [1, 1, 1]
    with pytest.raises(MaceError, match="concepts_per_task=0: give at least 1"):
        plan_tasks(job, CONCEPTS, concepts_per_task=0)


def test_local_pool_threads_are_divided_among_the_workers_it_starts():
    pool = LocalPool(HostRecipe("tiny", 0), workers=4)
    pool.driver_threads = 8
    assert (pool.threads(4), pool.threads(1), pool.threads(16)) == (2, 8, 1)
    assert LocalPool(HostRecipe("tiny", 0), workers=4, threads_per_worker=3).threads(1) == 3
    with pytest.raises(MaceError, match="threads_per_worker=0"):
        LocalPool(HostRecipe("tiny", 0), threads_per_worker=0)


def test_two_local_workers_give_the_one_worker_erasure_bit_for_bit(tiny_host, one_worker, tmp_path):
    steps = []
    assert SETTINGS.train.concepts_per_batch == 2  # two tasks: both workers train, one a batch of two
    pool = LocalPool(HostRecipe("tiny", 0), workers=2, threads_per_worker=1)
    with torch_threads(1):  # the driver's steps (refine, data, fusion) at the reference's thread count too
        got = erase(tiny_host, engine=pool, cache_dir=tmp_path,
                    progress=lambda stage, done, total, info: steps.append((stage, done, total)))
    assert_same_erasure(got, one_worker, exact=True)
    # the training as a whole went through one bar, to steps × concepts, fed by both workers' steps
    train = [(d, t) for s, d, t, in steps if s == "train"]
    assert train[-1] == (3 * len(CONCEPTS), 3 * len(CONCEPTS)) and len(train) > len(CONCEPTS)
    assert len(list(tmp_path.joinpath("tasks").glob("task-*.safetensors"))) == len(CONCEPTS)


def test_killed_worker_is_retried_and_the_erasure_matches(tiny_host, one_worker, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    pool = LocalPool(HostRecipe("tiny", 0), workers=2, threads_per_worker=1)
    with torch_threads(1):
        got = erase(tiny_host, engine=pool, cache_dir=tmp_path / "cache")
    pid, victim = marker.read_text().split(" ", 1)  # a worker did die by SIGKILL at a concept's 2nd step
    assert victim.strip() in {"Taylor Swift, airplane", "Van Gogh"}
    assert_same_erasure(got, one_worker, exact=True)

    # Rerun: every concept is read back from its task file; a pool whose workers could not even build
    # the host proves that no task was submitted.
    monkeypatch.delenv(KILL_ONCE_ENV)
    with torch_threads(1):  # the same refined W1 as the first run, so the same task keys
        again = erase(tiny_host, engine=LocalPool(HostRecipe("checkpoint", str(tmp_path / "absent")), workers=2),
                      cache_dir=tmp_path / "cache")
    for k, w in got.weights.items():
        assert torch.equal(again.weights[k], w)


def test_workers_on_fewer_threads_match_within_the_stated_tolerance(tiny_host, tmp_path):
    # The CLI's default: the driver's threads divided among the workers (2 -> 1 each on 2 cores), against
    # the one-process run at the driver's threads.
    got = erase(tiny_host, engine=LocalPool(HostRecipe("tiny", 0), workers=2), cache_dir=tmp_path)
    assert_same_erasure(got, one_worker_erasure(tiny_host), exact=driver_threads() == 1)


class Stop(Exception):
    pass


def test_an_interrupt_stops_every_worker_and_keeps_the_finished_concepts(tiny_host, tmp_path):
    import multiprocessing

    tasks = tmp_path / "tasks"

    def interrupt_after_the_first() -> None:  # what Ctrl-C or ComfyUI's Cancel raises, once a concept is in
        if tasks.is_dir() and any(tasks.glob("task-*")):
            raise Stop

    one_per_task = dataclasses.replace(SETTINGS, train=dataclasses.replace(SETTINGS.train, concepts_per_batch=1))
    with pytest.raises(Stop):  # 3 tasks on 2 workers: the third is still queued or running at the interrupt
        erase(tiny_host, one_per_task, engine=LocalPool(HostRecipe("tiny", 0), workers=2), cache_dir=tmp_path,
              check_interrupt=interrupt_after_the_first)
    assert 1 <= len(list(tasks.glob("task-*.safetensors"))) < len(CONCEPTS)
    assert multiprocessing.active_children() == []  # every worker was stopped


def test_a_task_failing_every_attempt_is_named(tiny_host, tmp_path):
    # Workers whose checkpoint is missing raise in every task: after max_attempts the run names the
    # concepts and the error, and raises; nothing is written as finished.
    pool = LocalPool(HostRecipe("checkpoint", str(tmp_path / "absent.safetensors")), workers=1, max_attempts=2)
    with pytest.raises(MaceError, match=r"failed every attempt.*Taylor Swift.*absent.*2 attempts"):
        erase(tiny_host, engine=pool, cache_dir=tmp_path)
    assert not list((tmp_path / "tasks").glob("task-*"))


def test_cli_engine_options_are_checked_before_any_model_loads(tmp_path, capsys):
    from mace_ops.cli import main

    assert main(["demo", "--out", str(tmp_path / "a"), "--workers", "0"]) == 2
    assert "--workers 0: give at least 1" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "b"), "--workers", "2", "--ray", "auto"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
