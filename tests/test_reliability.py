"""Reliability (issue 7): bad input -> a MaceError naming the input and the fix, nothing changed; faults
(interrupts, crashes, full disks, foreign or hostile files) lose nothing finished and never touch the host.

Cases already covered elsewhere are listed in the README's "What happens when ..." table (its "Proved by"
column); this file holds the rest.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import struct
import zlib
from functools import cache
from pathlib import Path

import pytest
import torch
from _host_checks import assert_same_training, attention_processors, host_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mace_ops import cli
from mace_ops import erasure as me
from mace_ops import io as mio
from mace_ops.checkpoint import load_sd1_host, load_sd1_modules, save_sanitized_checkpoint
from mace_ops.concepts import Concept, parse_concept_list
from mace_ops.data import ConceptData
from mace_ops.errors import MaceError
from mace_ops.hosts.diffusers import DiffusersHost
from mace_ops.lora import LoRABank, load_bank, save_bank
from mace_ops.pipeline import (
    Erasure,
    ErasureSettings,
    concept_pair_moments,
    fuse_weights,
    refine_weights,
    run_erasure,
)
from mace_ops.tokens import sd1_token_ids
from mace_ops.train import TrainConfig, train_concept_loras

# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra threads only add overhead (and spin badly on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_host_untouched(host, state, procs) -> None:
    after = host_state(host)
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)  # bit-identical
    assert attention_processors(host) == procs  # our processors are gone
    assert all(p.grad is None and not p.requires_grad for p in host.unet.parameters())


def _train_data(phrases, n=2, hw=8, seed=0) -> list[ConceptData]:
    g = torch.Generator().manual_seed(seed)
    return [
        ConceptData(concept=Concept(p, "a thing", "object"), images=None,
                    latents=torch.randn(n, 4, hw, hw, generator=g), masks=torch.rand(n, hw, hw, generator=g) > 0.3)
        for p in phrases
    ]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 2, "lr": 1e-2, "seed": 0, "concepts_per_batch": 1, **kw})


def _cached(folder: Path) -> list[str]:
    """The phrases whose finished LoRA is in the training cache folder (complete files only)."""
    return sorted(json.loads(mio.read_safetensors_metadata(p)["concept"]) for p in Path(folder).glob("lora-*"))


def _in_flight(folder: Path) -> list[int]:
    """The number of finished steps in each group checkpoint of the training cache folder."""
    return [json.loads(mio.read_safetensors_metadata(p)["step"]) for p in Path(folder).glob("group-*")]


class Stop(Exception):
    """A stand-in for ComfyUI's InterruptProcessingException."""


@cache
def _word_ids(prompt: str) -> tuple[int, ...]:
    ids = [49406] + [zlib.crc32(w.encode()) % 49000 for w in prompt.lower().split()][:75] + [49407]
    return tuple(ids + [49407] * (77 - len(ids)))


class WordHost:
    """A tiny fake host for the cheap per-concept stages: one token per word (start 49406, end/pad 49407),
    token states from a fixed random table (d = 8), two 4×8 matrices. Records every ``encode`` batch."""

    max_length = 77

    def __init__(self, d: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(49408, d, generator=g)
        self.weights = {"b.to_k": torch.randn(4, d, generator=g), "b.to_v": torch.randn(4, d, generator=g)}
        self.batches: list[int] = []

    def token_ids(self, prompts):
        return [list(_word_ids(p)) for p in prompts]

    def encode(self, prompts):
        self.batches.append(len(prompts))
        return self.table[torch.tensor(self.token_ids(prompts))]  # (B, 77, d)

    def cross_attention_weights(self):
        return {k: v.clone() for k, v in self.weights.items()}


# --------------------------------------------------------------------------------------------------
# concept lists: property test, 77 tokens, 5,000 concepts

_PIECES = st.sampled_from(
    ["cat", "Cat", "CAT ", " ", "   ", "->", "-", ">", "#", "\t", "a person", "dog", "été", "{}", "{0}", "%s",
     "\r", "\x85", "\u2028", "\x00", "\ufeff", "🙂", "word " * 40]
)
_LINE = st.lists(st.one_of(_PIECES, st.text(max_size=6)), max_size=6).map("".join)
_TEXT = st.lists(_LINE, max_size=8).map("\n".join)


def _norm(s: str) -> str:
    return " ".join(s.split())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=_TEXT, anchor=st.sampled_from(["a person", "", "  ", "cat", "été"]), kind=st.sampled_from(["object", "style"]),
       tokenize=st.booleans())
