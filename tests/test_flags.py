"""Every flag of every CLI is checked before any work: bad input is ONE line `error: ...` on
stderr, exit status 2, no traceback, and nothing written (no workdir, no prepared dataset)."""
import contextlib
import dataclasses
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cnnjax import parallel, summary, train
from cnnjax.training import config as training_config
from experiments import benchmark, configs
from experiments import train as train_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def place(tmp_path, monkeypatch):
    """An empty cwd, an empty data dir, a workdir that does not exist, and a plain file."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.chdir(tmp_path / "cwd")
    return {"cwd": tmp_path / "cwd", "data": tmp_path / "data", "work": tmp_path / "work",
            "file": tmp_path / "file"}


def call(main, argv):
    """(exit status, stderr) of `main(argv)` run in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors exit
            code = e.code
    return code, err.getvalue()


def fill(text, place):
    """`text` with {file}, {work}, {data} replaced by `place`'s paths."""
    for k, v in place.items():
        text = text.replace("{%s}" % k, str(v))
    return text


def assert_refused(code, err, expected, place):
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err
    assert not place["work"].exists()
    assert list(place["data"].iterdir()) == [] and list(place["cwd"].iterdir()) == []
    assert place["file"].read_text() == "not a directory"


PORT = ["--num_processes=2", "--process_id=0"]
TRAIN_CASES = {  # id: (flags, expected in the error line); {file} is a plain file
    # the bugs reported
    "num_steps=0": (["--num_steps=0"], "--num_steps=0 must be a positive integer"),
    "bn_recalibration_batches<0": (["--bn_recalibration_batches=-1"],
                                   "--bn_recalibration_batches=-1 must be an integer >= 0"),
    "num_epochs=-1": (["--num_epochs=-1"], "--num_epochs=-1.0 must be a finite number > 0"),
    "lr=nan": (["--learning_rate=nan"], "--learning_rate=nan must be a finite number > 0"),
    "lr=inf": (["--learning_rate=inf"], "--learning_rate=inf must be a finite number > 0"),
    "lr<0": (["--learning_rate=-0.1"], "--learning_rate=-0.1 must be a finite number > 0"),
    "smoothing=2": (["--label_smoothing=2"], "--label_smoothing=2.0 must be a number in [0, 1)"),
    "workdir=file": (["--workdir={file}"], "must be a directory, but it is a file"),
    "batch=0": (["--batch_size=0"], "--batch_size=0 must be a positive integer"),
    # every other flag
    "config": (["--config=nope"], "unknown --config='nope'"),
    "arch": (["--arch=resnet5"], "unknown model 'resnet5'; did you mean resnet50"),
    "arch=''": (["--arch="], "unknown model ''"),
    "dataset": (["--dataset=imagenet22k"], "unknown dataset 'imagenet22k'; supported:"),
    "synthetic": (["--dataset=synthetic:num_classes=0"], "bad synthetic option 'num_classes=0'"),
    "data_dir=file": (["--data_dir={file}"], "must be a directory, but it is a file"),
    "data_dir=file/x": (["--data_dir={file}/x"], "must be a directory, but {file} is a file"),
    "data_dir=''": (["--data_dir="], "--data_dir='' must be a directory path"),
    "image_size=0": (["--image_size=0"], "--image_size=0 must be a positive integer"),
    "image_size<0": (["--image_size=-32"], "--image_size=-32 must be a positive integer"),
    "image_size=abc": (["--image_size=abc"], "argument --image_size: invalid int value: 'abc'"),
    "too small": (["--arch=alexnet", "--image_size=32"],
                  "--image_size=32 is too small for alexnet: it needs at least 63x63 pixels"),
    "too small aux": (["--arch=googlenet_v1", '--model_overrides={"aux_logits": true}',
                       "--image_size=64"], "googlenet_v1 with aux_logits: it needs at least 79"),
    "batch<0": (["--batch_size=-8"], "--batch_size=-8 must be a positive integer"),
    "batch=abc": (["--batch_size=abc"], "argument --batch_size: invalid int value: 'abc'"),
    "num_epochs=0": (["--num_epochs=0"], "--num_epochs=0.0 must be a finite number > 0"),
    "num_epochs=nan": (["--num_epochs=nan"], "--num_epochs=nan must be"),
    "num_epochs=inf": (["--num_epochs=inf"], "--num_epochs=inf must be"),
    "num_steps<0": (["--num_steps=-3"], "--num_steps=-3 must be a positive integer"),
    "num_steps=1.5": (["--num_steps=1.5"], "argument --num_steps: invalid int value: '1.5'"),
    "optimizer": (["--optimizer=lamb"],
                  "unknown optimizer 'lamb'; --optimizer must be sgd or adamw"),
    "lr=0": (["--learning_rate=0"], "--learning_rate=0.0 must be a finite number > 0"),
    "lr=abc": (["--learning_rate=fast"], "argument --learning_rate: invalid float value: 'fast'"),
    "momentum=1": (["--momentum=1"], "--momentum=1.0 must be a number in [0, 1)"),
    "momentum<0": (["--momentum=-0.5"], "--momentum=-0.5 must be a number in [0, 1)"),
    "momentum=nan": (["--momentum=nan"], "--momentum=nan must be a number in [0, 1)"),
    "weight_decay<0": (["--weight_decay=-1e-4"],
                       "--weight_decay=-0.0001 must be a finite number >= 0"),
    "weight_decay=inf": (["--weight_decay=inf"], "--weight_decay=inf must be a finite number >= 0"),
    "warmup<0": (["--warmup_epochs=-1"], "--warmup_epochs=-1.0 must be a finite number >= 0"),
    "warmup=nan": (["--warmup_epochs=nan"], "--warmup_epochs=nan must be a finite number >= 0"),
    "smoothing=1": (["--label_smoothing=1"], "--label_smoothing=1.0 must be a number in [0, 1)"),
    "smoothing<0": (["--label_smoothing=-0.1"], "--label_smoothing=-0.1 must be"),
    "clip=0": (["--grad_clip_norm=0"], "--grad_clip_norm=0.0 must be a finite number > 0"),
    "clip<0": (["--grad_clip_norm=-1"], "--grad_clip_norm=-1.0 must be a finite number > 0"),
    "clip=nan": (["--grad_clip_norm=nan"], "--grad_clip_norm=nan must be a finite number > 0"),
    "aux<0": (["--aux_loss_weight=-0.3"], "--aux_loss_weight=-0.3 must be a finite number >= 0"),
    "aux=inf": (["--aux_loss_weight=inf"], "--aux_loss_weight=inf must be a finite number >= 0"),
    "dtype": (["--dtype=float16"], "unknown dtype 'float16'; --dtype must be float32 or bfloat16"),
    "overrides=bad json": (["--model_overrides={bad"],
                           "argument --model_overrides: expected a JSON object such as"),
    "overrides=list": (["--model_overrides=[1]"], "got '[1]'"),
    "overrides=string": (['--model_overrides="x"'], "expected a JSON object"),
    "overrides unknown": (['--model_overrides={"nope": 1}'], "resnet18 has no option 'nope'"),
    "overrides taken": (['--model_overrides={"in_channels": 3, "num_classes": 5}'],
                        "cannot set in_channels, num_classes"),
    "seed<0": (["--seed=-1"], "--seed=-1 must be an integer in [0, 2**32)"),
    "seed>uint32": (["--seed=4294967296"], "--seed=4294967296 must be an integer in [0, 2**32)"),
    "seed=abc": (["--seed=abc"], "argument --seed: invalid int value: 'abc'"),
    "log_every=0": (["--log_every=0"], "--log_every=0 must be a positive integer"),
    "eval_every=0": (["--eval_every=0"], "--eval_every=0 must be a positive integer"),
    "checkpoint_every<0": (["--checkpoint_every=-5"], "--checkpoint_every=-5 must be"),
    "workdir=file/x": (["--workdir={file}/run"], "must be a directory, but {file} is a file"),
    "workdir=''": (["--workdir="], "--workdir='' must be a directory path"),
    "processes: only one": (["--coordinator_address=localhost:1234"],
                            "need all of --coordinator_address, --num_processes and --process_id"),
    "processes: two": (PORT, "got only --num_processes, --process_id"),
    "num_processes=0": (["--coordinator_address=h:1", "--num_processes=0", "--process_id=0"],
                        "--num_processes=0 must be a positive integer"),
    "process_id=2 of 2": (["--coordinator_address=h:1", "--num_processes=2", "--process_id=2"],
                          "--process_id=2 must be in [0, 2)"),
    "process_id<0": (["--coordinator_address=h:1", "--num_processes=2", "--process_id=-1"],
                     "--process_id=-1 must be in [0, 2)"),
    "address: no port": (["--coordinator_address=localhost", *PORT],
                         "--coordinator_address='localhost' must be HOST:PORT"),
    "address: port 0": (["--coordinator_address=h:0", *PORT], "with a port in 1..65535"),
    "address: port 70000": (["--coordinator_address=h:70000", *PORT], "must be HOST:PORT"),
    "address: no host": (["--coordinator_address=:1234", *PORT], "must be HOST:PORT"),
    "address: port abc": (["--coordinator_address=h:abc", *PORT], "must be HOST:PORT"),
    "unknown flag": (["--bach_size=8"], "unrecognized arguments: --bach_size=8; did you mean "
                                        "--batch_size?"),
    "no value": (["--model_overrides"], "argument --model_overrides: expected one argument"),
}


