"""Ensembles: the averaging maths on hand-made members, two tiny trained runs end to end,
runs of different datasets refused, and the command line."""
import contextlib
import io
import json

import numpy as np
import pytest

from cnnjax import data, ensemble, train
from experiments import ensemble as ensemble_cli

pytestmark = pytest.mark.xdist_group("ensemble")  # one worker trains the members once (`runs`)


def softmax64(logits):
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def vote(member_logits):
    """Majority vote of the members' top-1 answers (ties: the lower class)."""
    answers = np.argmax(member_logits, -1)  # (M, N)
    k = np.shape(member_logits)[-1]
    return np.array([np.bincount(a, minlength=k).argmax() for a in answers.T])


# Three members, three classes, two examples of class 1, written as probabilities (their logs
# are logits with exactly these softmaxes).
#   example 0: the members answer 0, 2, 0; the mean (0.367, 0.400, 0.233) answers 1, which no
#              member does (and the vote says 0).
#   example 1: two members lean to 0 by a hair, one is sure of 1; the vote says 0, the mean
#              (0.34, 0.65, 0.01) says 1.
PROBS = np.array([
    [[0.50, 0.40, 0.10], [0.51, 0.48, 0.01]],
    [[0.10, 0.40, 0.50], [0.51, 0.48, 0.01]],
    [[0.50, 0.40, 0.10], [0.01, 0.98, 0.01]],
])
LABELS = np.array([1, 1])


def test_the_mean_of_probabilities_answers_what_no_member_and_no_vote_does():
    logits = np.log(PROBS)
    combined = ensemble.combine_logits(logits, "probs")
    mean = PROBS.mean(0)
    np.testing.assert_allclose(np.exp(combined), mean, rtol=1e-6)
    assert np.argmax(combined[0]) == 1
    assert all(np.argmax(m[0]) != 1 for m in logits)          # every member answers otherwise
    assert list(vote(logits)) == [0, 0] != list(np.argmax(combined, -1))
    got = ensemble.metrics(combined, LABELS)
    assert got["top1"] == 1.0 and got["count"] == 2
    assert [ensemble.metrics(m, LABELS)["top1"] for m in logits] == [0.0, 0.0, 0.5]
    assert np.mean(vote(logits) == LABELS) == 0.0
    np.testing.assert_allclose(got["loss"], -np.log(mean[[0, 1], LABELS]).mean(), rtol=1e-6)


def test_averaging_probabilities_and_logits_disagree_on_a_sure_member():
    """A member sure of class 1 (logits 0, 20) against two fairly sure of class 0 (3, 0):
    in probability it holds 1/3 of the mass, (0.635, 0.365) answers 0; in logits it
    dominates the mean (2, 6.67), which answers 1."""
    logits = np.array([[[0.0, 20.0]], [[3.0, 0.0]], [[3.0, 0.0]]])
    label = np.array([0])
    by_probs = ensemble.combine_logits(logits, "probs")
    by_logits = ensemble.combine_logits(logits, how="logits")
    np.testing.assert_allclose(np.exp(by_probs), softmax64(logits).mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.exp(by_logits), softmax64([[2.0, 20 / 3]]), rtol=1e-6)
    assert ensemble.metrics(by_probs, label)["top1"] == 1.0
    assert ensemble.metrics(by_logits, label)["top1"] == 0.0
    with pytest.raises(ValueError, match="unknown combine 'max'"):
        ensemble.combine_logits(logits, "max")


def test_metrics_top5_loss_and_ties():
    scores = np.array([[6.0, 5, 4, 3, 2, 1, 0],     # label 4: fifth, in the top 5
                       [6.0, 5, 4, 3, 2, 1, 0],     # label 5: sixth, out
                       [1.0, 1, 0, 0, 0, 0, 0]])    # label 1 ties class 0: ranks second
    got = ensemble.metrics(scores, [4, 5, 1])
    assert got["top1"] == 0.0 and got["top5"] == 2 / 3 and got["count"] == 3
    expect = -np.log(softmax64(scores)[[0, 1, 2], [4, 5, 1]]).mean()
    np.testing.assert_allclose(got["loss"], expect, rtol=1e-6)
    assert ensemble.metrics(scores, [0, 0, 0])["top1"] == 1.0


