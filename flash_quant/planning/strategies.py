"""Mixed-precision strategies: a precision per operator type (and per layer range),
serialisable to and from JSON.

An operator's precision is an `OperatorPrecision(weight, activation)`:

* linear operators (q/k/v/o projections, FFN gate/up/down, embeddings incl. the LM head):
  the stored weight precision and the activation (input) precision; the matmul runs at
  the wider of the two (the narrower operand is dequantized in the kernel);
* ``qk_matmul`` / ``pv_matmul``: the operand precision of Q·Kᵀ and P·V (weight None);
* ``kv_cache``: the storage precision of cached K and V (weight None);
* ``softmax`` / ``norm``: the compute precision (fp32 / fp16 / bf16 only).

No torch import.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from .formats import format_info, normalize_precision

__all__ = ["OperatorType", "OperatorPrecision", "LayerRule", "MixedPrecisionStrategy",
           "LINEAR_OPERATORS", "STRATEGY_NAMES", "get_strategy", "list_strategies",
           "create_layerwise_gradient", "attention_preset_for"]


class OperatorType(str, enum.Enum):
    Q_PROJ = "q_proj"
    K_PROJ = "k_proj"
    V_PROJ = "v_proj"
    O_PROJ = "o_proj"
    QK_MATMUL = "qk_matmul"
    SOFTMAX = "softmax"
    PV_MATMUL = "pv_matmul"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    KV_CACHE = "kv_cache"
    NORM = "norm"
    EMBEDDINGS = "embeddings"


LINEAR_OPERATORS = (OperatorType.Q_PROJ, OperatorType.K_PROJ, OperatorType.V_PROJ, OperatorType.O_PROJ,
                    OperatorType.FFN_GATE, OperatorType.FFN_UP, OperatorType.FFN_DOWN,
                    OperatorType.EMBEDDINGS)
_COMPUTE_ONLY = (OperatorType.SOFTMAX, OperatorType.NORM)
_NO_WEIGHT = (OperatorType.QK_MATMUL, OperatorType.PV_MATMUL, OperatorType.KV_CACHE) + _COMPUTE_ONLY
# What flash_quant's attention kernels can run for each product.
_KERNEL_QK = ("int8", "int4", "fp8_e4m3", "fp16", "bf16", "fp32")
_KERNEL_PV = ("int8", "fp8_e4m3", "fp16", "bf16", "fp32")


def _op(x) -> OperatorType:
    try:
        return x if isinstance(x, OperatorType) else OperatorType(str(x).strip().lower())
    except ValueError:
        raise ValueError(f"unknown operator {x!r}; expected one of {[o.value for o in OperatorType]}") from None


@dataclass(frozen=True)
class OperatorPrecision:
    activation: str
    weight: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "activation", normalize_precision(self.activation))
        if self.weight is not None:
            object.__setattr__(self, "weight", normalize_precision(self.weight))

    @property
    def compute(self) -> str:
        """The wider of weight and activation: what the matmul runs in."""
        if self.weight is None:
            return self.activation
        wa, ww = format_info(self.activation).bits, format_info(self.weight).bits
        return self.activation if wa >= ww else self.weight

    def label(self) -> str:
        return self.activation if self.weight is None else f"W {self.weight} / A {self.activation}"

    def to_json(self):
        return {"weight": self.weight, "activation": self.activation}

    @classmethod
    def parse(cls, raw, where: str = "") -> "OperatorPrecision":
        """From {"weight", "activation"}, or a bare string meaning weight = activation."""
        try:
            if isinstance(raw, OperatorPrecision):
                return raw
            if isinstance(raw, str):
                return cls(activation=raw, weight=raw)
            if isinstance(raw, dict):
                unknown = set(raw) - {"weight", "activation"}
                if unknown:
                    raise ValueError(f"unknown keys {sorted(unknown)}")
                if "activation" not in raw:
                    raise ValueError("missing 'activation'")
                return cls(activation=raw["activation"], weight=raw.get("weight"))
            raise ValueError(f"expected a precision string or {{'weight', 'activation'}}, got {raw!r}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if where else str(e)) from None


def _validate_entry(op: OperatorType, p: OperatorPrecision, where: str) -> OperatorPrecision:
    if op in _NO_WEIGHT and p.weight is not None:
        if p.weight != p.activation:
            raise ValueError(f"{where}: {op.value} has no weight; got weight {p.weight}")
        p = OperatorPrecision(activation=p.activation)
    if op in LINEAR_OPERATORS and p.weight is None:
        raise ValueError(f"{where}: {op.value} is a linear operator and needs a weight precision")
    if op in _COMPUTE_ONLY and p.activation not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"{where}: {op.value} computes in fp32/fp16/bf16, got {p.activation}")
    return p


@dataclass(frozen=True)
class LayerRule:
    """Overrides for layers ``start <= layer < end``."""

    start: int
    end: int
    overrides: Tuple[Tuple[OperatorType, OperatorPrecision], ...]

    def __post_init__(self):
        if not (isinstance(self.start, int) and isinstance(self.end, int) and 0 <= self.start < self.end):
            raise ValueError(f"layer rule needs integers 0 <= start < end, got start={self.start!r}, end={self.end!r}")

    def to_json(self):
        return {"start": self.start, "end": self.end,
                "overrides": {op.value: p.to_json() for op, p in self.overrides}}


@dataclass(frozen=True)
class MixedPrecisionStrategy:
    name: str
    description: str
    operators: Tuple[Tuple[OperatorType, OperatorPrecision], ...]
    layer_rules: Tuple[LayerRule, ...] = ()
    weight_group_size: int = 128      # elements per weight scale of integer weights
    notes: str = ""

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("strategy name must be a non-empty string")
        ops = dict(self.operators)
        missing = [o.value for o in OperatorType if o not in ops]
        if missing:
            raise ValueError(f"strategy {self.name!r} has no precision for {missing}")
        if self.weight_group_size < 1:
            raise ValueError(f"weight_group_size must be >= 1, got {self.weight_group_size}")

    # ---- queries ------------------------------------------------------------------
    def precision_for(self, op, layer: Optional[int] = None) -> OperatorPrecision:
        op = _op(op)
        if layer is not None:
            for rule in reversed(self.layer_rules):          # later rules win
                if rule.start <= layer < rule.end:
                    for o, p in rule.overrides:
                        if o is op:
                            return p
        return dict(self.operators)[op]

    def attention_preset(self, layer: Optional[int] = None) -> Tuple[Optional[str], str]:
        return attention_preset_for(self.precision_for(OperatorType.QK_MATMUL, layer).activation,
                                    self.precision_for(OperatorType.PV_MATMUL, layer).activation)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def build(cls, name: str, description: str, default: Mapping, overrides: Optional[Mapping] = None,
              layer_rules=(), weight_group_size: int = 128, notes: str = "") -> "MixedPrecisionStrategy":
        """default: precisions for every operator type (dict op -> precision / dict);
        overrides: further per-operator entries."""
        table = {}
        for src in (default, overrides or {}):
            for k, v in src.items():
                op = _op(k)
                table[op] = _validate_entry(op, OperatorPrecision.parse(v, f"{name}.{op.value}"),
                                            f"{name}.{op.value}")
        rules = []
        for r in layer_rules:
            if isinstance(r, LayerRule):
                rules.append(r)
                continue
            if not isinstance(r, dict) or not {"start", "end", "overrides"} <= set(r):
                raise ValueError(f"{name}: a layer rule needs 'start', 'end' and 'overrides', got {r!r}")
            ov = tuple((_op(k), _validate_entry(_op(k), OperatorPrecision.parse(v, f"{name}.layers.{k}"),
                                                f"{name}.layers.{k}"))
                       for k, v in r["overrides"].items())
            rules.append(LayerRule(r["start"], r["end"], ov))
        ordered = tuple((op, table[op]) for op in OperatorType if op in table)
        return cls(name, description, ordered, tuple(rules), weight_group_size, notes)

    # ---- JSON ---------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description,
                "operators": {op.value: p.to_json() for op, p in self.operators},
                "layer_rules": [r.to_json() for r in self.layer_rules],
                "weight_group_size": self.weight_group_size, "notes": self.notes}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, obj) -> "MixedPrecisionStrategy":
        if isinstance(obj, str):
            obj = json.loads(obj)
        if not isinstance(obj, dict):
            raise ValueError(f"a strategy must be a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"name", "description", "operators", "layer_rules", "weight_group_size", "notes"}
        if unknown:
            raise ValueError(f"strategy JSON has unknown keys {sorted(unknown)}")
        for req in ("name", "operators"):
            if req not in obj:
                raise ValueError(f"strategy JSON is missing {req!r}")
        return cls.build(obj["name"], obj.get("description", ""), obj["operators"],
                         layer_rules=obj.get("layer_rules", ()),
                         weight_group_size=int(obj.get("weight_group_size", 128)), notes=obj.get("notes", ""))


def attention_preset_for(qk: str, pv: str) -> Tuple[Optional[str], str]:
    """The flash_quant preset that runs Q·Kᵀ in `qk` and P·V in `pv`: (name, note).
    name is None when no kernel implements the pair (planner-only configuration)."""
    qk, pv = normalize_precision(qk), normalize_precision(pv)
    table = {("int8", "int8"): "fast", ("int4", "fp16"): "int4", ("int4", "bf16"): "int4",
             ("fp8_e4m3", "fp16"): "fp8", ("fp8_e4m3", "bf16"): "fp8",
             ("int8", "fp16"): "accurate", ("int8", "bf16"): "accurate",
             ("fp16", "fp16"): "fp16", ("bf16", "bf16"): "bf16", ("fp32", "fp32"): "fp32"}
    if (qk, pv) in table:
        return table[(qk, pv)], "implemented by flash_quant's kernels"
    if qk not in _KERNEL_QK or pv not in _KERNEL_PV:
        return None, (f"planner-only: flash_quant's kernels run Q·Kᵀ in {_KERNEL_QK} and P·V in "
                      f"{_KERNEL_PV}; {qk}/{pv} is modelled, not runnable")
    return None, f"planner-only: no preset pairs Q·Kᵀ {qk} with P·V {pv} (use an AttentionConfig)"


# --------------------------------------------------------------------------- named strategies
def _all(weight: str, act: str, *, qk: str, pv: str, kv: str, softmax="fp32", norm="fp32",
         emb=("fp16", "fp16")) -> dict:
    d = {op: {"weight": weight, "activation": act} for op in LINEAR_OPERATORS}
    d[OperatorType.EMBEDDINGS] = {"weight": emb[0], "activation": emb[1]}
    d.update({OperatorType.QK_MATMUL: qk, OperatorType.PV_MATMUL: pv, OperatorType.KV_CACHE: kv,
              OperatorType.SOFTMAX: softmax, OperatorType.NORM: norm})
    return {k: ({"activation": v} if isinstance(v, str) else v) for k, v in d.items()}


def _fp16_baseline():
    return MixedPrecisionStrategy.build(
        "fp16_baseline", "Everything in fp16 (softmax and norms in fp32): the accuracy reference.",
        _all("fp16", "fp16", qk="fp16", pv="fp16", kv="fp16"))


def _fp8_balanced():
    return MixedPrecisionStrategy.build(
        "fp8_balanced", "W8A8 FP8 E4M3 linears, FP8 Q·Kᵀ, FP8 KV cache, 16-bit P·V: 8-bit tensor cores "
        "on Hopper/Blackwell with a small accuracy cost.",
        _all("fp8_e4m3", "fp8_e4m3", qk="fp8_e4m3", pv="fp16", kv="fp8_e4m3"))


def _w4a16_aggressive():
    return MixedPrecisionStrategy.build(
        "w4a16_aggressive", "INT4 weights (group 128, fp16 scales) with fp16 activations; INT8 Q·Kᵀ and "
        "P·V with an INT8 KV cache. Pays off where weight bytes dominate (decode).",
        _all("int4", "fp16", qk="int8", pv="int8", kv="int8"))


def _nvfp4_blackwell():
    return MixedPrecisionStrategy.build(
        "nvfp4_blackwell", "NVFP4 weights and activations (W4A4, native FP4 tensor cores on Blackwell), "
        "FP8 Q·Kᵀ, NVFP4 KV cache. On chips without FP4 units it is storage-only: the cost model "
        "dequantizes to the first native precision.",
        _all("nvfp4", "nvfp4", qk="fp8_e4m3", pv="fp16", kv="nvfp4"),
        notes="The seed paired NVFP4 weights with fp16 activations and still claimed the FP4 "
              "tensor-core rate; an fp16 activation makes the matmul run at the fp16 rate, so this "
              "strategy quantizes activations too (use a custom strategy for W4A16 NVFP4).")


def _hybrid_long_context():
    return MixedPrecisionStrategy.build(
        "hybrid_long_context", "FP8 W8A8 linears; INT8 Q·Kᵀ and P·V with an INT8 KV cache (the 'fast' "
        "attention preset): at long context the KV cache is the traffic to cut.",
        _all("fp8_e4m3", "fp8_e4m3", qk="int8", pv="int8", kv="int8"))


def create_layerwise_gradient(num_layers: int = 32) -> MixedPrecisionStrategy:
    """fp16 for the first third of the layers, FP8 W8A8 for the middle third, INT4 weights
    (w4a16) for the last third except the final layer, which stays FP8.  The ordering is a
    heuristic to be validated per model (no measurement behind it here)."""
    if not isinstance(num_layers, int) or num_layers < 3:
        raise ValueError(f"layerwise_gradient needs num_layers >= 3, got {num_layers!r}")
    a, b = num_layers // 3, 2 * num_layers // 3
    fp16 = {op.value: {"weight": "fp16", "activation": "fp16"} for op in LINEAR_OPERATORS if op is not OperatorType.EMBEDDINGS}
    fp16.update(qk_matmul={"activation": "fp16"}, pv_matmul={"activation": "fp16"})
    int4 = {op.value: {"weight": "int4", "activation": "fp16"} for op in LINEAR_OPERATORS if op is not OperatorType.EMBEDDINGS}
    rules = [{"start": 0, "end": a, "overrides": fp16},
             {"start": b, "end": num_layers - 1, "overrides": int4}]
    return MixedPrecisionStrategy.build(
        "layerwise_gradient", f"Per-layer gradient over {num_layers} layers: fp16 for layers 0-{a - 1}, "
        f"FP8 for {a}-{b - 1}, INT4 weights for {b}-{num_layers - 2}, FP8 for the last layer.",
        _all("fp8_e4m3", "fp8_e4m3", qk="int8", pv="fp16", kv="int8"), layer_rules=rules)


_FACTORIES = {"fp16_baseline": _fp16_baseline, "fp8_balanced": _fp8_balanced,
              "w4a16_aggressive": _w4a16_aggressive, "nvfp4_blackwell": _nvfp4_blackwell,
              "hybrid_long_context": _hybrid_long_context, "layerwise_gradient": create_layerwise_gradient}
STRATEGY_NAMES = tuple(_FACTORIES)


def list_strategies() -> Tuple[str, ...]:
    return STRATEGY_NAMES


def get_strategy(name: str, num_layers: Optional[int] = None) -> MixedPrecisionStrategy:
    """A named strategy (num_layers only for layerwise_gradient; default 32)."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _FACTORIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGY_NAMES}")
    if key == "layerwise_gradient":
        return create_layerwise_gradient(num_layers or 32)
    return _FACTORIES[key]()
