"""``mace-erase fuse``: fuse LoRAs trained elsewhere, one per concept, into a checkpoint's cross-attention
with MACE's closed form (``mace_ops.external_lora``), and write the erasure file.

    mace-erase fuse --checkpoint MODEL --concepts FILE --lora A.safetensors --lora B.safetensors \\
                    --out erasure.safetensors [--preserve FILE] [--preserve-weight W] [--ridge L]

The i-th ``--lora`` belongs to the i-th concept of the list. Every cheap input is checked before the
model is loaded; a LoRA with keys on modules other than the cross-attention to_k/to_v is refused with
their list unless ``--allow-other-modules`` (then the list is printed). Nothing is overwritten.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .errors import MaceError


def _check_inputs(args: argparse.Namespace) -> tuple[Path, list]:
    """(checkpoint, concepts), or one MaceError listing every bad cheap input."""
    from .concepts import parse_concept_list
    from .io import check_safetensors_file
    from .run_inputs import DEFAULT_ANCHORS, _collect, read_text
    from .single_file import check_source
    from .tokens import sd1_token_ids

    errors: list[str] = []
    out = Path(args.out)

    def check_out() -> None:
        if out.exists():
            raise MaceError(f"{str(out)!r} exists; MACE never overwrites: choose a new file name")
        if not out.resolve().parent.is_dir():
            raise MaceError(f"{str(out)!r}: its folder does not exist; create it first")

    _collect(errors, "--out", check_out)
    checkpoint = _collect(errors, "--checkpoint", lambda: check_source(args.checkpoint))
    concepts = _collect(errors, "--concepts", lambda: parse_concept_list(
        read_text(args.concepts, "concept list"), default_anchor=args.anchor or DEFAULT_ANCHORS[args.kind],
        kind=args.kind, token_ids=sd1_token_ids))
    for path in args.lora:
        _collect(errors, "--lora", lambda p=path: check_safetensors_file(p, "LoRA file"))
    if concepts is not None and len(concepts) != len(args.lora):
        errors.append(f"--lora: {len(args.lora)} file(s) for {len(concepts)} concept(s); give one --lora per "
                      "concept, in the order of the concept list")
    for flag, value in (("--preserve-weight", args.preserve_weight), ("--ridge", args.ridge)):
        if not (math.isfinite(value) and value >= 0):
            errors.append(f"{flag} {value}: give a finite number >= 0")
    if errors:
        raise MaceError("\n".join(errors))
    return checkpoint, concepts


def cmd_fuse(args: argparse.Namespace) -> int:
    from .erasure import Erasure, save_erasure
    from .external_lora import external_fusion_metadata, fuse_external_loras, read_external_lora
    from .pipeline import preservation_statistics
    from .preservation import read_prompt_file
    from .single_file import load_host

    checkpoint, concepts = _check_inputs(args)
    preserve = read_prompt_file(args.preserve) if args.preserve else None
    host = load_host(checkpoint, device=args.device)
    original = host.cross_attention_weights()
    shapes = {k: tuple(w.shape) for k, w in original.items()}
    loras = [read_external_lora(p, shapes, allow_other_modules=args.allow_other_modules) for p in args.lora]
    for c, lora in zip(concepts, loras, strict=True):
        note = f"; ignored {len(lora.ignored)} other module(s): {lora.ignored}" if lora.ignored else ""
        _say(args, f"{c.phrase!r}: {Path(lora.path).name} ({lora.style} keys), {len(lora.used)} to_k/to_v{note}")
    stats = preservation_statistics(host, preserve)
    fused = fuse_external_loras(host, concepts, loras, stats.groups(args.preserve_weight), args.ridge)
    erasure = Erasure.build(fused, base_fingerprint=host.model_fingerprint(), concepts=concepts,
                            source="fuse_external_loras",
                            **external_fusion_metadata(loras, concepts, preserve_weight=args.preserve_weight,
                                                       ridge=args.ridge))
    written = save_erasure(erasure, original, args.out)
    print(f"wrote {written}: {len(concepts)} LoRA(s) fused into {len(fused)} cross-attention matrices")
    return 0


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


def add_fuse_parser(sub: Any) -> None:
    """The ``fuse`` subcommand on ``mace-erase``'s subparsers."""
    from .pipeline import ErasureSettings

    default = ErasureSettings()
    f = sub.add_parser("fuse", help="fuse LoRAs trained elsewhere (kohya, diffusers, peft), one per concept, "
                                    "with MACE's closed form")
    f.add_argument("--checkpoint", required=True, help="SD1.x .safetensors single file or diffusers folder (read only)")
    f.add_argument("--concepts", required=True, help="text file: one 'phrase -> anchor [:: kind]' per line")
    f.add_argument("--lora", action="append", required=True,
                   help="LoRA .safetensors of one concept (repeat: the i-th for the i-th concept)")
    f.add_argument("--out", required=True, help="the erasure file to write (must not exist)")
    f.add_argument("--kind", choices=("object", "style"), default="object", help="kind of lines without ':: kind'")
    f.add_argument("--anchor", help="default anchor for lines without '->' (object: 'a person', style: 'art')")
    f.add_argument("--preserve", help="text file of preservation prompts (default: the built-in corpus)")
    f.add_argument("--preserve-weight", type=float, default=default.fusion_preserve,
                   help=f"scale-free weight of the preservation prompts (default {default.fusion_preserve:g})")
    f.add_argument("--ridge", type=float, default=default.ridge, help="ridge λ·||W - W0||² (default 0)")
    f.add_argument("--allow-other-modules", action="store_true",
                   help="fuse a LoRA's to_k/to_v even when it also adapts other modules (they are listed, not fused)")
    f.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_fuse)


__all__ = ["add_fuse_parser", "cmd_fuse"]
