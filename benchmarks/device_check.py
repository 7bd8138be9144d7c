"""Device check: MACE's stages on one GPU at full SD1.5 size (random weights), per precision.

Measures, for each dtype (default fp16 and bf16 on CUDA):

* LoRA training, N concepts batched in one forward vs one after another: concept-steps/s, peak VRAM;
* training-data generation (DDIM + guidance + the attention probe that makes the masks): images/s;
* a whole ``run_erasure`` of 10 concepts (first dtype only, measured last): seconds per stage, peak VRAM.

The models are SD1.5-shaped and randomly initialised (UNet: ``bench_train.SD15_UNET_CONFIG``; text
encoder: CLIP ViT-L/14's text tower, 12 layers; VAE: SD1.5's), so no weights are downloaded; images
are noise but every stage does its real work at real shapes. Peak VRAM is
``torch.cuda.max_memory_allocated`` over each measurement (reset before it). Results go to
``<out>/device_check.json`` and ``<out>/device_check.md``, rewritten after each measurement, so a run
cut short keeps what it finished. ``--dry-run``: the tiny model on the CPU, tiny sizes (CI keeps the
script working; its figures mean nothing).

    python benchmarks/device_check.py --out device-check-out            # on a GPU
    python benchmarks/device_check.py --dry-run --out /tmp/dc           # anywhere, < 2 min
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train's SD1.5 config
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mace_ops without an install

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PHRASES = ["cat", "dog", "owl", "horse", "tiger", "eagle", "shark", "zebra", "rabbit", "lion", "panda", "koala"]


@dataclass
class Sizes:
    """How big each measurement is."""

    full: bool  # SD1.5-shaped models (else the tiny one)
    train_concepts: int  # N in batched vs one-after-another
    train_steps: int
    latent: int  # training latents are latent × latent (64: 512 px)
    gen_images: int
    sample_steps: int
    image_size: int
    erase_concepts: int
    erase_steps: int  # LoRA steps per concept in the whole run


GPU_SIZES = Sizes(True, 8, 5, 64, 8, 30, 512, 10, 50)
DRY_SIZES = Sizes(False, 2, 2, 8, 2, 2, 32, 1, 2)


# --------------------------------------------------------------------------------------------------
# Models


def clip_l_text_encoder() -> torch.nn.Module:
    """CLIP ViT-L/14's text tower (SD1.x's text encoder), randomly initialised."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))


def sd15_vae() -> torch.nn.Module:
    """SD1.5's VAE (``vae/config.json``), randomly initialised."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )


def base_models(full: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(unet, text encoder, vae) in float32 on the CPU, seeded."""
    from mace_ops.tiny import build_tiny_sd

    if not full:
        sd = build_tiny_sd(0)
        return sd.unet, sd.text_encoder, sd.vae
    from bench_train import SD15_UNET_CONFIG
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    torch.manual_seed(1)
    text = clip_l_text_encoder()
    torch.manual_seed(2)
    vae = sd15_vae()
    return unet, text, vae


def host_on(models: tuple, device: torch.device, dtype: torch.dtype) -> Any:
    """A DiffusersHost over copies of ``models`` cast whole to ``dtype`` on ``device``."""
    from mace_ops.hosts.diffusers import DiffusersHost
    from mace_ops.tiny import sd1_alphas_cumprod

    unet, text, vae = (copy.deepcopy(m).to(device, dtype).eval().requires_grad_(False) for m in models)
    return DiffusersHost(unet, text, vae, alphas_cumprod=sd1_alphas_cumprod(), device=device)


# --------------------------------------------------------------------------------------------------
# Measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _training_data(n: int, hw: int) -> list:
    from mace_ops.concepts import Concept
    from mace_ops.data import ConceptData

    g = torch.Generator().manual_seed(0)
    return [
        ConceptData(Concept(p, "an animal", "object"), None, torch.randn(4, 4, hw, hw, generator=g),
                    (torch.rand(4, hw, hw, generator=g) > 0.3).float())
        for p in PHRASES[:n]
    ]


