import json

import pytest

from flash_quant import (
    PRESETS,
    AttentionConfig,
    OperandConfig,
    PerBlock,
    PerChannel,
    PerTensor,
    PerToken,
    Precision,
    PVPrecision,
    Strategy,
    get_preset,
)
from flash_quant.config import Granularity, resolve_config


def test_enums_are_str_with_docs():
    assert Precision("int8") is Precision.INT8 and Precision.INT4 == "int4"
    assert Strategy("legacy") is Strategy.LEGACY
    for member in list(Precision) + list(Strategy) + list(PVPrecision):
        assert isinstance(member, str)


def test_granularity_frozen_and_json():
    g = PerBlock(32)
    with pytest.raises(Exception):
        g.rows = 4
    assert g.block_size == 32 and PerToken().block_size == 1
    for g in (PerTensor(), PerToken(), PerBlock(16), PerChannel()):
        assert Granularity.from_json(g.to_json()) == g
    with pytest.raises(ValueError, match="positive"):
        PerBlock(0)
    with pytest.raises(ValueError, match="unknown granularity"):
        Granularity.from_json({"kind": "per_galaxy"})


def test_presets_round_trip_json():
    for name, cfg in PRESETS.items():
        again = AttentionConfig.from_json(json.loads(json.dumps(cfg.to_json())))
        assert again == cfg, name


def test_preset_contents():
    acc = get_preset("accurate")
    assert acc.q.precision is Precision.INT8 and acc.k.smooth and not acc.v.quantized
    assert acc.pv is PVPrecision.NONE
    fast = get_preset("fast")
    assert fast.v.precision is Precision.INT8 and fast.pv is PVPrecision.INT8
    assert get_preset("int4").k.precision is Precision.INT4
    assert resolve_config(None) == acc
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("int3")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision=Precision.FP8_E4M3, strategy=Strategy.ASYMMETRIC), "asymmetric"),
        (dict(precision=Precision.INT8, strategy=Strategy.LEGACY, granularity=PerToken()), "legacy"),
    ],
)
def test_operand_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OperandConfig(**kwargs)


def test_attention_config_rejects():
    i8 = OperandConfig(Precision.INT8)
    with pytest.raises(ValueError, match="head dim"):
        AttentionConfig(q=OperandConfig(Precision.INT8, granularity=PerChannel()))
    with pytest.raises(ValueError, match="both Q and K"):
        AttentionConfig(q=OperandConfig(Precision.INT8, rotate=True), k=i8)
    with pytest.raises(ValueError, match="pv='int8' needs V"):
        AttentionConfig(q=i8, k=i8, pv="int8")
    with pytest.raises(ValueError, match="smooth K only"):
        AttentionConfig(q=OperandConfig(Precision.INT8, smooth=True))
    with pytest.raises(TypeError, match="Granularity"):
        OperandConfig(Precision.INT8, granularity="per_token")
