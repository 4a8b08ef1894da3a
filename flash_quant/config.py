"""Quantization choices: precisions, strategies, granularities and attention presets.

Everything here is a small immutable value, so configs can be hashed, compared, used as
torch.compile constants and written to JSON.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = [
    "STRATEGY_VERSION",
    "Precision",
    "QUANTIZED_PRECISIONS",
    "Strategy",
    "PVPrecision",
    "Granularity",
    "PerTensor",
    "PerHead",
    "PerToken",
    "PerBlock",
    "PerChannel",
    "OperandConfig",
    "AttentionConfig",
    "PRESETS",
    "get_preset",
    "resolve_config",
]

#: Version of the quantization arithmetic (scale rules, rounding, INT4 nibble order).
#: Carried by every QuantizedTensor; loading a tensor of a newer version is refused.
STRATEGY_VERSION = 1


class Precision(str, enum.Enum):
    """Storage precision of an operand."""

    INT8 = "int8"
    """Signed 8-bit integers in [-128, 127], one byte each."""
    INT4 = "int4"
    """Signed 4-bit integers in [-8, 7], two per byte (even element in the low nibble)."""
    FP8_E4M3 = "fp8_e4m3"
    """torch.float8_e4m3fn: 3 mantissa bits, max 448; the accurate 8-bit float."""
    FP8_E5M2 = "fp8_e5m2"
    """torch.float8_e5m2: 2 mantissa bits, max 57344; range over precision."""
    FP16 = "fp16"
    """Unquantized torch.float16."""
    BF16 = "bf16"
    """Unquantized torch.bfloat16."""
    FP32 = "fp32"
    """Unquantized torch.float32."""

    @property
    def is_quantized(self) -> bool:
        return self.value in _QUANTIZED

    @property
    def is_integer(self) -> bool:
        return self in (Precision.INT8, Precision.INT4)

    @property
    def float_dtype(self):
        """The torch dtype of an unquantized precision (None for quantized ones)."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(self.value)

    # The numbers of a quantized precision live in _QUANTIZED below (one row each); these
    # properties read them. csrc/precision.h holds the same numbers for C++ and Metal
    # (tests/test_precision_table.py checks that the two agree).
    def _row(self) -> "_PrecisionNumbers":
        row = _QUANTIZED.get(self.value)
        if row is None:
            raise ValueError(f"precision {self.value!r} is not quantized: it has no code range")
        return row

    @property
    def qmax(self) -> float:
        """Largest code magnitude: symmetric data is clamped to [-qmax, qmax] and its scale is
        group absmax / qmax (fp8: the largest finite value)."""
        return self._row().qmax

    @property
    def qmin(self) -> float:
        """Smallest code: asymmetric integer data uses [qmin, qmax] (fp8: -qmax)."""
        return self._row().qmin

    @property
    def bits(self) -> int:
        """Bits per element of the stored data (16 / 32 for unquantized precisions)."""
        row = _QUANTIZED.get(self.value)
        return row.bits if row is not None else {"fp16": 16, "bf16": 16, "fp32": 32}[self.value]

    @property
    def packed_per_byte(self) -> int:
        """Elements stored in one byte of the data tensor (INT4: two nibbles, even element
        in the low one)."""
        return 8 // self._row().bits

    @property
    def storage_dtype(self):
        """The torch dtype of the data tensor of a quantized precision (INT4: uint8 bytes)."""
        import torch

        return getattr(torch, self._row().storage_dtype)


@dataclass(frozen=True)
class _PrecisionNumbers:
    qmin: float
    qmax: float
    bits: int
    storage_dtype: str  # name of the torch dtype (config.py does not import torch)


#: The one table of quantized precisions (docs/op_contract.md).
_QUANTIZED = {
    "int8": _PrecisionNumbers(-128.0, 127.0, 8, "int8"),
    "int4": _PrecisionNumbers(-8.0, 7.0, 4, "uint8"),
    "fp8_e4m3": _PrecisionNumbers(-448.0, 448.0, 8, "float8_e4m3fn"),
    "fp8_e5m2": _PrecisionNumbers(-57344.0, 57344.0, 8, "float8_e5m2"),
}