def test_members_that_read_examples_in_another_order_are_refused():
    ensemble.check_aligned([("a", np.array([0, 1, 2])), ("b", np.array([0, 1, 2]))])
    with pytest.raises(ValueError, match=r"example 1 has label 1 for a but 2 for b"):
        ensemble.check_aligned([("a", np.array([0, 1, 2])), ("b", np.array([0, 2, 1]))])
    with pytest.raises(ValueError, match="a has 3 examples, b has 2"):
        ensemble.check_aligned([("a", np.array([0, 1, 2])), ("b", np.array([0, 1]))])


# --- two tiny runs on the embedded digits ----------------------------------------------------

def small(workdir, data_dir, **kw):
    """A run of a few steps with one-block stages: what costs seconds to compile on a CPU."""
    base = dict(arch="resnet18", dataset="digits", batch_size=32, num_steps=3, log_every=1,
                learning_rate=0.4, bn_recalibration_batches=1, data_dir=data_dir,
                workdir=str(workdir))
    return train.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two members that differ in architecture, input size and dtype, trained on digits."""
    root = tmp_path_factory.mktemp("ensemble")
    configs = [small(root / "a", data_dir, image_size=32, model_overrides={"stage_sizes": [1, 1]}),
               small(root / "b", data_dir, arch="se_resnet18", image_size=40, dtype="bfloat16",
                     model_overrides={"stage_sizes": [1]})]
    summaries = [train.train_and_evaluate(c, verbose=False) for c in configs]
    return {"root": root, "data_dir": data_dir, "workdirs": [c.workdir for c in configs],
            "summaries": summaries}


@pytest.fixture(scope="module")
def evaluated(runs):
    return ensemble.evaluate(runs["workdirs"], return_logits=True)  # batches as trained: 32


def test_members_and_ensemble_on_the_digits_test_split(runs, evaluated):
    r = evaluated
    test = data.Loader("digits", "test", data_dir=runs["data_dir"], image_size=32,
                       global_batch_size=400, train=False).batch(0)
    labels = test["label"][test["mask"] > 0]
    assert r["count"] == len(labels) == 360 and r["dataset"] == "digits"
    np.testing.assert_array_equal(r["labels"], labels)  # every test example once, in order
    a, b = r["members"]
    assert (a["arch"], a["image_size"], a["dtype"]) == ("resnet18", 32, "float32")
    assert (b["arch"], b["image_size"], b["dtype"]) == ("se_resnet18", 40, "bfloat16")
    # Each member equals the training loop's own final evaluation of the state it saved
    # (cnnjax.train.evaluate: the jitted eval step's masked sums, the same batches).
    for m, s in zip(r["members"], runs["summaries"]):
        assert m["step"] == 3 and m["eval_batch_size"] == 32
        assert m["count"] == s["eval_count"] == 360
        assert m["logits"].shape == (360, 10) and m["logits"].dtype == np.float32
        assert (m["top1"], m["top5"]) == (s["eval_top1"], s["eval_top5"])
        np.testing.assert_allclose(m["loss"], s["eval_loss"], rtol=1e-5)
    # The ensemble recomputed from the members' probabilities, in float64.
    mean = (softmax64(a["logits"]) + softmax64(b["logits"])) / 2
    rank = np.argsort(-mean, axis=-1, kind="stable")
    e = r["ensemble"]
    assert e["count"] == 360 and e["members"] == 2
    assert e["top1"] == np.mean(rank[:, 0] == labels)
    assert e["top5"] == np.mean(np.any(rank[:, :5] == labels[:, None], -1))
    np.testing.assert_allclose(e["loss"], -np.log(mean[np.arange(360), labels]).mean(),
                               rtol=1e-5)


def test_runs_of_different_datasets_are_refused(runs, tmp_path):
    synthetic = "synthetic:num_classes=10,channels=1,num_train=32,num_test=32"
    other = small(tmp_path / "synthetic", runs["data_dir"], dataset=synthetic, num_steps=1,
                  image_size=32, bn_recalibration_batches=0,
                  model_overrides={"stage_sizes": [1]})
    train.train_and_evaluate(other, verbose=False)
    digits_run = runs["workdirs"][0]
    with pytest.raises(ValueError, match="different datasets") as e:
        ensemble.evaluate([digits_run, other.workdir])
    assert f"{digits_run}: digits (10 classes)" in str(e.value)
    assert f"{other.workdir}: {synthetic} (10 classes)" in str(e.value)
    code, out, err = cli(f"--workdirs={other.workdir},{digits_run}")
    assert code == 2 and err.count("\n") == 1 and "different datasets" in err, err


# --- the command line ------------------------------------------------------------------------

def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = ensemble_cli.main(list(argv))
        except SystemExit as e:  # argparse's own errors exit
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_the_command_prints_the_table_and_writes_json(runs, evaluated, tmp_path):
    path = tmp_path / "out" / "ensemble.json"
    code, out, err = cli(f"--workdirs={','.join(runs['workdirs'])}", "--combine=logits",
                         "--batch_size=32", f"--json={path}")
    assert code == 0, err
    lines = out.splitlines()
    assert "2 run(s) on digits test split (360 examples), mean of logits" in lines[0]
    assert lines[1].split()[:5] == ["arch", "input", "dtype", "step", "top-1"]
    assert lines[3].split()[:5] == ["1", "resnet18", "32x32", "float32", "3"]
    assert lines[4].split()[:5] == ["2", "se_resnet18", "40x40", "bfloat16", "3"]
    got = json.loads(path.read_text())
    assert lines[-1].split()[:4] == ["ensemble", f"{got['ensemble']['top1']:.2%}",
                                     f"{got['ensemble']['top5']:.2%}",
                                     f"{got['ensemble']['loss']:.4f}"]
    # The same batches as `evaluated`, so the same logits (another batch size may move a
    # bfloat16 logit by one step and break one of the near-ties of a 3-step model).
    for m, ref in zip(got["members"], evaluated["members"]):
        assert (m["top1"], m["top5"], m["loss"]) == (ref["top1"], ref["top5"], ref["loss"])
    mean_logits = (evaluated["members"][0]["logits"] + evaluated["members"][1]["logits"]) / 2
    expect = ensemble.metrics(mean_logits, evaluated["labels"])
    assert (got["ensemble"]["top1"], got["ensemble"]["top5"]) == (expect["top1"], expect["top5"])
    np.testing.assert_allclose(got["ensemble"]["loss"], expect["loss"], rtol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--workdirs={run},{missing}"], "{missing}' does not exist"),
    (["--workdirs={run},{empty}"],
     "member '{empty}' holds no checkpoint (no {empty}/checkpoints/STEP)"),
    (["--workdirs={run}", "--combine=max"], "argument --combine: invalid choice: 'max'"),
    (["--workdirs={run},"], "none empty"),
    (["--workdirs={run}", "--batch_size=0"], "--batch_size=0 must be a positive integer"),
    (["--combine=probs"], "the following arguments are required: --workdirs"),
])
def test_bad_input_is_one_error_line(runs, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    names = {"run": runs["workdirs"][0], "missing": str(tmp_path / "missing"),
             "empty": str(tmp_path / "empty")}
    code, out, err = cli(*[a.format(**names) for a in argv])
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(**names) in err, err
    assert not (tmp_path / "missing").exists() and list((tmp_path / "empty").iterdir()) == []
