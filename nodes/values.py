"""The values that travel on our custom sockets (plain containers; no torch or ComfyUI import here).

MACE_CONCEPTS     ConceptsValue      the concept list and the preset settings it came with
MACE_PRESERVATION PreservationValue  cached second moments of the preservation prompts
MACE_LORA_BANK    BankValue          one trained LoRA per concept, with the per-step losses
MACE_ERASURE      ErasureValue       the erased matrices, their differences to the base, provenance
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONCEPTS = "MACE_CONCEPTS"
PRESERVATION = "MACE_PRESERVATION"
LORA_BANK = "MACE_LORA_BANK"
ERASURE = "MACE_ERASURE"
CUSTOM_TYPES = (CONCEPTS, PRESERVATION, LORA_BANK, ERASURE)


@dataclass
class ConceptsValue:
    concepts: list[Any]  # list[mace_ops.concepts.Concept]
    settings: Any  # mace_ops.erasure.ErasureSettings (the preset's weights, or the defaults)
    preset: str | None = None


@dataclass
class PreservationValue:
    statistics: Any  # mace_ops.pipeline.PreservationStatistics
    text_encoder_fingerprint: str
    prompts: list[str] = field(default_factory=list)  # general then retained: SDXL's pooled-channel edit reads them


@dataclass
class BankValue:
    bank: Any  # mace_ops.lora.LoRABank
    concepts: list[Any]
    losses: dict[str, list[float]]
    base_fingerprint: str
    erasure_settings: Any = None  # the concept list's ErasureSettings (fusion weights of its preset)


@dataclass
class ErasureValue:
    erasure: Any  # mace_ops.erasure.Erasure
    diffs: dict[str, Any]  # "<block>.to_k" -> W_new - W0 (float32, CPU)
