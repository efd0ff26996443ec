"""Helpers shared by the training tests: the train CLI in-process, a run's metrics, a port."""
import contextlib
import io
import json
import pathlib
import socket

from experiments import train as train_cli


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
