"""``mace-erase``: MACE without the UI (``python -m mace_ops`` too).

    mace-erase run  --checkpoint MODEL --concepts FILE | --preset NAME --out DIR [options]
    mace-erase demo [--out DIR] [--model world|tiny] [--workers N | --ray ADDRESS]
    mace-erase eval --suite objects|celebrities|explicit|artists --checkpoint MODEL --out DIR [options]
    mace-erase fuse --checkpoint MODEL --concepts FILE --lora FILE [--lora FILE ...] --out FILE
                    (LoRAs trained elsewhere, one per concept: ``mace_ops.fuse_command``)
    mace-erase probe --erasure FILE [--checkpoint ORIGINAL] --out DIR [options]   (mace_ops.probe_cli)

``run`` writes into ``DIR`` (which must not exist): the sanitized single-file checkpoint
``<name>_mace.safetensors``, the erasure file ``erasure.safetensors`` (a LoRA-style file of weight
differences that ComfyUI's stock LoRA loader applies), ``concepts.txt`` and ``report/``. Work goes to
``DIR.partial/`` first and is renamed to ``DIR`` at the end; the per-concept cache lives in
``DIR.partial/cache`` (or ``--cache``), so after Ctrl-C the same command resumes.
``--workers N`` trains the per-concept LoRAs in N processes on this machine, ``--ray ADDRESS`` on a Ray
cluster (``mace_ops.engines``); Ctrl-C stops every worker and keeps the finished concepts.
Exit codes: 0 done, 2 bad input (the message says what to fix), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MaceError
from .run_inputs import add_prediction_arg, check_new_folder, check_run_inputs

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130
DEMO_PRESERVE_PROMPTS = 200


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- shared helpers


def _run_pipeline(host: Any, concepts: list, retained: list[str], settings: Any, *, preserve: list[str] | None,
                  cache: Path, quiet: bool, engine: Any = None) -> Any:
    from .pipeline import run_erasure
    from .progress import StageProgress

    bar = StageProgress(enabled=not quiet)
    try:
        return run_erasure(host, concepts, preservation_prompts=preserve, retained_prompts=retained,
                           settings=settings, cache_dir=str(cache), progress=bar, engine=engine)
    finally:
        bar.close()


def _engine(args: argparse.Namespace, recipe: Any) -> Any:
    """None (train here), a ``LocalPool`` (``--workers N``, N > 1) or a ``RayEngine`` (``--ray ADDRESS``)."""
    workers, address = getattr(args, "workers", 1), getattr(args, "ray", None)
    if workers < 1:
        raise MaceError(f"--workers {workers}: give at least 1")
    if address is not None and workers > 1:
        raise MaceError("--workers and --ray exclude each other: Ray places the tasks itself (give --ray-gpus)")
    device = getattr(args, "device", None) or "cpu"
    if address is not None:
        from .ray_engine import RayEngine, import_ray

        import_ray()
        gpus = args.ray_gpus if args.ray_gpus is not None else (1.0 if device.startswith("cuda") else 0.0)
        if address == "local":  # this machine: each task on this process's threads, as a one-process run
            import torch

            return RayEngine(recipe, None, num_gpus=gpus, threads=torch.get_num_threads())
        return RayEngine(recipe, address, num_gpus=gpus)
    if workers == 1:
        return None
    from .local_pool import LocalPool

    devices = [f"cuda:{i}" for i in range(workers)] if device == "cuda" else [device] * workers
    return LocalPool(recipe, workers, devices=devices)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1,
                   help="train the concepts in N worker processes on this machine (with --device cuda: one per GPU, "
                        "cuda:0..N-1)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="train on a Ray cluster: 'auto' (a running cluster, e.g. after `ray start --head`), "
                        "HOST:PORT, or 'local' (start one on this machine); needs pip install 'mass-concept-erasure[ray]'")
    p.add_argument("--ray-gpus", type=float, default=None,
                   help="GPUs per Ray task (fractions share a GPU); default 1 with --device cuda, else 0")


def _losses(erasure: Any) -> dict[str, list[float]]:
    raw = (getattr(erasure, "metadata", None) or {}).get("losses", {}) or {}
    return {str(k): [float(x) for x in v] for k, v in raw.items()}


def _provenance(erasure: Any, settings_metadata: dict[str, Any]) -> dict[str, str]:
    from .erasure import concept_dicts

    return {
        "mace.concepts": json.dumps(concept_dicts(list(erasure.concepts))),
        "mace.base_fingerprint": str(erasure.base_fingerprint),
        "mace.settings": json.dumps(settings_metadata, default=str),
    }


def _write_outputs(stage: Path, *, checkpoint: Path | None, host: Any, erasure: Any, concepts: list,
                   retained: list[str], settings: Any, report_images: int, quiet: bool,
                   compact: float | None = None) -> dict[str, Any]:
    """Sanitized checkpoint (when ``checkpoint``), erasure file, concepts.txt and report/ into ``stage``."""
    from .checkpoint import save_sanitized_checkpoint
    from .concepts import format_concept_list
    from .erasure import save_erasure
    from .report import write_report
    from .single_file import source_dtype, write_checkpoint

    original = host.cross_attention_weights()
    settings_metadata = settings.as_metadata()  # what run_erasure stored as erasure.metadata["settings"]
    written: dict[str, Any] = {}
    label = getattr(erasure, "label_emb_diff", None)  # SDXL pooled channel
    erased_host = host.with_weights(erasure.weights)
    if label is not None:
        erased_host = erased_host.with_label_emb(host.label_emb_weight().float() + label)
    if checkpoint is not None:
        meta = _provenance(erasure, settings_metadata)
        if checkpoint.is_dir():
            target = stage / f"{checkpoint.name}_mace.safetensors"
            target.unlink(missing_ok=True)
            write_checkpoint(host.family, host.unet, host.text_encoders, host.vae, target,
                             cross_attention_weights=erasure.weights, metadata=meta, store_configs=True,
                             dtype=source_dtype(checkpoint),
                             label_emb=None if label is None else host.label_emb_weight().float() + label)
        else:
            target = stage / f"{checkpoint.stem}_mace.safetensors"
            target.unlink(missing_ok=True)  # left by an interrupted attempt (inside DIR.partial only)
            save_sanitized_checkpoint(checkpoint, erasure.weights, target, metadata=meta, label_emb_diff=label)
        written["checkpoint"] = target.name
    erasure_path = stage / "erasure.safetensors"
    erasure_path.unlink(missing_ok=True)
    save_erasure(erasure, original, erasure_path, compact=compact)
    written["erasure"] = erasure_path.name
    (stage / "concepts.txt").write_text(format_concept_list(concepts) + "\n", encoding="utf-8")
    report_dir = stage / "report"
    if report_dir.exists():
        shutil.rmtree(report_dir)  # same: a report left by an interrupted attempt of this run
    if not quiet:
        _say("writing the report (before/after images) ...")
    write_report(report_dir, erasure=erasure, original_host=host, erased_host=erased_host,
                 concepts=concepts, retained=retained, losses=_losses(erasure), seed=settings.seed,
                 steps=settings.sample_steps, cfg=settings.cfg, image_size=settings.image_size,
                 max_image_concepts=report_images, max_retained_images=min(4, report_images),
                 settings=settings_metadata)
    written["report"] = "report/report.html"
    return written


def _finish(stage: Path, out: Path, cache: Path, keep_cache: bool) -> None:
    if not keep_cache and cache.is_relative_to(stage) and cache.exists():
        shutil.rmtree(cache)
    if out.exists():
        raise MaceError(f"--out {str(out)!r} appeared while running; results are left in {str(stage)!r}")
    os.rename(stage, out)


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    """Check every cheap input first (``run_inputs``: nothing loaded or written on a bad one), then load
    the model and erase."""
    from .concept_task import HostRecipe
    from .single_file import load_host

    inputs = check_run_inputs(args)
    out, checkpoint, concepts = inputs.out, inputs.checkpoint, inputs.concepts
    stage = Path(str(out) + ".partial")
    cache = Path(args.cache) if args.cache else stage / "cache"
    t0 = time.time()
    if not args.quiet:
        _say(f"inputs checked ({len(concepts)} concepts); loading {checkpoint} ...")
    dtype_name = str(inputs.dtype).removeprefix("torch.")
    engine = _engine(args, HostRecipe("checkpoint", str(Path(checkpoint).resolve()), args.prediction_type,
                                      dtype=dtype_name))
    host = load_host(checkpoint, device=args.device, prediction=args.prediction_type, dtype=inputs.dtype)
    if stage.exists() and not args.quiet:
        _say(f"resuming: reusing finished work in {stage}")
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "command.json").write_text(json.dumps(vars(args), default=str, indent=1), encoding="utf-8")
    if not args.quiet:
        _say(f"erasing {len(concepts)} concepts (cache: {cache})")
    erasure = _run_pipeline(host, concepts, inputs.retained, inputs.settings, preserve=inputs.preserve,
                            cache=cache, quiet=args.quiet, engine=engine)
    written = _write_outputs(stage, checkpoint=checkpoint, host=host, erasure=erasure, concepts=concepts,
                             retained=inputs.retained, settings=inputs.settings, report_images=args.report_images,
                             quiet=args.quiet, compact=args.compact_erasure)
    _finish(stage, out, cache, args.keep_cache)
    print(f"done in {time.time() - t0:.0f} s: {out / written['checkpoint']}, {out / written['erasure']}, "
          f"report {out / written['report']}")
    return EXIT_OK


def demo_concepts() -> list:
    """One person, one object, one style."""
    from .concepts import Concept

    return [Concept("Taylor Swift", "a person", "object"), Concept("airplane", "sky", "object"),
            Concept("Van Gogh", "art", "style")]


def demo_settings(seed: int = 0) -> Any:
    """Small enough for a CPU in well under two minutes on the tiny model."""
    from .pipeline import ErasureSettings
    from .train import TrainConfig

    return ErasureSettings(cfr_preserve=0.5, fusion_preserve=5.0, ridge=0.1, n_images=2, sample_steps=4,
                           image_size=64, seed=seed, train=TrainConfig(steps=8, lr=1e-4, seed=seed))


def world_demo_settings(seed: int = 0) -> Any:
    """The world demo's settings: strong enough to erase on the trained world model in under two minutes."""
    from .pipeline import ErasureSettings
    from .train import TrainConfig
    from .world.evaluate import SAMPLE_CFG, SAMPLE_STEPS

    # Training images are drawn with the world's own sampler (``world.evaluate``).
    # CFR: retained weight 5 (0.5 let "red circle"'s erasure take "blue circle", 42 % -> 8 %).
    # Fusion (benchmarks/README.md, "Where the damage comes from"): E_i = the phrase's own tokens, weights
    # 500 / 5000 and a relative ridge 1e-2. With all 77 positions, weight 5 and ε 1e-6 the fused to_k/to_v
    # moved 21x their norm and every neighbour fell; a lone LoRA already hits the neighbours, so the
    # fusion's preservation must hold them. LoRA lr 2e-3 x 100 steps: at 1e-3 "red star" stayed at 100 %.
    return ErasureSettings(cfr_preserve=0.5, cfr_retained=5.0, fusion_preserve=500.0, fusion_retained=5000.0,
                           ridge=0.1, fusion_relative_ridge=1e-2, fusion_tokens="phrase",
                           n_images=4, sample_steps=SAMPLE_STEPS, cfg=SAMPLE_CFG, image_size=64, seed=seed,
                           train=TrainConfig(steps=100, lr=2e-3, seed=seed))


