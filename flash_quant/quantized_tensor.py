"""QuantizedTensor: quantized data with its scales, zero points and provenance."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.utils._pytree as pytree

from . import ops
from .config import STRATEGY_VERSION, Granularity, PerTensor, Precision, Strategy

__all__ = ["QuantizedTensor", "FORMAT_VERSION"]

#: Version of the serialized layout (the state dict written by torch.save).
FORMAT_VERSION = 1

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def _tracing() -> bool:
    return torch.compiler.is_compiling()


class QuantizedTensor:
    """A tensor stored in INT8 / INT4 / FP8 with explicit quantization parameters.

    Fields:
      data        int8 (INT8), uint8 with two values per byte (INT4, even element in the
                  low nibble), or a torch float8 dtype (FP8); logical layout of the original.
      scale       float32, one per group (shape given by the granularity, see
                  docs/op_contract.md); dequantized = (data - zero_point) * scale (+ mean).
      zero_point  int32, same shape as scale; all zeros unless strategy is asymmetric.
      mean        float32 per-channel centre removed before quantizing (smoothing: the
                  robust centre of flash_quant.key_stats from flash_quant.quantize), or None.
      rotated     True when the values were Hadamard-rotated along the last dim first
                  (dequantize() undoes it).
      precision, strategy, strategy_version, granularity, orig_shape, orig_dtype.

    Build one with `flash_quant.quantize(x, ...)`; it can be passed to
    `flash_quant.attention` in place of a float Q, K or V (quantize once, attend many
    times), saved with torch.save and loaded with torch.load(weights_only=True).
    """

    def __init__(
        self,
        data: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        *,
        precision: Precision,
        strategy: Strategy,
        granularity: Granularity,
        orig_shape: Tuple[int, ...],
        orig_dtype: torch.dtype,
        mean: Optional[torch.Tensor] = None,
        rotated: bool = False,
        strategy_version: int = STRATEGY_VERSION,
        check_values: bool = True,
    ):
        self.data = data
        self.scale = scale
        self.zero_point = zero_point
        self.precision = Precision(precision)
        self.strategy = Strategy(strategy)
        self.granularity = granularity
        self.orig_shape = tuple(int(s) for s in orig_shape)
        self.orig_dtype = orig_dtype
        self.mean = mean
        if not isinstance(rotated, bool):  # "no" or 0.5 would read as True
            raise TypeError(f"rotated must be True or False, got {rotated!r}")
        self.rotated = rotated
        self.strategy_version = int(strategy_version)
        self._validate_structure()
        if check_values and not _tracing():
            self._validate_values()

    # ------------------------------------------------------------------ validation
    def _validate_structure(self):
        if not self.precision.is_quantized:
            raise ValueError(f"QuantizedTensor precision must be int8/int4/fp8, got {self.precision.value}")
        if self.strategy_version > STRATEGY_VERSION or self.strategy_version < 1:
            raise ValueError(
                f"QuantizedTensor strategy_version {self.strategy_version} is not supported by this "
                f"flash_quant (knows versions 1..{STRATEGY_VERSION}); upgrade flash_quant"
            )
        if not isinstance(self.granularity, Granularity):
            raise TypeError(f"granularity must be a Granularity, got {self.granularity!r}")
        if self.orig_dtype not in _DTYPE_NAMES:
            raise ValueError(f"orig_dtype must be float32/float16/bfloat16, got {self.orig_dtype}")
        expected = self.precision.storage_dtype
        if self.data.dtype != expected:
            raise ValueError(f"{self.precision.value} data must be {expected}, got {self.data.dtype}")
        shape = self.orig_shape
        if self.precision is Precision.INT4:
            if shape[-1] % 2:
                raise ValueError(f"INT4 packs two values per byte: the last dim must be even, got {shape[-1]}")
            packed = shape[:-1] + (shape[-1] // 2,)
            if tuple(self.data.shape) != packed:
                raise ValueError(f"INT4 data shape {tuple(self.data.shape)} does not match packed shape {packed}")
        elif tuple(self.data.shape) != shape:
            raise ValueError(f"data shape {tuple(self.data.shape)} does not match orig_shape {shape}")
        sshape = ops.scale_shape(shape, self.granularity.name, self.granularity.block_size)
        if tuple(self.scale.shape) != sshape:
            raise ValueError(
                f"scale shape {tuple(self.scale.shape)} does not match {self.granularity.name} "
                f"granularity of shape {shape} (expected {sshape})"
            )
        if self.scale.dtype != torch.float32:
            raise ValueError(f"scale must be float32, got {self.scale.dtype}")
        if tuple(self.zero_point.shape) != sshape or self.zero_point.dtype != torch.int32:
            raise ValueError(
                f"zero_point must be int32 of shape {sshape}, got {self.zero_point.dtype} {tuple(self.zero_point.shape)}"
            )
        if self.strategy is Strategy.LEGACY and self.granularity.name != "per_tensor":
            raise ValueError("legacy strategy is per-tensor: granularity must be PerTensor()")
        if self.strategy is Strategy.ASYMMETRIC and not self.precision.is_integer:
            raise ValueError("asymmetric strategy needs int8 or int4 precision")
        if self.mean is not None:
            mshape = shape[:-2] + (1, shape[-1])
            if tuple(self.mean.shape) != mshape or self.mean.dtype != torch.float32:
                raise ValueError(f"mean must be float32 of shape {mshape}, got {self.mean.dtype} {tuple(self.mean.shape)}")
        devices = {t.device for t in (self.data, self.scale, self.zero_point) if t is not None}
        if self.mean is not None:
            devices.add(self.mean.device)
        if len(devices) != 1:
            raise ValueError(f"data, scale, zero_point and mean must be on one device, got {sorted(map(str, devices))}")

    def _validate_values(self):
        """Checks that read values (a device sync): run on construction and load, not in
        the hot path of flash_quant.quantize."""
        if not bool(torch.isfinite(self.scale).all()):
            raise ValueError("QuantizedTensor scale has non-finite values")
        if not bool((self.scale > 0).all()):
            raise ValueError("QuantizedTensor scale must be > 0 everywhere")
        if self.mean is not None and not bool(torch.isfinite(self.mean).all()):
            raise ValueError("QuantizedTensor mean has non-finite values (NaN or inf)")
        if self.strategy is not Strategy.ASYMMETRIC and bool((self.zero_point != 0).any()):
            raise ValueError(f"{self.strategy.value} quantization has no zero point: zero_point must be 0")
        if self.strategy is Strategy.ASYMMETRIC:
            lo, hi = int(self.precision.qmin), int(self.precision.qmax)
            if bool((self.zero_point < lo).any()) or bool((self.zero_point > hi).any()):
                raise ValueError(f"zero_point out of the {self.precision.value} range [{lo}, {hi}]")

    # ------------------------------------------------------------------ views
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.orig_shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the original (and of dequantize())."""
        return self.orig_dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held: data, scales, zero points (only when asymmetric) and the mean."""
        total = self.data.nbytes + self.scale.nbytes
        if self.strategy is Strategy.ASYMMETRIC:
            total += self.zero_point.nbytes
        if self.mean is not None:
            total += self.mean.nbytes
        return total

    def compression_ratio(self, reference_dtype: Optional[torch.dtype] = None) -> float:
        """nbytes / bytes of the original in `reference_dtype` (default: orig_dtype)."""
        dt = reference_dtype or self.orig_dtype
        return self.nbytes / (math.prod(self.orig_shape) * torch.empty((), dtype=dt).element_size())

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float tensor this stands for, in `dtype` (default orig_dtype)."""
        mean = self.mean if self.mean is not None else self.scale.new_empty((0,))
        out = ops.dequantize(
            self.data, self.scale, self.zero_point, mean, self.precision.value,
            self.granularity.block_size, torch.float32,
        )
        if self.rotated:
            from .rotation import unrotate

            out = unrotate(out)
        return out.to(dtype or self.orig_dtype)

    def to(self, device) -> "QuantizedTensor":
        """A copy on `device` (dtype conversion is not offered: it would change the format)."""
        if isinstance(device, torch.dtype):
            raise TypeError("QuantizedTensor.to takes a device; use dequantize(dtype) for a float copy")
        return self._replace(
            data=self.data.to(device), scale=self.scale.to(device), zero_point=self.zero_point.to(device),
            mean=None if self.mean is None else self.mean.to(device),
        )

    def _replace(self, **tensors) -> "QuantizedTensor":
        fields = dict(
            data=self.data, scale=self.scale, zero_point=self.zero_point, mean=self.mean,
        )
        fields.update(tensors)
        return QuantizedTensor(
            fields["data"], fields["scale"], fields["zero_point"], mean=fields["mean"],
            **self._meta(), check_values=False,
        )

    def _meta(self) -> dict:
        return dict(
            precision=self.precision, strategy=self.strategy, granularity=self.granularity,
            orig_shape=self.orig_shape, orig_dtype=self.orig_dtype, rotated=self.rotated,
            strategy_version=self.strategy_version,
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={tuple(self.orig_shape)}, precision={self.precision.value}, "
            f"strategy={self.strategy.value}, granularity={self.granularity}, smooth={self.mean is not None}, "
            f"rotated={self.rotated}, orig_dtype={self.orig_dtype}, device={self.device}, nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------------ serialization
    def __reduce_ex__(self, protocol):
        state = {
            "format_version": FORMAT_VERSION,
            "strategy_version": self.strategy_version,
            "precision": self.precision.value,
            "strategy": self.strategy.value,
            "granularity": self.granularity.name,
            "block_size": self.granularity.block_size,
            "orig_shape": list(self.orig_shape),
            "orig_dtype": _DTYPE_NAMES[self.orig_dtype],
            "rotated": self.rotated,
            "data": self.data,
            "scale": self.scale,
            "zero_point": self.zero_point,
            "mean": self.mean,
        }
        return (_rebuild_quantized_tensor, (state,))


def _granularity_from(name: str, block_size: int) -> Granularity:
    from .config import PerBlock, PerChannel, PerHead, PerToken

    kinds = {"per_tensor": PerTensor, "per_head": PerHead, "per_token": PerToken, "per_channel": PerChannel}
    if name == "per_block":
        return PerBlock(int(block_size))
    if name not in kinds:
        raise ValueError(f"unknown granularity {name!r} in a saved QuantizedTensor")
    return kinds[name]()


#: Keys of a saved state (format version 1), as written by __reduce_ex__.
_STATE_KEYS = (
    "format_version", "strategy_version", "precision", "strategy", "granularity", "block_size",
    "orig_shape", "orig_dtype", "rotated", "data", "scale", "zero_point", "mean",
)


def _rebuild_quantized_tensor(state: dict) -> QuantizedTensor:
    """Unpickling entry point (registered for torch.load(weights_only=True) by
    flash_quant/_serialization.py on `import flash_quant`)."""
    if not isinstance(state, dict):
        raise ValueError(f"malformed saved QuantizedTensor: expected a state dict, got {type(state).__name__}")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"cannot load a QuantizedTensor of format version {version!r}: this flash_quant reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"malformed saved QuantizedTensor: missing {', '.join(missing)}")
    for key in ("data", "scale", "zero_point", "mean"):
        if not isinstance(state[key], torch.Tensor) and not (key == "mean" and state[key] is None):
            raise ValueError(f"malformed saved QuantizedTensor: {key} is {type(state[key]).__name__}, not a tensor")
    if state["orig_dtype"] not in _DTYPES:
        raise ValueError(f"unknown orig_dtype {state['orig_dtype']!r} in a saved QuantizedTensor")
    try:
        return QuantizedTensor(
            state["data"], state["scale"], state["zero_point"], mean=state["mean"],
            precision=Precision(state["precision"]), strategy=Strategy(state["strategy"]),
            granularity=_granularity_from(state["granularity"], state["block_size"]),
            orig_shape=tuple(state["orig_shape"]), orig_dtype=_DTYPES[state["orig_dtype"]],
            rotated=state["rotated"], strategy_version=state["strategy_version"],
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"malformed saved QuantizedTensor: {err}") from err


# pytree: the tensors are children, the rest is static context, so torch.compile and
# torch.export see a QuantizedTensor as four tensors plus constants.
def _flatten(qt: QuantizedTensor):
    return [qt.data, qt.scale, qt.zero_point, qt.mean], tuple(sorted(qt._meta().items()))


def _unflatten(children, context) -> QuantizedTensor:
    data, scale, zero_point, mean = children
    return QuantizedTensor(data, scale, zero_point, mean=mean, **dict(context), check_values=False)


def _flatten_with_keys(qt: QuantizedTensor):
    children, context = _flatten(qt)
    keys = [pytree.GetAttrKey(n) for n in ("data", "scale", "zero_point", "mean")]
    return list(zip(keys, children)), context


pytree.register_pytree_node(
    QuantizedTensor, _flatten, _unflatten, flatten_with_keys_fn=_flatten_with_keys,
    serialized_type_name="flash_quant.QuantizedTensor",
)
