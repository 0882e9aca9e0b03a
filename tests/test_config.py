"""The shared config behaviour: JSON round trips and the one preset registry of every config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from pylandmark.config import JsonConfig, Presets


@dataclass
class _Cfg(JsonConfig):
    width: int = 4
    sizes: tuple[int, ...] = (1, 2)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")


_Cfg.presets.register("small", _Cfg(width=2, extra={"a": [1]}))
_Cfg.presets.register("big", _Cfg(width=64))


def test_each_config_class_has_its_own_registry():
    @dataclass
    class Other(JsonConfig):
        x: int = 0

    assert isinstance(_Cfg.presets, Presets) and isinstance(Other.presets, Presets)
    assert sorted(_Cfg.presets) == ["big", "small"]
    assert len(Other.presets) == 0  # a registry per subclass, not one shared dict


def test_from_preset_copies_and_overrides():
    cfg = _Cfg.from_preset("small", sizes=(3,))
    assert cfg == _Cfg(width=2, sizes=(3,), extra={"a": [1]})
    cfg.extra["a"].append(2)  # a deep copy: the registered preset is untouched
    assert _Cfg.presets["small"].extra == {"a": [1]}
    with pytest.raises(ValueError, match="width must be >= 1"):  # overrides go through __post_init__
        _Cfg.from_preset("big", width=0)


def test_unknown_preset_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match=r"name: unknown preset 'huge' for _Cfg; choose one of \['big', 'small'\]"):
        _Cfg.from_preset("huge")
    with pytest.raises(ValueError, match=r"cfg: unknown preset 3"):
        _Cfg.presets.get_config(3, argument="cfg")


def test_coerce_takes_a_config_or_a_preset_name():
    mine = _Cfg(width=5)
    assert _Cfg.coerce(mine) is mine
    assert _Cfg.coerce("big") == _Cfg(width=64) and _Cfg.coerce("big") is not _Cfg.presets["big"]
    with pytest.raises(TypeError, match="cfg must be a _Cfg or a preset name, got dict"):
        _Cfg.coerce({"width": 5})
    with pytest.raises(ValueError, match="arch: unknown preset 'huge'"):
        _Cfg.coerce("huge", "arch")


def test_register_rejects_duplicates_and_wrong_types():
    with pytest.raises(ValueError, match="already registered"):
        _Cfg.presets.register("small", _Cfg())
    with pytest.raises(TypeError, match="must be a _Cfg"):
        _Cfg.presets.register("odd", {"width": 3})
    with pytest.raises(ValueError, match="non-empty str"):
        _Cfg.presets.register("", _Cfg())
    with pytest.raises(TypeError):  # a read-only view: entries are added through register only
        _Cfg.presets["x"] = _Cfg()  # type: ignore[index]


def test_dict_round_trip_is_strict():
    cfg = _Cfg(width=3, sizes=(5, 6))
    d = cfg.to_dict()
    assert d == {"width": 3, "sizes": [5, 6], "extra": {}}
    assert _Cfg.from_dict({**d, "sizes": tuple(d["sizes"])}) == cfg
    with pytest.raises(ValueError, match=r"unknown _Cfg fields \['wdith'\]"):
        _Cfg.from_dict({"wdith": 3})
    assert dataclasses.fields(_Cfg)[0].name == "width"  # `presets` is a ClassVar, not a field


def test_library_configs_use_the_registry():
    from pylandmark.models import CSPDARKNET_PRESETS, LANDMARKNET_PRESETS, RESNET_PRESETS
    from pylandmark.models.cspdarknet import CspDarknetCfg
    from pylandmark.models.landmarknet import LandmarkNetConfig
    from pylandmark.models.resnet import ResNetCfg
    from pylandmark.training import TRAIN_PRESETS, TrainConfig

    assert CSPDARKNET_PRESETS is CspDarknetCfg.presets and RESNET_PRESETS is ResNetCfg.presets
    assert LANDMARKNET_PRESETS is LandmarkNetConfig.presets and TRAIN_PRESETS is TrainConfig.presets
    assert ResNetCfg.from_preset("resnet101").layers == (3, 4, 23, 3)
    assert LandmarkNetConfig.from_preset("resnet101-gem-lw", whiten_dim=512) == \
        LandmarkNetConfig(backbone="resnet101", whitening=True, whiten_dim=512)
    assert TrainConfig.from_preset("resnet101-gem", epochs=3) == TrainConfig(model="resnet101-gem", epochs=3)
