"""Helpers shared by the tests: the train CLI in-process, a run's metrics, a port, the models
whose siblings stand in for them."""
import contextlib
import io
import json
import pathlib
import socket

from experiments import train as train_cli

# Variants that repeat a sibling's modules with other block counts, widths or group counts: the
# sibling's train step in tests/test_models.py covers their code
# (test_variants_use_no_layer_kind_their_sibling_lacks checks that), tests/test_reference.py
# their exact parameters and multiply-adds, and test_models' shape and dtype tests every model.
# Compiling each one's backward pass cost 11-27 s; tracing each one's backbone 1-2 s.
SIBLINGS = {
    "vgg13": "vgg11", "vgg16": "vgg11", "vgg19": "vgg11",
    "vgg13_bn": "vgg11_bn", "vgg16_bn": "vgg11_bn", "vgg19_bn": "vgg11_bn",
    "resnet34": "resnet18", "se_resnet34": "se_resnet18",
    "resnet101": "resnet152", "se_resnet101": "se_resnet152", "densenet169": "densenet201",
    "shufflenet_v1_g2": "shufflenet_v1_g3", "shufflenet_v1_g4": "shufflenet_v1_g3",
    "shufflenet_v1_g8": "shufflenet_v1_g3", "shufflenet_v2_x1_0": "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_5": "shufflenet_v2_x0_5", "shufflenet_v2_x2_0": "shufflenet_v2_x0_5",
    "mnasnet1_0": "mnasnet0_5", "mobilenet_v3_large": "mobilenet_v3_small",
}


def cli(*args) -> tuple[int, str]:
    """(exit status, stderr) of `python -m experiments.train ARGS`, run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_cli.main(list(args))
    return code, err.getvalue()


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
