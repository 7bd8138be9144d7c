"""ComfyHost under ComfyUI's model management (real ComfyUI, CPU: ``--cpu``).

What a CPU can show: which ComfyUI calls the host makes, with what, on which device, and that the
models are in ``comfy.model_management.current_loaded_models`` while they run. Not VRAM: there is none.
The training step is run as in a node: everything under ``torch.inference_mode()``, the trainable part
opting out of it.
"""

from __future__ import annotations

import pytest
import torch


def _state(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def _loaded(patcher) -> bool:
    import comfy.model_management as mm

    return any(lm.model is patcher for lm in mm.current_loaded_models)


def _train_step(host, seen: list) -> float:
    """One LoRA-style step (loss on the attention probabilities, backward); ``seen`` gets, per cross-
    attention call, whether the private UNet is in ComfyUI's loaded models at that moment."""
    from mace_ops.attention import explicit_attention

    w = host.cross_attention_weights()
    with torch.inference_mode():
        context = host.encode(["a photo of a cat"])
        with torch.inference_mode(False), torch.enable_grad():
            ups = {n: torch.zeros(v.shape[0], 1, requires_grad=True) for n, v in w.items()}
            downs = {n: torch.full((1, 768), 0.01) for n in w}
            linears = {n: (lambda c, n=n: c @ (w[n] + ups[n] @ downs[n]).T) for n in w}
            probs = []

            def attention(block, q, k, v, heads):
                seen.append(_loaded(host._private_patcher()))
                return explicit_attention(q, k, v, heads, sink=probs.append)

            with host.instrument(linears=linears, attention=attention) as unet:
                unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300]), context)
            loss = sum(p[..., 1:3].sum() for p in probs)
            loss.backward()
            # (the last block's to_v does not reach a loss on attention probabilities: no gradient)
            return float(sum(u.grad.abs().sum() for u in ups.values() if u.grad is not None))


@pytest.fixture()
def spy(monkeypatch):
    """Records ComfyUI's load_models_gpu / unload_model_and_clones calls and lets them run."""
    import comfy.model_management as mm

    calls: dict[str, list] = {"load": [], "unload": []}
    load, unload = mm.load_models_gpu, mm.unload_model_and_clones

    def load_spy(models, memory_required=0, **kw):
        calls["load"].append((list(models), memory_required, kw))
        return load(models, memory_required=memory_required, **kw)

    def unload_spy(model, *a, **kw):
        calls["unload"].append(model)
        return unload(model, *a, **kw)

    monkeypatch.setattr(mm, "load_models_gpu", load_spy)
    monkeypatch.setattr(mm, "unload_model_and_clones", unload_spy)
    return calls


def test_training_runs_on_a_private_unet_loaded_by_comfyui(tiny_parts, spy):
    import comfy.model_management as mm

    from mace_ops.hosts.comfy import ComfyHost, compute_dtype, training_memory

    model, clip, vae = tiny_parts
    before = _state(model)
    host = ComfyHost(model, clip, vae)
    seen: list[bool] = []
    assert _train_step(host, seen) > 0  # a real gradient through ComfyUI's loaded copy
    private = host._private_patcher()
    assert seen and all(seen)  # in current_loaded_models during every cross-attention of the step
    loads = [c for c in spy["load"] if c[0] == [private]]
    assert len(loads) == 1  # memory asked once, through ComfyUI, with the whole model on the device
    _, memory, kw = loads[0]
    assert memory == training_memory(model, (1, 4, 8, 8)) and memory >= model.model.memory_required([1, 4, 8, 8])
    assert kw.get("force_full_load") is True
    # devices and dtype are ComfyUI's: the MODEL's load/offload devices (--cpu: the CPU), its compute dtype
    assert private.load_device == model.load_device == mm.get_torch_device()
    assert private.offload_device == model.offload_device
    params = list(host._private_unet().parameters())
    assert {p.device for p in params} == {torch.device(model.load_device)}
    assert {p.dtype for p in params} == {compute_dtype(model)} and not any(p.is_inference() for p in params)
    assert spy["unload"] == []  # --cpu: nothing to unload to make room
    # a second step with the same batch asks nothing more; the shared MODEL never changed
    _train_step(host, seen)
    assert len([c for c in spy["load"] if c[0] == [private]]) == 1
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_on_a_gpu_the_model_clip_and_vae_are_unloaded_before_training(tiny_parts, spy, monkeypatch):
    """``on_cpu`` answers False as for a GPU; the unloading itself is ComfyUI's (it works on the CPU too)."""
    import comfy.model_management as mm

    import mace_ops.hosts.comfy as comfy_host

    model, clip, vae = tiny_parts
    host = comfy_host.ComfyHost(model, clip, vae).with_weights({})  # a fresh patch state: a new private copy
    with torch.inference_mode():
        host.vae_encode(torch.zeros(1, 3, 64, 64))
        mm.load_models_gpu([host.model])
    assert _loaded(host.model) and any(lm.model is vae.patcher for lm in mm.current_loaded_models)
    monkeypatch.setattr(comfy_host, "on_cpu", lambda device: False)
    loaded_during: list[set[str]] = []
    parts = {"model": host.model, "base model": model, "clip": clip.patcher, "vae": vae.patcher}

    def attention_seen(block, q, k, v, heads):
        loaded_during.append({name for name, p in parts.items() if _loaded(p)})
        return q  # right shape (B, N, heads·d); the step's output is not used here

    with torch.inference_mode(), torch.inference_mode(False), torch.enable_grad():
        with host.instrument(attention=attention_seen) as unet:
            unet(torch.zeros(1, 4, 8, 8), torch.tensor([300]), host.encode(["a cat"]))
    assert {id(m) for m in spy["unload"]} == {id(host.model), id(clip.patcher), id(vae.patcher)}
    assert loaded_during and all(s == set() for s in loaded_during)
    assert _loaded(host._private_patcher())


def test_sampling_runs_on_the_model_loaded_by_comfyui(tiny_parts):
    import comfy.model_management as mm

    from mace_ops.hosts.comfy import ComfyHost

    model, clip, vae = tiny_parts
    before = _state(model)
    host = ComfyHost(model, clip, vae)
    during: list[bool] = []

    def probe(block, probs):
        during.append(any(lm.model is not None and lm.model.is_clone(model) and lm.device == model.load_device
                          for lm in mm.current_loaded_models))

    with torch.inference_mode():
        host.generate(["a cat"], seed=0, steps=1, cfg=1.0, height=64, width=64, attention_probe=probe)
    assert during and all(during)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_out_of_memory_is_a_clear_error(tiny_parts, monkeypatch):
    import comfy.model_management as mm

    from mace_ops.errors import MaceError
    from mace_ops.hosts.comfy import ComfyHost

    def no_memory(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    host = ComfyHost(*tiny_parts).with_weights({})
    monkeypatch.setattr(mm, "load_models_gpu", no_memory)
    with pytest.raises(MaceError, match="not enough memory.*fewer concepts"):
        with torch.inference_mode(False), host.instrument() as unet:
            unet(torch.zeros(1, 4, 8, 8), torch.tensor([300]), torch.zeros(1, 77, 768))
