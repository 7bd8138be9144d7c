"""The Ray engine on a local 2-CPU Ray cluster (one per module): the erasure of the one-process run,
bit for bit at one thread per task, also when a worker is SIGKILLed mid-concept (Ray retries the
task). Same case as ``test_engines.py``."""

from __future__ import annotations

import pytest
from _engine_case import assert_same_erasure, erase, one_worker_erasure, torch_threads

from mace_ops.concept_task import KILL_ONCE_ENV, HostRecipe
from mace_ops.ray_engine import RayEngine

ray = pytest.importorskip("ray", reason="the optional 'ray' package is not installed (pip install '.[ray]')")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_worker(tiny_host):
    """The one-process run at 1 thread, as each Ray task runs."""
    return one_worker_erasure(tiny_host, threads=1)


def test_local_ray_cluster_gives_the_one_worker_erasure(cluster, tiny_host, one_worker, tmp_path):
    engine = RayEngine(HostRecipe("tiny", 0), threads=1)
    with torch_threads(1):  # the driver's steps (refine, data, fusion) at the reference's thread count too
        got = erase(tiny_host, engine=engine, cache_dir=tmp_path)
    assert engine.workers == 2
    assert_same_erasure(got, one_worker, exact=True)
    assert len(list((tmp_path / "tasks").glob("task-*.safetensors"))) == 3  # gathered on the driver


def test_ray_retries_a_killed_worker_and_the_erasure_matches(cluster, tiny_host, one_worker, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    with torch_threads(1):
        got = erase(tiny_host, engine=RayEngine(HostRecipe("tiny", 0), max_retries=2, threads=1))
    assert marker.exists()  # a worker died by SIGKILL at a concept's 2nd step
    assert_same_erasure(got, one_worker, exact=True)