#: Names of the quantized precisions, in table order (the op contract's precision strings).
QUANTIZED_PRECISIONS = tuple(_QUANTIZED)


class Strategy(str, enum.Enum):
    """How the quantization range is chosen."""

    SYMMETRIC = "symmetric"
    """Range [-absmax, absmax], zero point 0: integer products need no correction."""
    ASYMMETRIC = "asymmetric"
    """Range [min, max] (including 0) with an integer zero point: finer steps for skewed
    data, at the cost of correction terms in integer products. INT8 / INT4 only."""
    LEGACY = "legacy"
    """The seed implementation's behaviour: one symmetric scale for the whole tensor."""


class PVPrecision(str, enum.Enum):
    """Precision of the softmax probabilities P in the P·V product."""

    NONE = "none"
    """P is not quantized (fp32 on CPU, the 16-bit input type on GPU)."""
    INT8 = "int8"
    """P quantized to int8 per row and key tile (scale = tile max / 127), with int8 V."""
    FP8_E4M3 = "fp8_e4m3"
    """P rounded to float8 e4m3, with fp8 e4m3 V (less accurate than INT8: 3.7 % vs 1.7 %
    rel-L2 in an fp64 simulation on N(0,1) at S=1024)."""


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale. Subclasses are the choices."""

    name = "granularity"

    @property
    def block_size(self) -> int:
        """Rows per scale group along the sequence dim (as the kernels index it)."""
        return 1

    def to_json(self) -> dict:
        return {"kind": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_json(obj: dict) -> "Granularity":
        kinds = {g.name: g for g in (PerTensor, PerHead, PerToken, PerBlock, PerChannel)}
        kind = obj.get("kind")
        if kind not in kinds:
            raise ValueError(f"unknown granularity kind {kind!r}; expected one of {sorted(kinds)}")
        args = {k: v for k, v in obj.items() if k != "kind"}
        return kinds[kind](**args)


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    name = "per_tensor"


@dataclass(frozen=True)
class PerHead(Granularity):
    """One scale per (batch, head): a (S, D) slice."""

    name = "per_head"


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per row (token) of the last dim."""

    name = "per_token"


