"""Host adapters: what `mace_ops` needs from a model host (diffusers, ComfyUI)."""

from .base import AttentionFn, CrossAttentionBlock, Host, LinearFn

__all__ = ["AttentionFn", "CrossAttentionBlock", "Host", "LinearFn"]
