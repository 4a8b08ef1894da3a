"""Model shapes the planner knows (presets) and the JSON format for others.

JSON: {"name": str, "hidden": int, "layers": int, "heads": int, "kv_heads": int,
       "head_dim": int, "ffn_dim": int, optional "vocab": int (0 = no LM head),
       "gated_ffn": bool (default true: gate/up/down as in Llama)}.
No torch import.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Tuple

from .strategies import OperatorType

__all__ = ["ModelSpec", "MODEL_PRESETS", "load_model", "LinearSpec"]

_REQUIRED = ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn_dim")
_OPTIONAL = ("name", "vocab", "gated_ffn", "arch", "double_blocks", "single_blocks", "text_tokens")


@dataclass(frozen=True)
class LinearSpec:
    """`count` linear maps in_features -> out_features applied to `rows` rows each, in
    `layers` layers, with precision taken from operator `op`."""

    op: OperatorType
    in_features: int
    out_features: int
    rows: int
    layers: int = 1
    first_layer: int = 0

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.layers


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab: int = 0
    gated_ffn: bool = True
    arch: str = "decoder"          # "decoder" (Llama-like) or "mmdit" (Flux-like)
    double_blocks: int = 0
    single_blocks: int = 0
    text_tokens: int = 0

    def __post_init__(self):
        for k in _REQUIRED:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model {self.name!r}: {k} must be a positive integer, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.arch not in ("decoder", "mmdit"):
            raise ValueError(f"model {self.name!r}: arch must be 'decoder' or 'mmdit', got {self.arch!r}")
        if self.arch == "mmdit" and self.double_blocks + self.single_blocks != self.layers:
            raise ValueError(f"model {self.name!r}: double_blocks + single_blocks must equal layers")

    @property
    def has_kv_cache(self) -> bool:
        return self.arch == "decoder"

    @classmethod
    def from_json(cls, obj, where: str = "model JSON") -> "ModelSpec":
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with keys {_REQUIRED}, got {type(obj).__name__}")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {missing} (required: {list(_REQUIRED)})")
        unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (allowed: {list(_REQUIRED + _OPTIONAL)})")
        kwargs = {}
        for k in _REQUIRED + ("vocab", "double_blocks", "single_blocks", "text_tokens"):
            if k in obj:
                v = obj[k]
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ValueError(f"{where}: {k} must be an integer, got {v!r}")
                kwargs[k] = v
        if "gated_ffn" in obj:
            if not isinstance(obj["gated_ffn"], bool):
                raise ValueError(f"{where}: gated_ffn must be true or false, got {obj['gated_ffn']!r}")
            kwargs["gated_ffn"] = obj["gated_ffn"]
        if "arch" in obj:
            kwargs["arch"] = obj["arch"]
        if kwargs.get("vocab", 0) < 0:
            raise ValueError(f"{where}: vocab must be >= 0")
        return cls(name=str(obj.get("name", "custom")), **kwargs)

    # ---- inventory ------------------------------------------------------------------
    def params(self) -> int:
        return sum(l.params for l in self.linears(tokens=1, phase="prefill", batch=1))

    def linears(self, tokens: int, phase: str, batch: int) -> List[LinearSpec]:
        """The linear maps of one forward over `tokens` rows (decode: `batch` rows)."""
        H, L, F = self.hidden, self.layers, self.ffn_dim
        qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.arch == "decoder":
            t = tokens
            out = [LinearSpec(OperatorType.Q_PROJ, H, qd, t, L), LinearSpec(OperatorType.K_PROJ, H, kvd, t, L),
                   LinearSpec(OperatorType.V_PROJ, H, kvd, t, L), LinearSpec(OperatorType.O_PROJ, qd, H, t, L),
                   LinearSpec(OperatorType.FFN_UP, H, F, t, L), LinearSpec(OperatorType.FFN_DOWN, F, H, t, L)]
            if self.gated_ffn:
                out.append(LinearSpec(OperatorType.FFN_GATE, H, F, t, L))
            if self.vocab:
                # LM head: only the last position of each sequence produces logits.
                out.append(LinearSpec(OperatorType.EMBEDDINGS, H, self.vocab, batch, 1))
            return out
        # mmdit (Flux): `tokens` image tokens per sample plus text_tokens.
        img, txt = tokens, self.text_tokens * batch
        D, S = self.double_blocks, self.single_blocks
        out = []
        for rows in (img, txt):   # two streams in every double block
            out += [LinearSpec(OperatorType.Q_PROJ, H, qd, rows, D), LinearSpec(OperatorType.K_PROJ, H, qd, rows, D),
                    LinearSpec(OperatorType.V_PROJ, H, qd, rows, D), LinearSpec(OperatorType.O_PROJ, qd, H, rows, D),
                    LinearSpec(OperatorType.FFN_UP, H, F, rows, D), LinearSpec(OperatorType.FFN_DOWN, F, H, rows, D),
                    # adaLN modulation (6 vectors) from the conditioning vector: one row per sample
                    LinearSpec(OperatorType.EMBEDDINGS, H, 6 * H, batch, D)]
        both = img + txt
        out += [LinearSpec(op, i, o, r, S, first_layer=D) for op, i, o, r in (
            (OperatorType.Q_PROJ, H, qd, both), (OperatorType.K_PROJ, H, qd, both),
            (OperatorType.V_PROJ, H, qd, both), (OperatorType.FFN_UP, H, F, both),
            (OperatorType.O_PROJ, qd, H, both), (OperatorType.FFN_DOWN, F, H, both),
            (OperatorType.EMBEDDINGS, H, 3 * H, batch))]
        return out

    def attention_calls(self, seq_len: int, phase: str, batch: int) -> Tuple[int, int, int, bool]:
        """(seq_q, seq_kv, number of calls, causal) per forward."""
        if self.arch == "mmdit":
            s = seq_len + self.text_tokens
            return s, s, self.layers, False
        if phase == "decode":
            return 1, seq_len, self.layers, False
        return seq_len, seq_len, self.layers, True

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("name",) + _REQUIRED + ("vocab", "gated_ffn", "arch")}
        if self.arch == "mmdit":
            d.update(double_blocks=self.double_blocks, single_blocks=self.single_blocks, text_tokens=self.text_tokens)
        return d


MODEL_PRESETS = {
    # Llama 3 8B / 70B: config.json of meta-llama/Meta-Llama-3-8B / -70B.
    "llama-3-8b": ModelSpec("Llama-3-8B", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                            ffn_dim=14336, vocab=128256),
    "llama-3-70b": ModelSpec("Llama-3-70B", hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128,
                             ffn_dim=28672, vocab=128256),
    # FLUX.1-dev transformer: 19 double-stream + 38 single-stream blocks, 24 heads of 128,
    # hidden 3072, MLP ratio 4, 512 T5 text tokens.  seq_len = image tokens (4096 at 1024^2).
    "flux-dev": ModelSpec("Flux-dev transformer", hidden=3072, layers=57, heads=24, kv_heads=24, head_dim=128,
                          ffn_dim=12288, vocab=0, gated_ffn=False, arch="mmdit", double_blocks=19,
                          single_blocks=38, text_tokens=512),
}


def load_model(arg) -> ModelSpec:
    """A preset name (case-insensitive), a path to a model JSON file, a JSON string or a dict."""
    if isinstance(arg, ModelSpec):
        return arg
    if isinstance(arg, dict):
        return ModelSpec.from_json(arg)
    if not isinstance(arg, str) or not arg.strip():
        raise ValueError(f"model must be a preset name, a JSON file or a JSON object, got {arg!r}")
    key = arg.strip().lower().replace("_", "-")
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key]
    if arg.lstrip().startswith("{"):
        try:
            return ModelSpec.from_json(json.loads(arg))
        except json.JSONDecodeError as e:
            raise ValueError(f"model JSON string is malformed: {e}") from None
    if os.path.exists(arg):
        try:
            with open(arg) as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"model file {arg!r} is not valid JSON: {e}") from None
        return ModelSpec.from_json(obj, where=f"model file {arg!r}")
    raise ValueError(f"unknown model {arg!r}: not a preset ({', '.join(MODEL_PRESETS)}) and no such file")
