"""LoRA training throughput: N concepts trained in one batch versus one after another.

Prints a markdown table: optimiser steps per second (concept-steps: every concept's step counted) and
peak resident memory, for N concepts at equal optimiser steps per concept, on

* the tiny SD1.x-shaped model (``mace_ops.tiny``, 16×16 latents), and
* a full-size SD1.5-shaped UNet (diffusers ``UNet2DConditionModel`` with SD1.5's config written
  below, random init, 32×32 latents) with the tiny text encoder and VAE (not timed).

Each (model, N, mode) runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own;
"above base" is the peak minus the RSS after building the model and one warm-up step. Tiny rows run
``--repeats`` sequential/batched pairs, alternating, and report medians (this machine's speed drifts by
±15 % over minutes). "UNet alone" is the host UNet's own forward + backward at batch N versus N
batches of one (``unet_alone``): how much of the speed-up the model itself allows; batching also
saves per-step work (optimiser, sampling, Python), so training can exceed it. Not a test.

    .venv/bin/python benchmarks/bench_train.py                      # tiny N=1,4,16 (50 steps, 3 pairs); full N=1,4
    .venv/bin/python benchmarks/bench_train.py --full-ns ""         # tiny only (~6 min)
    .venv/bin/python benchmarks/bench_train.py --full-ns 1,4,16 --full-steps 1
    .venv/bin/python benchmarks/bench_train.py --full-ns "" --tiny-ns 16 --with-cache   # + the cost of resume files
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PHRASES = [
    "cat", "dog", "owl", "horse", "tiger", "eagle", "shark", "zebra",
    "rabbit", "lion", "panda", "koala", "camel", "otter", "bison", "moose",
]  # fmt: skip

#: SD1.5's unet/config.json, written out (diffusers defaults fill the rest)
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _host(model: str):
    from mace_ops.hosts.diffusers import DiffusersHost
    from mace_ops.tiny import build_tiny_sd

    if model == "tiny":
        return DiffusersHost.from_tiny(0)
    from diffusers import UNet2DConditionModel

    sd = build_tiny_sd(0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return DiffusersHost(unet, sd.text_encoder, sd.vae, alphas_cumprod=sd.alphas_cumprod)


def _data(n_concepts: int, hw: int):
    from mace_ops.concepts import Concept
    from mace_ops.data import ConceptData

    g = torch.Generator().manual_seed(0)
    return [
        ConceptData(
            concept=Concept(p, "an animal", "object"),
            images=None,
            latents=torch.randn(4, 4, hw, hw, generator=g),
            masks=(torch.rand(4, hw, hw, generator=g) > 0.3).float(),
        )
        for p in PHRASES[:n_concepts]
    ]


def worker(model: str, n: int, mode: str, steps: int, hw: int) -> dict:
    from mace_ops.train import TrainConfig, train_concept_loras

    torch.set_num_threads(2)
    host = _host(model)
    data = _data(n, hw)
    warm = _data(1, hw)
    train_concept_loras(host, warm, TrainConfig(steps=1))  # tokenizer, allocator, first-call costs
    base_mb = _rss_mb()
    cfg = TrainConfig(steps=steps, concepts_per_batch=1 if mode == "sequential" else None)
    cache = tempfile.mkdtemp(prefix="mace-bench-cache-") if mode == "batched+cache" else None
    t0, c0 = time.perf_counter(), time.process_time()
    _, losses = train_concept_loras(host, data, cfg, cache_dir=cache)  # +cache: per-concept files, checkpoints
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if cache is not None:
        shutil.rmtree(cache)
    assert all(len(v) == steps for v in losses.values())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "concept_steps": n * steps, "peak_mb": peak_mb, "base_mb": base_mb}


def unet_alone(model: str, n: int, reps: int, hw: int) -> dict:
    """The host UNet's own batch scaling: forward + backward (to the context) of ``n`` samples in one
    batch versus ``n`` batches of one, same inputs, no LoRA, loss, optimiser or bookkeeping; the two
    are timed alternately ``reps`` times. Returns the per-repetition ratios ``n · t(1) / t(n)``."""
    torch.set_num_threads(2)
    host = _host(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, hw, hw, generator=g)
    t = torch.randint(200, 400, (n,), generator=g)
    ctx = torch.randn(n, 77, 768, generator=g)

    def fwd_bwd(lo: int, hi: int) -> None:
        c = ctx[lo:hi].clone().requires_grad_(True)
        with host.instrument() as unet:
            unet(x[lo:hi], t[lo:hi], c).square().mean().backward()

    fwd_bwd(0, n)
    fwd_bwd(0, 1)
    ratios = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            fwd_bwd(i, i + 1)
        t1 = time.perf_counter()
        fwd_bwd(0, n)
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return {"ratios": ratios}


def _run(model: str, n: int, mode: str, steps: int, hw: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, str(n), mode, str(steps), str(hw)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-ns", default="1,4,16")
    ap.add_argument("--tiny-steps", type=int, default=50, help="default: TrainConfig.steps, a real run's length")
    ap.add_argument("--full-ns", default="1,4", help="'' to skip the full-size UNet")
    ap.add_argument("--full-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="sequential/batched pairs per tiny row (full: 1)")
    ap.add_argument("--with-cache", action="store_true",
                    help="also time batched training with a cache folder (resume files and group checkpoints)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, n, mode, steps, hw = args.worker
        if mode == "unet-alone":
            result = unet_alone(model, int(n), int(steps), int(hw))
        else:
            result = worker(model, int(n), mode, int(steps), int(hw))
        print(json.dumps(result))
        return

    plan = [("tiny", 16, int(n), args.tiny_steps, args.repeats) for n in args.tiny_ns.split(",") if n]
    plan += [("full", 32, int(n), args.full_steps, 1) for n in args.full_ns.split(",") if n]
    print(f"torch {torch.__version__}, 2 threads, load average at start {os.getloadavg()[0]:.1f}")
    print()
    print(
        "| model | latent | N | steps/concept | mode | runs | concept-steps/s (wall, median) "
        "| speed-up (wall, median [range]) | speed-up (CPU, median) | UNet alone | peak RSS MB | above base MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, hw, n, steps, repeats in plan:
        runs: dict[str, list[dict]] = {"sequential": [], "batched": [], **({"batched+cache": []} if args.with_cache else {})}
        for _ in range(repeats):  # alternate the modes so that drifting machine load hits both alike
            for mode in runs:
                runs[mode].append(_run(model, n, mode, steps, hw))
        alone = statistics.median(_run(model, n, "unet-alone", 5 if model == "tiny" else 1, hw)["ratios"])
        rate = {m: [r["concept_steps"] / r["seconds"] for r in rs] for m, rs in runs.items()}
        cpu = {m: [r["concept_steps"] / r["cpu_seconds"] for r in rs] for m, rs in runs.items()}
        for mode, rs in runs.items():
            wall_up = [b / s_ for b, s_ in zip(rate[mode], rate["sequential"], strict=True)]
            cpu_up = [b / s_ for b, s_ in zip(cpu[mode], cpu["sequential"], strict=True)]
            spread = f" [{min(wall_up):.2f}–{max(wall_up):.2f}]" if repeats > 1 else ""
            peak = max(r["peak_mb"] for r in rs)
            above = max(r["peak_mb"] - r["base_mb"] for r in rs)
            print(
                f"| {model} | {hw}×{hw} | {n} | {steps} | {mode} | {repeats} | {statistics.median(rate[mode]):.2f} | "
                f"{statistics.median(wall_up):.2f}×{spread} | {statistics.median(cpu_up):.2f}× | "
                f"{f'{alone:.2f}×' if mode != 'sequential' else '–'} | {peak:.0f} | {above:.0f} |",
                flush=True,
            )
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
