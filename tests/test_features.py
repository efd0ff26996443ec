"""`features_only=True`: every model as a backbone of stride-4/8/16/32 maps, and weights that load.

Shapes are traced with jax.eval_shape (nothing compiles); one check computes, eagerly: ResNet-18
at 64x64 (each small model run costs 3-20 s of op-by-op compiles on two cores).
"""
import fnmatch
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from cnnjax.models import feature_info, strip_head

from helpers import SIBLINGS, random_values

# Every model but the variants whose modules a sibling's repeat (their backbone code is the
# sibling's: the same family module, other counts and widths).
NAMES = [n for n in cnnjax.list_models() if n not in SIBLINGS]
# The one non-square size every model takes. Convs and pools treat H and W alike, so its W axis
# also gives each map's width at 224x224, the size feature_info is asked about.
SIZE = (160, 224)
# The head of each family: the top-level modules a features_only model does not build (the first
# pattern a name matches counts; pools, flattening and dropout have no parameters).
HEADS = (("alexnet*", {"fc6", "fc7", "fc8"}), ("zfnet", {"fc6", "fc7", "fc8"}),
         ("vgg*", {"fc6", "fc7", "fc8"}), ("mobilenet_v3_*", {"fc_hidden", "fc"}), ("*", {"fc"}))
# Convs and pools without "same" padding: their maps come out up to 2 pixels short of
# input / stride (the others' are exact at SIZE).
UNPADDED = {"alexnet", "alexnet_v1", "zfnet"}


def head(name: str) -> set[str]:
    return next(modules for pattern, modules in HEADS if fnmatch.fnmatchcase(name, pattern))


@functools.cache
def traced(name: str, features_only: bool, size: tuple[int, int] = SIZE, **overrides):
    """(output, variables) of `name` at `size`, as shapes."""
    model = cnnjax.create_model(name, features_only=features_only, **overrides)
    x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init_with_output, train=False),
                          jax.random.key(0), x)


def shapes(variables) -> dict[tuple, tuple]:
    """{(collection, module, ..., leaf): shape} of a variable tree."""
    return {tuple(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


@pytest.mark.parametrize("name", NAMES)
def test_maps_are_the_strides_and_channels_feature_info_names(name):
    """Strides 4-32 at both sizes, as many pixels as the stride says, feature_info's channels."""
    info = feature_info(name)  # at 224x224
    assert [i["stride"] for i in info] == [4, 8, 16, 32]
    assert [i["name"] for i in info] == [f"stride{i['stride']}" for i in info]
    maps, _ = traced(name, True)
    assert set(maps) == {i["name"] for i in info}
    sizes = []
    for i in info:
        n, h, w, c = maps[i["name"]].shape
        assert (n, c) == (1, i["channels"]), i
        for got, full in ((h, SIZE[0]), (w, SIZE[1])):
            exact = full // i["stride"]  # 160 and 224 are multiples of 32
            assert exact - 2 <= got < exact if name in UNPADDED else got == exact, (i, got)
        sizes.append((h, w))
    assert all(a > b for pair in zip(sizes, sizes[1:]) for a, b in zip(*pair))  # both axes


@pytest.mark.parametrize("name, size, sides", [
    ("alexnet_v1", (227, 227), (55, 27, 13, 6)),  # Krizhevsky et al. 2012, Fig. 2
    ("zfnet", (224, 224), (55, 26, 13, 6)),        # Zeiler & Fergus 2014, Fig. 3
    ("alexnet", (224, 224), (55, 27, 13, 6)),      # torchvision's
])
def test_unpadded_trunks_keep_the_papers_map_sizes(name, size, sides):
    maps, _ = traced(name, True, size)
    assert [maps[f"stride{s}"].shape[1:3] for s in (4, 8, 16, 32)] == [(d, d) for d in sides]


@pytest.mark.parametrize("name", NAMES)
def test_backbone_variables_are_the_full_models_less_its_head(name):
    _, backbone = traced(name, True)
    _, full = traced(name, False)
    backbone, full = shapes(backbone), shapes(full)
    assert backbone.items() <= full.items()  # same names, same shapes
    assert {path[1] for path in full.keys() - backbone.keys()} == head(name)
    assert not {path[1] for path in backbone} & head(name)


def test_googlenet_backbone_builds_no_aux_heads_and_skips_their_size_check():
    # googlenet_v1's aux heads need 79x79; its backbone takes the trunk's minimum, 31.
    maps, backbone = traced("googlenet_v1", True, (31, 31), aux_logits=True)
    assert maps["stride32"].shape == (1, 1, 1, 1024)
    _, full = traced("googlenet_v1", False, (224, 224), aux_logits=True)
    missing = shapes(full).keys() - shapes(backbone).keys()
    assert {path[1] for path in missing} == {"fc", "aux1", "aux2"}


def test_input_checks_still_run_first():
    model = cnnjax.create_model("alexnet", features_only=True)
    with pytest.raises(ValueError, match="alexnet needs an input of at least 63x63 pixels"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_resnet18_backbone_loads_the_full_models_weights_and_gives_its_activations():
    """A full model's variables, head dropped, drive the backbone: each level equals the full
    model's activation at the stage its docstring names (computed: eagerly, at 64x64)."""
    stages = {"stride4": "stage1_block2", "stride8": "stage2_block2",
              "stride16": "stage3_block2", "stride32": "stage4_block2"}
    full = cnnjax.create_model("resnet18")
    backbone = cnnjax.create_model("resnet18", features_only=True)
    x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
    variables = random_values(traced("resnet18", False)[1])  # no shape depends on the size
    _, state = full.apply(variables, x, train=False, mutable=["intermediates"],
                          capture_intermediates=lambda m, method: m.name in stages.values())
    like = traced("resnet18", True)[1]
    loaded = strip_head(variables, like)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(like)
    maps = backbone.apply(loaded, x, train=False)
    assert maps.keys() == stages.keys()
    chex.assert_tree_all_finite(maps)
    for level, stage in stages.items():
        np.testing.assert_allclose(maps[level], state["intermediates"][stage]["__call__"][0],
                                   rtol=0, atol=1e-6, err_msg=level)
