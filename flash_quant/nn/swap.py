"""quantize_attention(model, config): swap every torch.nn.MultiheadAttention of a model
for flash_quant.nn.MultiheadAttention, in place, and report what was done."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Tuple

from torch import nn

from .multihead_attention import ConfigLike, MultiheadAttention

__all__ = ["SwapReport", "quantize_attention"]

logger = logging.getLogger(__name__)


@dataclass
class SwapReport:
    """What quantize_attention did. `replaced`: qualified names of the swapped modules;
    `skipped`: (name, reason) of nn.MultiheadAttention modules left as they were;
    `notes`: other changes (e.g. nested-tensor conversion turned off)."""

    config: object
    replaced: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        name = self.config if isinstance(self.config, str) else getattr(self.config, "name", self.config)
        lines = [f"flash_quant.quantize_attention(config={name!r}): replaced {len(self.replaced)} nn.MultiheadAttention"]
        lines += [f"  replaced {n}" for n in self.replaced]
        lines += [f"  skipped  {n}: {r}" for n, r in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def quantize_attention(model: nn.Module, config: ConfigLike = "accurate", *, on_unsupported: str = "raise") -> SwapReport:
    """Replace every torch.nn.MultiheadAttention inside `model` by a
    flash_quant.nn.MultiheadAttention sharing its parameters, in place.

    Args:
      model: any nn.Module (not itself an nn.MultiheadAttention: use
        MultiheadAttention.from_float for that).
      config: flash_quant attention config (preset name or AttentionConfig).
      on_unsupported: "raise" (default) raises if a module cannot be converted (a head dim
        flash_quant does not support); "skip" leaves it as it is, logs a warning and lists
        it in the report.

    Subclasses of nn.MultiheadAttention are left alone (their forward may differ) and
    reported as skipped. A module shared under several names is converted once and stays
    shared. nn.TransformerEncoder modules whose layers are converted get
    `use_nested_tensor = False` (their nested-tensor fast path would hand the attention
    nested tensors); the report notes each.

    Returns a SwapReport (print it for a summary).
    """
    if on_unsupported not in ("raise", "skip"):
        raise ValueError(f"on_unsupported must be 'raise' or 'skip', got {on_unsupported!r}")
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError(
            "quantize_attention swaps submodules in place and cannot replace the root module; use "
            "flash_quant.nn.MultiheadAttention.from_float(mha, config) instead"
        )
    report = SwapReport(config=config)
    # Collect every (parent, attribute) slot holding an nn.MultiheadAttention; _modules
    # keeps duplicates (named_children would drop a module registered twice).
    slots = []
    seen_parents = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        if id(parent) in seen_parents:
            continue
        seen_parents.add(id(parent))
        for child_name, child in parent._modules.items():
            if isinstance(child, nn.MultiheadAttention):
                slots.append((f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name, child))
    # Convert everything first, so that an error leaves the model untouched.
    converted = {}  # id(old) -> new, keeps shared modules shared
    for qualname, _, _, child in slots:
        if type(child) is not nn.MultiheadAttention:
            report.skipped.append((qualname, f"{type(child).__name__} is a subclass of nn.MultiheadAttention (its forward may differ)"))
            continue
        if id(child) in converted:
            continue
        try:
            converted[id(child)] = MultiheadAttention.from_float(child, config)
        except ValueError as exc:
            if on_unsupported == "raise":
                raise ValueError(f"cannot convert {qualname} (the model is unchanged): {exc}") from exc
            logger.warning("quantize_attention: leaving %s as torch.nn.MultiheadAttention: %s", qualname, exc)
            report.skipped.append((qualname, str(exc)))
    for qualname, parent, child_name, child in slots:
        if id(child) in converted:
            setattr(parent, child_name, converted[id(child)])
            report.replaced.append(qualname)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False):
            if any(isinstance(m, MultiheadAttention) for m in mod.modules()):
                mod.use_nested_tensor = False
                report.notes.append(f"{name or '<root>'}: nn.TransformerEncoder.use_nested_tensor set to False")
    logger.info("%s", report)
    return report