@pytest.mark.parametrize("args, expected", TRAIN_CASES.values(), ids=TRAIN_CASES)
def test_train_cli_refuses_every_bad_flag_before_any_work(place, args, expected):
    code, err = call(train_cli.main, [f"--data_dir={place['data']}", f"--workdir={place['work']}",
                                      "--num_steps=1", "--quiet", *(fill(a, place) for a in args)])
    assert_refused(code, err, fill(expected, place), place)


R18 = "--arch=resnet18"
BENCHMARK_CASES = {
    "batch=0": ([R18, "--batch_size=0"], "--batch_size=0 must be a positive integer"),
    "batch<0": ([R18, "--batch_size=-8"], "--batch_size=-8 must be a positive integer"),
    "batch=abc": ([R18, "--batch_size=abc"], "argument --batch_size: invalid int value: 'abc'"),
    "image_size=0": ([R18, "--image_size=0"], "--image_size=0 must be a positive integer"),
    "too small": (["--arch=alexnet", "--image_size=32"],
                  "--image_size=32 is too small for alexnet: it needs at least 63x63 pixels"),
    "steps=0": ([R18, "--steps=0"], "--steps=0 must be a positive integer"),
    "num_classes=0": ([R18, "--num_classes=0"], "--num_classes=0 must be a positive integer"),
    "arch": (["--arch=resnet5"], "unknown model 'resnet5'; did you mean resnet50"),
    "no arch": ([], "the following arguments are required: --arch"),
    "dtype": ([R18, "--dtype=float16"], "argument --dtype: invalid choice: 'float16'"),
    "mode": ([R18, "--mode=infer"], "argument --mode: invalid choice: 'infer'"),
    "memory_efficient": ([R18, "--memory_efficient"], "resnet18 has no option 'memory_efficient'"),
    "remat": (["--arch=densenet121", "--remat"], "densenet121 has no option 'remat'"),
    "input without dataset": (["--mode=input"], "the following arguments are required: --dataset"),
    "workers=0": (["--mode=input", "--dataset=imagenet2012", "--workers=0"],
                  "--workers=0 must be a positive integer"),
    "input digits": (["--mode=input", "--dataset=digits"],
                     "--dataset=digits is held decoded in memory; --mode=input measures"),
    "input unknown": (["--mode=input", "--dataset=imagenet"], "unknown dataset 'imagenet'"),
    "conv": ([R18, "--conv=fast"], "argument --conv: invalid choice: 'fast'"),
    "compare non-torchvision": (["--arch=alexnet_v1", "--compare=torch"],
                                "--arch=alexnet_v1 has no torchvision counterpart to compare"),
    "compare input": (["--mode=input", "--dataset=imagenet2012", "--compare=torch"],
                      "--mode=input times the input pipeline alone"),
    "compare and framework": ([R18, "--compare=torch", "--framework=torch"],
                              "--compare=torch already times both frameworks"),
    "largest and all": (["--all", "--largest_batch"], "--largest_batch sweeps one model's step"),
    "every and arch": ([R18, "--every_arch"], "--every_arch times cnnjax's step of every "),
    "every and compare": (["--every_arch", "--compare=torch"], "drop --arch, --all"),
    "every out": (["--every_arch", "--out=no/such/dir/B.md"],
                  "must be a file in an existing directory"),
    "largest input": (["--mode=input", "--dataset=imagenet2012", "--largest_batch"],
                      "--largest_batch sweeps one model's step"),
    "largest start": ([R18, "--largest_batch", "--batch_size=64", "--max_batch_size=32"],
                      "--batch_size=64 is above --max_batch_size=32: nothing to sweep"),
    "largest max=0": ([R18, "--largest_batch", "--max_batch_size=0"],
                      "--max_batch_size=0 must be a positive integer"),
    "largest too small": (["--arch=alexnet", "--largest_batch", "--image_size=32"],
                          "--image_size=32 is too small for alexnet"),
    "largest out": ([R18, "--largest_batch", "--out=no/such/dir/B.md"],
                    "must be a file in an existing directory"),
    "compare option": ([R18, "--compare=torch", "--memory_efficient"],
                       "resnet18 has no option 'memory_efficient'"),
    "compare too small": (["--arch=alexnet", "--compare=torch", "--image_size=32"],
                          "--image_size=32 is too small for alexnet"),
    "compare rounds=0": ([R18, "--compare=torch", "--rounds=0"],
                         "--rounds=0 must be a positive integer"),
    "all and arch": ([R18, "--all"], "--all measures resnet50, resnet18"),
    "convs and compare": ([R18, "--compare=torch", "--convs"],
                          "--convs times the convolutions of cnnjax's step in this process"),
    "convs and torch": ([R18, "--framework=torch", "--convs"],
                        "drop --compare, --all, --largest_batch, --every_arch, --mode=input "
                        "and --framework=torch"),
    "trace and compare": ([R18, "--compare=torch", "--trace=tr"],
                          "--trace traces one step in this process; drop --compare"),
    "trace a file": ([R18, "--trace={file}"], "is a file; give a directory"),
    "all out": (["--all", "--out=no/such/dir/B.md"],
                "must be a file in an existing directory"),
    "unknown flag": ([R18, "--stepz=3"],
                     "unrecognized arguments: --stepz=3; did you mean --steps?"),
    "abbreviation": ([R18, "--step=3"],  # argparse would silently take it as --steps
                     "unrecognized arguments: --step=3; did you mean --steps?"),
}


