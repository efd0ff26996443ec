"""Model families; importing this package registers every architecture (one import a family)."""
from cnnjax.models import (
                                    alexnet,  # noqa: F401  (registers alexnet, alexnet_v1, zfnet)
                                    densenet,  # noqa: F401  (densenet121, 161, 169, 201)
                                    googlenet,  # noqa: F401  (googlenet, googlenet_v1)
                                    mnasnet,  # noqa: F401  (mnasnet0_5, mnasnet1_0)
                                    mobilenet,  # noqa: F401  (mobilenet_v1, _v2, _v3_large, _v3_small)
                                    resnet,  # noqa: F401  (resnet, resnext, wide_resnet, se_resnet)
                                    shufflenet,  # noqa: F401  (shufflenet_v1_g1..g8, _v2_x0_5..x2_0)
                                    vgg,  # noqa: F401  (vgg11..19, _bn)
)
from cnnjax.models.registry import (
                                    create_model,
                                    feature_info,
                                    list_models,
                                    model_spec,
                                    register,
                                    strip_head,
)

__all__ = ["create_model", "feature_info", "list_models", "model_spec", "register", "strip_head"]
