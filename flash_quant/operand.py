"""One attention operand (q, k or v) as the attention ops take it.

The schemas (csrc/schema.cpp) spell an operand out as separate arguments: its float
tensor `q`, and when quantized `q_data`, `q_scale`, `q_zero_point` (K also `k_mean`).
OperandArgs names those five once. `operand_kwargs` writes operands under the schema's
argument names and `OperandArgs.from_inputs` reads one back from an op's inputs by those
names, so no code addresses an operand's argument by its position.

A quantized operand's float tensor is never read by a kernel (docs/op_contract.md): only
its shape, dtype and gradient path matter. `stand_in` builds the zero-stride tensor that
takes its place wherever the float values are not at hand or not worth computing.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["ROLES", "OperandArgs", "operand_kwargs", "schema_names", "stand_in"]

#: The operands of the attention ops, in schema order.
ROLES = ("q", "k", "v")

#: The only operand whose smoothing mean the schemas take (`k_mean`).
_MEAN_ROLE = "k"


class OperandArgs(NamedTuple):
    """One operand's arguments. `float` carries shape, dtype and gradient; with `data`
    given the kernels compute with the codes (data - zero_point) * scale instead."""

    float: torch.Tensor | None
    data: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    mean: torch.Tensor | None = None  # K's smoothing mean (k_mean): only for the lse

    @property
    def quantized(self) -> bool:
        return self.data is not None

    def as_kwargs(self, role: str) -> dict[str, torch.Tensor | None]:
        """These arguments under the schema's names for `role` ("q", "k" or "v")."""
        kwargs = {role: self.float, f"{role}_data": self.data, f"{role}_scale": self.scale,
                  f"{role}_zero_point": self.zero_point}
        if role == _MEAN_ROLE:
            kwargs[f"{role}_mean"] = self.mean
        elif self.mean is not None:
            raise ValueError(f"the attention ops take no {role}_mean: only K's smoothing mean is an argument")
        return kwargs

    @classmethod
    def from_inputs(cls, role: str, inputs: Mapping[str, Any]) -> OperandArgs:
        """The operand `role` of an op's inputs given by name (see schema_names)."""
        return cls(inputs[role], inputs[f"{role}_data"], inputs[f"{role}_scale"],
                   inputs[f"{role}_zero_point"], inputs.get(f"{role}_mean"))


def operand_kwargs(q: OperandArgs, k: OperandArgs, v: OperandArgs) -> dict[str, torch.Tensor | None]:
    """The three operands' arguments of attention_forward / attention_backward, by name."""
    return {**q.as_kwargs("q"), **k.as_kwargs("k"), **v.as_kwargs("v")}


def schema_names(op: torch._ops.OpOverload) -> tuple[str, ...]:
    """An op's argument names in schema order (the order of the inputs autograd's
    setup_context gets, defaults filled in, and of the gradients it returns)."""
    return tuple(a.name for a in op._schema.arguments)


def stand_in(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A zero-stride tensor of `shape` and `dtype` (one element in memory): stands for a
    quantized operand's float tensor, whose values no kernel reads."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)
