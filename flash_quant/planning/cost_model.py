"""Attention cost model: FLOPs, bytes, exp-unit and dequantization work, and a predicted
time with its bottleneck, for FlashAttention 1-4 style kernels and flash_quant's own.

The model is physical first: every term is "work / rate" with the rate taken from the
hardware registry (`hardware.py`).  Each kernel family combines the terms its way:

* ``fa1``: no overlap; matmul, softmax and memory traffic add up.
* ``fa2``: matmul and softmax serialise inside a warp, memory overlaps them.
* ``fa3``: warp specialisation overlaps matmul, softmax and memory (Hopper, native FP8).
* ``fa4``: as fa3, and part of the exponentials is emulated on the FMA units so the exp
  unit is not the only source of exp2 (Blackwell); optional block sparsity.
* ``flash_quant``: flash_quant's kernels: a memory-bound quantization pass for every
  operand quantized on the fly (Q, K with smoothing, V; plus the Hadamard rotation), then
  an FA2-style kernel.

Uncalibrated, the terms are divided by efficiency factors (measured where the registry
has them, else the documented assumptions of `hardware.DEFAULT_EFFICIENCY`).  Calibrated
(`calibrate.py` wrote ``data/calibration_<hardware>.json``), a (family, precision) pair
whose coefficients were fitted on measured timings predicts (MODEL_VERSION 3)
``t = c_launch*kernels*1us + c_serial*steps*1us + c_serial_decode*steps_decode*1us
+ c_mma*T_mma + c_sfu*T_sfu + c_mem*T_mem + c_prep*T_prep`` with the T's computed at peak
rates and ``steps`` the critical path of flash_quant's Triton forward in key blocks (see
`kernel_schedule`: one program walks the visible keys of a BLOCK_M query tile — or, split-KV
for short query blocks, of one key range — serially, and programs run in waves of SMs x
programs-per-SM); the
fit's error and its leave-one-out error are stored with it.

No torch import: this runs inside ``flash-quant recommend``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .formats import format_info, normalize_precision
from .hardware import HardwareSpec, get_hardware
from .user_data import find_data_file

__all__ = [
    "prior_coefficients", "AttentionShape", "AttentionPrecision", "AttentionCost", "AttentionCostModel",
    "FAMILIES", "FEATURES", "MODEL_VERSION", "attention_terms", "kernel_schedule", "KernelSchedule",
    "load_calibration", "scale_bytes_per_row",
]

FAMILIES = ("fa1", "fa2", "fa3", "fa4", "flash_quant")
# Names of the calibrated model's features, in coefficient order.  "serial" is the
# forward kernel's critical path in key-block steps for Sq > 64 (prefill tiles), and
# "serial_decode" the same for Sq <= 64: that is a separate autotune key of the forward
# (cuda/forward.py: sq_bucket) with its own tile config, so its per-step time is its own.
FEATURES = ("launch", "serial", "serial_decode", "mma", "sfu", "mem", "prep")
#: Version of the calibrated model's feature set (stored with every calibration).
MODEL_VERSION = 4  # 3: split-KV decode schedule, statistics + reduce kernels counted;
#                   4: GQA packing of short queries (one program per kv head)

# Work constants (documented assumptions, not measurements):
SOFTMAX_ALU_OPS = 4          # per score: scale, running max, subtract, row-sum accumulate
QUANT_SCORE_ALU_OPS = 1      # per score: multiply by q_scale * k_scale (integer Q·Kᵀ)
PV_QUANT_ALU_OPS = 2         # per score: scale P and convert it to the 8-bit type
DEQUANT_ALU_OPS = {"int4": 2, "nvfp4": 3, "mxfp4": 3, "int8": 2, "fp8_e4m3": 2, "fp8_e5m2": 2}
EMULATED_EXP_OPS = 8         # FMA-unit ops of one polynomial exp2 (FA4-style emulation)
LAUNCH_S = 5e-6              # per kernel launch, prior of the calibrated fit
SERIAL_STEP_S = 1e-6         # per key-block step of one program, prior of the calibrated fit
Q_TILE = 128                 # query rows per program (how often a K/V tile is re-dequantized)
# Occupancy of the forward kernel (assumptions, per SM): shared memory and 32-bit registers.
SMEM_PER_SM = {"hopper": 227 * 1024, "blackwell": 227 * 1024, "ampere": 163 * 1024}
DEFAULT_SMEM_PER_SM = 99 * 1024
REGS_PER_SM = 65536


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: (B, Hq, Sq, D) queries against (B, Hkv, Skv, D) keys/values."""

    batch: int
    heads_q: int
    seq_q: int
    head_dim: int
    heads_kv: Optional[int] = None
    seq_kv: Optional[int] = None
    causal: bool = False

    def __post_init__(self):
        if self.heads_kv is None:
            object.__setattr__(self, "heads_kv", self.heads_q)
        if self.seq_kv is None:
            object.__setattr__(self, "seq_kv", self.seq_q)
        for name in ("batch", "heads_q", "heads_kv", "seq_q", "seq_kv", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AttentionShape.{name} must be a positive integer, got {v!r}")
        if self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q ({self.heads_q}) must be a multiple of heads_kv ({self.heads_kv})")

    @classmethod
    def decode(cls, batch: int, heads_q: int, heads_kv: int, context: int, head_dim: int):
        """One new query token per sequence against `context` cached keys."""
        return cls(batch, heads_q, 1, head_dim, heads_kv, context, causal=False)

    @property
    def is_decode(self) -> bool:
        return self.seq_q <= 16 and self.seq_kv > self.seq_q

    @property
    def visible_pairs(self) -> int:
        """(query, key) pairs a head computes: all of them, or the top-left causal
        triangle (key j visible to query i iff j <= i)."""
        sq, skv = self.seq_q, self.seq_kv
        if not self.causal:
            return sq * skv
        if sq <= skv:
            return sq * (sq + 1) // 2
        return skv * (skv + 1) // 2 + (sq - skv) * skv

    @property
    def scores(self) -> int:
        return self.batch * self.heads_q * self.visible_pairs

    @property
    def flops(self) -> int:
        """4 * pairs * D per head (Q·Kᵀ and P·V), the convention of the benchmarks."""
        return 4 * self.scores * self.head_dim

    def label(self) -> str:
        kv = f" kv{self.heads_kv}" if self.heads_kv != self.heads_q else ""
        sk = f"x{self.seq_kv}" if self.seq_kv != self.seq_q else ""
        return (f"{self.batch}x{self.heads_q}x{self.seq_q}{sk}x{self.head_dim}{kv}"
                f"{' causal' if self.causal else ''}")

    def to_json(self) -> dict:
        return {"batch": self.batch, "heads_q": self.heads_q, "heads_kv": self.heads_kv,
                "seq_q": self.seq_q, "seq_kv": self.seq_kv, "head_dim": self.head_dim,
                "causal": self.causal}

    @classmethod
    def from_json(cls, obj: dict) -> "AttentionShape":
        return cls(int(obj["batch"]), int(obj["heads_q"]), int(obj["seq_q"]), int(obj["head_dim"]),
                   int(obj.get("heads_kv", obj["heads_q"])), int(obj.get("seq_kv", obj["seq_q"])),
                   bool(obj.get("causal", False)))


def scale_bytes_per_row(granularity: str, seq: int, head_dim: int, block_size: int = 64) -> float:
    """fp32 scale bytes per (row of one head) for a granularity (amortised over rows)."""
    if granularity == "per_token":
        return 4.0
    if granularity == "per_block":
        return 4.0 / block_size
    if granularity == "per_channel":
        return 4.0 * head_dim / seq
    if granularity in ("per_head", "per_tensor"):
        return 4.0 / seq
    if granularity == "none":
        return 0.0
    raise ValueError(f"unknown granularity {granularity!r}")


@dataclass(frozen=True)
class AttentionPrecision:
    """Precisions of one attention configuration as the cost model sees it.

    q / k / v: storage precision of each operand in the kernel ("fp16"/"bf16"/"fp32" when
    unquantized; "nvfp4"/"mxfp4" are storage-only formats on chips without FP4 units).
    qk / pv: operand precision of the two products (what the matrix units are asked for;
    the hardware may run a wider one, see `HardwareSpec.compute_precision`).
    kv_prequantized: K/V arrive already quantized (a quantized KV cache): no quantization
    pass for them.  smooth_k / rotate: extra passes of flash_quant's preprocessing.
    """

    name: str
    q: str = "fp16"
    k: str = "fp16"
    v: str = "fp16"
    qk: str = "fp16"
    pv: str = "fp16"
    input: str = "fp16"
    q_granularity: str = "none"
    k_granularity: str = "none"
    v_granularity: str = "none"
    smooth_k: bool = False
    rotate: bool = False
    kv_prequantized: bool = False

    def __post_init__(self):
        for f in ("q", "k", "v", "qk", "pv", "input"):
            object.__setattr__(self, f, normalize_precision(getattr(self, f)))

    def quantized(self, operand: str) -> bool:
        return getattr(self, operand) != self.input

    @classmethod
    def from_config(cls, config, input_precision: str = "fp16", kv_prequantized: bool = False):
        """From a `flash_quant.config.AttentionConfig` (or a preset name)."""
        if isinstance(config, str):
            from ..config import get_preset  # flash_quant.config imports no torch
            config = get_preset(config)
        inp = normalize_precision(input_precision)
        if config.compute_dtype is not None:
            inp = config.compute_dtype.value

        def store(op):
            return op.precision.value if op.quantized else inp

        def gran(op):
            return op.granularity.name if op.quantized else "none"

        q, k, v = store(config.q), store(config.k), store(config.v)
        pv = config.pv.value
        return cls(
            name=config.name, q=q, k=k, v=v,
            qk=q if config.q.quantized and config.k.quantized else inp,
            pv=inp if pv == "none" else pv, input=inp,
            q_granularity=gran(config.q), k_granularity=gran(config.k), v_granularity=gran(config.v),
            smooth_k=config.k.quantized and config.k.smooth,
            rotate=config.q.rotate and config.q.quantized,
            kv_prequantized=kv_prequantized,
        )

    @classmethod
    def uniform(cls, name: str, qk: str, pv: str, kv_storage: str, input_precision: str = "fp16",
                kv_prequantized: bool = True):
        """A planner configuration: Q in the Q·Kᵀ precision, K/V stored in `kv_storage`
        (e.g. a KV cache), products in `qk` / `pv`."""
        inp = normalize_precision(input_precision)
        qk, pv, kvs = normalize_precision(qk), normalize_precision(pv), normalize_precision(kv_storage)
        q = qk if format_info(qk).bits < 16 else inp
        gran = lambda p: "per_token" if format_info(p).bits < 16 else "none"  # noqa: E731
        return cls(name=name, q=q, k=kvs, v=kvs, qk=qk, pv=pv, input=inp,
                   q_granularity=gran(q), k_granularity=gran(kvs),
                   v_granularity="per_channel" if format_info(kvs).bits < 16 else "none",
                   kv_prequantized=kv_prequantized)


def _bytes(precision: str) -> float:
    return format_info(precision).bits_per_element() / 8.0


@dataclass
class AttentionTerms:
    """The work of one call at peak rates (seconds) and its raw counts."""

    t_mma: float
    t_exp: float
    t_alu: float
    t_mem: float
    t_prep: float
    kernels: int
    flops: int
    kernel_bytes: float
    prep_bytes: float
    qk_compute: str
    pv_compute: str
    schedule: Optional["KernelSchedule"] = None

    @property
    def t_sfu(self) -> float:
        return self.t_exp + self.t_alu

    def features(self) -> Tuple[float, ...]:
        """Feature vector of the calibrated model (see FEATURES), in seconds; the launch
        feature is kernels x 1 µs, so its coefficient reads as µs per kernel launch (it
        also carries the per-call host overhead: within one preset the kernel count is
        fixed, so the two cannot be told apart); the serial features are key-block steps
        x 1 µs, so their coefficients read as µs per step of one program."""
        sch = self.schedule
        steps = sch.steps if sch is not None else 0.0
        dec = sch is not None and sch.decode_regime
        return (self.kernels * 1e-6, 0.0 if dec else steps * 1e-6, steps * 1e-6 if dec else 0.0,
                self.t_mma, self.t_sfu, self.t_mem, self.t_prep)


@dataclass(frozen=True)
class KernelSchedule:
    """How flash_quant's Triton forward runs a shape (cuda/forward.py).

    grid = (ceil(Sq / BLOCK_M), B * Hq, splits): one program per query tile and key range,
    which walks the visible key blocks of its range (causal: up to its diagonal)
    serially. Non-causal short query blocks (Sq <= 64) that cannot fill the GPU split the
    keys (split-KV, mirroring cuda/forward.split_count; a merge kernel follows).
    GQA short queries (Sq <= 64, non-causal) are packed per kv head: grid
    (ceil(group * Sq / BLOCK_M), B * Hkv, splits), as cuda/forward's PACK_GQA.
    Programs run `occupancy` per SM, so in waves of SMs * occupancy.  `steps` is the
    critical path in key-block steps of the busiest program slot: ceil(programs / slots)
    * blocks per program (wave quantization); causal (heaviest tiles first) the larger of
    the longest program and total blocks / slots.  BLOCK_M / BLOCK_N are the nominal
    config of cuda/autotune.py (the first candidate; Sq <= 64: BLOCK_M 64, 4 warps) —
    the autotuner may pick another per key, which the fitted per-step coefficient absorbs.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    occupancy: int
    programs: int
    waves: int
    steps: float
    decode_regime: bool
    splits: int = 1


def _nominal_config(head_dim: int, eight_bit: bool, in_bytes: float, seq_q: int) -> Tuple[int, int, int, int]:
    """Mirror of autotune.forward_default (no torch import here)."""
    d2 = max(16, 1 << (head_dim - 1).bit_length())
    if in_bytes == 4:
        c = (64, 32, 4, 2)
    elif d2 <= 64:
        c = (128, 64, 4, 3)
    elif d2 <= 128:
        c = (128, 128, 8, 3) if eight_bit else (128, 64, 8, 3)
    else:
        c = (64, 64, 4, 2)
    if seq_q <= 64:
        c = (min(64, c[0]), c[1], 4, c[3])
    return c


def kernel_schedule(shape: AttentionShape, prec: "AttentionPrecision", hw: HardwareSpec) -> KernelSchedule:
    """Grid, occupancy, waves and critical path of flash_quant's forward for `shape`."""
    in_b = _bytes(prec.input)
    qk_bits = format_info(prec.qk).bits
    bm, bn, warps, stages = _nominal_config(shape.head_dim, qk_bits <= 8, in_b, shape.seq_q)
    d2 = max(16, 1 << (shape.head_dim - 1).bit_length())
    q_b = min(_bytes(prec.q), in_b) if qk_bits <= 8 else in_b
    k_b = min(_bytes(prec.k), in_b) if qk_bits <= 8 else in_b
    v_b = _bytes(prec.v) if format_info(prec.pv).bits <= 8 else in_b
    smem = stages * bn * d2 * (k_b + v_b) + bm * d2 * q_b
    regs = bm * d2 + 2 * bm * bn + warps * 32 * 32      # acc + scores/probabilities + base
    smem_sm = SMEM_PER_SM.get(hw.arch, DEFAULT_SMEM_PER_SM)
    occ = max(1, min(int(smem_sm // smem), REGS_PER_SM // regs, 64 // warps))
    group = shape.heads_q // shape.heads_kv
    if group > 1 and shape.seq_q <= 64 and not shape.causal:
        # GQA packing, as cuda/forward (PACK_GQA): one program row-block per kv head
        n_m = -(-(group * shape.seq_q) // bm)
        bh = shape.batch * shape.heads_kv
    else:
        n_m = -(-shape.seq_q // bm)
        bh = shape.batch * shape.heads_q
    programs = bh * n_m
    slots = max(1, hw.sm_count) * occ
    waves = -(-programs // slots)
    if shape.causal:
        # top-left alignment (as SDPA): tile m walks keys [0, min(Skv, (m + 1) * BLOCK_M))
        blocks = [-(-min(shape.seq_kv, (m + 1) * bm) // bn) for m in range(n_m)]
        steps = max(float(max(blocks)), bh * sum(blocks) / slots)
        splits = 1
    else:
        splits = 1
        if shape.seq_q <= 64 and programs < hw.sm_count:  # split-KV, as cuda/forward.split_count
            splits = max(1, min(-(-2 * hw.sm_count // programs), -(-shape.seq_kv // (2 * bn)), 128))
            split_len = -(-(-(-shape.seq_kv // splits)) // bn) * bn
            splits = -(-shape.seq_kv // split_len)
            programs *= splits
            waves = -(-programs // slots)
            steps = float(waves * (split_len // bn))
        else:
            steps = float(waves * -(-shape.seq_kv // bn))
    return KernelSchedule(bm, bn, warps, stages, occ, programs, waves, steps, shape.seq_q <= 64, splits)


def attention_terms(shape: AttentionShape, prec: AttentionPrecision, hw: HardwareSpec,
                    density: float = 1.0) -> AttentionTerms:
    """Work of one attention call at the chip's peak rates (no efficiency applied)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    b, hq, hkv, sq, skv, d = (shape.batch, shape.heads_q, shape.heads_kv, shape.seq_q,
                              shape.seq_kv, shape.head_dim)
    scores = shape.scores * density
    qk_c, pv_c = hw.compute_precision(prec.qk), hw.compute_precision(prec.pv)
    t_mma = 2 * scores * d / (hw.peak(qk_c) * 1e12) + 2 * scores * d / (hw.peak(pv_c) * 1e12)
    t_exp = scores / (hw.exp_tops.value * 1e12)
    simt_ops = hw.simt_fp32_tflops.value * 1e12 / 2.0   # FMA counted as 2 FLOPs
    alu = SOFTMAX_ALU_OPS
    if format_info(prec.qk).bits < 16:
        alu += QUANT_SCORE_ALU_OPS
    if format_info(prec.pv).bits < 16:
        alu += PV_QUANT_ALU_OPS
    alu_ops = scores * alu
    # Operands stored narrower than the matrix unit runs are dequantized in the kernel,
    # once per query tile that loads them (decode: the GQA group shares one load).
    q_tiles = 1 if shape.is_decode else math.ceil(sq / Q_TILE) * (hq // hkv)
    for operand, compute in (("k", qk_c), ("v", pv_c)):
        stored = getattr(prec, operand)
        if stored != compute and format_info(stored).bits < 16:
            alu_ops += b * hkv * skv * d * q_tiles * density * DEQUANT_ALU_OPS.get(stored, 2)
    if prec.q != qk_c and format_info(prec.q).bits < 16:
        alu_ops += b * hq * sq * d * DEQUANT_ALU_OPS.get(prec.q, 2)
    t_alu = alu_ops / simt_ops

    in_b = _bytes(prec.input)
    rows_q, rows_kv = b * hq * sq, b * hkv * skv
    kernel_bytes = (
        rows_q * d * _bytes(prec.q) + rows_q * scale_bytes_per_row(prec.q_granularity, sq, d)
        + rows_kv * d * density * (_bytes(prec.k) + _bytes(prec.v))
        + rows_kv * (scale_bytes_per_row(prec.k_granularity, skv, d)
                     + scale_bytes_per_row(prec.v_granularity, skv, d))
        + (b * hkv * d * 4 if prec.smooth_k else 0)       # k_mean
        + rows_q * d * in_b + rows_q * 4                  # out + lse
    )
    # Quantization passes of flash_quant (fa3/fa4 with fp8 quantize Q/K/V the same way).
    prep_bytes = 0.0
    kernels = 1
    for operand, rows, seq, gran in (("q", rows_q, sq, prec.q_granularity),
                                     ("k", rows_kv, skv, prec.k_granularity),
                                     ("v", rows_kv, skv, prec.v_granularity)):
        if not prec.quantized(operand) or (operand != "q" and prec.kv_prequantized):
            continue
        stored = getattr(prec, operand)
        prep_bytes += rows * d * (in_b + _bytes(stored)) + rows * scale_bytes_per_row(gran, seq, d)
        kernels += 1
        if (operand == "k" and prec.smooth_k) or gran in ("per_channel", "per_head", "per_tensor"):
            prep_bytes += rows * d * in_b                 # column statistics: a second read
            kernels += 2                                  # the statistics pass and its reduce
        if operand in ("q", "k") and prec.rotate:
            prep_bytes += 2 * rows * d * in_b             # rotated copy written and re-read
            kernels += 1
    bw = hw.memory_bandwidth_tbs.value * 1e12
    schedule = kernel_schedule(shape, prec, hw)
    if schedule.splits > 1:
        kernels += 1                                      # the split-KV merge
    return AttentionTerms(t_mma=t_mma, t_exp=t_exp, t_alu=t_alu, t_mem=kernel_bytes / bw,
                          t_prep=prep_bytes / bw, kernels=kernels, flops=int(shape.flops * density),
                          kernel_bytes=kernel_bytes, prep_bytes=prep_bytes,
                          qk_compute=qk_c, pv_compute=pv_c, schedule=schedule)


@dataclass
class AttentionCost:
    time_s: float
    bottleneck: str
    terms: AttentionTerms
    components_s: Dict[str, float]
    calibrated: bool
    family: str
    precision: str
    note: str = ""

    @property
    def time_us(self) -> float:
        return self.time_s * 1e6

    @property
    def tflops(self) -> float:
        return self.terms.flops / self.time_s / 1e12

    @property
    def arithmetic_intensity(self) -> float:
        return self.terms.flops / max(self.terms.kernel_bytes + self.terms.prep_bytes, 1.0)


def prior_coefficients(hw: HardwareSpec, prec: "AttentionPrecision") -> Dict[str, float]:
    """The uncalibrated model written as coefficients of FEATURES (additive form): the
    prior the calibration fit is pulled towards where the data cannot decide."""
    eff_mma, _ = hw.efficiency_factor("mma", hw.compute_precision(prec.qk))
    eff_exp, _ = hw.efficiency_factor("exp")
    eff_mem, _ = hw.efficiency_factor("memory")
    return {"launch": LAUNCH_S * 1e6, "serial": SERIAL_STEP_S * 1e6, "serial_decode": SERIAL_STEP_S * 1e6,
            "mma": 1.0 / eff_mma, "sfu": 1.0 / eff_exp, "mem": 1.0 / eff_mem, "prep": 1.0 / eff_mem}


def load_calibration(hw_key: str, path: Optional[str] = None) -> Optional[dict]:
    """The stored calibration of `hw_key` (dict) or None when there is none: `path`, else
    the user's calibration_<hw_key>.json (flash-quant calibrate), else the shipped one."""
    path = path or find_data_file(f"calibration_{hw_key}.json")
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    fits = data.get("fits")
    if not isinstance(fits, dict):
        raise ValueError(f"{path}: no 'fits' object; re-run `flash-quant calibrate`")
    if data.get("model_version", MODEL_VERSION) != MODEL_VERSION:
        raise ValueError(f"{path}: fitted for cost-model version {data.get('model_version')}, this is "
                         f"version {MODEL_VERSION}; re-fit it offline with `flash-quant calibrate --refit "
                         f"{path}` (same measurements) or re-run `flash-quant calibrate` on the GPU")
    for key, fit in fits.items():
        coef = fit.get("coef")
        if not isinstance(coef, dict) or set(coef) != set(FEATURES):
            raise ValueError(f"{path}: fit {key!r} must have coefficients {FEATURES} (model version "
                             f"{MODEL_VERSION}), got {coef!r}; re-fit it offline with "
                             f"`flash-quant calibrate --refit {path}`")
    return data


class AttentionCostModel:
    """Predicts attention time on one chip.

    calibration: "auto" loads ``data/calibration_<hardware key>.json`` when present, None
    disables calibration, a dict is used as is (the output of `calibrate.fit`).
    """

    def __init__(self, hardware, calibration="auto"):
        self.hw = get_hardware(hardware)
        if calibration == "auto":
            calibration = load_calibration(self.hw.key)
        self.calibration = calibration

    def fit_for(self, family: str, precision_name: str) -> Optional[dict]:
        if not self.calibration:
            return None
        return self.calibration["fits"].get(f"{family}/{precision_name}")

    def predict(self, shape: AttentionShape, precision: AttentionPrecision, family: str = "flash_quant",
                density: float = 1.0, use_calibration: bool = True) -> AttentionCost:
        if family not in FAMILIES:
            raise ValueError(f"unknown kernel family {family!r}; expected one of {FAMILIES}")
        self._check_family(family, precision)
        hw = self.hw
        terms = attention_terms(shape, precision, hw, density)
        fit = self.fit_for(family, precision.name) if use_calibration else None
        if fit is not None:
            c = fit["coef"]
            comps = {name: c[name] * x for name, x in zip(FEATURES, terms.features())}
            total = sum(comps.values())
            return AttentionCost(total, _bottleneck(comps), terms, comps, True, family, precision.name,
                                 note=f"calibrated ({self.calibration.get('date', '?')}, "
                                      f"{self.calibration.get('device_name', hw.key)})")
        eff_mma_qk, _ = hw.efficiency_factor("mma", terms.qk_compute)
        eff_mma_pv, _ = hw.efficiency_factor("mma", terms.pv_compute)
        eff_mem, _ = hw.efficiency_factor("memory")
        eff_exp, _ = hw.efficiency_factor("exp")
        eff_simt, _ = hw.efficiency_factor("simt")
        a_mma = terms.t_mma / ((eff_mma_qk + eff_mma_pv) / 2)
        a_exp, a_alu = terms.t_exp / eff_exp, terms.t_alu / eff_simt
        if family == "fa4":
            # Emulate a share of exp2 on the FMA units; the best split balances both units.
            exp_rate = hw.exp_tops.value * 1e12 * eff_exp
            emu_rate = hw.simt_fp32_tflops.value * 1e12 / 2 * eff_simt / EMULATED_EXP_OPS
            a_exp = terms.t_exp * hw.exp_tops.value * 1e12 / (exp_rate + emu_rate)
        a_mem, a_prep = terms.t_mem / eff_mem, terms.t_prep / eff_mem
        launch = LAUNCH_S * terms.kernels
        if family == "fa1":
            comps = {"mma": a_mma, "sfu": a_exp + a_alu, "mem": a_mem}
            core = a_mma + a_exp + a_alu + a_mem
        elif family == "fa2":
            comps = {"mma": a_mma, "sfu": a_exp + a_alu, "mem": a_mem}
            core = max(a_mma + a_exp + a_alu, a_mem)
        elif family in ("fa3", "fa4"):
            comps = {"mma": a_mma, "sfu": a_exp + a_alu, "mem": a_mem}
            core = max(a_mma, a_exp + a_alu, a_mem)
        else:
            comps = {"mma": a_mma, "sfu": a_exp + a_alu, "mem": a_mem}
            core = max(a_mma + a_exp + a_alu, a_mem)
        total = launch + a_prep + core
        comps.update(prep=a_prep, launch=launch)
        return AttentionCost(total, _bottleneck(comps), terms, comps, False, family, precision.name,
                             note="uncalibrated (registry efficiencies)")

    @staticmethod
    def _check_family(family: str, p: AttentionPrecision) -> None:
        sixteen = ("fp16", "bf16")
        if family in ("fa1", "fa2") and (p.qk not in sixteen or p.pv not in sixteen):
            raise ValueError(f"{family} computes in fp16/bf16 only; got Q·Kᵀ {p.qk}, P·V {p.pv}")
        if family in ("fa3", "fa4") and not all(x in sixteen + ("fp8_e4m3",) for x in (p.qk, p.pv)):
            raise ValueError(f"{family} computes in fp16/bf16/fp8_e4m3; got Q·Kᵀ {p.qk}, P·V {p.pv}")


_BOTTLENECK_NAMES = {"mma": "tensor-core matmul", "sfu": "exp/softmax units", "mem": "memory bandwidth",
                     "prep": "quantization passes", "launch": "launch/host overhead",
                     "serial": "serial key-block latency (too few programs)",
                     "serial_decode": "serial key-block latency (too few programs)"}


def _bottleneck(components: Dict[str, float]) -> str:
    return _BOTTLENECK_NAMES[max(components, key=components.get)]
