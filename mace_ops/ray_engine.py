"""The multi-machine engine: one Ray task per batch of concepts that the in-process trainer would train
together (``TrainConfig.concepts_per_batch``; ``engines.plan_tasks``).

    ray start --head                       # first machine; then on the others:
    ray start --address HEAD_IP:6379
    mace-erase run ... --ray auto          # on any machine of the cluster

Ray schedules the tasks (``num_gpus`` per task, fractions allowed), retries a task whose worker
process or node died (``max_retries``; a task that raises is retried too: ``retry_exceptions``), and
returns each result (factors and losses, a few MB) to the driver through its object store, so the
machines need no shared file system; the model must be loadable on each (``HostRecipe``). The shared
part of the job (W1, the host recipe) is put into the object store once. Ray is an optional
dependency: ``pip install "mass-concept-erasure[ray]"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def import_ray() -> Any:
    """The ``ray`` module, or a MaceError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise MaceError("--ray needs the optional 'ray' package: pip install 'mass-concept-erasure[ray]' "
                        "(or pip install 'ray[default]')") from e
    return ray


def _ray_task(factory: HostFactory, job: TrainingJob, task: ConceptTask, use_gpu: bool,
              threads: int) -> list[ConceptOutcome]:
    """Body of one Ray task (Ray sets CUDA_VISIBLE_DEVICES to the GPUs it granted)."""
    import torch

    torch.set_num_threads(threads)  # the result's last bits depend on it on CPU (engines module docstring)
    hosts = worker_hosts(factory, job, "cuda" if use_gpu else None)
    return run_concept_task(hosts, job, task)


class RayEngine:
    """Tasks on a Ray cluster. ``address``: "auto" (a running cluster), "HOST:PORT", or None (the
    cluster this process is connected to, else a new local one). ``num_gpus``/``num_cpus``: resources
    of one task (``num_gpus=0.5`` puts two tasks on a GPU). ``max_retries``: extra attempts per task.
    ``init_kwargs``: passed to ``ray.init`` when this engine connects. ``threads``: torch threads in
    each task (default: ``num_cpus`` rounded down, at least 1); a one-process run gives bit-identical LoRAs
    at one thread (within float32 rounding at more)."""

    shares_files = False

    def __init__(self, host_factory: HostFactory, address: str | None = None, *, num_gpus: float = 0.0,
                 num_cpus: float = 1.0, max_retries: int = 2, init_kwargs: dict[str, Any] | None = None,
                 threads: int | None = None) -> None:
        if num_gpus < 0 or num_cpus < 0 or max_retries < 0:
            raise MaceError(f"num_gpus={num_gpus}, num_cpus={num_cpus}, max_retries={max_retries}: none may be negative")
        if threads is not None and threads < 1:
            raise MaceError(f"threads={threads}: give at least 1 torch thread per task, or None for num_cpus")
        self.host_factory = host_factory
        self.address = address
        self.num_gpus, self.num_cpus, self.max_retries = float(num_gpus), float(num_cpus), int(max_retries)
        self.init_kwargs = dict(init_kwargs or {})
        self.threads = threads if threads is not None else max(1, int(self.num_cpus))
        self.workers = 0  # filled from the cluster's resources on connection

    def _connect(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
        per_task = "GPU" if self.num_gpus > 0 else "CPU"
        need = self.num_gpus if self.num_gpus > 0 else max(self.num_cpus, 1e-9)
        self.workers = max(1, int(ray.cluster_resources().get(per_task, 0) // need))
        return ray

    def run(self, job: TrainingJob, tasks: Sequence[ConceptTask], *, on_step: OnStep, on_done: OnDone,
            check_interrupt: Callable[[], None] | None = None) -> dict[str, str]:
        """See ``engines.Engine.run`` (progress: per finished task; Ray does the retries)."""
        ray = self._connect()
        remote = ray.remote(_ray_task).options(
            num_gpus=self.num_gpus, num_cpus=self.num_cpus, max_retries=self.max_retries, retry_exceptions=True,
        )
        factory_ref, job_ref = ray.put(self.host_factory), ray.put(job)
        refs = {remote.remote(factory_ref, job_ref, t, self.num_gpus > 0, self.threads): i for i, t in enumerate(tasks)}
        failed: dict[str, str] = {}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                for ref in ready:
                    i = refs.pop(ref)
                    try:
                        outcomes = ray.get(ref)
                    except ray.exceptions.RayError as e:  # every retry spent: a crashed worker, a lost node, an error
                        failed[tasks[i].label] = f"{type(e).__name__} after {self.max_retries + 1} attempts: {e}"[:2000]
                        continue
                    on_done(tasks[i], outcomes)
                if check_interrupt is not None:
                    check_interrupt()
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        return failed


__all__ = ["RayEngine", "import_ray"]
