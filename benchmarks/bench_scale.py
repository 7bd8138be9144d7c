"""Scale-out throughput: per-concept tasks on 1 and 2 local workers (and on a local Ray cluster), and a
paper model of K GPUs × M machines for 1,000 and 10,000 concepts.

Measured on the tiny model (``mace_ops.tiny``), N concepts, each task = training images + LoRA:

* in-process: the N tasks one after another in this process (``run_concept_task``): the per-concept cost c;
* LocalPool(1), LocalPool(2): wall time of ``engines.train_on_engine`` (spawn, host build, tasks, gather);
* Ray(1), Ray(2): the same on ``ray.init(num_cpus=2)`` with 2 CPUs or 1 CPU per task;
* Ray's own per-task overhead o: the mean round trip of 200 empty tasks.

overhead per task = (T_engine(1 worker) - N·c) / N (start-up included, spread over the N tasks).
The paper model (printed after, NOT a measurement) is

    T(N, K, M) = ⌈N / (K·M)⌉ · c_gpu + N · o / (K·M) + t_start + t_fuse(N)

with c_gpu the reference's 17.4 s per concept on an A100 (29 min for 100), o from this run, t_start
60 s (model loading on every worker, assumed) and t_fuse 0.14 s per concept on the driver (statistics +
fusion add at 1,000 concepts in ``bench_closed_form.py``, CPU). Not a test.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --concepts 6 --steps 10
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time

import torch

from mace_ops.concept_task import DataSettings, HostRecipe, run_concept_task, worker_hosts
from mace_ops.concepts import Concept
from mace_ops.engines import make_job, plan_tasks, train_on_engine
from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.local_pool import LocalPool
from mace_ops.train import TrainConfig

PHRASES = ["cat", "dog", "owl", "horse", "tiger", "eagle", "shark", "zebra", "rabbit", "lion", "panda", "koala"]
REFERENCE_SECONDS_PER_CONCEPT = 29 * 60 / 100  # MACE reference, one A100
ASSUMED_START_S = 60.0
#: the driver's per-concept statistics + fusion add on a CPU: bench_closed_form.py, 1,000 concepts (126 s + 12 s)
FUSE_S_PER_CONCEPT = 0.14


def _job(host: DiffusersHost, steps: int):
    data = DataSettings(n_images=1, seed=0, steps=2, cfg=7.5, size=32)
    # one concept per task and per batch, as measured before tasks followed the trainer's batches
    return make_job(host.cross_attention_weights(), host.model_fingerprint(), data,
                    TrainConfig(steps=steps, concepts_per_batch=1), None)


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the local pool's workers, once shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed_engine(engine, host, concepts, steps) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its children: exact for LocalPool only)."""
    job = _job(host, steps)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    train_on_engine(engine, job, concepts)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _in_process(host, concepts, steps) -> tuple[float, float]:
    job = _job(host, steps)
    hosts = worker_hosts(HostRecipe("tiny", 0), job, None)
    _, tasks = plan_tasks(job, concepts)
    run_concept_task(hosts, job, tasks[0])  # warm-up (first forward, caches)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for task in tasks:
        run_concept_task(hosts, job, task)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _ray_rows(host, concepts, steps) -> tuple[list[tuple[str, tuple[float, float]]], float | None]:
    try:
        import ray
    except ImportError:
        return [], None
    from mace_ops.ray_engine import RayEngine

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        noop = ray.remote(lambda: None)
        ray.get([noop.remote() for _ in range(20)])  # start the workers
        t0 = time.perf_counter()
        ray.get([noop.remote() for _ in range(200)])
        per_task = (time.perf_counter() - t0) / 200
        rows = [(f"Ray, {w} worker(s)", _timed_engine(RayEngine(HostRecipe("tiny", 0), num_cpus=2 / w), host,
                                                       concepts, steps)) for w in (1, 2)]
    finally:
        ray.shutdown()
    return rows, per_task


def _paper_model(overhead_s: float) -> None:
    print("\nPaper model (NOT a measurement): T = ceil(N/(K*M))*c + N*o/(K*M) + t_start + t_fuse")
    print(f"c = {REFERENCE_SECONDS_PER_CONCEPT:.1f} s/concept (reference, A100), o = {overhead_s * 1e3:.1f} ms/task "
          f"(measured here), t_start = {ASSUMED_START_S:.0f} s (assumed), t_fuse = {FUSE_S_PER_CONCEPT} s/concept "
          "(bench_closed_form.py)\n")
    print("| concepts | 1 GPU | 8 GPUs × 1 | 8 GPUs × 4 | 8 GPUs × 16 |")
    print("|---:|---:|---:|---:|---:|")
    for n in (1000, 10000):
        cells = []
        for gpus in (1, 8, 32, 128):
            t = (math.ceil(n / gpus) * REFERENCE_SECONDS_PER_CONCEPT + n * overhead_s / gpus + ASSUMED_START_S
                 + n * FUSE_S_PER_CONCEPT)
            cells.append(f"{t / 3600:.2f} h")
        print(f"| {n:,} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    host = DiffusersHost.from_tiny(0)
    concepts = [Concept(p, "an animal") for p in PHRASES[: args.concepts]]
    n = len(concepts)
    load0 = os.getloadavg()[0]
    seq, seq_cpu = _in_process(host, concepts, args.steps)
    rows = [(f"LocalPool, {w} worker(s)", _timed_engine(LocalPool(HostRecipe("tiny", 0), w, threads_per_worker=1),
                                                         host, concepts, args.steps)) for w in (1, 2)]
    ray_rows, ray_task = ([], None) if args.no_ray else _ray_rows(host, concepts, args.steps)
    rows += ray_rows
    print(f"tiny model, {n} concepts × {args.steps} steps, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores, load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"in-process: {seq:.1f} s = {seq / n:.2f} s per concept\n")
    print("| engine | wall (s) | concepts/min | overhead per task, wall (s) | CPU (s) | overhead per task, CPU (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| in-process, one after another | {seq:.1f} | {60 * n / seq:.1f} | 0 | {seq_cpu:.1f} | 0 |")
    for name, (t, cpu) in rows:
        one = name.endswith("1 worker(s)")
        over = f"{(t - seq) / n:.2f}" if one else "–"
        cpu_cell = f"{cpu:.1f}" if name.startswith("Local") else "– (Ray workers are not our children)"
        cpu_over = f"{(cpu - seq_cpu) / n:.2f}" if name.startswith("Local") else "–"
        print(f"| {name} | {t:.1f} | {60 * n / t:.1f} | {over} | {cpu_cell} | {cpu_over} |")
    pool1, pool2 = rows[0][1][0], rows[1][1][0]
    print(f"\nLocalPool speed-up 2 vs 1 worker (wall): {pool1 / pool2:.2f}×")
    if ray_rows:
        print(f"Ray speed-up 2 vs 1 worker (wall): {ray_rows[0][1][0] / ray_rows[1][1][0]:.2f}×; "
              f"empty Ray task round trip: {ray_task * 1e3:.1f} ms")
    _paper_model(ray_task if ray_task is not None else 0.01)


if __name__ == "__main__":
    main()