def test_random_concept_lists_parse_or_raise_mace_error(text, anchor, kind, tokenize):
    try:
        concepts = parse_concept_list(text, default_anchor=anchor, kind=kind,
                                      token_ids=sd1_token_ids if tokenize else None)
    except MaceError as e:
        assert str(e)  # a message, never another exception type
        return
    assert concepts
    keys = [c.phrase.casefold() for c in concepts]
    assert len(set(keys)) == len(keys)  # no duplicates (case-insensitive)
    for c in concepts:
        assert isinstance(c, Concept) and c.kind == kind
        assert c.phrase and c.anchor and c.phrase == _norm(c.phrase) and c.anchor == _norm(c.anchor)
        assert "#" not in c.phrase and "->" not in c.phrase and c.phrase.casefold() != c.anchor.casefold()


def test_refine_refuses_a_concept_whose_prompts_exceed_77_tokens(tiny_host):
    """The nodes parse without a tokenizer: the refine stage checks every prompt with the host's own."""
    long_words = " ".join(["cat"] * 72)
    W0 = tiny_host.cross_attention_weights()
    for concept, role in ((Concept(long_words, "a person"), "phrase"), (Concept("Taylor Swift", long_words), "anchor")):
        with pytest.raises(MaceError, match=rf"exceeds 77 tokens; shorten the {role}"):
            refine_weights(tiny_host, [Concept("dog", "a thing"), concept], ridge=1.0)
    assert all(torch.equal(W0[k], v) for k, v in tiny_host.cross_attention_weights().items())


def test_five_thousand_concepts_parse_and_the_limit_is_named():
    text = "\n".join(f"concept number {i} -> a thing" for i in range(5000))
    concepts = parse_concept_list(text, default_anchor="x", token_ids=sd1_token_ids)  # one tokenizer call
    assert len(concepts) == 5000 and concepts[4999] == Concept("concept number 4999", "a thing")
    with pytest.raises(MaceError, match="5000 concepts, more than the limit of 1000; split it or raise the limit"):
        parse_concept_list(text, default_anchor="x", max_concepts=1000)
    assert cli.build_parser().parse_args(["run", "--checkpoint", "c", "--concepts", "t", "--out", "o",
                                          "--max-concepts", "5000"]).max_concepts == 5000


def test_many_concepts_stream_through_refine_and_fuse():
    """CFR statistics (1,000 concepts) and fusion (5,000) see one concept at a time: every encode call
    holds one concept's 30 prompts, memory is the d×d moments, and the statistics count every aligned token."""
    host = WordHost()
    concepts = [Concept(f"concept number {i}", "a thing") for i in range(5000)]
    seen = []
    cross, gram = concept_pair_moments(host, concepts[:1000], progress=lambda s, d, t, info: seen.append(d))
    assert seen == list(range(1, 1001))
    assert len(host.batches) == 1000 + 1 and max(host.batches) == 30  # concepts, and their one shared anchor
    # per pair: 77 positions minus the 3-token phrase span, the shorter side has 1 padding position less
    # to pair, and the 2-token anchor span takes the place of 2 of them: 77 - 3 = 74 aligned positions
    assert cross.count == gram.count == 1000 * 30 * 74 and cross.sum.shape == (8, 8)

    host.batches.clear()
    bank = LoRABank({k: tuple(v.shape) for k, v in host.weights.items()}, [c.phrase for c in concepts])
    fused = fuse_weights(host, host.weights, bank, concepts, ridge=1.0)
    assert len(host.batches) == 5000 and max(host.batches) == 30
    # the bank's up factors start at 0 (identity edit): fusing 5,000 of them keeps W
    for k, w in host.weights.items():
        torch.testing.assert_close(fused[k], w, rtol=1e-6, atol=1e-6)


