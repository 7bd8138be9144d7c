"""Every cheap input of ``mace-erase run``, checked before a (multi-GB) model is loaded.

``check_run_inputs`` reads and validates, in this order and without writing anything: ``--out`` (must
not exist, its folder writable), ``--checkpoint`` (headers only: a complete SD1.x ``.safetensors`` or a
diffusers folder), the numbers (``--size``, ``--images``, ``--steps`` ...), ``--device``, ``--cache``,
``--dtype``, the concept list (parsed and tokenized with the shipped SD1.x tokenizer: every bad line by number, too
long concepts refused by the 77-token limit) or ``--preset``, the weights, and the prompt files. All
problems are reported together, each naming its input and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MaceError

DEFAULT_ANCHORS = {"object": "a person", "style": "art"}
WEIGHT_FIELDS = ("cfr_preserve", "cfr_retained", "fusion_preserve", "fusion_retained", "ridge", "relative_ridge")


@dataclass(frozen=True)
class RunInputs:
    """What ``cmd_run`` needs once the inputs are known to be good."""

    out: Path
    checkpoint: Path
    concepts: list
    retained: list[str]
    preserve: list[str] | None
    settings: Any  # pipeline.ErasureSettings
    dtype: Any = None  # torch.dtype of the UNet and text encoders (``check_dtype``)


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file's content; ``what`` names the input in errors."""
    p = Path(path)
    if not p.is_file():
        raise MaceError(f"{what} {path!r} does not exist; give a text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MaceError(f"{what} {path!r} is not UTF-8 text ({e}); save it as UTF-8") from e


def check_new_folder(out: Path, what: str = "--out") -> None:
    """``out`` must not exist and its parent must be an existing, writable folder."""
    if out.exists():
        raise MaceError(f"{what} {str(out)!r} exists; MACE never overwrites: choose a new folder")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise MaceError(f"{what} {str(out)!r}: folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise MaceError(f"{what} {str(out)!r}: folder {str(parent)!r} is not writable; choose another place")


def check_numbers(args: argparse.Namespace) -> None:
    """The numeric options of ``run`` (``None`` = the preset's / the default value)."""
    if args.size is not None and (args.size % 8 or args.size <= 0):
        raise MaceError(f"--size {args.size}: give a positive multiple of 8 (e.g. 512)")
    for flag, value, least in (("--images", args.images, 1), ("--sample-steps", args.sample_steps, 1),
                               ("--steps", args.steps, 1), ("--max-concepts", args.max_concepts, 1),
                               ("--report-images", args.report_images, 0),
                               ("--harden", getattr(args, "harden", None), 0),
                               ("--concepts-per-batch", getattr(args, "concepts_per_batch", None), 1)):
        if value is not None and value < least:
            raise MaceError(f"{flag} {value}: give a whole number >= {least}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise MaceError(f"--lr {args.lr}: give a positive learning rate (e.g. 1e-4)")
    compact = getattr(args, "compact_erasure", None)
    if compact is not None and not (math.isfinite(compact) and 0 <= compact < 1):
        raise MaceError(f"--compact-erasure {compact}: give a relative error in [0, 1) (e.g. 0.01)")


def check_device(device: str | None) -> None:
    """``--device`` must name a torch device that exists here."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as e:
        raise MaceError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise MaceError(f"--device {device!r}: no CUDA GPU is available here; use --device cpu")


DTYPES = ("auto", "float32", "float16", "bfloat16")


def cpu_runs(dtype: Any) -> bool:
    """Whether this torch runs the UNet's and text encoder's operations in ``dtype`` on the CPU."""
    import torch

    try:
        x = torch.ones(1, 4, 8, 8, dtype=dtype)
        torch.nn.functional.conv2d(x, torch.ones(4, 4, 3, 3, dtype=dtype), padding=1)
        torch.nn.functional.group_norm(x, 2)
        torch.nn.functional.layer_norm(x, (8,))
        torch.softmax(x @ x.transpose(-1, -2), dim=-1)
        return True
    except RuntimeError:
        return False


def check_dtype(name: str | None, device: str | None) -> Any:
    """``--dtype`` as a torch dtype: auto = float16 on CUDA, float32 elsewhere; refused where the device
    cannot compute in it (a CPU torch without fp16/bf16 kernels, a GPU without bf16)."""
    import torch

    name = name or "auto"
    if name not in DTYPES:
        raise MaceError(f"--dtype {name!r}: use one of {', '.join(DTYPES)} (auto: float16 on CUDA, float32 on CPU)")
    kind = torch.device(device or "cpu").type
    if name == "auto":
        return torch.float16 if kind == "cuda" else torch.float32
    dtype = getattr(torch, name)
    if kind == "cpu" and dtype != torch.float32 and not cpu_runs(dtype):
        raise MaceError(f"--dtype {name}: this torch ({torch.__version__}) cannot run a UNet in {name} on the CPU; "
                        "use --dtype float32 (or a GPU: --device cuda)")
    if kind == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise MaceError("--dtype bfloat16: this GPU has no bfloat16 support; use --dtype float16")
    return dtype


def check_cache(cache: str | None) -> None:
    """``--cache`` is an existing writable folder, or can be created (its nearest existing folder is writable)."""
    if cache is None:
        return
    p = Path(cache).resolve()
    if p.exists() and not p.is_dir():
        raise MaceError(f"--cache {cache!r} is a file; give a folder (it is created when missing)")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise MaceError(f"--cache {cache!r}: folder {str(existing)!r} is not writable; choose another place")


def check_weights(settings: Any, source: str) -> None:
    """Preservation weights and ridges: finite numbers >= 0."""
    for name in WEIGHT_FIELDS:
        value = float(getattr(settings, name))
        if not (math.isfinite(value) and value >= 0):
            raise MaceError(f"{source}: weight {name}={value} must be a finite number >= 0; fix it")


def read_concepts(args: argparse.Namespace, token_ids: Any) -> tuple[list, list[str], Any]:
    """(concepts, retained prompts, the preset's or default ErasureSettings) from --concepts/--preset and
    --retained; a concept list is parsed with ``token_ids`` checking the 77-token limit."""
    from .concepts import load_preset, parse_concept_list
    from .pipeline import ErasureSettings
    from .preservation import read_prompt_file, retained_prompts

    retained: list[str] = []
    if args.preset:
        preset = load_preset(args.preset)
        concepts = list(preset.concepts)
        retained = retained_prompts(preset.retained, preset.kind) if preset.retained else []
        settings = ErasureSettings.from_preset(preset)
    else:
        anchor = args.anchor or DEFAULT_ANCHORS[args.kind]
        concepts = parse_concept_list(read_text(args.concepts, "concept list"), default_anchor=anchor,
                                      kind=args.kind, token_ids=token_ids, max_concepts=args.max_concepts)
        settings = ErasureSettings()
    check_weights(settings, f"preset {args.preset!r}" if args.preset else "the default settings")
    if args.retained:
        try:
            retained = read_prompt_file(args.retained)
        except MaceError as e:
            raise MaceError(f"--retained: {e}") from e
    return concepts, retained, settings


def add_prediction_arg(p: argparse.ArgumentParser) -> None:
    """``--prediction-type`` of the commands that load a checkpoint (``single_file.load_host``)."""
    p.add_argument("--prediction-type", choices=("auto", "epsilon", "v_prediction"), default="auto",
                   help="what the UNet predicts; auto: epsilon for SD1.x/SDXL, for SD2.x ComfyUI's rule "
                        "(v for the 768-v models, epsilon for 512-base)")


def with_overrides(args: argparse.Namespace, settings: Any) -> Any:
    """``settings`` with --seed, --steps, --lr, --concepts-per-batch, --images, --size, --sample-steps, --fast,
    --harden, --pooled-channel applied
    (``check_numbers`` first)."""
    train = dataclasses.replace(settings.train, seed=args.seed)
    if args.steps is not None:
        train = dataclasses.replace(train, steps=args.steps)
    if args.lr is not None:
        train = dataclasses.replace(train, lr=args.lr)
    if getattr(args, "concepts_per_batch", None) is not None:
        train = dataclasses.replace(train, concepts_per_batch=args.concepts_per_batch)
    overrides: dict[str, Any] = {"seed": args.seed, "train": train.check()}
    if getattr(args, "fast", False):
        overrides["closed_form_only"] = True
    if getattr(args, "harden", None):
        overrides["harden_rounds"] = args.harden
    if getattr(args, "pooled_channel", False):
        overrides["pooled_channel"] = True
    for field, value in (("n_images", args.images), ("image_size", args.size), ("sample_steps", args.sample_steps)):
        if value is not None:
            overrides[field] = value
    return dataclasses.replace(settings, **overrides)


def concepts_and_settings(args: argparse.Namespace, token_ids: Any) -> tuple[list, list[str], Any]:
    """(concepts, retained prompts, ErasureSettings with the overrides): ``read_concepts`` + ``with_overrides``."""
    concepts, retained, settings = read_concepts(args, token_ids)
    return concepts, retained, with_overrides(args, settings)


def _collect(errors: list[str], flag: str, check: Callable[[], Any]) -> Any:
    """Run ``check``; on ``MaceError`` note its message (``flag`` in front unless it already names an
    option) in ``errors`` and return None."""
    try:
        return check()
    except MaceError as e:
        msg = str(e)
        errors.append(msg if msg.startswith("--") else f"{flag}: {msg}")
        return None


def check_run_inputs(args: argparse.Namespace, token_ids: Any = None) -> RunInputs:
    """Validate every cheap input of ``run`` (see the module doc) and return them read; ``token_ids``
    defaults to the shipped SD1.x tokenizer. Raises one ``MaceError`` listing every problem found."""
    from .preservation import read_prompt_file
    from .single_file import check_source
    from .tokens import sd1_token_ids

    errors: list[str] = []
    _collect(errors, "--out", lambda: check_new_folder(Path(args.out)))
    checkpoint = _collect(errors, "--checkpoint", lambda: check_source(args.checkpoint))
    before = len(errors)
    _collect(errors, "options", lambda: check_numbers(args))
    numbers_ok = len(errors) == before
    device_ok = _collect(errors, "--device", lambda: check_device(args.device) or True)
    dtype = _collect(errors, "--dtype", lambda: check_dtype(getattr(args, "dtype", None),
                                                            args.device if device_ok else None))
    _collect(errors, "--cache", lambda: check_cache(args.cache))
    preserve = _collect(errors, "--preserve", lambda: read_prompt_file(args.preserve) if args.preserve else None)
    chosen = _collect(errors, "--preset" if args.preset else "--concepts",
                      lambda: read_concepts(args, token_ids or sd1_token_ids))
    settings = None
    if chosen is not None and numbers_ok:  # bad numbers are named once, by check_numbers
        settings = _collect(errors, "--preset" if args.preset else "options", lambda: with_overrides(args, chosen[2]))
    if errors:
        raise MaceError("\n".join(errors))
    concepts, retained, _ = chosen
    return RunInputs(out=Path(args.out), checkpoint=checkpoint, concepts=concepts, retained=retained,
                     preserve=preserve, settings=settings, dtype=dtype)