@pytest.mark.parametrize("args, expected", BENCHMARK_CASES.values(), ids=BENCHMARK_CASES)
def test_benchmark_cli_refuses_every_bad_flag(place, args, expected):
    code, err = call(benchmark.main, [fill(a, place) for a in args])
    assert_refused(code, err, expected, place)


SUMMARY_CASES = {
    "input_size=0": (["--input_size=0"], "--input_size=0 must be a positive integer"),
    "input_size<0": (["--input_size=-3"], "--input_size=-3 must be a positive integer"),
    "input_size=abc": (["--input_size=abc"], "argument --input_size: invalid int value: 'abc'"),
    "too small": (["--input_size=32"], "alexnet needs an input of at least 63x63 pixels"),
    "arch": (["--arch=alexx"], "unknown model 'alexx'; did you mean alexnet?"),
    "format": (["--format=html"], "argument --format: invalid choice: 'html'"),
    "in_channels=0": (["--in_channels=0"], "--in_channels=0 must be a positive integer"),
    "num_classes<0": (["--num_classes=-1"], "--num_classes=-1 must be a positive integer"),
    "arch and spec": (["--arch_spec=best_spec.json"],
                      "argument --arch_spec: not allowed with argument --arch"),
    "unknown flag": (["--inputsize=3"], "unrecognized arguments: --inputsize=3; did you mean "
                                        "--input_size?"),
}