def measure_training(host: Any, sizes: Sizes, device: torch.device) -> dict:
    """Concept-steps/s of N concepts trained one after another and in one batch (same steps each)."""
    from mace_ops.train import TrainConfig, train_concept_loras

    data = _training_data(sizes.train_concepts, sizes.latent)
    train_concept_loras(host, data[:1], TrainConfig(steps=1))  # warm-up: kernels, allocator, tokenizer
    out: dict[str, Any] = {"concepts": sizes.train_concepts, "steps": sizes.train_steps, "latent": sizes.latent}
    for mode, per_batch in (("sequential", 1), ("batched", None)):
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        _, losses = train_concept_loras(host, data, TrainConfig(steps=sizes.train_steps, concepts_per_batch=per_batch))
        _sync(device)
        seconds = time.perf_counter() - t0
        finite = all(all(x == x and abs(x) != float("inf") for x in v) for v in losses.values())
        out[mode] = {"seconds": seconds, "concept_steps_per_s": sizes.train_concepts * sizes.train_steps / seconds,
                     "peak_vram_gib": _peak_gib(device), "losses_finite": finite}
    out["speedup"] = out["batched"]["concept_steps_per_s"] / out["sequential"]["concept_steps_per_s"]
    return out


def measure_generation(host: Any, sizes: Sizes, device: torch.device) -> dict:
    """Training-data generation of one concept: images, attention masks, VAE latents."""
    from mace_ops.concepts import Concept
    from mace_ops.data import generate_training_data

    concept = [Concept("Taylor Swift", "a person")]
    kwargs = dict(n_images=sizes.gen_images, steps=sizes.sample_steps, size=sizes.image_size,
                  batch_size=sizes.gen_images)
    generate_training_data(host, concept, **{**kwargs, "n_images": 1, "steps": 1, "batch_size": 1})  # warm-up
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    (data,) = generate_training_data(host, concept, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"images": sizes.gen_images, "sample_steps": sizes.sample_steps, "image_size": sizes.image_size,
            "seconds": seconds, "images_per_s": sizes.gen_images / seconds, "peak_vram_gib": _peak_gib(device),
            "latents_finite": bool(torch.isfinite(data.latents).all())}


def measure_erasure(host: Any, sizes: Sizes, device: torch.device) -> dict:
    """A whole run_erasure of ``sizes.erase_concepts`` concepts: wall seconds per stage."""
    from mace_ops.concepts import Concept
    from mace_ops.pipeline import ErasureSettings, run_erasure
    from mace_ops.preservation import default_corpus
    from mace_ops.train import TrainConfig

    concepts = [Concept(p, "an animal") for p in PHRASES[: sizes.erase_concepts]]
    settings = ErasureSettings(n_images=sizes.gen_images, sample_steps=sizes.sample_steps,
                               image_size=sizes.image_size,
                               train=TrainConfig(steps=sizes.erase_steps, concepts_per_batch=8))
    prompts = default_corpus() if sizes.full else default_corpus()[:16]
    stage_seconds: dict[str, float] = {}
    _reset_peak(device)
    t0 = time.perf_counter()
    clock = {"stage": "setup", "t": t0}  # setup: until the first event

    def progress(stage: str, done: int, total: int, info: Any) -> None:  # a stage's time ends at the next's first event
        if stage != clock["stage"]:
            now = time.perf_counter()
            stage_seconds[clock["stage"]] = stage_seconds.get(clock["stage"], 0.0) + now - clock["t"]
            clock.update(stage=stage, t=now)

    erasure = run_erasure(host, concepts, preservation_prompts=prompts, settings=settings, progress=progress)
    _sync(device)
    end = time.perf_counter()
    stage_seconds[clock["stage"]] = stage_seconds.get(clock["stage"], 0.0) + end - clock["t"]
    return {"concepts": len(concepts), "preservation_prompts": len(prompts), "lora_steps": sizes.erase_steps,
            "n_images": sizes.gen_images, "sample_steps": sizes.sample_steps, "image_size": sizes.image_size,
            "stage_seconds": stage_seconds, "total_seconds": end - t0, "peak_vram_gib": _peak_gib(device),
            "weights_finite": all(bool(torch.isfinite(w).all()) for w in erasure.weights.values())}


# --------------------------------------------------------------------------------------------------
# Report


