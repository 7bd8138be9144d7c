"""The idempotent per-concept task that the engines (``mace_ops.engines``) spread over workers.

A task turns ``(base-model fingerprint, concept, settings, seed)`` into ``(training data, LoRA factors,
losses)``; its outcome is a pure function of the content key

    key = sha256(format, fingerprint(W0 model), concept (phrase, anchor, kind), data settings,
                 TrainConfig.result_dict(), digest(W1 = the refined to_k/to_v), digest(user images/masks))

(bit for bit at one torch thread: a task is one of the batches that the in-process trainer
trains together, trained by the same call; more threads change the last bits, see
``mace_ops.engines`` and ``mace_ops.train``). The driver writes each gathered outcome to ``<cache>/tasks/`` under its key,
atomically (temporary file + rename), with a manifest (concept, key, losses, settings) in the file's
metadata; a rerun reads the finished ones back and submits only the others. Only the driver writes
there, so two workers never write the same file; a worker's own caches (training images, per-concept
LoRAs and group checkpoints of ``mace_ops.train``) are written atomically too and read only when their
key matches, so nothing partial is ever read as finished.

Worker side: ``run_concept_task`` (one task = one batch of concepts, trained together) on a host built
once per worker by a picklable ``HostFactory``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from torch import Tensor

from .concepts import Concept
from .errors import MaceError
from .hosts.base import Host
from .io import atomic_save_safetensors, read_safetensors
from .lora import LoRABank
from .train import TrainConfig, _digest_tensors

TASK_FORMAT = "mace-concept-task/1"
#: Test hook: a path; the first task to reach its second training step creates that file and SIGKILLs
#: its own process (a worker lost mid-concept). Read by the driver at submission, never in production.
KILL_ONCE_ENV = "MACE_TEST_KILL_ONCE"

Factors = dict[str, tuple[Tensor, Tensor]]  # name -> (up (d_out, r), down (r, d_ctx))


class HostFactory(Protocol):
    """Builds the host in a worker (picklable: a module-level function or a ``functools.partial``)."""

    def __call__(self, device: str | None) -> Host: ...


@dataclass(frozen=True)
class HostRecipe:
    """A ``HostFactory`` that builds the host in the worker (cheap to send, unlike a pickled host, which
    is about 190 MB even for the tiny model): ``kind`` "checkpoint" (``source``: the
    path of an SD1.x, SD2.x or SDXL checkpoint, readable on every worker's machine), "world" (the shipped world model)
    or "tiny" (``source``: the seed of ``DiffusersHost.from_tiny``)."""

    kind: str
    source: str | int = 0
    prediction: str = "auto"  # checkpoint: the prediction type ("auto", "epsilon", "v_prediction")
    dtype: str = "float32"  # checkpoint: the UNet's and text encoders' dtype (``mace-erase run --dtype``)

    def __post_init__(self) -> None:
        if self.kind not in ("checkpoint", "world", "tiny"):
            raise MaceError(f"host recipe kind {self.kind!r}: use 'checkpoint', 'world' or 'tiny'")

    def __call__(self, device: str | None) -> Host:
        from .hosts.diffusers import DiffusersHost

        if self.kind == "checkpoint":
            import torch

            from .single_file import load_host

            return load_host(str(self.source), device=device, prediction=self.prediction,
                             dtype=getattr(torch, self.dtype))
        if self.kind == "world":
            return DiffusersHost.from_world()
        return DiffusersHost.from_tiny(int(self.source))


@dataclass(frozen=True)
class DataSettings:
    """How a concept's training images are made (``mace_ops.data.generate_training_data``)."""

    n_images: int = 8
    seed: int = 0
    steps: int = 30
    cfg: float = 7.5
    size: int = 512


@dataclass
class TrainingJob:
    """What every task of one run shares; sent once to each worker.

    refined: W1, the CFR weights the LoRAs sit on, name -> (d_out, d_ctx) float32 CPU.
    fingerprint: ``model_fingerprint()`` of the ORIGINAL model; a worker whose host differs refuses.
    worker_cache: a folder every worker can write (same machine or a shared file system) for the
    training images and the per-concept LoRA caches, or None (a retried concept starts from scratch).
    """

    refined: dict[str, Tensor]
    fingerprint: str
    data: DataSettings
    train: TrainConfig
    worker_cache: str | None = None
    job_id: str = ""


@dataclass
class ConceptTask:
    """One unit of work: the concepts (usually one) and their user images/masks (by phrase)."""

    concepts: list[Concept]
    user_images: dict[str, Tensor] = field(default_factory=dict)
    user_masks: dict[str, Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # content key of each concept (driver-side)
    kill_once: str | None = None  # KILL_ONCE_ENV, copied at submission

    @property
    def label(self) -> str:
        return ", ".join(c.phrase for c in self.concepts)


@dataclass
class ConceptOutcome:
    """One finished concept: its LoRA factors (CPU) and per-step losses."""

    phrase: str
    factors: Factors
    losses: list[float]


# -------------------------------------------------------------------------------- content keys


def task_key(job: TrainingJob, concept: Concept, user_images: Tensor | None, user_masks: Tensor | None) -> str:
    """The content key of one concept's task (module docstring)."""
    user = {n: t for n, t in (("images", user_images), ("masks", user_masks)) if t is not None}
    record = {
        "format": TASK_FORMAT,
        "model": job.fingerprint,
        "concept": [concept.phrase, concept.anchor, concept.kind],
        "data": vars(job.data),
        "train": job.train.result_dict(),
        "refined": _digest_tensors(job.refined),
        "user": _digest_tensors(user) if user else None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def task_path(cache_dir: str | os.PathLike[str], phrase: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", phrase).strip("_")[:40] or "concept"
    return Path(cache_dir) / f"task-{slug}-{key[:20]}.safetensors"


def save_outcome(cache_dir: str | os.PathLike[str], key: str, outcome: ConceptOutcome, job: TrainingJob) -> Path:
    """Write a finished concept under its key (atomic: a reader sees the whole file or none)."""
    tensors: dict[str, Tensor] = {}
    for name, (up, down) in outcome.factors.items():
        tensors[f"{name}.up"] = up.detach().cpu().contiguous()
        tensors[f"{name}.down"] = down.detach().cpu().contiguous()
    manifest = {"key": key, "concept": outcome.phrase, "losses": outcome.losses, "format": TASK_FORMAT,
                "model": job.fingerprint, "data": vars(job.data), "train": job.train.result_dict()}
    path = task_path(cache_dir, outcome.phrase, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, {k: json.dumps(v) for k, v in manifest.items()}, overwrite=True)
    return path


def load_outcome(cache_dir: str | os.PathLike[str], phrase: str, key: str, names: Sequence[str]) -> ConceptOutcome | None:
    """A finished concept written by ``save_outcome`` for this key, or None (absent, damaged, other key)."""
    path = task_path(cache_dir, phrase, key)
    if not path.is_file():
        return None
    try:
        tensors, raw = read_safetensors(path, "concept task file")
        meta = {k: json.loads(v) for k, v in raw.items()}
        if meta.get("key") != key or meta.get("format") != TASK_FORMAT:
            return None
        factors = {n: (tensors[f"{n}.up"], tensors[f"{n}.down"]) for n in names}
        return ConceptOutcome(phrase, factors, [float(x) for x in meta["losses"]])
    except (MaceError, KeyError, TypeError, ValueError):
        return None


def gather_bank(job: TrainingJob, concepts: Sequence[Concept], outcomes: Mapping[str, ConceptOutcome]) -> LoRABank:
    """The LoRA bank of every concept (rows in the order of ``concepts``) from the gathered outcomes."""
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in job.refined.items()}
    bank = LoRABank(shapes, [c.phrase for c in concepts], job.train.rank, seed=job.train.seed)
    for i, c in enumerate(concepts):
        bank.set_factors(i, outcomes[c.phrase].factors)
    return bank


# -------------------------------------------------------------------------------- worker side


@dataclass
class _WorkerHosts:
    original: Host
    refined: Host


_HOSTS: dict[str, _WorkerHosts] = {}  # job_id -> hosts, built once per worker process


def worker_hosts(factory: HostFactory, job: TrainingJob, device: str | None) -> _WorkerHosts:
    """The original host and its W1 view for ``job``, built on the first task of a worker process."""
    if job.job_id not in _HOSTS:
        _HOSTS.clear()  # one job at a time per worker: free the previous model
        host = factory(device)
        if host.model_fingerprint() != job.fingerprint:
            raise MaceError("the worker's model is not the driver's (fingerprints differ): give every worker "
                            "the same checkpoint")
        _HOSTS[job.job_id] = _WorkerHosts(host, host.with_weights(job.refined))
    return _HOSTS[job.job_id]


def _kill_hook(task: ConceptTask) -> Callable[[int], None]:
    """The ``KILL_ONCE_ENV`` test hook: SIGKILL this process at the task's second step, once per marker."""

    def hook(step: int) -> None:
        if task.kill_once and step >= 2:
            try:
                with open(task.kill_once, "x", encoding="utf-8") as fh:  # atomic: only one task wins
                    fh.write(f"{os.getpid()} {task.label}\n")
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def run_concept_task(
    hosts: _WorkerHosts,
    job: TrainingJob,
    task: ConceptTask,
    progress: Callable[[str, int, float], None] | None = None,
) -> list[ConceptOutcome]:
    """Generate the task's training data and train its LoRAs (``mace_ops.data``, ``mace_ops.train``).

    ``progress(phrase, step, loss)``: after each of the concept's optimiser steps (``step`` from 1)."""
    from .data import generate_training_data
    from .train import train_concept_loras

    cache = Path(job.worker_cache) if job.worker_cache else None
    data = generate_training_data(
        hosts.original, task.concepts, token_ids=hosts.original.token_ids, n_images=job.data.n_images,
        seed=job.data.seed, steps=job.data.steps, cfg=job.data.cfg, size=job.data.size,
        user_images=task.user_images, user_masks=task.user_masks,
        cache_dir=None if cache is None else cache / "data",
    )
    kill = _kill_hook(task)
    counts = {c.phrase: 0 for c in task.concepts}

    def step(_done: int, _total: int, phrase: str, loss: float) -> None:
        counts[phrase] += 1
        kill(counts[phrase])
        if progress is not None:
            progress(phrase, counts[phrase], loss)

    bank, losses = train_concept_loras(
        hosts.refined, data, job.train, token_ids=hosts.original.token_ids, base_weights=job.refined,
        progress=step, cache_dir=None if cache is None else cache / "loras",
    )
    return [ConceptOutcome(c.phrase, {n: (u.cpu(), d.cpu()) for n, (u, d) in bank.factors(i).items()},
                           losses[c.phrase]) for i, c in enumerate(task.concepts)]


__all__ = [
    "KILL_ONCE_ENV",
    "ConceptOutcome",
    "ConceptTask",
    "DataSettings",
    "HostFactory",
    "HostRecipe",
    "TrainingJob",
    "gather_bank",
    "load_outcome",
    "run_concept_task",
    "save_outcome",
    "task_key",
    "worker_hosts",
]