def _demo_setup(args: argparse.Namespace) -> tuple[Any, list, list[str], Any, list[str]]:
    """(host, concepts, retained prompts, settings, preservation prompts) of the chosen demo model."""
    from .hosts.diffusers import DiffusersHost

    if args.model == "tiny":
        from .preservation import default_corpus

        if not args.quiet:
            _say("building the tiny SD1-shaped model (random weights: images are noise-like; the mechanism is real)")
        preserve = default_corpus()[: args.preserve_prompts]
        return (DiffusersHost.from_tiny(args.seed), demo_concepts(), ["a photo of a dog", "a painting of a river"],
                demo_settings(args.seed), preserve)
    from .world.demo import DEMO_ERASED, DEMO_RETAINED, preservation_prompts

    if not args.quiet:
        _say("loading the world model (a small SD1-layout model trained on a toy world of shapes, colours, "
             "patterns and named characters)")
    retained = [p for c in DEMO_RETAINED for p in c.prompts()[:2]]
    preserve = preservation_prompts(list(DEMO_ERASED), n=args.preserve_prompts, seed=args.seed)
    return (DiffusersHost.from_world(), [c.concept() for c in DEMO_ERASED], retained,
            world_demo_settings(args.seed), preserve)


def _world_verdict(report_dir: Path, host: Any, erasure: Any, seed: int) -> list[dict[str, Any]]:
    """Classifier verdict images and numbers, added to the report page."""
    from .world.classifier import load_classifier
    from .world.demo import DEMO_ERASED, DEMO_RETAINED
    from .world.verdict import verdict_html, write_verdict

    numbers = write_verdict(report_dir, host, host.with_weights(erasure.weights), load_classifier(),
                            DEMO_ERASED, DEMO_RETAINED, n=6, seed=seed)
    page = report_dir / "report.html"
    text = page.read_text(encoding="utf-8")
    fragment = verdict_html(numbers["items"], numbers["samples_per_concept"])
    page.write_text(text.replace("<h2>Erased concepts</h2>", fragment + "<h2>Erased concepts</h2>", 1),
                    encoding="utf-8")
    return numbers["items"]


