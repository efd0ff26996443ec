"""The registry: names, patterns, errors."""
import functools

import flax.linen as nn
import pytest

import cnnjax
from cnnjax.models import registry

ISSUE_2_MODELS = {
    "alexnet", "alexnet_v1", "zfnet", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn",
    "vgg16_bn", "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "se_resnet18", "se_resnet34",
    "se_resnet50", "se_resnet101", "se_resnet152"}


def test_list_models_is_sorted_and_complete():
    names = cnnjax.list_models()
    assert names == sorted(names) and len(set(names)) == len(names)
    assert ISSUE_2_MODELS <= set(names)


def test_list_models_pattern():
    assert cnnjax.list_models("vgg*_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert cnnjax.list_models("se_resnet*") == [f"se_resnet{d}" for d in (101, 152, 18, 34, 50)]
    assert cnnjax.list_models("nothing*") == []


def test_create_model_returns_an_unbound_flax_module():
    model = cnnjax.create_model("resnet18", num_classes=10)
    assert isinstance(model, nn.Module) and model.num_classes == 10 and model.arch == "resnet18"


def test_unknown_name_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'; did you mean resnet50") as e:
        cnnjax.create_model("resnet5")
    assert "resnet18" in str(e.value) or "resnet152" in str(e.value)
    with pytest.raises(ValueError, match=r"did you mean .*vgg16_bn"):
        cnnjax.create_model("vgg16bn")


def test_unknown_override_names_the_valid_options():
    with pytest.raises(ValueError, match=r"resnet50 has no option 'se_ratio'.*se_reduction"):
        cnnjax.create_model("resnet50", se_ratio=16)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_classes_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        cnnjax.create_model("resnet18", num_classes=bad)


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="'resnet50' is already registered"):
        registry.register("resnet50", functools.partial(nn.Dense, 3))
    with pytest.raises(ValueError, match="lowercase"):
        registry.register("MyNet", functools.partial(nn.Dense, 3))


def test_se_is_an_option_of_resnet_not_a_copy():
    from cnnjax.models.resnet import ResNet
    se = cnnjax.create_model("se_resnet50")
    plain = cnnjax.create_model("resnet50", se_reduction=16)
    assert type(se) is ResNet and se.se_reduction == 16
    assert cnnjax.profile(plain, 64).params == cnnjax.profile(se, 64).params