@dataclass(frozen=True)
class PerBlock(Granularity):
    """One scale per `rows` consecutive tokens of a head."""

    rows: int = 64
    name = "per_block"

    def __post_init__(self):
        if not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"PerBlock.rows must be a positive integer, got {self.rows!r}")

    @property
    def block_size(self) -> int:
        return self.rows


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per channel (last dim) of a head, shared over the sequence."""

    name = "per_channel"


_ROW_CONSTANT = ("per_tensor", "per_head", "per_token", "per_block")


@dataclass(frozen=True)
class OperandConfig:
    """How one attention operand (Q, K or V) is stored for the kernel.

    precision None keeps the operand unquantized in the input's dtype.
    smooth: subtract the per-channel mean over the sequence before quantizing (exact for
    K in attention: softmax ignores a per-row shift). rotate: multiply by an orthonormal
    Hadamard matrix along the head dim before quantizing (exact for Q·Kᵀ when Q and K are
    both rotated; spreads outlier channels over all channels). scale_search: "absmax"
    (scale = group absmax / qmax, computed inside the quantize kernel) or "mse" (per group,
    the clip ratio minimising the reconstruction error; symmetric strategy only).
    """

    precision: Optional[Precision] = None
    strategy: Strategy = Strategy.SYMMETRIC
    granularity: Granularity = field(default_factory=PerToken)
    smooth: bool = False
    rotate: bool = False
    scale_search: str = "absmax"

    def __post_init__(self):
        if self.precision is not None and not isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", Precision(self.precision))
        if not isinstance(self.strategy, Strategy):
            object.__setattr__(self, "strategy", Strategy(self.strategy))
        if not isinstance(self.granularity, Granularity):
            raise TypeError(
                f"granularity must be a Granularity (PerTensor(), PerToken(), PerBlock(64), ...), "
                f"got {self.granularity!r}"
            )
        if self.scale_search not in ("absmax", "mse"):
            raise ValueError(f"scale_search must be 'absmax' or 'mse', got {self.scale_search!r}")
        if not self.quantized:
            return
        if self.scale_search == "mse" and self.strategy is not Strategy.SYMMETRIC:
            raise ValueError(f"scale_search='mse' needs the symmetric strategy, got {self.strategy.value}")
        if self.strategy is Strategy.ASYMMETRIC and not self.precision.is_integer:
            raise ValueError(
                f"asymmetric strategy needs an integer precision (int8/int4), got {self.precision.value}"
            )
        if self.strategy is Strategy.LEGACY and self.granularity.name != "per_tensor":
            raise ValueError(
                "legacy strategy is per-tensor symmetric by definition; "
                f"got granularity {self.granularity.name}"
            )

    @property
    def quantized(self) -> bool:
        return self.precision is not None and self.precision.is_quantized

    def to_json(self) -> dict:
        return {
            "precision": None if self.precision is None else self.precision.value,
            "strategy": self.strategy.value,
            "granularity": self.granularity.to_json(),
            "smooth": self.smooth,
            "rotate": self.rotate,
            "scale_search": self.scale_search,
        }

    @staticmethod
    def from_json(obj: dict) -> "OperandConfig":
        return OperandConfig(
            precision=None if obj.get("precision") is None else Precision(obj["precision"]),
            strategy=Strategy(obj.get("strategy", "symmetric")),
            granularity=Granularity.from_json(obj.get("granularity", {"kind": "per_token"})),
            smooth=bool(obj.get("smooth", False)),
            rotate=bool(obj.get("rotate", False)),
            scale_search=obj.get("scale_search", "absmax"),
        )


@dataclass(frozen=True)
class AttentionConfig:
    """Per-operand quantization for attention, plus the precision of P in P·V.

    compute_dtype: for the unquantized presets, the dtype the inputs are cast to (the
    output is cast back to the input dtype); None computes in the input dtype.
    """

    q: OperandConfig = field(default_factory=OperandConfig)
    k: OperandConfig = field(default_factory=OperandConfig)
    v: OperandConfig = field(default_factory=OperandConfig)
    pv: PVPrecision = PVPrecision.NONE
    compute_dtype: Optional[Precision] = None
    name: str = "custom"

    def __post_init__(self):
        if not isinstance(self.pv, PVPrecision):
            object.__setattr__(self, "pv", PVPrecision(self.pv))
        if self.compute_dtype is not None and not isinstance(self.compute_dtype, Precision):
            object.__setattr__(self, "compute_dtype", Precision(self.compute_dtype))
        if self.compute_dtype is not None and self.compute_dtype.is_quantized:
            raise ValueError(f"compute_dtype must be fp16/bf16/fp32, got {self.compute_dtype.value}")
        for role in ("q", "k"):
            op = getattr(self, role)
            if op.quantized and op.granularity.name not in _ROW_CONSTANT:
                raise ValueError(
                    f"{role.upper()} granularity {op.granularity.name} is not supported in attention: "
                    "a Q/K scale must be constant along the head dim (use per_tensor, per_head, "
                    "per_token or per_block)"
                )
        if self.q.rotate != self.k.rotate:
            raise ValueError("rotate must be set on both Q and K (the rotation cancels only in Q·Kᵀ)")
        if self.v.rotate:
            raise ValueError("rotate applies to Q and K only; V cannot be rotated")
        if self.q.smooth:
            raise ValueError("smoothing Q is not supported (it needs a correction term); smooth K only")
        if self.v.smooth:
            raise ValueError("smoothing V is not supported; smooth K only")
        if self.pv is PVPrecision.INT8:
            if self.v.precision is not Precision.INT8:
                raise ValueError("pv='int8' needs V quantized as int8")
            if self.v.granularity.name in ("per_token", "per_block") or self.v.strategy is Strategy.ASYMMETRIC:
                raise ValueError(
                    "pv='int8' needs a symmetric V scale constant along the sequence "
                    "(per_channel, per_head or per_tensor)"
                )
        if self.pv is PVPrecision.FP8_E4M3 and self.v.precision is not Precision.FP8_E4M3:
            raise ValueError("pv='fp8_e4m3' needs V quantized as fp8_e4m3")

    @property
    def quantized(self) -> bool:
        return self.q.quantized or self.k.quantized or self.v.quantized

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "q": self.q.to_json(),
            "k": self.k.to_json(),
            "v": self.v.to_json(),
            "pv": self.pv.value,
            "compute_dtype": None if self.compute_dtype is None else self.compute_dtype.value,
        }

    @staticmethod
    def from_json(obj: dict) -> "AttentionConfig":
        return AttentionConfig(
            q=OperandConfig.from_json(obj.get("q", {})),
            k=OperandConfig.from_json(obj.get("k", {})),
            v=OperandConfig.from_json(obj.get("v", {})),
            pv=PVPrecision(obj.get("pv", "none")),
            compute_dtype=obj.get("compute_dtype"),
            name=obj.get("name", "custom"),
        )


def _qk(precision: Precision, rotate: bool, scale_search: str = "absmax") -> tuple:
    q = OperandConfig(precision, granularity=PerToken(), rotate=rotate, scale_search=scale_search)
    k = OperandConfig(precision, granularity=PerToken(), smooth=True, rotate=rotate, scale_search=scale_search)
    return q, k


def _build_presets() -> dict:
    presets = {}
    # Accurate default: INT8 Q·Kᵀ per token, K smoothed, Q/K Hadamard-rotated (takes the
    # outlier-channel family from 1.7 % to 0.6-0.7 % rel-L2 in an fp64 simulation), V
    # unquantized so P·V runs in 16 bits.
    q, k = _qk(Precision.INT8, rotate=True)
    presets["accurate"] = AttentionConfig(q=q, k=k, name="accurate")
    # Fast: 8-bit P·V as well. INT8 V per channel with INT8 P per key tile.
    presets["fast"] = AttentionConfig(
        q=q, k=k, v=OperandConfig(Precision.INT8, granularity=PerChannel()), pv=PVPrecision.INT8, name="fast"
    )
    # INT4: 15 levels make absmax scales costly; a per-row clip search (scales.mse_scale)
    # takes the outlier family at D=64 from 13.2 % to about 10.5 % rel-L2.
    q4, k4 = _qk(Precision.INT4, rotate=True, scale_search="mse")
    presets["int4"] = AttentionConfig(q=q4, k=k4, name="int4")
    # FP8 Q/K: rotation takes the outlier family from 9.8 % to 4.1 % rel-L2 (CPU, S=1024).
    q8, k8 = _qk(Precision.FP8_E4M3, rotate=True)
    presets["fp8"] = AttentionConfig(q=q8, k=k8, name="fp8")
    for p in (Precision.FP16, Precision.BF16, Precision.FP32):
        presets[p.value] = AttentionConfig(compute_dtype=p, name=p.value)
    presets["none"] = AttentionConfig(name="none")
    return presets


#: Named configurations. "accurate" is the default of flash_quant.attention.
PRESETS = _build_presets()


def get_preset(name: str) -> AttentionConfig:
    """The preset called `name` (see PRESETS)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)} or 'auto'") from None


def resolve_config(config: Union[str, AttentionConfig, None]) -> AttentionConfig:
    """A preset name, an AttentionConfig or None (the accurate default) to an AttentionConfig."""
    if config is None:
        return PRESETS["accurate"]
    if isinstance(config, AttentionConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    raise TypeError(f"config must be a preset name or an AttentionConfig, got {type(config).__name__}")
