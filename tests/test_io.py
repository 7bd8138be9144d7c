"""mace_ops.io: atomic writes, refused files, the erasure file format."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
import struct
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mace_ops import erasure as me
from mace_ops import io as mio
from mace_ops.concepts import Concept
from mace_ops.erasure import Erasure
from mace_ops.errors import MaceError
from mace_ops.hosts.base import matrix_names, sd1_block_names


def _weights(seed: int = 0, d_ctx: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(4 + i % 3, d_ctx, generator=g) for i, n in enumerate(matrix_names(sd1_block_names()))}


def _erasure(original: dict[str, torch.Tensor], changed: int = 5) -> Erasure:
    g = torch.Generator().manual_seed(1)
    names = sorted(original)
    new = {n: original[n].clone() for n in names}
    for n in names[:changed]:
        new[n] = new[n] + torch.randn(new[n].shape, generator=g)
    return Erasure(weights=new, base_fingerprint="abc123",
                   concepts=[Concept("Taylor Swift", "a person", "object"), Concept("Monet", "art", "style")],
                   metadata={"seed": 3, "losses": {"Monet": [1.0, 0.5]}})


# ---------------------------------------------------------------- writing


def test_atomic_save_writes_and_refuses_existing(tmp_path):
    p = tmp_path / "a.safetensors"
    mio.atomic_save_safetensors({"x": torch.ones(2)}, p, {"k": "v"})
    tensors, meta = mio.read_safetensors(p)
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"k": "v"}
    before = p.read_bytes()
    with pytest.raises(MaceError, match="a.safetensors.*exists.*a_00001.safetensors"):
        mio.atomic_save_safetensors({"x": torch.zeros(2)}, p)
    assert p.read_bytes() == before
    mio.atomic_save_safetensors({"x": torch.zeros(2)}, p, overwrite=True)
    assert torch.equal(mio.read_safetensors(p)[0]["x"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_shared_and_noncontiguous_tensors_are_written(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    p = mio.atomic_save_safetensors({"a": base, "b": base, "t": base.T}, tmp_path / "s.safetensors")
    got, _ = mio.read_safetensors(p)
    assert torch.equal(got["a"], base) and torch.equal(got["b"], base) and torch.equal(got["t"], base.T)


def test_unique_path(tmp_path):
    p = tmp_path / "m.safetensors"
    assert mio.unique_path(p) == p
    p.write_bytes(b"")
    (tmp_path / "m_00001.safetensors").write_bytes(b"")
    assert mio.unique_path(p) == tmp_path / "m_00002.safetensors"


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, exc):
    def half_write(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # some bytes hit the disk, then the disk fills / Ctrl-C
        raise exc

    monkeypatch.setattr(mio, "_write_safetensors", half_write)
    target = tmp_path / "out.safetensors"
    expected = MaceError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        mio.atomic_save_safetensors({"x": torch.ones(3)}, target)
    if expected is MaceError:
        assert "out.safetensors" in str(info.value) and "disk is full" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(MaceError, match="not_a_folder"):
        mio.atomic_save_safetensors({"x": torch.ones(1)}, blocker / "sub" / "f.safetensors")


def test_permission_denied_folder_is_named(tmp_path, monkeypatch):
    def deny(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(mio.tempfile, "mkstemp", deny)
    with pytest.raises(MaceError, match=f"folder '{tmp_path}'.*Permission denied"):
        mio.atomic_save_safetensors({"x": torch.ones(1)}, tmp_path / "f.safetensors")


# ---------------------------------------------------------------- reading


def test_pickle_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(MaceError, match="evil.safetensors.*pickle"):
        mio.read_safetensors(p)


def test_zip_checkpoint_is_refused(tmp_path):
    p = tmp_path / "model.ckpt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(MaceError, match="model.ckpt.*pickle/zip"):
        mio.read_safetensors(p)


def test_truncated_file_is_refused(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"x": torch.arange(1000, dtype=torch.float32)}, str(p))
    data = p.read_bytes()
    for cut in (4, 8 + 10, len(data) - 1):
        q = tmp_path / f"cut{cut}.safetensors"
        q.write_bytes(data[:cut])
        with pytest.raises(MaceError, match=f"cut{cut}.safetensors.*truncated"):
            mio.read_safetensors(q)


def test_corrupt_header_is_refused(tmp_path):
    p = tmp_path / "c.safetensors"
    body = b"not json at all!"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(MaceError, match="c.safetensors.*corrupt"):
        mio.read_safetensors(p)
    with pytest.raises(MaceError, match="does not exist"):
        mio.read_safetensors(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- erasure file


def test_erasure_round_trip_stores_only_changed_diffs(tmp_path):
    original = _weights()
    erasure = _erasure(original, changed=5)
    p = me.save_erasure(erasure, original, tmp_path / "e.safetensors")
    with safe_open(str(p), framework="pt") as f:
        keys = sorted(f.keys())
        meta = f.metadata()
    changed = sorted(original)[:5]
    assert keys == sorted(f"diffusion_model.{n}.diff" for n in changed)
    assert meta["mace.format"] == "mace-erasure" and meta["mace.base_fingerprint"] == "abc123"
    assert json.loads(meta["mace.concepts"])[1] == {"phrase": "Monet", "anchor": "art", "kind": "style"}

    loaded, diffs = me.load_erasure(p, original_weights=original, expected_fingerprint="abc123")
    assert sorted(diffs) == changed
    for n in changed:
        torch.testing.assert_close(diffs[n], erasure.weights[n] - original[n])
        torch.testing.assert_close(loaded.weights[n], erasure.weights[n])
    assert loaded.concepts == erasure.concepts and loaded.metadata == erasure.metadata
    with pytest.raises(MaceError, match="made for base model 'abc123'"):
        me.load_erasure(p, expected_fingerprint="other")


def test_diffs_applied_like_comfyui_documented_key_format(tmp_path):
    """Apply the file the way comfy/lora.py does: key ``diffusion_model.<p>`` -> ``<p>.weight``, W0 + s·diff."""
    original = _weights()
    erasure = _erasure(original, changed=32)
    p = me.save_erasure(erasure, original, tmp_path / "e.safetensors")
    unet_sd = {f"diffusion_model.{n}.weight": w for n, w in original.items()}
    key_map = {k[: -len(".weight")]: k for k in unet_sd}  # ComfyUI's generic "<path>" -> "<path>.weight"
    tensors, _ = mio.read_safetensors(p)
    strength = 0.7
    patched = dict(unet_sd)
    for key, diff in tensors.items():
        assert key.endswith(".diff")
        target = key_map[key[: -len(".diff")]]
        patched[target] = unet_sd[target] + strength * diff
    ours = me.apply_erasure_weights(original, me.load_erasure(p)[1], strength)
    for n in original:
        torch.testing.assert_close(ours[n], patched[f"diffusion_model.{n}.weight"])
        torch.testing.assert_close(ours[n], original[n] + strength * (erasure.weights[n] - original[n]))


def test_apply_refuses_other_model():
    original = _weights()
    with pytest.raises(MaceError, match="made for another model"):
        me.apply_erasure_weights(original, {"nope.to_k": torch.zeros(1, 1)})
    name = sorted(original)[0]
    with pytest.raises(MaceError, match=f"{name}.*made for another model"):
        me.apply_erasure_weights(original, {name: torch.zeros(1, 1)})


def test_load_erasure_refuses_other_files(tmp_path):
    p = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2, 2)}, str(p))
    with pytest.raises(MaceError, match="not a MACE erasure file"):
        me.load_erasure(p)
    q = tmp_path / "nan.safetensors"
    save_file({"diffusion_model.a.to_k.diff": torch.tensor([[float("nan")]])}, str(q),
              metadata={"mace.format": "mace-erasure", "mace.format_version": "1"})
    with pytest.raises(MaceError, match="NaN"):
        me.load_erasure(q)
    r = tmp_path / "badkey.safetensors"
    save_file({"diffusion_model.a.to_q.diff": torch.zeros(1, 1)}, str(r),
              metadata={"mace.format": "mace-erasure", "mace.format_version": "1"})
    with pytest.raises(MaceError, match="to_k/to_v"):
        me.load_erasure(r)


def test_comfyui_lora_loader_accepts_our_keys(tmp_path):
    """With a real ComfyUI checkout ($COMFYUI_PATH), its own SD1.5 key map and patch math apply every diff.

    Run with ComfyUI's environment, e.g.
    ``COMFYUI_PATH=.comfy/ComfyUI .venv-comfy/bin/python -m pytest tests/test_io.py -k comfyui``.
    """
    root = os.environ.get("COMFYUI_PATH")
    if not root or not os.path.isdir(os.path.join(root, "comfy")):
        pytest.skip("COMFYUI_PATH not set to a ComfyUI checkout")
    sys.path.insert(0, os.path.abspath(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.lora
        import comfy.model_detection
        import comfy.utils
    except Exception as e:  # ComfyUI needs its own environment (torchvision etc.)
        pytest.skip(f"ComfyUI not importable here: {e}")
    finally:
        sys.path.remove(os.path.abspath(root))
    sd15 = {  # what comfy.model_detection detects for an SD1.5 checkpoint
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_resblock": False,
        "use_temporal_attention": False, "num_head_channels": -1,
    }
    with torch.device("meta"):
        model = comfy.model_detection.model_config_from_unet_config(sd15).get_model({})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    original = {n: torch.randn(shapes[f"diffusion_model.{n}.weight"], generator=g)
                for n in matrix_names(sd1_block_names())}
    erasure = _erasure(original, changed=32)
    p = me.save_erasure(erasure, original, tmp_path / "e.safetensors")
    sd = comfy.utils.load_torch_file(str(p), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    assert len(patches) == 32
    ours = me.apply_erasure_weights(original, me.load_erasure(p)[1], 0.7)
    for n, w0 in original.items():
        key = f"diffusion_model.{n}.weight"
        theirs = comfy.lora.calculate_weight([(0.7, patches[key], 1.0, None, None)], w0.clone(), key)
        torch.testing.assert_close(theirs, ours[n])


def test_written_files_get_the_users_usual_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        expected = 0o666 & ~0o022  # what open() gives: others may read a saved checkpoint or erasure
        mio.atomic_save_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        mio.atomic_write_text(tmp_path / "x.txt", "hi")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == expected
    assert (tmp_path / "x.txt").read_text() == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "x.txt"]  # no temp file left
