"""The world's judge: a small CNN that reads shape, colour, style and face from a 64×64 image.

Four softmax heads over one conv trunk (64→32→16→8→4 px, then a linear layer each); trained on
seeded renders with generic degradations (random blur by down/up-sampling, Gaussian noise) so that
it reads imperfect samples too; it never sees a model's output. Identity is derived, not learned:

    identity(x) = the name whose look is (shape, colour, style) when face(x), else None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vocab import COLOURS, IDENTITIES, SHAPES, STYLES, Look

HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "style": tuple(STYLES),
                                     "face": ("no", "yes")}
WEIGHTS_FILE = Path(__file__).with_name("weights") / "classifier.safetensors"
_BY_LOOK = {look: name for name, look in IDENTITIES.items()}


class WorldClassifier(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> {head: logits (B, n_head)}."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:], strict=False):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU()]
        self.trunk = nn.Sequential(*layers, nn.Flatten())  # (B, 4w·4·4)
        self.heads = nn.ModuleDict({k: nn.Linear(chans[-1] * 16, len(v)) for k, v in HEADS.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}


@dataclass
class Reading:
    """What the classifier saw in one image."""

    shape: str
    colour: str
    style: str
    face: bool

    @property
    def identity(self) -> str | None:
        return _BY_LOOK.get(Look(self.shape, self.colour, self.style, True)) if self.face else None


def load_classifier(path: Path | str | None = None) -> WorldClassifier:
    from safetensors.torch import load_file

    model = WorldClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(Path(path or WEIGHTS_FILE)).items()})
    return model.eval().requires_grad_(False)


@torch.no_grad()
def read_images(model: WorldClassifier, images: Tensor, batch: int = 256) -> list[Reading]:
    """Readings of (B, 3, 64, 64) images in [-1, 1] (other sizes are resized bilinearly)."""
    out: list[Reading] = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float()
        if x.shape[-1] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        idx = {k: v.argmax(-1).tolist() for k, v in model(x).items()}
        for j in range(len(x)):
            out.append(Reading(SHAPES[idx["shape"][j]], HEADS["colour"][idx["colour"][j]],
                               HEADS["style"][idx["style"][j]], bool(idx["face"][j])))
    return out


def degrade(x: Tensor, rng: np.random.Generator) -> Tensor:
    """Generic training degradations: blur (down/up-sample by 1–2×) with p 0.5, noise σ ∈ [0, 0.15]."""
    if rng.random() < 0.5:
        s = int(rng.integers(32, 56))
        x = F.interpolate(F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False), size=(64, 64),
                          mode="bilinear", align_corners=False)
    return x + torch.randn_like(x) * float(rng.uniform(0, 0.15))


__all__ = ["HEADS", "Reading", "WorldClassifier", "degrade", "load_classifier", "read_images"]
