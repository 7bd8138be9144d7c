"""Compact vs dense erasure files on the tiny SDXL model, and the arithmetic at full SDXL size.

Erasure: CFR (``refine_weights``) on the tiny SDXL's 140 ``to_k``/``to_v`` (d_out 16–64, 2048-d
context) for 3 people → "a person", 64 preservation prompts of the default corpus. Written dense
(float32 ``.diff``) and compact (``--tol`` list: float16 truncated-SVD factors, ``mace_ops.compact``),
read back with ``load_erasure``; errors against the dense file's ΔW: the largest relative Frobenius
error over the matrices and the largest absolute entry error relative to max |ΔW|.
Full SDXL (arithmetic): 20 matrices (640, 2048) + 120 (1280, 2048); rank r costs
r · Σ (d_out + 2048) · 2 bytes = r · 0.906 MB, dense float16 166,400 · 2048 · 2 = 681.6 MB.

    .venv/bin/python benchmarks/bench_compact_erasure.py --tol 0.1,0.01,0.001
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mace_ops.concepts import Concept  # noqa: E402
from mace_ops.erasure import load_erasure, save_erasure  # noqa: E402
from mace_ops.hosts.diffusers import DiffusersHost  # noqa: E402
from mace_ops.pipeline import Erasure, preservation_statistics, refine_weights  # noqa: E402
from mace_ops.preservation import default_corpus  # noqa: E402

CONCEPTS = [Concept("Taylor Swift", "a person"), Concept("Brad Pitt", "a person"), Concept("Oprah Winfrey", "a person")]
SDXL_ROWS = {640: 20, 1280: 120}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tol", default="0.1,0.01,0.001")
    args = ap.parse_args()
    torch.set_num_threads(2)
    host = DiffusersHost.from_tiny(0, family="sdxl")
    stats = preservation_statistics(host, default_corpus()[:64])
    original = host.cross_attention_weights()
    weights = refine_weights(host, CONCEPTS, stats.groups(1.0))
    erasure = Erasure(weights=weights, base_fingerprint=host.model_fingerprint(), concepts=CONCEPTS)
    folder = Path(tempfile.mkdtemp())
    save_erasure(erasure, original, folder / "dense.safetensors")
    _, dense = load_erasure(folder / "dense.safetensors")
    size = (folder / "dense.safetensors").stat().st_size
    print(f"tiny SDXL, {len(dense)} matrices, Σ d_out = {sum(d.shape[0] for d in dense.values())}; "
          f"dense float32 file {size / 1e6:.2f} MB")
    print("| tol | file (MB) | factored / dense fp16 matrices | Σ rank (factored) | max rel. Frobenius error | max |entry error| / max |ΔW| |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tol in [float(t) for t in args.tol.split(",")]:
        path = folder / f"compact_{tol:g}.safetensors"
        save_erasure(erasure, original, path, compact=tol)
        loaded, got = load_erasure(path)
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            ranks = json.loads(f.metadata()["mace.compact"])["ranks"]
        rel = max(float(torch.linalg.matrix_norm(got[n] - d) / torch.linalg.matrix_norm(d)) for n, d in dense.items())
        ent = max(float((got[n] - d).abs().max() / d.abs().max()) for n, d in dense.items())
        factored = sum(1 for r in ranks.values() if r)
        print(f"| {tol:g} | {path.stat().st_size / 1e6:.2f} | {factored} / {len(ranks) - factored} | "
              f"{sum(ranks.values())} | {rel:.2e} | {ent:.2e} |")
    per_rank = sum(n * (rows + 2048) * 2 for rows, n in SDXL_ROWS.items()) / 1e6
    dense16 = sum(n * rows * 2048 * 2 for rows, n in SDXL_ROWS.items()) / 1e6
    print(f"full SDXL: dense float16 {dense16:.1f} MB, float32 {2 * dense16:.1f} MB; compact {per_rank:.3f} MB per unit "
          "of rank: " + ", ".join(f"r={r}: {r * per_rank:.0f} MB" for r in (32, 64, 128, 220, 256, 512)))


if __name__ == "__main__":
    main()
