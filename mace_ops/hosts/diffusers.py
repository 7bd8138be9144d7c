"""The diffusers host: ``UNet2DConditionModel`` + ``CLIPTextModel`` + ``AutoencoderKL`` (CLI and tests).

Cross-attention blocks are the UNet's ``attn2`` modules, named by their SD1.x LDM paths
(``mace_ops.tiny.ldm_cross_attention_names``). ``instrument`` installs our own attention processor on
each of them and puts the original processors back on exit (also on error); no parameter is ever
written. Trial weights (``with_weights``) live in the host object and reach the UNet only through
that processor, as ``F.linear(context, W)``, so hosts made by ``with_weights`` share one set of modules.

Processor math for one block (the SD1.x case of diffusers' ``AttnProcessor2_0``)::

    q = to_q(h)                          (B, N, heads·d)
    k = to_k(ctx), v = to_v(ctx)         (B, 77, heads·d)   or linears[<block>.to_k/.to_v](ctx)
    o = attention(block, q, k, v, heads) (B, N, heads·d)    default: scaled-dot-product attention
    out = to_out(o)

Families (``mace_ops.family``): SD1.x, SD2.x and SDXL, read from the UNet's context width and
``label_emb`` inputs. The context is the concatenation of each text encoder's states (SDXL: CLIP-L
penultimate ⊕ bigG penultimate, 768 + 1280, no final LN); SDXL's UNet also gets ``label_emb``'s input
``cat(pooled bigG, size ids)``: ``unet(x, t, context, pooled=...)``, size ids (h, w, 0, 0, h, w) in pixels.

Sampling (``generate``): DDIM (η = 0) with SD1.x's scheduler settings (prediction type from the family),
classifier-free guidance with the empty prompt (encoded, as ComfyUI does; not zeros), ``eps = eps_u + cfg·(eps_c - eps_u)``; prompt ``i``'s initial noise comes from
``torch.Generator().manual_seed(seed + i)`` on the CPU.
``vae_encode`` returns the MEAN of the VAE posterior times the scaling factor (deterministic).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import explicit_attention, sdpa_attention
from ..errors import MaceError
from ..family import SD1, ModelFamily, family_by_name, family_from_unet_dims
from ..tiny import (
    build_tiny,
    build_tiny_sd,
    ldm_cross_attention_names,
    sd1_alphas_cumprod,
)
from ..tokens import load_sd1_tokenizer, padded_token_ids, sd1_token_ids
from .base import (
    AttentionFn,
    CrossAttentionBlock,
    LinearFn,
    UNetFn,
    check_generate_args,
    check_matrix_names,
    check_weight_shapes,
    weights_fingerprint,
)

#: SD1.x's sampler settings (scheduler_config.json of the SD1.x pipelines), for DDIMScheduler.from_config
SD1_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": SD1.train_steps,
    "beta_start": SD1.beta_start,
    "beta_end": SD1.beta_end,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _check_sd1_attention(name: str, attn: nn.Module) -> None:
    """Refuse diffusers attention options our processor does not implement (none is used by SD1.x)."""
    unexpected = []
    if getattr(attn, "spatial_norm", None) is not None:
        unexpected.append("spatial_norm")
    if getattr(attn, "group_norm", None) is not None:
        unexpected.append("group_norm")
    if getattr(attn, "norm_cross", None):
        unexpected.append("norm_cross")
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        unexpected.append("norm_q/norm_k")
    if getattr(attn, "residual_connection", False):
        unexpected.append("residual_connection")
    if getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        unexpected.append("rescale_output_factor")
    if getattr(attn, "to_k", None) is None or getattr(attn.to_k, "bias", None) is not None:
        unexpected.append("to_k bias")
    if getattr(attn, "to_v", None) is None or getattr(attn.to_v, "bias", None) is not None:
        unexpected.append("to_v bias")
    if unexpected:
        raise MaceError(
            f"cross-attention {name} uses {', '.join(unexpected)}, which MACE's processor does not support; "
            "use an SD1.x-style UNet"
        )


class _MaceProcessor:
    """Our diffusers attention processor for one cross-attention block (see the module docstring)."""

    def __init__(
        self, block: str, to_k: LinearFn | None, to_v: LinearFn | None, attention: AttentionFn | None
    ) -> None:
        self.block = block
        self.to_k = to_k
        self.to_v = to_v
        self.attention = attention

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise MaceError(f"cross-attention {self.block}: attention masks are not supported")
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise MaceError(f"cross-attention {self.block}: expected (B, N, C) states and a text context")
        ctx = encoder_hidden_states  # (B, 77, d_ctx)
        q = attn.to_q(hidden_states)  # (B, N, heads·d)
        k = self.to_k(ctx) if self.to_k is not None else attn.to_k(ctx)  # (B, 77, heads·d)
        v = self.to_v(ctx) if self.to_v is not None else attn.to_v(ctx)
        if self.attention is not None:  # k/v as projected (float32 through a LoRA): it picks its precision
            out = self.attention(self.block, q, k, v, attn.heads)
        else:
            out = sdpa_attention(q, k.to(q.dtype), v.to(q.dtype), attn.heads)
        out = attn.to_out[0](out.to(q.dtype))
        return attn.to_out[1](out)


def _weight_linear(weight: Tensor) -> LinearFn:
    def linear(ctx: Tensor) -> Tensor:  # (B, L, d_ctx) -> (B, L, d_out)
        return F.linear(ctx, weight.to(ctx.device, ctx.dtype))

    return linear


def check_diffusers_folder(folder: str | os.PathLike[str]) -> None:
    """Cheap check, headers only, of a diffusers SD1.x folder: ``unet/``, ``text_encoder/`` and ``vae/``
    each with a ``config.json`` and complete ``.safetensors`` weights (pickles are never opened)."""
    from ..io import check_safetensors_file

    root = os.fspath(folder)
    for sub in ("unet", "text_encoder", "vae"):
        where = os.path.join(root, sub)
        if not os.path.isdir(where):
            raise MaceError(f"diffusers folder {root} has no {sub}/ subfolder: it is not a model; give an SD1.x "
                            "diffusers folder or a .safetensors checkpoint file")
        weights = sorted(f for f in os.listdir(where) if f.endswith(".safetensors"))
        if not weights:
            raise MaceError(f"diffusers folder {root}: {sub}/ has no .safetensors weights (.bin/.ckpt pickles are "
                            "refused and never unpickled); convert the weights to safetensors")
        if not os.path.isfile(os.path.join(where, "config.json")):
            raise MaceError(f"diffusers folder {root}: {sub}/ has no config.json; give a complete diffusers folder")
        for name in weights:
            check_safetensors_file(os.path.join(where, name), "weights file")


def _context_memo_linear(weight: Tensor) -> LinearFn:
    """``F.linear(ctx, weight)`` computed once per context tensor (sampling reuses one context every step)."""
    memo: dict[tuple, Tensor] = {}

    def linear(ctx: Tensor) -> Tensor:  # (B, L, d_ctx) -> (B, L, d_out)
        key = (ctx.data_ptr(), tuple(ctx.shape), ctx.dtype, ctx.device)
        if key not in memo:
            memo.clear()
            memo[key] = F.linear(ctx, weight.to(ctx.device, ctx.dtype))
        return memo[key]

    return linear


class DiffusersHost:
    """A ``Host`` over diffusers/transformers modules; ``with_weights`` copies share them.

    No parameter is ever written. The constructor only prepares the modules it is given: moves them
    to ``device`` (the UNet also to ``dtype``), sets eval mode and ``requires_grad_(False)``.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        vae: nn.Module,
        *,
        text_encoder_2: nn.Module | None = None,
        family: ModelFamily | str | None = None,
        tokenizer: Any = None,
        alphas_cumprod: Tensor | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``tokenizer`` defaults to the SD1.x CLIP tokenizer; ``scheduler_config`` to SD1.x's;
        ``alphas_cumprod`` to the one derived from the scheduler config. Modules are moved to
        ``device`` (when given), the UNet to ``dtype`` (default: it keeps its own), put in eval mode
        and frozen. The UNet runs in its dtype; text states come back as float32 whatever the
        encoder's dtype."""
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.dtype = dtype if dtype is not None else next(unet.parameters()).dtype
        self.text_encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
        for m in (unet, *self.text_encoders, vae):
            m.to(self.device).eval().requires_grad_(False)
        if next(unet.parameters()).dtype != self.dtype:
            unet.to(self.dtype)
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.family = family_by_name(family) if family is not None else self._unet_family(unet)
        if len(self.text_encoders) != len(self.family.encoders):
            raise MaceError(f"a {self.family.name} model needs {len(self.family.encoders)} text encoder(s); "
                            f"{len(self.text_encoders)} given")
        self.max_length = self.family.max_length
        self.tokenizer = tokenizer if tokenizer is not None else load_sd1_tokenizer()  # BPE shared by L, H, bigG
        default_sched = {**SD1_SCHEDULER_CONFIG, "prediction_type": self.family.prediction}
        self.scheduler_config = dict(default_sched if scheduler_config is None else scheduler_config)
        if alphas_cumprod is None:
            alphas_cumprod = self._schedule_alphas()
        self._alphas = alphas_cumprod.detach().to("cpu", torch.float64).clone()
        self._modules_by_name = self._find_blocks(unet)  # LDM name -> attn2 module, forward order
        self._check_context_width()
        self._weights: dict[str, Tensor] = {}  # overrides of to_k / to_v
        self._label_emb: Tensor | None = None  # override of label_emb.0.0.weight (SDXL pooled channel)
        self._shared: dict[str, Any] = {}  # cached fingerprints, shared with with_weights copies

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tiny(cls, seed: int = 0, family: str = "sd1", **kwargs: Any) -> DiffusersHost:
        """A host over ``mace_ops.tiny.build_tiny(family, seed)`` (tests, benchmarks)."""
        sd = build_tiny_sd(seed) if family == "sd1" else build_tiny(family, seed)
        return cls(sd.unet, sd.text_encoder, sd.vae, text_encoder_2=sd.text_encoder_2, family=sd.family,
                   alphas_cumprod=sd.alphas_cumprod, **kwargs)

    @staticmethod
    def _unet_family(unet: nn.Module) -> ModelFamily:
        """The family read from the UNet: its cross-attention width and ``label_emb`` inputs."""
        width = getattr(unet.config, "cross_attention_dim", None)
        add = getattr(unet, "add_embedding", None)
        adm = int(add.linear_1.in_features) if add is not None and hasattr(add, "linear_1") else 0
        return family_from_unet_dims(int(width if not isinstance(width, (list, tuple)) else width[0]), adm)

    @classmethod
    def from_world(cls, **kwargs: Any) -> DiffusersHost:
        """A host over the trained toy-world model shipped in the package (``mace_ops.world``)."""
        from ..world.model import load_world_model

        sd = load_world_model()
        return cls(sd.unet, sd.text_encoder, sd.vae, alphas_cumprod=sd.alphas_cumprod, **kwargs)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], *, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> DiffusersHost:
        """A host over a local diffusers SD1.x / SD2.x / SDXL folder (``unet/``, ``text_encoder/``, ``vae/``,
        SDXL's ``text_encoder_2/``, optional ``tokenizer/`` and ``scheduler/``), offline, safetensors only.
        The family is read from the UNet; padding follows the family (bigG and OpenCLIP-H pad with 0)."""
        import json

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        root = os.fspath(folder)
        check_diffusers_folder(root)
        opts = {"local_files_only": True, "use_safetensors": True}
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **opts)
        text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **opts)
        text_encoder_2 = None  # SDXL: bigG with its projection (the pooled channel)
        if os.path.isdir(os.path.join(root, "text_encoder_2")):
            from transformers import CLIPTextModelWithProjection

            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **opts)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **opts)
        tokenizer = None  # the folder's own tokenizer when it has one, else the SD1.x one
        if os.path.isfile(os.path.join(root, "tokenizer", "vocab.json")):
            import transformers

            cls_ = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
            tokenizer = cls_.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        scheduler_config = None
        sched = os.path.join(root, "scheduler", "scheduler_config.json")
        if os.path.isfile(sched):
            with open(sched, encoding="utf-8") as f:
                raw = json.load(f)
            scheduler_config = {**SD1_SCHEDULER_CONFIG, **{k: v for k, v in raw.items() if k in SD1_SCHEDULER_CONFIG}}
        return cls(unet, text_encoder, vae, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                   scheduler_config=scheduler_config, device=device, dtype=dtype)

    def _schedule_alphas(self) -> Tensor:
        c = self.scheduler_config
        if c.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise MaceError(f"scheduler beta_schedule {c.get('beta_schedule')!r}: only SD1.x's scaled_linear is supported")
        return sd1_alphas_cumprod(int(c["num_train_timesteps"]), float(c["beta_start"]), float(c["beta_end"]))

    @staticmethod
    def _find_blocks(unet: nn.Module) -> dict[str, nn.Module]:
        names = ldm_cross_attention_names(unet)
        if not names:
            raise MaceError("the UNet has no cross-attention blocks; give an SD1.x-style UNet2DConditionModel")
        blocks = {}
        for path, ldm in names.items():
            module = unet.get_submodule(path)
            _check_sd1_attention(ldm, module)
            blocks[ldm] = module
        return blocks

    def _check_context_width(self) -> None:
        """Every cross-attention block must read the concatenated token width of the text encoders
        (the family's context: SD1.x 768, SD2.x 1024, SDXL 768 + 1280)."""
        widths = [getattr(getattr(e, "config", None), "hidden_size", None) for e in self.text_encoders]
        width = None if None in widths else sum(int(w) for w in widths)
        for name, m in self._modules_by_name.items():
            d_ctx = int(m.to_k.weight.shape[1])
            if d_ctx != self.family.context_dim or (width is not None and d_ctx != width):
                raise MaceError(
                    f"cross-attention {name} reads {d_ctx}-d context but the text encoders give {width}-d "
                    f"token states ({self.family.name}: {self.family.context_dim}): the UNet and text encoders "
                    "do not belong together; give a complete SD1.x, SD2.x or SDXL model"
                )

    def with_weights(self, weights: Mapping[str, Tensor]) -> DiffusersHost:
        """A new host sharing the modules whose to_k/to_v are ``weights`` (missing names keep this host's).

        The weights are stored in the model's own dtype (an fp16 model gets fp16 weights, rounded to
        nearest), as they would be written into it."""
        originals = self._original_weights()
        shapes = {n: tuple(w.shape) for n, w in originals.items()}
        check_matrix_names("weights", weights, shapes)
        check_weight_shapes(weights, shapes)
        new = object.__new__(DiffusersHost)
        new.__dict__.update(self.__dict__)
        new._weights = {
            **self._weights,
            **{n: w.detach().to(self.device, originals[n].dtype, copy=True) for n, w in weights.items()},
        }
        return new

    def label_emb_weight(self) -> Tensor | None:
        """A copy of ``label_emb.0.0.weight`` (diffusers ``add_embedding.linear_1``), (d_t, 2816); None
        when the UNet has no ``label_emb`` (SD1.x, SD2.x)."""
        if self._label_emb is not None:
            return self._label_emb.detach().clone()
        add = getattr(self.unet, "add_embedding", None)
        return None if add is None else add.linear_1.weight.detach().clone()

    def with_label_emb(self, weight: Tensor) -> DiffusersHost:
        """A new host whose UNet runs with ``label_emb.0.0.weight = weight`` (the modules are untouched:
        the weight is passed to each forward with ``torch.func.functional_call``)."""
        current = self.label_emb_weight()
        if current is None or tuple(weight.shape) != tuple(current.shape):
            raise MaceError(f"label_emb weight of shape {tuple(weight.shape)}: the model has "
                            f"{None if current is None else tuple(current.shape)}")
        new = object.__new__(DiffusersHost)
        new.__dict__.update(self.__dict__)
        new._label_emb = weight.detach().to(self.device, current.dtype, copy=True)
        return new

    # ------------------------------------------------------------------ text
    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """The first encoder's ids with its padding (SDXL: CLIP-L's; bigG's differ only after the end token)."""
        return self._encoder_ids(prompts, 0)

    def _encoder_ids(self, prompts: Sequence[str], i: int) -> list[list[int]]:
        pad = self.family.encoders[i].pad_id
        if self.family is SD1:
            return sd1_token_ids(list(prompts), self.tokenizer)
        return padded_token_ids(list(prompts), self.tokenizer, pad, self.max_length)

    def _encoder_states(self, i: int, prompts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Encoder i's token states (B, 77, d_i) as its family reads them, and its pooled output when used."""
        spec, enc = self.family.encoders[i], self.text_encoders[i]
        ids = torch.tensor(self._encoder_ids(prompts, i), dtype=torch.long, device=self.device)  # (B, 77)
        if not spec.penultimate:  # SD1.x: last hidden state after the final layer norm
            out = enc(input_ids=ids)
            return out.last_hidden_state.float(), None
        out = enc(input_ids=ids, output_hidden_states=True)
        # diffusers' SD2 encoder is OpenCLIP-H without its last layer (23 of 24): its output after the
        # final LN is already "penultimate + LN"
        if spec.name == "clip_h" and int(enc.config.num_hidden_layers) == 23:
            states = out.last_hidden_state
        else:
            states = out.hidden_states[-2]  # (B, 77, d_i): input of the last layer
            if spec.final_layer_norm:
                states = getattr(enc, "text_model", enc).final_layer_norm(states)  # transformers 4 and 5
        pooled = out.text_embeds.float() if spec.pooled else None  # (B, d_i): projected pooled output
        return states.float(), pooled

    @torch.no_grad()
    def encode_with_pooled(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """``(context (B, 77, d_ctx), pooled (B, d_pooled) or None)``: the encoders' states concatenated."""
        parts = [self._encoder_states(i, prompts) for i in range(len(self.text_encoders))]
        pooled = [p for _, p in parts if p is not None]
        return torch.cat([s for s, _ in parts], dim=-1), (torch.cat(pooled, dim=-1) if pooled else None)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """The UNet's text context, (B, 77, d_ctx) float32 (SD1.x: last hidden state after the final LN)."""
        return self.encode_with_pooled(prompts)[0]

    @torch.no_grad()
    def encode_pooled(self, prompts: Sequence[str]) -> Tensor | None:
        """The pooled text embedding fed to ``label_emb`` (SDXL: bigG's, (B, 1280)); None for SD1.x/SD2.x."""
        if not self.family.pooled_dim:
            return None
        return self.encode_with_pooled(prompts)[1]

    # ------------------------------------------------------------------ weights
    def cross_attention_blocks(self) -> list[CrossAttentionBlock]:
        out = []
        for name, m in self._modules_by_name.items():
            d_out, d_ctx = m.to_k.weight.shape
            out.append(CrossAttentionBlock(name, int(m.heads), int(d_out) // int(m.heads), int(d_out), int(d_ctx)))
        return out

    def _original_weights(self) -> dict[str, Tensor]:
        """The modules' own to_k/to_v weights (not copies; never written)."""
        out = {}
        for name, m in self._modules_by_name.items():
            out[f"{name}.to_k"] = m.to_k.weight
            out[f"{name}.to_v"] = m.to_v.weight
        return out

    def cross_attention_weights(self) -> dict[str, Tensor]:
        """Detached copies of this host's to_k/to_v (the ``with_weights`` overrides where present)."""
        return {n: self._weights.get(n, w).detach().clone() for n, w in self._original_weights().items()}

    def model_fingerprint(self) -> str:
        """``weights_fingerprint`` of the MODULES' own to_k/to_v in block order (not of ``with_weights``
        overrides: a host and its ``with_weights`` copies share the base model's fingerprint)."""
        if "model" not in self._shared:
            w = self._original_weights()
            self._shared["model"] = weights_fingerprint(w, list(w))
        return self._shared["model"]

    def text_encoder_fingerprint(self) -> str:
        """``weights_fingerprint`` of every text-encoder tensor (state_dict order, encoders in order)."""
        if "text" not in self._shared:
            sd = dict(self.text_encoder.state_dict())
            for i, enc in enumerate(self.text_encoders[1:], start=2):  # SDXL: bigG's tensors as "te<i>.<key>"
                sd.update({f"te{i}.{k}": v for k, v in enc.state_dict().items()})
            self._shared["text"] = weights_fingerprint(sd, list(sd))
        return self._shared["text"]

    # ------------------------------------------------------------------ UNet
    @contextmanager
    def instrument(
        self,
        *,
        linears: Mapping[str, LinearFn] | None = None,
        attention: AttentionFn | None = None,
    ) -> Iterator[UNetFn]:
        """Our processor on every cross-attention block while open; the original processors come back on exit."""
        linears = dict(linears or {})
        check_matrix_names("linears", linears, set(self._original_weights()))
        for n, w in self._weights.items():
            linears.setdefault(n, _weight_linear(w))
        saved: list[tuple[nn.Module, Any]] = []
        try:
            for name, m in self._modules_by_name.items():
                proc = _MaceProcessor(name, linears.get(f"{name}.to_k"), linears.get(f"{name}.to_v"), attention)
                saved.append((m, m.processor))
                m.set_processor(proc)
            yield self._unet_fn
        finally:
            for m, proc in reversed(saved):
                m.set_processor(proc)

    def _unet_fn(self, x_t: Tensor, t: Tensor, context: Tensor, pooled: Tensor | None = None) -> Tensor:
        """UNet(x_t (B,4,h,w), t (B,) or scalar, context (B,77,d_ctx)[, pooled (B,d_pooled)]), host dtype.

        SDXL needs ``pooled``; its size ids are those of an uncropped image of the latent's size × 8."""
        x = x_t.to(self.device, self.dtype)
        c = context.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        kwargs: dict[str, Any] = {}
        if self.family.adm_dim:
            if pooled is None:
                raise MaceError(f"a {self.family.name} UNet needs the pooled text embedding (host.encode_pooled)")
            sizes = self.family.size_ids(x.shape[-2] * 8, x.shape[-1] * 8)
            time_ids = torch.tensor([sizes], device=self.device, dtype=self.dtype).expand(x.shape[0], -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids}
        if self._label_emb is not None:
            params = {"add_embedding.linear_1.weight": self._label_emb}
            kwargs.update(encoder_hidden_states=c, return_dict=False)
            return torch.func.functional_call(self.unet, params, (x, t), kwargs)[0]
        return self.unet(x, t, encoder_hidden_states=c, return_dict=False, **kwargs)[0]

    def alphas_cumprod(self) -> Tensor:
        return self._alphas.clone()

    # ------------------------------------------------------------------ VAE
    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", self.family.vae_scale))

    @torch.no_grad()
    def vae_encode(self, images: Tensor) -> Tensor:
        """Images (B,3,H,W) in [-1, 1] -> posterior mean × scaling factor, (B,4,H/8,W/8) float32."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(self.device, vae_dtype).contiguous()).latent_dist
        return (dist.mean * self.scaling_factor).float()

    @torch.no_grad()
    def vae_decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images (B,3,H,W) clamped to [-1, 1], float32."""
        vae_dtype = next(self.vae.parameters()).dtype
        img = self.vae.decode(latents.to(self.device, vae_dtype).contiguous() / self.scaling_factor).sample
        return img.float().clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int,
        steps: int = 30,
        cfg: float = 7.5,
        height: int = 512,
        width: int = 512,
        attention_probe: Callable[[str, Tensor], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """DDIM + classifier-free guidance (see the module docstring); images (B,3,H,W) in [-1, 1]."""
        from diffusers import DDIMScheduler

        prompts = check_generate_args(prompts, steps=steps, height=height, width=width)
        b = len(prompts)
        guided = cfg != 1.0
        cond, cond_pooled = self.encode_with_pooled(prompts)  # (B, 77, d), (B, d_pooled) or None
        empty, empty_pooled = self.encode_with_pooled([""])
        context = torch.cat([empty.expand(b, -1, -1), cond]) if guided else cond  # (2B or B, 77, d)
        pooled = cond_pooled
        if cond_pooled is not None and guided:
            pooled = torch.cat([empty_pooled.expand(b, -1), cond_pooled])  # (2B, d_pooled)
        noise = [
            torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed + i))
            for i in range(b)
        ]
        x = torch.cat(noise).to(self.device, torch.float32)  # (B, 4, h, w)
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        x = x * scheduler.init_noise_sigma

        attention: AttentionFn | None = None
        if attention_probe is not None:

            def attention(block: str, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
                def sink(probs: Tensor) -> None:  # (2B or B, heads, N, 77)
                    attention_probe(block, probs[b:] if guided else probs)

                return explicit_attention(q, k, v, heads, sink=sink)

        total = len(scheduler.timesteps)
        # the context is one tensor for the whole loop: its keys/values are projected once, not every step
        linears = {n: _context_memo_linear(self._weights.get(n, w)) for n, w in self._original_weights().items()}
        with self.instrument(linears=linears, attention=attention) as unet:
            for i, t in enumerate(scheduler.timesteps):
                x_in = torch.cat([x, x]) if guided else x
                eps = unet(x_in, t.expand(x_in.shape[0]), context, pooled).float()
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + cfg * (eps_c - eps_u)
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
                if progress is not None:
                    progress(i + 1, total)
        return self.vae_decode(x)


__all__ = ["SD1_SCHEDULER_CONFIG", "DiffusersHost", "weights_fingerprint"]
