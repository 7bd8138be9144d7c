"""mace_ops.erasure: one provenance schema for every producer, and erasure files of the old shapes still load.

The old files are written here byte for byte as MACE wrote them before the schema (safetensors ``save_file``
with the metadata strings of that version), not with ``save_erasure``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mace_ops.concepts import Concept
from mace_ops.erasure import Erasure, load_erasure, save_erasure
from mace_ops.errors import MaceError

SCHEMA_KEYS = {"source", "settings", "losses", "external_loras"}
CONCEPTS = [Concept("Taylor Swift", "a person", "object"), Concept("Monet", "art", "style")]


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"b{i}.to_{kv}": torch.randn(3, 5, generator=g, dtype=torch.float64) for i in range(2) for kv in "kv"}


def _old_file(path, settings_json: dict) -> dict[str, torch.Tensor]:
    """An erasure file as written before the schema (diffs of b0.to_k only); returns the diffs."""
    diff = torch.full((3, 5), 0.25)
    meta = {
        "mace.format": "mace-erasure",
        "mace.format_version": "1",
        "mace.base_fingerprint": "f00d",
        "mace.concepts": json.dumps([{"phrase": "Monet", "anchor": "art", "kind": "style"}]),
        "mace.matrices": json.dumps({"b0.to_k": [3, 5]}),
        "mace.settings": json.dumps(settings_json),
    }
    save_file({"diffusion_model.b0.to_k.diff": diff}, str(path), metadata=meta)
    return {"b0.to_k": diff}


OLD_SHAPES = {
    # run_erasure: {"settings": ErasureSettings.as_metadata(), "losses": ...}
    "run": ({"settings": {"seed": 3, "ridge": 0.1}, "losses": {"Monet": [1.0, 0.5]}},
            {"source": "run_erasure", "settings": {"seed": 3, "ridge": 0.1}, "losses": {"Monet": [1.0, 0.5]},
             "external_loras": []}),
    # the Fuse LoRAs node: {"fusion": {...}, "losses": ..., "host": "comfyui"}
    "fuse node": ({"fusion": {"preserve_weight": 2.0, "ridge": 0.0}, "losses": {"Monet": [0.3]}, "host": "comfyui"},
                  {"source": "fuse_weights", "settings": {"preserve_weight": 2.0, "ridge": 0.0},
                   "losses": {"Monet": [0.3]}, "external_loras": [], "host": "comfyui"}),
    # external LoRAs: {"fusion": {...}, "external_loras": [...]}
    "external": ({"fusion": {"preserve_weight": 1.0}, "external_loras": [{"concept": "Monet", "style": "kohya"}]},
                 {"source": "fuse_external_loras", "settings": {"preserve_weight": 1.0}, "losses": {},
                  "external_loras": [{"concept": "Monet", "style": "kohya"}]}),
}


@pytest.mark.parametrize("shape", sorted(OLD_SHAPES))
def test_old_erasure_files_load_into_the_schema(tmp_path, shape):
    old, want = OLD_SHAPES[shape]
    diffs = _old_file(tmp_path / "old.safetensors", old)
    original = {"b0.to_k": torch.ones(3, 5), "b0.to_v": torch.zeros(3, 5)}
    erasure, got = load_erasure(tmp_path / "old.safetensors", original_weights=original, expected_fingerprint="f00d")
    assert erasure.metadata == want
    assert erasure.concepts == [Concept("Monet", "art", "style")] and erasure.base_fingerprint == "f00d"
    assert torch.equal(got["b0.to_k"], diffs["b0.to_k"])
    assert torch.equal(erasure.weights["b0.to_k"], torch.full((3, 5), 1.25))  # W0 + diff, by hand
    # re-saved, it is written in the schema and reads back unchanged
    save_erasure(erasure, original, tmp_path / "new.safetensors")
    again, _ = load_erasure(tmp_path / "new.safetensors")
    assert again.metadata == want


def test_every_producer_builds_the_same_schema():
    w = _weights()
    run = Erasure.build(w, base_fingerprint="x", concepts=CONCEPTS, source="run_erasure",
                        settings={"seed": 0}, losses={"Monet": [1.0]})
    external = Erasure.build(w, base_fingerprint="x", concepts=CONCEPTS, source="fuse_external_loras",
                             settings={"ridge": 0.0}, external_loras=[{"concept": "Monet", "style": "peft"}])
    fuse = Erasure.build(w, base_fingerprint="x", concepts=CONCEPTS, source="fuse_weights", settings={"ridge": 1.0})
    assert set(run.metadata) == set(external.metadata) == set(fuse.metadata) == SCHEMA_KEYS
    assert external.metadata["losses"] == {} and run.metadata["external_loras"] == []
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in run.weights.values())
    torch.testing.assert_close(run.weights["b0.to_k"], w["b0.to_k"].float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown erasure source"):
        Erasure.build(w, base_fingerprint="x", concepts=CONCEPTS, source="other", settings={})


def test_metadata_round_trip_and_refusals():
    e = Erasure.build(_weights(), base_fingerprint="abc", concepts=CONCEPTS, source="run_erasure",
                      settings={"seed": 1}, losses={"Taylor Swift": [0.5]})
    meta = e.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    back = Erasure.from_metadata(meta)
    assert (back.metadata, back.concepts, back.base_fingerprint) == (e.metadata, e.concepts, e.base_fingerprint)
    with pytest.raises(MaceError, match="not a MACE erasure file"):
        Erasure.from_metadata({**meta, "mace.format": "lora"})
    with pytest.raises(MaceError, match="newer than this MACE"):
        Erasure.from_metadata({**meta, "mace.format_version": "99"})
    with pytest.raises(MaceError, match="corrupt metadata"):
        Erasure.from_metadata({**meta, "mace.settings": "{not json"})


def test_label_emb_difference_round_trips_and_applies_by_strength(tmp_path):
    """SDXL's pooled channel: the label_emb difference is written under ComfyUI's diff key, read back
    bit for bit, and ``apply_label_emb_diff`` gives L0 + s·D (checked elementwise against a loop) or refuses
    a model without a label_emb of that shape, naming the input."""
    from safetensors.torch import load_file

    from mace_ops.erasure import apply_label_emb_diff

    g = torch.Generator().manual_seed(1)
    w0 = _weights()
    erasure = Erasure.build({n: w + 0.5 for n, w in w0.items()}, base_fingerprint="f", concepts=CONCEPTS,
                            source="run_erasure", settings={})
    erasure.label_emb_diff = torch.randn(4, 6, generator=g)
    path = save_erasure(erasure, w0, tmp_path / "e.safetensors")
    assert torch.equal(load_file(str(path))["diffusion_model.label_emb.0.0.diff"], erasure.label_emb_diff)
    loaded, diffs = load_erasure(path)
    assert torch.equal(loaded.label_emb_diff, erasure.label_emb_diff) and set(diffs) == set(w0)
    base = torch.randn(4, 6, generator=g)
    got = apply_label_emb_diff(base, loaded.label_emb_diff, 0.3)
    for i in range(4):
        for j in range(6):
            assert abs(float(got[i, j]) - (float(base[i, j]) + 0.3 * float(erasure.label_emb_diff[i, j]))) < 1e-6
    for bad in (None, torch.zeros(4, 5)):
        with pytest.raises(MaceError, match=r"model input: .*label_emb difference of shape \(4, 6\).*connect the SDXL"):
            apply_label_emb_diff(bad, loaded.label_emb_diff, 1.0, model="this sd1 model")