def test_singular_cfr_system_in_the_pipeline_is_named():
    host = WordHost(d=256)  # one concept's prompts have fewer distinct tokens than 256 dimensions
    with pytest.raises(MaceError, match="singular.*preservation.*ridge"):
        refine_weights(host, [Concept("cat", "a dog")], ridge=0.0, relative_ridge=0.0)


# --------------------------------------------------------------------------------------------------
# models that are not SD-like


def _unet(cross_attention: bool = True, width: int = 768):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if cross_attention else ("DownBlock2D",) * 2,
        mid_block_type="UNetMidBlock2DCrossAttn" if cross_attention else None,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if cross_attention else ("UpBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=width,
        attention_head_dim=2,
    )


@pytest.mark.parametrize(("unet", "match"), [
    (lambda: _unet(cross_attention=False), "no cross-attention blocks; give an SD1.x-style"),
    (lambda: _unet(width=32), "32-d cross-attention context .*give an SD1.x, SD2.x or SDXL base model"),
])
def test_diffusers_host_refuses_a_model_that_is_not_sd_like(tiny_sd, unet, match):
    with pytest.raises(MaceError, match=match):
        DiffusersHost(unet(), tiny_sd.text_encoder, tiny_sd.vae, alphas_cumprod=tiny_sd.alphas_cumprod)