def _f(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    env = results["environment"]
    lines = [f"# MACE device check ({'dry run, tiny model, CPU' if env['dry_run'] else 'SD1.5-sized, random weights'})",
             "", f"device: {env['device_name']}; torch {env['torch']}; started {env['started']}", ""]
    rows = [(d, r) for d, r in results["dtypes"].items()]
    lines += ["## LoRA training: batched vs one after another", "",
              "| dtype | N | steps | latent | sequential c-steps/s | batched c-steps/s | speed-up | peak VRAM GiB (seq / batched) |",
              "|---|---|---|---|---|---|---|---|"]
    for d, r in rows:
        t = r.get("training")
        if t:
            lines.append(f"| {d} | {t['concepts']} | {t['steps']} | {t['latent']}² | "
                         f"{_f(t['sequential']['concept_steps_per_s'])} | {_f(t['batched']['concept_steps_per_s'])} | "
                         f"{_f(t['speedup'])}× | {_f(t['sequential']['peak_vram_gib'])} / {_f(t['batched']['peak_vram_gib'])} |")
    lines += ["", "## Training-data generation", "",
              "| dtype | images | sampler steps | size | images/s | peak VRAM GiB |", "|---|---|---|---|---|---|"]
    for d, r in rows:
        g = r.get("generation")
        if g:
            lines.append(f"| {d} | {g['images']} | {g['sample_steps']} | {g['image_size']} | {_f(g['images_per_s'], '.3f')} "
                         f"| {_f(g['peak_vram_gib'])} |")
    lines += ["", "## Whole run (`run_erasure`): seconds per stage", ""]
    for d, r in rows:
        e = r.get("erasure")
        if e:
            stages = " · ".join(f"{k} {v:.1f}" for k, v in e["stage_seconds"].items())
            lines.append(f"- {d}: {e['concepts']} concepts, {e['lora_steps']} LoRA steps, {e['n_images']} images × "
                         f"{e['sample_steps']} steps at {e['image_size']} px: total {e['total_seconds']:.1f} s "
                         f"({stages}); peak VRAM {_f(e['peak_vram_gib'])} GiB")
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: {v.splitlines()[-1]}" for k, v in results["errors"].items()]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(results, indent=2))
    (out / "device_check.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, tiny sizes")
    ap.add_argument("--out", default="device-check-out")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (GPU default fp16,bf16; dry: fp32)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--skip", default="", help="comma list of training,generation,erasure")
    args = ap.parse_args(argv)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run, or on a GPU", file=sys.stderr)
        return 2
    dtypes = (args.dtypes or ("fp32" if args.dry_run else "fp16,bf16")).split(",")
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    results: dict[str, Any] = {
        "environment": {"dry_run": args.dry_run, "torch": torch.__version__, "device": str(device),
                        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sizes": sizes.__dict__},
        "dtypes": {}, "errors": {},
    }
    t0 = time.perf_counter()
    models = base_models(sizes.full)
    results["environment"]["build_seconds"] = time.perf_counter() - t0
    # the whole run last: a run cut short by a timeout loses only it
    plan = [(name, what) for name in dtypes for what in ("training", "generation")] + [(dtypes[0], "erasure")]
    measure = {"training": measure_training, "generation": measure_generation, "erasure": measure_erasure}
    hosts: dict[str, Any] = {}
    for name, what in plan:
        if what in skip:
            continue
        if name not in hosts:
            hosts.clear()  # one host on the device at a time
            if device.type == "cuda":
                torch.cuda.empty_cache()
            hosts[name] = host_on(models, device, DTYPES[name])
        print(f"[{time.perf_counter() - t0:6.1f} s] {name} {what} ...", flush=True)
        try:
            results["dtypes"].setdefault(name, {})[what] = measure[what](hosts[name], sizes, device)
        except Exception:  # keep going: one failure must not lose the other figures
            results["errors"][f"{name}/{what}"] = traceback.format_exc()
            print(results["errors"][f"{name}/{what}"], file=sys.stderr, flush=True)
        write(results, out)
    results["environment"]["total_seconds"] = time.perf_counter() - t0
    write(results, out)
    print(markdown(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