@pytest.mark.parametrize("args, expected", SUMMARY_CASES.values(), ids=SUMMARY_CASES)
def test_summary_cli_refuses_every_bad_flag(place, args, expected):
    code, err = call(summary.main, ["--arch=alexnet", *args])
    assert_refused(code, err, expected, place)


@pytest.mark.parametrize("main", [train_cli.main, benchmark.main, summary.main])
def test_help_still_works(main):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and out.getvalue().startswith("usage: python -m ")


@pytest.mark.parametrize("module, args, expected", [
    ("experiments.train", ["--workdir={work}", "--data_dir={data}", "--batch_size=abc"],
     "argument --batch_size: invalid int value: 'abc'"),
    ("experiments.benchmark", ["--arch=alexnet", "--image_size=32"], "too small for alexnet"),
])
def test_no_traceback_end_to_end(place, module, args, expected):
    out = subprocess.run([sys.executable, "-m", module, *(fill(a, place) for a in args)],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert_refused(out.returncode, out.stderr, expected, place)


# --- TrainConfig from Python -------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"num_steps": 0}, "--num_steps=0 must be a positive integer"),
    ({"learning_rate": float("nan")}, "--learning_rate=nan must be a finite number > 0"),
    ({"batch_size": "64"}, "--batch_size='64' must be a positive integer"),
    ({"image_size": 32.0}, "--image_size=32.0 must be a positive integer"),
    ({"seed": True}, "--seed=True must be an integer in [0, 2**32)"),
    ({"momentum": 1}, "--momentum=1 must be a number in [0, 1)"),
    ({"optimizer": "SGD"}, "unknown optimizer 'SGD'"),
    ({"model_overrides": '{"zero_init_residual": true}'}, "must be a JSON object"),
    ({"model_overrides": {1: 2}}, "must be a JSON object"),
    ({"arch": None}, "--arch=None must be a string"),
    ({"dataset": "synthetic:channels=x"}, "bad synthetic option 'channels=x'"),
])
def test_train_config_validate_from_python(place, kw, message):
    config = train.TrainConfig(workdir=str(place["work"]), data_dir=str(place["data"]), **kw)
    with pytest.raises(ValueError) as e:
        config.validate()
    assert message in str(e.value)
    with pytest.raises(ValueError) as again:  # the same message from the entry points
        train.train_and_evaluate(config, verbose=False)
    assert str(again.value) == str(e.value)
    assert not place["work"].exists() and list(place["data"].iterdir()) == []


