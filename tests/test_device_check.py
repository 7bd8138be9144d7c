"""``benchmarks/device_check.py --dry-run`` keeps working (the GPU run itself needs a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "dc"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "device_check.json").read_text())
    assert results["errors"] == {} and results["environment"]["dry_run"] is True
    row = results["dtypes"]["fp32"]
    train = row["training"]
    assert train["speedup"] > 0 and train["sequential"]["losses_finite"] and train["batched"]["losses_finite"]
    assert row["generation"]["images_per_s"] > 0 and row["generation"]["latents_finite"]
    erasure = row["erasure"]
    assert {"preservation", "refine", "data", "train", "fuse"} <= set(erasure["stage_seconds"])
    assert abs(sum(erasure["stage_seconds"].values()) - erasure["total_seconds"]) < 1e-6 * erasure["total_seconds"] + 1e-3
    assert erasure["weights_finite"]
    table = (out / "device_check.md").read_text()
    assert "| fp32 | 2 | 2 | 8² |" in table and "## Whole run" in table


def test_device_check_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")], check=True)