def test_diffusers_folder_with_only_pickled_weights_is_refused(tmp_path, tiny_sd):
    """A diffusers folder whose weights are .bin (pickle) files: refused, never unpickled."""
    marker = tmp_path / "UNPICKLED"
    for sub in ("unet", "text_encoder", "vae"):
        (tmp_path / "m" / sub).mkdir(parents=True)
    tiny_sd.unet.save_config(tmp_path / "m" / "unet")
    tiny_sd.vae.save_config(tmp_path / "m" / "vae")
    tiny_sd.text_encoder.config.save_pretrained(tmp_path / "m" / "text_encoder")
    for sub, name in (("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
                      ("text_encoder", "pytorch_model.bin")):
        torch.save(_Marker(str(marker)), tmp_path / "m" / sub / name)
    with pytest.raises(MaceError, match="safetensors"):
        load_sd1_host(tmp_path / "m")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# hostile and broken files: pickles never unpickled, corrupt files named


class _Marker:
    """Unpickling this creates the folder ``path``: the proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _pickle_files(folder: Path, marker: Path) -> list[Path]:
    files = []
    for protocol in (2, 4, 5):
        p = folder / f"proto{protocol}.safetensors"
        p.write_bytes(pickle.dumps({"state_dict": _Marker(str(marker))}, protocol=protocol))
        files.append(p)
    p = folder / "zip.ckpt"
    torch.save({"state_dict": _Marker(str(marker))}, p)  # torch.save zip format
    files.append(p)
    return files


_LOADERS = {
    "read_safetensors": lambda p: mio.read_safetensors(p),
    "read_metadata": lambda p: mio.read_safetensors_metadata(p),
    "load_bank": lambda p: load_bank(p),
    "load_erasure": lambda p: me.load_erasure(p),
    "load_sd1_modules": lambda p: load_sd1_modules(p),
    "load_sd1_host": lambda p: load_sd1_host(p),
    "sanitize_source": lambda p: save_sanitized_checkpoint(p, {}, Path(p).with_name("out.safetensors")),
}


def test_marker_proves_unpickling_would_be_seen(tmp_path):
    marker = tmp_path / "UNPICKLED"
    pickle.loads(pickle.dumps(_Marker(str(marker))))
    assert marker.is_dir()


@pytest.mark.parametrize("loader", sorted(_LOADERS))
def test_pickles_are_refused_and_never_unpickled(tmp_path, loader):
    marker = tmp_path / "UNPICKLED"
    for p in _pickle_files(tmp_path, marker):
        with pytest.raises(MaceError, match=rf"{p.name}.*pickle/zip.*never unpickled"):
            _LOADERS[loader](p)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_refuses_a_pickled_checkpoint_without_unpickling(tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    concepts = tmp_path / "c.txt"
    concepts.write_text("cat -> a dog\n", encoding="utf-8")
    ckpt = _pickle_files(tmp_path, marker)[-1]
    assert cli.main(["run", "--checkpoint", str(ckpt), "--concepts", str(concepts), "--out", str(tmp_path / "o")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def real_files(tmp_path_factory, tiny_host):
    """A MACE erasure file and LoRA bank file for the tiny host."""
    folder = tmp_path_factory.mktemp("files")
    W0 = tiny_host.cross_attention_weights()
    names = sorted(W0)[:3]
    erasure = Erasure({n: W0[n] + 0.01 for n in names}, tiny_host.model_fingerprint(), [Concept("cat", "a dog")],
                      {"seed": 0})
    e = me.save_erasure(erasure, W0, folder / "erasure.safetensors")
    bank = LoRABank({n: tuple(W0[n].shape) for n in names}, ["cat", "owl"], rank=1)
    b = save_bank(bank, folder / "bank.safetensors", metadata={"fingerprint": tiny_host.model_fingerprint()})
    return {"erasure": (e, lambda p: me.load_erasure(p, original_weights=W0)), "bank": (b, lambda p: load_bank(p))}


@pytest.mark.parametrize("kind", ["erasure", "bank"])
def test_truncated_or_corrupted_files_raise_mace_error_naming_the_file(tmp_path, real_files, kind):
    """Every truncation and random byte flips of the header: a MaceError naming the file, never another
    exception (flips in tensor data may load: safetensors has no checksum)."""
    src, load = real_files[kind]
    data = src.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    g = torch.Generator().manual_seed(0)
    cuts = sorted({0, 1, 7, 8, 9, header_end - 1, header_end, header_end + 1, len(data) - 1,
                   *torch.randint(1, len(data), (20,), generator=g).tolist()})
    variants = [(f"cut{c}", data[:c]) for c in cuts if c < len(data)]
    for i in range(40):
        flipped = bytearray(data)
        at = int(torch.randint(0, header_end, (1,), generator=g))
        flipped[at] = int(torch.randint(0, 256, (1,), generator=g))
        variants.append((f"flip{i}", bytes(flipped)))
    refused = 0
    for name, content in variants:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        try:
            load(p)
        except MaceError as e:
            assert p.name in str(e), str(e)
            refused += 1
    assert refused >= len(cuts) - 1  # every truncation is refused


@pytest.mark.parametrize(("what", "expected", "match"), [
    ("fingerprint", {"expected_fingerprint": "0" * 64}, "trained on base model .* but this model is '0000"),
    ("rank", {"expected_rank": 4}, "has rank 1 but rank 4 is expected"),
    ("shapes", {"expected_shapes": {"x.to_k": (2, 3)}}, "does not fit this model"),
])
def test_bank_for_another_model_or_rank_is_refused(real_files, what, expected, match):
    with pytest.raises(MaceError, match=match):
        load_bank(real_files["bank"][0], **expected)


def test_erasure_for_another_model_is_refused(real_files, tiny_host):
    path = real_files["erasure"][0]
    with pytest.raises(MaceError, match="made for base model .* not this one"):
        me.load_erasure(path, expected_fingerprint="f" * 64)
    small = {n: w[:, :10] for n, w in tiny_host.cross_attention_weights().items()}
    with pytest.raises(MaceError, match="it was made for another model"):
        me.load_erasure(path, original_weights=small)


# --------------------------------------------------------------------------------------------------
# output files: existing, unwritable, disk full


def _writers(tmp_path, tiny_host):
    W0 = tiny_host.cross_attention_weights()
    name = sorted(W0)[0]
    erasure = Erasure({name: W0[name] + 1}, "fp", [Concept("cat", "a dog")], {})
    bank = LoRABank({name: tuple(W0[name].shape)}, ["cat"])
    src = tmp_path / "src.safetensors"
    save_file({f"model.diffusion_model.{name}.weight": W0[name]}, str(src))
    return {
        "save_erasure": lambda p: me.save_erasure(erasure, W0, p),
        "save_bank": lambda p: save_bank(bank, p),
        "save_sanitized_checkpoint": lambda p: save_sanitized_checkpoint(src, {name: W0[name] + 1}, p),
    }


@pytest.mark.parametrize("writer", ["save_erasure", "save_bank", "save_sanitized_checkpoint"])
def test_writers_never_overwrite_and_leave_nothing_when_the_disk_fills(tmp_path, tiny_host, monkeypatch, writer):
    write = _writers(tmp_path, tiny_host)[writer]
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "taken.safetensors"
    existing.write_bytes(b"precious")
    with pytest.raises(MaceError, match="taken.safetensors.*exists"):
        write(existing)
    assert existing.read_bytes() == b"precious"

    def fill_disk(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)  # part of the file reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mio, "_write_safetensors", fill_disk)
    with pytest.raises(MaceError, match="new.safetensors.*the disk is full; nothing was written"):
        write(out / "new.safetensors")
    assert sorted(os.listdir(out)) == ["taken.safetensors"]  # no partial or temporary file


def test_disk_full_while_caching_a_lora_keeps_the_finished_concepts(tiny_host, tmp_path, monkeypatch):
    data = _train_data(["cat", "owl"])
    real = mio._write_safetensors
    writes = []

    def second_fails(tensors, path, metadata):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata)

    monkeypatch.setattr(mio, "_write_safetensors", second_fails)
    with pytest.raises(MaceError, match="disk is full"):
        train_concept_loras(tiny_host, data, _cfg(), cache_dir=tmp_path)
    assert _cached(tmp_path) == ["cat"]  # one complete file, no partial one
    monkeypatch.undo()
    full, full_losses = train_concept_loras(tiny_host, data, _cfg())
    resumed, losses = train_concept_loras(tiny_host, data, _cfg(), cache_dir=tmp_path)
    assert_same_training(full, full_losses, resumed, losses)


def test_cli_out_in_an_unwritable_folder_is_refused(tmp_path, monkeypatch, capsys):
    concepts = tmp_path / "c.txt"
    concepts.write_text("cat -> a dog\n", encoding="utf-8")
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    argv = ["run", "--checkpoint", str(concepts), "--concepts", str(concepts), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is not writable; choose another place" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("masks", [torch.ones(2, 4, 4), torch.ones(3, 8, 8), torch.ones(8, 8)])
def test_training_masks_of_the_wrong_size_or_count_are_refused(tiny_host, masks):
    data = _train_data(["cat", "owl"])
    data[1].masks = masks
    state, procs = host_state(tiny_host), attention_processors(tiny_host)
    with pytest.raises(MaceError, match=r"concept 'owl': masks of shape .* do not match its latents \(need \(2, 8, 8\)\)"):
        train_concept_loras(tiny_host, data, _cfg())
    _assert_host_untouched(tiny_host, state, procs)


@pytest.mark.parametrize(("masks", "match"), [
    (torch.ones(2, 2, 64, 64), r"masks input: shape \(2, 2, 64, 64\); expected a ComfyUI MASK"),
    (torch.ones(64), r"masks input: shape \(64,\)"),
])
def test_node_masks_of_the_wrong_shape_are_named(masks, match):
    from nodes.mace_nodes import _user_data
    from nodes.values import ConceptsValue

    cv = ConceptsValue([Concept("cat", "a dog")], ErasureSettings())
    with pytest.raises(MaceError, match=match):
        _user_data(cv, None, masks, "cat")


# --------------------------------------------------------------------------------------------------
# NaN / Inf during training


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "late"])
def test_nan_or_inf_stops_that_concept_by_name_and_keeps_the_others(tiny_host, tmp_path, monkeypatch, bad):
    from mace_ops import train

    data = _train_data(["cat", "golden retriever", "owl"])
    if bad == "late":  # finite data, the loss of one concept blows up at its 2nd step
        real_total = train.AttentionLossSink.total
        calls = []

        def total(self):
            out = real_total(self)
            calls.append(1)
            if len(calls) == 4:  # concepts_per_batch=1: calls 3, 4 are golden retriever's steps
                return out * float("inf")
            return out

        monkeypatch.setattr(train.AttentionLossSink, "total", total)
    else:
        data[1].latents[0, 0, 0, 0] = bad
        data[1].latents[1] = bad
    state, procs = host_state(tiny_host), attention_processors(tiny_host)
    with pytest.raises(MaceError, match=r"diverged for 1 concept\(s\): 'golden retriever'.*Lower the learning rate") as e:
        train_concept_loras(tiny_host, data, _cfg(), cache_dir=tmp_path)
    assert "'cat'" not in str(e.value) and "'owl'" not in str(e.value)
    assert _cached(tmp_path) == ["cat", "owl"]
    _assert_host_untouched(tiny_host, state, procs)


# --------------------------------------------------------------------------------------------------
# interrupts and crashes during training

PHRASES = ["cat", "golden retriever", "owl"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_host):
    return train_concept_loras(tiny_host, _train_data(PHRASES), _cfg())


@pytest.mark.parametrize(("raise_at", "exc", "cached"), [
    (1, Stop, []),  # after the first optimiser step
    (2, Stop, ["cat"]),  # right after the first concept finished
    (3, KeyboardInterrupt, ["cat"]),  # in the middle of the second concept
    (5, Stop, ["cat", "golden retriever"]),  # in the middle of the third
])
def test_interrupt_from_check_interrupt_unpatches_keeps_finished_and_resumes(
    tiny_host, tmp_path, uninterrupted, raise_at, exc, cached
):
    data = _train_data(PHRASES)
    state, procs = host_state(tiny_host), attention_processors(tiny_host)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == raise_at:
            raise exc

    with pytest.raises(exc):
        train_concept_loras(tiny_host, data, _cfg(), cache_dir=tmp_path, check_interrupt=check)
    _assert_host_untouched(tiny_host, state, procs)
    assert _cached(tmp_path) == sorted(cached)

    trained = []
    bank, losses = train_concept_loras(tiny_host, data, _cfg(), cache_dir=tmp_path,
                                       progress=lambda s, t, phrase, loss: trained.append(phrase))
    assert set(trained) == set(PHRASES) - set(cached)  # the rerun resumes: finished concepts are not retrained
    assert_same_training(*uninterrupted, bank, losses)  # concepts trained again: equal up to rounding


@pytest.mark.parametrize("damage", ["truncate", "pickle"])
def test_a_damaged_lora_cache_file_is_trained_again_never_unpickled(tiny_host, tmp_path, uninterrupted, damage):
    data = _train_data(PHRASES)
    train_concept_loras(tiny_host, data[:1], _cfg(), cache_dir=tmp_path)
    (cat_file,) = tmp_path.iterdir()
    marker = tmp_path.parent / f"UNPICKLED-{damage}"
    if damage == "truncate":
        cat_file.write_bytes(cat_file.read_bytes()[:-10])
    else:
        cat_file.write_bytes(pickle.dumps(_Marker(str(marker))))
    trained = []
    bank, losses = train_concept_loras(tiny_host, data, _cfg(), cache_dir=tmp_path,
                                       progress=lambda s, t, phrase, loss: trained.append(phrase))
    assert set(trained) == set(PHRASES) and not marker.exists()
    assert_same_training(*uninterrupted, bank, losses)
    assert _cached(tmp_path) == sorted(PHRASES)  # the damaged file was replaced


@pytest.mark.parametrize(("where", "nth"), [
    ("attention", 40),  # our attention processor: 16 blocks per forward, cat took 2 forwards -> 2nd concept
    ("unet_forward", 3),  # the UNet's own forward (a module hook), 2nd concept's first step
    ("backward", 3),  # autograd's backward, 2nd concept's first step
])
def test_keyboard_interrupt_inside_a_training_step_unpatches_the_host(tiny_host, tmp_path, monkeypatch, where, nth):
    """Ctrl-C lands anywhere inside a step: the host is unpatched and the finished concept is kept."""
    from mace_ops import train

    calls = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt

    handle = None
    if where == "attention":
        real = train.explicit_attention

        def attention(*a, **k):
            tick()
            return real(*a, **k)

        monkeypatch.setattr(train, "explicit_attention", attention)
    elif where == "unet_forward":
        handle = tiny_host.unet.down_blocks[0].register_forward_pre_hook(lambda *a: tick())
    else:
        real_backward = torch.Tensor.backward

        def backward(self, *a, **k):
            tick()
            return real_backward(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, "backward", backward)
    state, procs = host_state(tiny_host), attention_processors(tiny_host)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_concept_loras(tiny_host, _train_data(PHRASES), _cfg(), cache_dir=tmp_path)
    finally:
        if handle is not None:
            handle.remove()
    assert len(calls) == nth
    _assert_host_untouched(tiny_host, state, procs)
    assert _cached(tmp_path) == ["cat"]  # complete files only, no temp file


@pytest.mark.parametrize(("per_batch", "crash_at", "cached", "in_flight"), [
    (1, 5, ["cat", "golden retriever"], []),  # 1st forward of the 3rd concept
    (1, 4, ["cat"], []),  # 2nd forward of the 2nd concept
    (2, 3, ["cat", "golden retriever"], []),  # 1st forward of the 2nd batch (owl alone: no checkpoint)
    (3, 2, [], [1]),  # all three in one batch: its checkpoint after step 1 of 2 (every ceil(2/3) steps)
])
def test_a_crash_loses_at_most_the_concepts_in_progress(
    tiny_host, tmp_path, monkeypatch, per_batch, crash_at, cached, in_flight
):
    """A crash (any exception, e.g. out of memory) during training: every concept whose batch finished is
    on disk, and a batch in progress has its checkpoint (every ceil(steps / k) steps for k concepts)."""
    from mace_ops import train

    monkeypatch.setattr(train, "CHECKPOINT_MIN_SECONDS", 0.0)  # no time floor: checkpoints by steps alone
    real_total = train.AttentionLossSink.total
    forwards = []

    def total(self):
        forwards.append(1)
        if len(forwards) == crash_at:
            raise RuntimeError("CUDA out of memory")
        return real_total(self)

    monkeypatch.setattr(train.AttentionLossSink, "total", total)
    state, procs = host_state(tiny_host), attention_processors(tiny_host)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_concept_loras(tiny_host, _train_data(PHRASES), _cfg(concepts_per_batch=per_batch), cache_dir=tmp_path)
    assert _cached(tmp_path) == cached and _in_flight(tmp_path) == in_flight
    _assert_host_untouched(tiny_host, state, procs)


# --------------------------------------------------------------------------------------------------
# interrupts anywhere in a whole run (all five stages)

_RUN_SETTINGS = ErasureSettings(n_images=1, sample_steps=2, image_size=64,
                                train=TrainConfig(steps=2, concepts_per_batch=1))
_RUN_CONCEPTS = [Concept("Taylor Swift", "a person"), Concept("Van Gogh", "art", "style")]
_PROMPTS = ["a red house", "a dog on a beach", "a bowl of fruit", "a city at night"]


@pytest.fixture(scope="module")
def full_run(tiny_host, tmp_path_factory):
    return run_erasure(tiny_host, _RUN_CONCEPTS, preservation_prompts=_PROMPTS, settings=_RUN_SETTINGS,
                       cache_dir=tmp_path_factory.mktemp("full"))


@pytest.mark.parametrize(("stage", "nth"), [("data", 1), ("train", 3), ("fuse", 1)])
def test_run_interrupted_in_any_stage_unpatches_and_the_rerun_resumes(tiny_host, tmp_path, full_run, stage, nth):
    state, procs = host_state(tiny_host), attention_processors(tiny_host)
    seen: list[str] = []

    def check():
        if seen.count(stage) >= nth:
            raise Stop

    with pytest.raises(Stop):
        run_erasure(tiny_host, _RUN_CONCEPTS, preservation_prompts=_PROMPTS, settings=_RUN_SETTINGS, cache_dir=tmp_path,
                    progress=lambda s, *_: seen.append(s), check_interrupt=check)
    _assert_host_untouched(tiny_host, state, procs)
    if stage == "train":  # interrupted after Van Gogh's 1st step: Taylor Swift finished its 2 steps and is kept
        assert len(list((tmp_path / "loras").glob("lora-Taylor_Swift-*.safetensors"))) == 1

    trained: set[str] = set()

    def record(s, done, total, info):
        if s == "train":
            trained.add(info["concept"])

    again = run_erasure(tiny_host, _RUN_CONCEPTS, preservation_prompts=_PROMPTS, settings=_RUN_SETTINGS,
                        cache_dir=tmp_path, progress=record)
    # the rerun trains only what had not finished
    assert trained == {"data": {"Taylor Swift", "Van Gogh"}, "train": {"Van Gogh"}, "fuse": set()}[stage]
    _assert_host_untouched(tiny_host, state, procs)
    # concepts trained again: equal up to float32 rounding (1 vs 2 vs 3 threads: at most 9.4e-5 of max |w|)
    for k, w in full_run.weights.items():
        torch.testing.assert_close(again.weights[k], w, rtol=0, atol=1e-3 * float(w.abs().max()))


# --------------------------------------------------------------------------------------------------
# two graphs on the same model: no leak


def test_with_weights_views_never_leak_into_the_base_or_each_other(tiny_host, tiny_sd):
    """Two erasures of the same model used in turn (two graphs in one queue): each view computes exactly
    what a separate model with its weights computes, the base stays the original, in any order."""
    W0 = tiny_host.cross_attention_weights()
    names = sorted(W0)
    g = torch.Generator().manual_seed(3)
    wa = {n: W0[n] + 0.05 * torch.randn(W0[n].shape, generator=g) for n in names[:10]}
    wb = {n: W0[n] - 0.05 * torch.randn(W0[n].shape, generator=g) for n in names[5:20]}
    state, procs, fp = host_state(tiny_host), attention_processors(tiny_host), tiny_host.model_fingerprint()
    a = tiny_host.with_weights(wa)
    b = tiny_host.with_weights(wb)
    for w in wa.values():
        w.zero_()  # the caller's tensors change later: the view keeps its own copy

    context = tiny_host.encode(["a photo of a cat"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def eps(host):
        with torch.no_grad(), host.instrument() as f:
            return f(x, torch.tensor([500]), context)

    def reference(weights):  # an independent model: a deep copy of the UNet with the weights written in
        own = DiffusersHost(copy.deepcopy(tiny_sd.unet), tiny_sd.text_encoder, tiny_sd.vae,
                            alphas_cumprod=tiny_sd.alphas_cumprod, tokenizer=tiny_host.tokenizer)
        with torch.no_grad():
            for n, w in weights.items():
                block, m = n.rsplit(".", 1)
                getattr(own._modules_by_name[block], m).weight.copy_(w)
        return eps(own)

    wa_now = {n: a.cross_attention_weights()[n] for n in names[:10]}
    expected = {"base": reference({}), "a": reference(wa_now), "b": reference(wb)}
    views = {"base": tiny_host, "a": a, "b": b}
    for order in (["a", "b", "base"], ["base", "b", "a"], ["b", "a", "b", "base", "a"]):
        for key in order:
            torch.testing.assert_close(eps(views[key]), expected[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected["a"], expected["base"]) and not torch.allclose(expected["a"], expected["b"])
    assert all(torch.equal(W0[k], v) for k, v in tiny_host.cross_attention_weights().items())
    assert all(torch.equal(wb[n], b.cross_attention_weights()[n]) for n in wb)
    assert all(torch.equal(W0[n], b.cross_attention_weights()[n]) for n in names[:5])  # a's edit is not in b
    assert a.model_fingerprint() == b.model_fingerprint() == fp
    _assert_host_untouched(tiny_host, state, procs)