def test_paths_from_python(place):
    with pytest.raises(ValueError, match="but it is a file"):
        train.TrainConfig(data_dir=place["file"]).validate()  # a pathlib.Path
    with pytest.raises(ValueError, match="must be a directory path"):
        train.TrainConfig(workdir=3).validate()


def test_good_values_pass(place):
    train.TrainConfig().validate()  # the defaults (workdir runs/resnet18-digits, not created)
    for name in configs.names():
        train.TrainConfig(**configs.load(name)).validate()
    train.TrainConfig(
        arch="googlenet_v1", dataset="synthetic:num_classes=10,channels=1", image_size=79,
        batch_size=np.int64(8), num_epochs=0.5, num_steps=1, optimizer="adamw",
        learning_rate=1e-3, momentum=0.0, weight_decay=0, warmup_epochs=0, label_smoothing=0.99,
        grad_clip_norm=1.0, aux_loss_weight=0, dtype="bfloat16", seed=2**32 - 1, log_every=1,
        eval_every=1, checkpoint_every=1, model_overrides={"aux_logits": True},
        data_dir=str(place["data"] / "new" / "dir"), workdir=str(place["work"] / "a" / "b"),
    ).validate()
    assert list(place["cwd"].iterdir()) == [] and not place["work"].exists()
    assert parallel.check_processes(None, None, None) is False
    assert parallel.check_processes("[::1]:8476", 4, 3) is True
    args = train_cli._parser().parse_args(['--model_overrides={"zero_init_residual": true}'])
    assert args.model_overrides == {"zero_init_residual": True}


def test_every_train_config_field_has_a_rule():
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert fields - set(training_config._RULES) == {"data_dir", "workdir"}  # check_directory's


def test_a_config_is_validated_once_until_it_changes(monkeypatch, tmp_path):
    """The command line, train_and_evaluate and build each ask; only a change checks again."""
    from cnnjax import flags
    calls, check = [], flags.check
    monkeypatch.setattr(flags, "check", lambda *a: calls.append(a) or check(*a))
    config = train.TrainConfig(workdir=str(tmp_path / "work"))
    config.validate()
    config.validate()
    assert len(calls) == 1
    config.seed = 3
    config.validate()
    assert len(calls) == 2
    config.batch_size = 0
    with pytest.raises(ValueError, match="--batch_size=0"):
        config.validate()
