"""Model families: everything about SD1.x, SD2.x and SDXL that the core must not hard-code.

A family says how a prompt becomes the UNet's cross-attention context and which numbers go with it.
Checked against ComfyUI (``comfy/sd1_clip.py``, ``comfy/sdxl_clip.py``, ``comfy/text_encoders/sd2_clip.py``,
``comfy/supported_models.py``, ``comfy/model_base.py``) and diffusers' SD/SDXL pipelines:

| family | context d | encoders (layer, final LN)                    | pad ids     | label_emb | VAE scale | default px |
|--------|-----------|-----------------------------------------------|-------------|-----------|-----------|------------|
| sd1    | 768       | CLIP-L (last, LN)                             | 49407       | –         | 0.18215   | 512        |
| sd2    | 1024      | OpenCLIP-H (penultimate, LN)                  | 0           | –         | 0.18215   | 768 (v)    |
| sdxl   | 2048      | CLIP-L (penult., no LN) ⊕ bigG (penult., no LN)| 49407 / 0  | 2816      | 0.13025   | 1024       |

The context is ``cat(encoder states, dim=-1)`` in the order of ``encoders`` (SDXL: L then G, 768 + 1280).
SDXL's ``label_emb`` input (``adm``) is ``cat(pooled bigG (1280), 6 × Timestep(256) of (h, w, crop_h,
crop_w, target_h, target_w))``. SD2's final layer norm IS applied to the penultimate layer (ComfyUI's
``SD2ClipHModel`` keeps ``layer_norm_hidden_state=True``; diffusers ships a 23-layer encoder whose output
goes through the final LN: the same states). SD2 768-v checkpoints predict v; SD2-base (512) predicts eps.
All three train on the same noise schedule: ``train_steps`` = 1000, "scaled_linear" betas from
``beta_start`` = 0.00085 to ``beta_end`` = 0.012 (ComfyUI's ``linear_start``/``linear_end``).
Cross-attention blocks are never listed here: hosts enumerate them from the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MaceError

START_ID = 49406
END_ID = 49407


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: its token-state width and how its states are read."""

    name: str  # "clip_l", "clip_h", "clip_g" (ComfyUI's names)
    width: int  # hidden size d_i; the context is the concatenation of every encoder's d_i
    penultimate: bool  # states of the layer before the last (else the last layer)
    final_layer_norm: bool  # the encoder's final layer norm applied to those states
    pad_id: int  # id written after the end token (49407 = end, 0 = "!")
    pooled: bool = False  # its projected pooled output conditions the UNet (SDXL's bigG)


@dataclass(frozen=True)
class ModelFamily:
    """A Stable Diffusion family; see the module docstring for the values."""

    name: str
    encoders: tuple[TextEncoderSpec, ...]
    vae_scale: float  # latents = scale × VAE posterior
    prediction: str  # "epsilon" or "v_prediction" (the family's usual; a checkpoint may differ)
    resolution: int  # default image side in pixels
    max_length: int = 77  # token positions per prompt (start + 75 + end)
    size_embed_dim: int = 0  # SDXL: each of the 6 size numbers goes through Timestep(256)
    train_steps: int = 1000  # T of the training noise schedule
    beta_start: float = 0.00085  # "scaled_linear": β_t = linspace(√beta_start, √beta_end, T)²
    beta_end: float = 0.012

    @property
    def context_dim(self) -> int:
        """Columns of every ``to_k`` / ``to_v``: the sum of the encoders' widths."""
        return sum(e.width for e in self.encoders)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text embedding fed to ``label_emb`` (0: none)."""
        return sum(e.width for e in self.encoders if e.pooled)

    @property
    def adm_dim(self) -> int:
        """Inputs of ``label_emb``'s first linear layer (SDXL 2816 = 1280 + 6·256; 0: no ``label_emb``)."""
        return self.pooled_dim + 6 * self.size_embed_dim if self.pooled_dim else 0

    def size_ids(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """SDXL's size conditioning for an uncropped image: (h, w, crop_h, crop_w, target_h, target_w)."""
        return (height, width, 0, 0, height, width)


CLIP_L = TextEncoderSpec("clip_l", 768, penultimate=False, final_layer_norm=True, pad_id=END_ID)
SD1 = ModelFamily("sd1", (CLIP_L,), vae_scale=0.18215, prediction="epsilon", resolution=512)
SD2 = ModelFamily(
    "sd2",
    (TextEncoderSpec("clip_h", 1024, penultimate=True, final_layer_norm=True, pad_id=0),),
    vae_scale=0.18215,
    prediction="v_prediction",
    resolution=768,
)
SDXL = ModelFamily(
    "sdxl",
    (
        TextEncoderSpec("clip_l", 768, penultimate=True, final_layer_norm=False, pad_id=END_ID),
        TextEncoderSpec("clip_g", 1280, penultimate=True, final_layer_norm=False, pad_id=0, pooled=True),
    ),
    vae_scale=0.13025,
    prediction="epsilon",
    resolution=1024,
    size_embed_dim=256,
)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2, SDXL)}
_ALIASES = {"sd1.x": "sd1", "sd15": "sd1", "sd1.5": "sd1", "sd2.x": "sd2", "sd21": "sd2", "sd2.1": "sd2"}


def family_by_name(name: str | ModelFamily) -> ModelFamily:
    """The family called ``name`` ("sd1", "sd2", "sdxl"); a ``ModelFamily`` passes through."""
    if isinstance(name, ModelFamily):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FAMILIES:
        raise MaceError(f"model family {name!r}: supported are {sorted(FAMILIES)}")
    return FAMILIES[key]


def family_from_unet_dims(context_dim: int, adm_dim: int) -> ModelFamily:
    """The family of a UNet from its cross-attention width and ``label_emb`` inputs (0: none)."""
    for fam in FAMILIES.values():
        if fam.context_dim == context_dim and fam.adm_dim == adm_dim:
            return fam
    raise MaceError(
        f"a UNet with {context_dim}-d cross-attention context and {adm_dim} label_emb inputs is not SD1.x "
        "(768, 0), SD2.x (1024, 0) or SDXL base (2048, 2816): give an SD1.x, SD2.x or SDXL base model"
    )


__all__ = [
    "END_ID",
    "FAMILIES",
    "SD1",
    "SD2",
    "SDXL",
    "START_ID",
    "ModelFamily",
    "TextEncoderSpec",
    "family_by_name",
    "family_from_unet_dims",
]
