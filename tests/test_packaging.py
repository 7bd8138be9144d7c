"""What the ComfyUI registry and a user's install read from the repository: the distribution's name and
metadata, the icon, and that the pack never installs packages at run time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()  # the registry's rule for node ids
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["scripts"] == {"mace-erase": "mace_ops.cli:main"}
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert "Operating System :: OS Independent" in project["classifiers"]
    assert "Environment :: GPU :: NVIDIA CUDA" in project["classifiers"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "comfyui" not in comfy["DisplayName"].lower()
    assert comfy["Icon"].endswith("/docs/icon.png") and comfy["requires-comfyui"]


def test_icon_is_a_small_square_png_and_up_to_date():
    path = ROOT / "docs" / "icon.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width == img.height <= 400
    assert path.stat().st_size < 20_000
    check = subprocess.run([sys.executable, str(ROOT / "docs" / "make_icon.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_no_package_is_installed_at_run_time():
    """The registry's rule: dependencies come from pyproject.toml, never from pip calls in the pack."""
    sources = [ROOT / "__init__.py", *sorted((ROOT / "nodes").rglob("*.py")), *sorted((ROOT / "mace_ops").rglob("*.py"))]
    # a pip call: its module or API, or "pip"/"install" as arguments (prose such as "a plain pip install" is fine)
    pattern = re.compile(r"ensurepip|\bpip\.main\b|\bpip\._internal\b|[\"']pip[\"']\s*,\s*[\"']install[\"']|"
                         r"[\"']-m[\"']\s*,\s*[\"']pip[\"']|[\"'][^\"']*-m pip install")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in sources
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []
