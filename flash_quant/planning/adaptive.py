"""Adaptive choice of the attention preset: the choice `config="auto"` makes lives in the
core (flash_quant.auto, so an attention call never imports planning); planning exposes it
under its historical names."""
from __future__ import annotations

from ..auto import AdaptiveThresholds, select_attention_preset, select_attention_preset_static

__all__ = ["AdaptiveThresholds", "select_attention_preset", "select_attention_preset_static"]