def cmd_demo(args: argparse.Namespace) -> int:
    from .concept_task import HostRecipe
    from .io import unique_path

    out = Path(args.out) if args.out else unique_path(Path("mace-demo"))
    check_new_folder(out)
    if args.preserve_prompts < 1:
        raise MaceError(f"--preserve-prompts {args.preserve_prompts}: give at least 1")
    t0 = time.time()
    engine = _engine(args, HostRecipe(args.model, args.seed))
    host, concepts, retained, settings, preserve = _demo_setup(args)
    stage = Path(str(out) + ".partial")
    stage.mkdir(parents=True, exist_ok=True)
    cache = stage / "cache"
    erasure = _run_pipeline(host, concepts, retained, settings, preserve=preserve, cache=cache, quiet=args.quiet,
                            engine=engine)
    _write_outputs(stage, checkpoint=None, host=host, erasure=erasure, concepts=concepts, retained=retained,
                   settings=settings, report_images=3, quiet=args.quiet)
    if args.model == "world":
        for item in _world_verdict(stage / "report", host, erasure, args.seed):
            print(f"  {item['role']:8s} {item['kind']:8s} {item['phrase']:16s} recognised "
                  f"{item['before']:.0%} -> {item['after']:.0%}")
    _finish(stage, out, cache, keep_cache=False)
    print(f"demo done in {time.time() - t0:.0f} s; report: {out / 'report' / 'report.html'}")
    return EXIT_OK


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mace-erase", description="MACE mass concept erasure for SD1.x, headless.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="erase concepts from a checkpoint")
    r.add_argument("--checkpoint", required=True,
                   help="SD1.x, SD2.x or SDXL .safetensors single file or diffusers folder (read only)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--concepts", help="text file: one 'phrase -> anchor' (or 'phrase') per line")
    src.add_argument("--preset", help="a bundled preset (e.g. celebrities_100, artists_100, explicit, objects_cifar10)")
    r.add_argument("--out", required=True, help="new folder for the results (must not exist)")
    r.add_argument("--kind", choices=("object", "style"), default="object", help="kind of the --concepts lines without ':: kind' (e.g. 'Van Gogh -> art :: style')")
    r.add_argument("--anchor", help="default anchor for lines without '->' (object: 'a person', style: 'art')")
    r.add_argument("--preserve", help="text file of preservation prompts (default: the built-in corpus)")
    r.add_argument("--retained", help="text file of prompts to keep (second preservation group)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, help="LoRA training steps per concept (default: preset / 50)")
    r.add_argument("--lr", type=float, help="LoRA learning rate (default: preset / 1e-4)")
    r.add_argument("--concepts-per-batch", type=int, metavar="K",
                   help="concepts whose LoRAs train together in one forward pass (default 8). Lower it to fit a "
                        "smaller GPU (about 2.2 GiB of activations per concept at SD1.5 512 px) or to spread a "
                        "short list over more --workers: each batch is one task")
    r.add_argument("--images", type=int, help="training images per concept (default 8)")
    r.add_argument("--size", type=int, help="image size in pixels (default 512)")
    r.add_argument("--sample-steps", type=int, help="sampler steps for generated images (default 30)")
    r.add_argument("--fast", action="store_true",
                   help="closed form only (CFR): seconds instead of minutes, no LoRAs; weaker erasure "
                        "(see the README's 'Does it erase?')")
    r.add_argument("--harden", type=int, default=0, metavar="N",
                   help="after CFR, N rounds of concept inversion on the erased model whose recovered tokens are "
                        "added to CFR's pairs (RECE-style hardening; 0: off). Costs N x (inversion of every "
                        "concept); see the README's 'Is it really gone?'")
    r.add_argument("--pooled-channel", action="store_true",
                   help="SDXL: also edit label_emb's pooled-text columns in closed form, so the concept does not "
                        "reach the UNet through bigG's pooled embedding (off by default; see the README)")
    r.add_argument("--compact-erasure", type=float, metavar="TOL", default=None,
                   help="write the erasure file as float16 truncated-SVD factors within relative error TOL "
                        "(e.g. 0.01; SDXL: the dense file is ~1.4 GB); default: dense differences")
    r.add_argument("--report-images", type=int, default=8, help="concepts shown with before/after images")
    r.add_argument("--max-concepts", type=int, default=None, help="refuse lists longer than this")
    r.add_argument("--cache", help="cache folder (default: OUT.partial/cache, removed on success)")
    r.add_argument("--keep-cache", action="store_true", help="keep the default cache after success")
    r.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    r.add_argument("--dtype", default="auto", metavar="{auto,float32,float16,bfloat16}",
                   help="precision of the UNet and text encoder weights (default auto: float16 on CUDA, float32 "
                        "on CPU); LoRAs, optimiser and closed forms stay float32/float64, the VAE float32, and the "
                        "sanitized checkpoint keeps the source's dtype")
    r.add_argument("--quiet", action="store_true")
    add_prediction_arg(r)
    _add_engine_args(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="erase an object, a style and a named character from the shipped world model "
                                    "(CPU, < 2 min)")
    d.add_argument("--out", help="new folder (default ./mace-demo, or the next free mace-demo_NNNNN)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preserve-prompts", type=int, default=DEMO_PRESERVE_PROMPTS,
                   help=f"N preservation prompts: world captions (world) or the built-in corpus (tiny); "
                        f"default {DEMO_PRESERVE_PROMPTS}")
    d.add_argument("--model", choices=("world", "tiny"), default="world",
                   help="world: the trained toy-world model (default); tiny: random weights built in code")
    d.add_argument("--quiet", action="store_true")
    _add_engine_args(d)
    d.set_defaults(func=cmd_demo)

    from .evaluation import add_eval_parser
    from .fuse_command import add_fuse_parser
    from .probe_cli import add_probe_parser

    add_eval_parser(sub)
    add_fuse_parser(sub)
    add_probe_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mace-erase``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        return int(args.func(args))
    except MaceError as e:
        print(f"mace-erase: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        where = Path(str(args.out) + ".partial") if getattr(args, "out", None) else None
        msg = "mace-erase: interrupted"
        if where is not None and where.exists():
            msg += f"; finished work is kept in {where}: run the same command again to resume"
        print(msg, file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["build_parser", "demo_concepts", "demo_settings", "main", "world_demo_settings"]
