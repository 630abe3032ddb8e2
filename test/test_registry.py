"""Plug-in families share one registry shape: registration order, a refused second registration, and a lookup error
that names the family and every known plug-in."""
import pytest

from sal_ros.core.errors import SensorDataError
from sal_ros.core.registry import Registry


def test_register_lookup_and_refusals():
    reg = Registry("widget")
    assert reg.register("a", 1) == 1 and reg.registers("b")(2) == 2
    assert list(reg) == ["a", "b"] and reg.lookup("b") == 2
    with pytest.raises(ValueError, match="widget 'a' is registered already"):
        reg.register("a", 3)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; known: a, b"):
        reg.lookup("c")


def test_the_plug_in_families_are_registries():
    from sal_ros.data.sources import SOURCES
    from sal_ros.pretrain.teachers import TEACHERS, build_teacher
    from sal_ros.pseudolabel.mask_sources import SOURCES as MASK_SOURCES
    from sal_ros.pseudolabel.mask_sources import build_mask_source
    from sal_ros.pseudolabel.score_sources import SCORE_SOURCES, build_score_source

    assert all(isinstance(r, Registry) for r in (SOURCES, MASK_SOURCES, TEACHERS, SCORE_SOURCES))
    with pytest.raises(ValueError, match="unknown mask source 'x'; known: slic, sam, sam2, sam2_lidar, geometric"):
        build_mask_source("x")
    assert list(SCORE_SOURCES) == ["clip", "folder", "torchscript", "oracle"]
    assert list(TEACHERS) == ["dinov2", "clip", "random", "oracle"]
    with pytest.raises(ValueError, match="unknown score source 'x'; known: clip, folder, torchscript, oracle"):
        build_score_source("x")
    with pytest.raises(ValueError, match="unknown teacher 'x'; known: dinov2, clip, random, oracle"):
        build_teacher({"kind": "x"})
    with pytest.raises(ValueError, match="the oracle teacher needs a label set"):
        build_teacher({"kind": "oracle"})
    assert type(build_teacher({"kind": "random", "dim": 8})).__name__ == "RandomTeacher"
    with pytest.raises(SensorDataError, match="unknown frame source kind 'x'"):
        SOURCES.lookup("x")


def test_backbones_are_a_registry(monkeypatch):
    """A backbone family is one registration: configs naming it build it, unknown names list the known ones."""
    from sal_ros.model.backbone import BACKBONES
    from sal_ros.model.config import ModelConfig
    from sal_ros.model.minkunet import MinkUNet
    from sal_ros.model.sal import SALModel

    assert isinstance(BACKBONES, Registry) and list(BACKBONES) == ["minkunet", "waffleiron"]
    with pytest.raises(ValueError, match="unknown backbone 'pointnet'; known: minkunet, waffleiron"):
        ModelConfig(backbone="pointnet")

    class Wider(MinkUNet):
        pass

    monkeypatch.setitem(BACKBONES, "wider", Wider)
    assert type(SALModel(ModelConfig.preset("tiny", backbone="wider")).backbone) is Wider
