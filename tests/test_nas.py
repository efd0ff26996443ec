"""Neural architecture search: the space as data, the controller, REINFORCE, the search command,
--arch_spec, and weight sharing. Tiny on purpose (8x8 digits, few steps): CI time is scarce."""
import contextlib
import dataclasses
import io
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cnnjax
from cnnjax import checkpoint, nas, runtime
from cnnjax import summary as summary_cli
from cnnjax.models.nasspec import Layer, Space, Spec, SpecError
from cnnjax.nas import children, reinforce, search, shared
from cnnjax.nas import controller as ctl
from cnnjax.train import load_checkpoint
from experiments import nas as nas_cli
from experiments import train as train_cli

from helpers import finish, start

pytestmark = pytest.mark.xdist_group("nas")  # one worker runs the module's searches once

# Compiling dominates these tiny programs: XLA's CPU backend without its LLVM optimisations.
fast_jit = lambda fun: runtime.jit_on(jax.devices()[0], fun)  # noqa: E731

SMALL = Space(num_layers=3, filters=(8, 16, 32), kernel_heights=(1, 3, 5),
              kernel_widths=(1, 3, 5), strides=(1, 2), input_size=8)


def call(main, argv):
    """(exit status, stderr) of a CLI's main(argv), in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_the_module_runs_on_one_xdist_worker(request):
    """Under pyproject's `-n 2 --dist loadgroup`, xdist sends this module's tests (its group) to
    one worker, so the module's searches run once; xdist marks a grouped test's node id with
    '@nas'. With pytest 9.2 that mark (and the grouping) silently vanished, and each worker ran
    the searches again: pyproject keeps pytest below 9.2."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not on an xdist worker with --dist loadgroup")
    assert request.node.nodeid.endswith("@nas"), request.node.nodeid


# ----- 1. the search space as data ---------------------------------------------------------


@pytest.fixture(scope="module")
def sampled_specs():
    """Children of the default space drawn by an untrained controller, and one written by hand
    whose skip crosses two strides (a 2x2 map padded to 8x8 and concatenated)."""
    space = Space()
    controller = ctl.Controller(space)
    params = ctl.init_params(controller, 0)
    specs = [nas.decode(space, controller.apply({"params": params}, jax.random.key(k))[0])
             for k in range(3)]  # eager: compiling the sampler takes longer
    specs.append(Spec((Layer(8, (3, 5), 2), Layer(16, (1, 3), 2), Layer(8, (5, 1), 1, (0,)),
                       Layer(32, (3, 3), 1, (1,))), space))
    return specs


def test_sampled_specs_build_run_backward_and_count_exactly(sampled_specs):
    padded = False
    for spec in sampled_specs:
        model = nas.build(spec, num_classes=10, in_channels=1)
        assert model.arch == spec.name and model.in_channels == 1
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))

        def forward_backward(x, model=model):
            variables = model.init(jax.random.key(1), x, train=False)

            def loss(params):
                logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                        mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, jnp.arange(4)).mean(), logits

            return jax.value_and_grad(loss, has_aux=True)(variables["params"])

        (value, logits), grads = fast_jit(forward_backward)(x)
        assert logits.shape == (4, 10) and np.isfinite(float(value))
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
        prof = cnnjax.profile(model, 8)
        assert (prof.params, prof.macs) == nas.cost(spec, 8, in_channels=1, num_classes=10)
        assert prof.batch_stats == 2 * sum(l.filters for l in spec.layers)
        sizes = spec.sizes()
        padded |= any(len({sizes[i - 1][1]} | {sizes[j][1] for j in l.skips}) > 1
                      for i, l in enumerate(spec.layers) if i)
    assert padded  # some child concatenated maps of different sizes


def test_spec_json_round_trip_name_and_encoding(sampled_specs, tmp_path):
    for spec in sampled_specs[:3]:
        text = json.dumps(spec.to_json())
        assert nas.parse_spec(json.loads(text)) == spec
        assert nas.build(text).spec == spec  # JSON text, dict, file path and Spec all build
        (tmp_path / "s.json").write_text(text)
        assert nas.load_spec(tmp_path / "s.json") == spec
        np.testing.assert_array_equal(nas.encode(nas.decode(spec.space, nas.encode(spec))),
                                      nas.encode(spec))
        assert re.fullmatch(r"nas_[0-9a-f]{8}", spec.name)
    assert len({s.name for s in sampled_specs}) == len(sampled_specs)
    # The space is optional in a spec (the default), and kernel may be one int.
    short = nas.parse_spec({"layers": [{"filters": 8, "kernel": 3}]})
    assert short.space == Space() and short.layers == (Layer(8, (3, 3), 1, ()),)


def test_strides_set_the_smallest_input():
    spec = nas.parse_spec({"layers": [{"filters": 8, "kernel": 3, "stride": 2},
                                      {"filters": 8, "kernel": 3, "stride": 2}]})
    model = nas.build(spec, num_classes=10, in_channels=1)
    assert model.min_input_size == 3  # 3 -> 2 -> 1; at 2 the second stride meets a 1x1 map
    with pytest.raises(ValueError, match="at least 3x3"):
        model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)
    with pytest.raises(ValueError, match="1 input channels"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)


GOOD = {"filters": 8, "kernel": [3, 3], "stride": 1, "skips": []}


@pytest.mark.parametrize("spec, message", [
    ({"layers": [GOOD], "depth": 3}, r"spec has unknown field 'depth'"),
    ({"layers": [{**GOOD, "dilation": 2}]}, r"layers\[0\] has unknown field 'dilation'"),
    ({"space": {"widths": [8]}, "layers": [GOOD]}, r"space has unknown field 'widths'"),
    ({}, r"spec lacks field 'layers'"),
    ({"layers": [{"kernel": 3}]}, r"layers\[0\] lacks field 'filters'"),
    ({"layers": [{**GOOD, "filters": 12}]}, r"filters 12 is not a choice .*8, 16, 32"),
    ({"layers": [{**GOOD, "kernel": [3, 7]}]}, r"kernel width 7 is not a choice .*1, 3, 5"),
    ({"layers": [{**GOOD, "stride": 3}]}, r"stride 3 is not a choice"),
    ({"layers": [{**GOOD, "kernel": "3x3"}]}, r"kernel must be \[height, width\]"),
    ({"layers": [GOOD, GOOD, {**GOOD, "skips": [3]}]}, r"layers\[2\].skips: 3 is a later layer"),
    ({"layers": [GOOD, GOOD, {**GOOD, "skips": [2]}]}, r"2 is a later layer \(or itself\)"),
    ({"layers": [GOOD, GOOD, {**GOOD, "skips": [1]}]}, r"1 is already layer 2's input"),
    ({"layers": [GOOD, GOOD, GOOD, {**GOOD, "skips": [0, 0]}]}, r"lists a layer twice"),
    ({"layers": [GOOD, GOOD, {**GOOD, "skips": [-1]}]}, r"-1 is not a layer index"),
    ({"space": {"skips": False}, "layers": [GOOD, GOOD, {**GOOD, "skips": [0]}]},
     r"the search space has no skips"),
    ({"layers": [{**GOOD, "stride": 2}] * 4},
     r"layers\[3\] has stride 2 on a 1x1 map \(at input_size 8: 8 -> 4 -> 2 -> 1\): the network "
     r"would shrink below 1x1"),
    ({"layers": [GOOD] * 7}, r"7 layers; the search space has at most 6"),
    ({"space": {"kernel_heights": [2, 3]}, "layers": [GOOD]}, r"kernel_heights must be odd"),
    ({"space": {"strides": [2]}, "layers": [GOOD]}, r"strides must include 1"),
    ({"space": {"filters": []}, "layers": [GOOD]}, r"space.filters must be a non-empty list"),
    ({"layers": []}, r"spec.layers must be a non-empty list"),
])
def test_each_defect_of_a_spec_is_one_clear_error(spec, message):
    with pytest.raises(SpecError, match=message):
        nas.parse_spec(spec)


# ----- 2. the controller and REINFORCE -----------------------------------------------------


def biased_params(space, biases, skip_bias):
    """Controller parameters that are all zero but the heads' biases and the anchor bias: the
    LSTM state stays 0 (gates 1/2, cell input tanh 0 = 0), so every decision's distribution is
    softmax(bias of its kind), every anchor point's sigmoid(skip_bias)."""
    params = jax.tree_util.tree_map(jnp.zeros_like,
                                    ctl.init_params(ctl.Controller(space), 0))
    params = jax.tree_util.tree_map(lambda x: x, params)  # a mutable copy
    for kind, b in biases.items():
        params[f"head_{kind}"]["bias"] = jnp.asarray(b, jnp.float32)
    params["attn_v"]["bias"] = jnp.asarray([skip_bias], jnp.float32)
    return params


def test_log_prob_and_entropy_equal_a_hand_computation():
    space = Space(num_layers=4, input_size=2)  # the third stride-2 layer would meet a 1x1 map
    biases = {"filters": [0.5, -1.0, 2.0], "kernel_h": [0.0, 1.0, -1.0],
              "kernel_w": [3.0, 0.0, 0.0], "stride": [0.3, -0.2]}
    skip_bias = 0.7
    controller = ctl.Controller(space)
    params = biased_params(space, biases, skip_bias)
    spec = Spec((Layer(8, (3, 1), 2), Layer(32, (5, 5), 1), Layer(16, (1, 3), 1, (0,)),
                 Layer(8, (3, 3), 1, ())), space)
    decisions = nas.encode(spec)

    def softmax(b):
        z = [math.exp(v) for v in b]
        return [v / sum(z) for v in z]

    logp = entropy = 0.0
    for layer_index, layer in enumerate(spec.layers):
        for j in range(layer_index - 1):  # anchor points
            p_on = 1 / (1 + math.exp(-skip_bias))
            logp += math.log(p_on if j in layer.skips else 1 - p_on)
            entropy -= p_on * math.log(p_on) + (1 - p_on) * math.log(1 - p_on)
        for kind, value in zip(("filters", "kernel_h", "kernel_w"),
                               (layer.filters, *layer.kernel)):
            p = softmax(biases[kind])
            logp += math.log(p[space.choices(kind).index(value)])
            entropy -= sum(q * math.log(q) for q in p)
        if layer_index == 0:  # a 2x2 input: both strides allowed
            p = softmax(biases["stride"])
            logp += math.log(p[space.strides.index(layer.stride)])
            entropy -= sum(q * math.log(q) for q in p)
        # layers 1-3 see a 1x1 map: stride 2 is masked, stride 1 is certain (log 1, entropy 0)
    got_logp, got_entropy = ctl.log_prob(controller, params, jnp.asarray(decisions))
    np.testing.assert_allclose(float(got_logp), logp, rtol=1e-6)
    np.testing.assert_allclose(float(got_entropy), entropy, rtol=1e-6)


@pytest.fixture(scope="module")
def random_controller():
    controller = ctl.Controller(SMALL)
    # Larger weights than the U(-0.08, 0.08) start, so the decisions depend on each other.
    params = jax.tree_util.tree_map(lambda x: 30 * x, ctl.init_params(controller, 3))
    return controller, params


def test_sampled_log_prob_is_the_teacher_forced_one(random_controller):
    controller, params = random_controller
    decisions, logp, entropy = fast_jit(lambda k: ctl.sample_batch(controller, params, k, 16))(
        jax.random.key(5))
    forced = fast_jit(jax.vmap(lambda d: ctl.log_prob(controller, params, d)))(decisions)
    np.testing.assert_allclose(forced[0], logp, rtol=1e-5)
    np.testing.assert_allclose(forced[1], entropy, rtol=1e-5)
    assert len({tuple(d) for d in np.asarray(decisions)}) > 8  # it does sample


def test_summed_entropy_is_the_entropy_of_the_sequence(random_controller):
    """H(a_1..a_T) = E[-log P(a)] = E[sum_t H(a_t | a_<t)]: the entropy term the controller
    returns, averaged over samples, is the entropy of the whole architecture distribution."""
    controller, params = random_controller
    n = 4000
    _, logp, entropy = fast_jit(lambda k: ctl.sample_batch(controller, params, k, n))(
        jax.random.key(7))
    logp, entropy = np.asarray(logp, np.float64), np.asarray(entropy, np.float64)
    se = np.std(-logp - entropy) / math.sqrt(n)
    assert abs(np.mean(-logp) - np.mean(entropy)) < 4 * se, (np.mean(-logp), np.mean(entropy), se)
    assert np.std(entropy) > 0.1  # decisions do depend on earlier ones


def test_reinforce_learns_a_known_best_architecture_and_the_baseline_tracks():
    """The reward is the share of a child's 13 decisions that match a fixed best child. With
    Adam at 0.02 and the entropy bonus at 1e-2 every seed tried (0-4) passes 0.9 within 150
    steps; without the bonus (1e-3) 3 of 5 collapsed onto a wrong child."""
    space = SMALL
    best = Spec((Layer(32, (5, 1), 2), Layer(8, (3, 3), 1), Layer(16, (1, 5), 2, (0,))), space)
    target = jnp.asarray(nas.encode(best))
    controller = ctl.Controller(space)
    tx = reinforce.make_optimizer(0.02)
    update = fast_jit(reinforce.make_update(controller, tx, entropy_weight=1e-2,
                                            baseline_decay=0.8))
    sample = fast_jit(lambda p, k: ctl.sample_batch(controller, p, k, 8)[0])
    p_best = fast_jit(lambda p: jnp.exp(ctl.log_prob(controller, p, target)[0]))
    zero = jax.tree_util.tree_map(jnp.zeros_like, ctl.init_params(controller, 0))
    chance = float(p_best(zero))  # uniform over every allowed choice
    np.testing.assert_allclose(chance, 1 / (3 ** 9 * 2 ** 3 * 2), rtol=1e-5)
    for seed in (0, 1, 2):
        state = reinforce.init_state(controller, tx, seed=seed)
        assert chance / 3 < float(p_best(state.params)) < 3 * chance
        history = []
        for t in range(250):
            decisions = sample(state.params, reinforce.step_key(seed, t))
            rewards = jnp.mean(decisions == target, axis=1)
            state, metrics = update(state, decisions, rewards)
            history.append((float(metrics["mean_reward"]), float(metrics["baseline"])))
        assert float(p_best(state.params)) > 0.9, seed
        rewards, baselines = np.array(history).T
        assert rewards[:5].mean() < 0.5 and rewards[-10:].mean() > 0.95
        assert abs(baselines[-10:].mean() - rewards[-10:].mean()) < 0.03
        assert np.corrcoef(rewards[5:], baselines[5:])[0, 1] > 0.9


# ----- 3-4. the search command and --arch_spec ---------------------------------------------


TINY = ['--space={"num_layers": 3, "filters": [4, 8], "kernel_heights": [1, 3], '
        '"kernel_widths": [1, 3]}', "--controller_steps=2", "--children_per_step=2",
        "--child_steps=6", "--child_batch_size=16", "--hand_designed="]


@pytest.fixture(scope="module")
def search_run(tmp_path_factory, data_dir):
    """The real CLI, unbroken; and the same search stopped after one controller step, with a
    half-written step left behind (as a kill leaves it), then rerun."""
    root = tmp_path_factory.mktemp("nas")
    code, err = call(nas_cli.main, [f"--workdir={root / 'whole'}", f"--data_dir={data_dir}",
                                    *TINY])
    assert code == 0, err
    cfg = search.SearchConfig(workdir=str(root / "parts"), data_dir=data_dir,
                              space=json.loads(TINY[0].split("=", 1)[1]), controller_steps=2,
                              children_per_step=2, child_steps=6, child_batch_size=16,
                              hand_designed="")
    first = search.run(cfg, verbose=False, stop_after=1)
    assert first["controller_steps"] == 1
    with open(root / "parts" / "children.jsonl", "a") as f:
        f.write(json.dumps({"controller_step": 1, "child": 0, "reward": 1.0}) + "\n")
    search.run(cfg, verbose=False)
    return root, err


def test_search_writes_its_records_and_pictures(search_run):
    root, err = search_run
    w = root / "whole"
    lines = [l for l in err.splitlines() if l.startswith("step ")]
    assert len(lines) == 2 and all(re.search(r"mean reward [\d.]+  baseline [\d.]+  entropy "
                                             r"[\d.]+  best [\d.]+ \(nas_", l) for l in lines)
    rows = [json.loads(l) for l in (w / "children.jsonl").read_text().splitlines()]
    assert [r["controller_step"] for r in rows] == [0, 0, 1, 1]
    for r in rows:
        spec = nas.parse_spec(r["spec"])
        assert 0 <= r["accuracy"] <= 1 and r["reward"] == r["accuracy"]
        assert (r["params"], r["macs"]) == nas.cost(spec, 8, 1, 10) and r["name"] == spec.name
    best = max(rows, key=lambda r: r["reward"])
    assert json.loads((w / "best_spec.json").read_text()) == best["spec"]
    steps = [json.loads(l) for l in (w / "controller.jsonl").read_text().splitlines()]
    assert [s["controller_step"] for s in steps] == [0, 1]
    for s in steps:  # the mean of the step's rewards in float64, not the controller's float32
        assert s["mean_reward"] == float(np.mean([r["reward"] for r in rows
                                                  if r["controller_step"] == s["controller_step"]]))
    assert checkpoint.saved_steps(w) == [1, 2]
    from test_plots import assert_picture
    assert_picture(w / "search_curves.png")
    assert_picture(w / "search_children.png")


def test_a_killed_search_resumes_to_the_same_children(search_run):
    root, _ = search_run
    whole = (root / "whole" / "children.jsonl").read_text()
    assert (root / "parts" / "children.jsonl").read_text() == whole
    assert ((root / "parts" / "best_spec.json").read_text()
            == (root / "whole" / "best_spec.json").read_text())


def test_children_go_round_the_processes_then_round_each_ones_devices():
    assert children.placement(4, 1, 0, 1) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert children.placement(4, 1, 0, 8) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert children.placement(5, 2, 0, 2) == [(0, 0), (2, 1), (4, 0)]
    assert children.placement(5, 2, 1, 2) == [(1, 0), (3, 1)]
    assert children.placement(1, 2, 1, 4) == []  # fewer children than processes: this one waits


@pytest.mark.slow
@pytest.mark.parametrize("processes, devices", [(1, 8), (2, 1)])
def test_a_search_spread_over_devices_or_processes_writes_what_one_device_writes(
        search_run, data_dir, tmp_path, processes, devices):
    """The real CLI on 8 CPU devices (the 2 children of a step on devices 0 and 1), and as 2
    processes on 127.0.0.1 (one child each; every process gets both rewards and takes the same
    controller step). A child trains on one device with the same program wherever it runs, so
    every record but where it ran equals the one-device run's, bit for bit; only process 0
    writes or prints."""
    root, _ = search_run
    w = tmp_path / "w"
    errs = finish(start([f"--workdir={w}", f"--data_dir={data_dir}", *TINY],
                        processes=processes, devices=devices, module="experiments.nas"))
    rows = [json.loads(l) for l in (w / "children.jsonl").read_text().splitlines()]
    # child k on device k of the one process, or on process k % 2 (its only device, whose
    # global id JAX numbers by process)
    where = [(r["process"], r["device"]) for r in rows]
    if processes == 1:
        assert where == [(0, 0), (0, 1)] * 2
    else:
        assert [p for p, _ in where] == [0, 1] * 2 and where[:2] == where[2:]
        assert where[0][1] != where[1][1]
    one = [json.loads(l) for l in (root / "whole" / "children.jsonl").read_text().splitlines()]
    assert [(r["process"], r["device"]) for r in one] == [(0, 0)] * 4
    strip = lambda r: {k: v for k, v in r.items() if k not in ("process", "device")}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in one]
    for name in ("controller.jsonl", "best_spec.json"):
        assert (w / name).read_text() == (root / "whole" / name).read_text(), name
    assert checkpoint.saved_steps(w) == [1, 2]
    progress = [[l for l in err.splitlines() if l.startswith("step ")] for err in errs]
    assert [len(lines) for lines in progress] == [2] + [0] * (processes - 1)


def test_the_children_use_the_validation_split_not_the_test_split(data_dir):
    split = children.holdout("digits", data_dir, 8, 0.2)
    assert len(split.train_y) + len(split.val_y) == 1437  # the training split only
    assert abs(len(split.val_y) - 0.2 * 1437) < 10
    assert set(np.bincount(split.val_y)) <= {28, 29, 30}  # stratified
    train_rows = {r.tobytes() for r in split.train_x}
    assert not any(r.tobytes() in train_rows for r in split.val_x)  # digits has no duplicates


def test_arch_spec_trains_the_found_network(search_run, data_dir, tmp_path):
    root, _ = search_run
    spec_path = tmp_path / "best_spec.json"  # a copy, removed after training
    spec_path.write_text((root / "whole" / "best_spec.json").read_text())
    code, err = call(train_cli.main, [f"--arch_spec={spec_path}", f"--data_dir={data_dir}",
                                      f"--workdir={tmp_path / 'run'}", "--num_steps=3",
                                      "--batch_size=16"])
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    name = nas.load_spec(spec_path).name
    assert summary["arch"] == name and summary["eval_count"] == 360
    assert f"{name} on digits (1437 train / 360 test, 8x8x1)" in err
    spec_json = nas.load_spec(spec_path).to_json()
    spec_path.unlink()  # the checkpoint holds the spec: it loads without the file
    model, variables, record = load_checkpoint(tmp_path / "run")
    assert model.arch == name and record["spec"] == spec_json
    assert model.apply(variables, jnp.zeros((2, 8, 8, 1)), train=False).shape == (2, 10)
    # cnnjax.summary prints the found network's table as any registered model's
    best = root / "whole" / "best_spec.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert summary_cli.main([f"--arch_spec={best}", "--in_channels=1", "--num_classes=10",
                             "--format=json"]) == 0
    table = json.loads(out.getvalue())
    params, macs = nas.cost(nas.load_spec(best), in_channels=1, num_classes=10)
    assert table["model"] == name and table["input_shape"] == [1, 8, 8, 1]
    assert (table["params"], table["macs"]) == (params, macs)
    code, err = call(summary_cli.main, [f"--arch_spec={spec_path}"])  # removed above
    assert code == 2 and "--arch_spec: cannot read the spec file" in one_line_error(err)


def test_an_invalid_spec_file_is_one_clear_line(data_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": [GOOD, GOOD, {**GOOD, "skips": [4]}]}))
    work = tmp_path / "work"
    code, err = call(train_cli.main, [f"--arch_spec={bad}", f"--workdir={work}",
                                      f"--data_dir={data_dir}"])
    assert code == 2 and re.search(r"--arch_spec: .*bad.json: layers\[2\].skips: 4 is a later "
                                   "layer", one_line_error(err))
    for text, message in (("{", "is not JSON"), ('{"layers": []}', "non-empty list")):
        bad.write_text(text)
        code, err = call(train_cli.main, [f"--arch_spec={bad}", f"--workdir={work}"])
        assert code == 2 and message in one_line_error(err)
    code, err = call(train_cli.main, [f"--arch_spec={tmp_path / 'none.json'}"])
    assert code == 2 and "cannot read the spec file" in one_line_error(err)
    code, err = call(train_cli.main, [f"--arch_spec={bad}", "--arch=resnet18"])
    assert code == 2 and "give one" in one_line_error(err)
    assert not work.exists()


@pytest.mark.parametrize("args, message", [
    (["--mode=random"], r"unknown mode 'random'; --mode must be train_children or shared_weights"),
    (["--children_per_step=0"], r"--children_per_step=0 must be a positive integer"),
    (["--controller_steps=2.5"], r"argument --controller_steps: invalid int value"),
    (["--val_fraction=1"], r"--val_fraction=1.0 must be a number in \(0, 1\)"),
    (["--controller_learning_rate=0"], r"--controller_learning_rate=0.0 must be"),
    (["--shared_warmup=-1"], r"--shared_warmup=-1 must be an integer >= 0"),
    (['--space={"filters": [8], "depth": 2}'], r"--space=.*space has unknown field 'depth'"),
    (['--space={"kernel_heights": [2]}'], r"kernel_heights must be odd"),
    (['--mode=shared_weights', '--space={"strides": [1, 2]}'], r"needs strides \[1\]"),
    (["--mode=shared_weights", "--coordinator_address=127.0.0.1:1", "--num_processes=2",
      "--process_id=0"], r"--mode=shared_weights runs in one process"),
    (["--num_processes=2"], r"multi-process runs need all of --coordinator_address"),
    (["--hand_designed=resnet19"], r"unknown model 'resnet19'; did you mean resnet18"),
    (["--dataset=imagenet"], r"unknown dataset 'imagenet'"),
    (["--controller_step=3"], r"unrecognized arguments.*did you mean --controller_steps"),
])
def test_search_cli_refuses_bad_flags_before_any_work(tmp_path, args, message):
    work = tmp_path / "work"
    code, err = call(nas_cli.main, [f"--workdir={work}", *args])
    assert code == 2 and re.search(message, one_line_error(err)), err
    assert not work.exists()


def test_a_workdir_of_another_search_is_refused(search_run, data_dir):
    root, _ = search_run
    args = [f"--workdir={root / 'whole'}", f"--data_dir={data_dir}", *TINY, "--seed=1"]
    before = (root / "whole" / "children.jsonl").read_text()
    code, err = call(nas_cli.main, args)
    assert code == 2 and "holds a different search (seed: 0 there, 1 here)" in one_line_error(err)
    assert (root / "whole" / "children.jsonl").read_text() == before


def test_hand_designed_models_are_trained_once_and_counted_by_profile(data_dir, tmp_path,
                                                                     monkeypatch):
    """Their training is the children's (ChildTrainer, exercised above); a stub stands in for
    it here, as compiling mobilenet_v2 alone takes 15-30 s."""
    calls = []
    monkeypatch.setattr(children.ChildTrainer, "__call__",
                        lambda self, models, seeds: calls.append(models[0].arch) or [0.5])
    cfg = search.SearchConfig(workdir=str(tmp_path), data_dir=data_dir,
                              hand_designed="mobilenet_v2,shufflenet_v2_x0_5")
    split = children.holdout("digits", data_dir, 8, 0.2)
    rows = children.hand_designed(cfg, split, 8, tmp_path, lambda text: None)
    prof = cnnjax.profile("mobilenet_v2", 8, num_classes=10, in_channels=1)
    assert rows[0] == {"arch": "mobilenet_v2", "accuracy": 0.5, "params": prof.params,
                       "macs": prof.macs, "steps": cfg.child_steps}
    assert [r["arch"] for r in rows] == calls == ["mobilenet_v2", "shufflenet_v2_x0_5"]
    assert children.hand_designed(cfg, split, 8, tmp_path, lambda text: None) == rows
    assert len(calls) == 2  # read back from hand_designed.jsonl, not trained again


# ----- 5. weight sharing (ENAS) ------------------------------------------------------------


SHARED = Space(num_layers=4, filters=(4, 8), kernel_heights=(1, 3, 5), kernel_widths=(1, 3),
               strides=(1,), input_size=8)


LABELS = jnp.arange(6) % 10


def sgd_step(apply_train):
    """(params, other variables) -> params after one plain SGD step (lr 0.1) on a fixed batch,
    `apply_train(variables)` giving (logits, updates) in train mode."""
    def step(params, other):
        def loss(p):
            logits, _ = apply_train({**other, "params": p})
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))
    return step


@pytest.fixture(scope="module")
def supernet():
    """The supergraph, its variables (with non-trivial BatchNorm statistics, so that eval mode
    reads them), a batch, and its jitted functions of the decisions (compiled once)."""
    model = shared.SuperNet(SHARED, num_classes=10, in_channels=1)
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
    d0 = jnp.zeros(len(SHARED.layout()), jnp.int32)
    variables = fast_jit(lambda x, d: model.init(jax.random.key(1), x, d, train=False))(x, d0)
    _, upd = fast_jit(lambda v, x, d: model.clone(bn_momentum=0.0).apply(
        v, x, d, train=True, mutable=["batch_stats"]))(variables, 3 * x + 1, d0)
    fns = {
        "eval": fast_jit(lambda v, d: model.apply(v, x, d, train=False)),
        "train": fast_jit(lambda v, d: model.apply(v, x, d, train=True, mutable=["batch_stats"])),
        "step": fast_jit(lambda p, v, d: sgd_step(
            lambda w: model.apply(w, x, d, train=True, mutable=["batch_stats"]))(p, v)),
        "grad": fast_jit(lambda v, d: jax.grad(lambda p: model.apply(
            {**v, "params": p}, x, d, train=False).sum())(v["params"])),
    }
    return model, {**variables, **upd}, x, fns


def child(layers):
    return Spec(tuple(layers), SHARED)


A = child([Layer(8, (5, 3), 1), Layer(4, (1, 1), 1), Layer(8, (3, 3), 1, (0,)),
           Layer(4, (3, 1), 1, (0, 1))])
B = child([Layer(8, (5, 3), 1), Layer(8, (3, 3), 1), Layer(4, (5, 1), 1),
           Layer(8, (1, 3), 1, (1,))])


def test_children_that_share_a_choice_read_the_same_weights(supernet):
    model, variables, x, fns = supernet
    a = shared.extract(SHARED, variables, nas.encode(A), in_channels=1)
    b = shared.extract(SHARED, variables, nas.encode(B), in_channels=1)
    for key in ("params", "batch_stats"):  # layer 0: the same choice in A and B
        jax.tree_util.tree_map(np.testing.assert_array_equal, a[key]["layer0"], b[key]["layer0"])
    # ... and a step through A moves exactly the weights B's layer 0 reads next.
    grads = fns["grad"](variables, jnp.asarray(nas.encode(A)))
    moved = shared.extract(SHARED, {"params": grads}, nas.encode(B), in_channels=1)
    assert np.all(np.asarray(moved["params"]["layer0"]["conv"]["kernel"]) != 0)
    # A 1x1 child reads the centre tap of the shared 5x3 kernel.
    assert np.array_equal(a["params"]["layer1"]["conv"]["kernel"][0, 0],
                          variables["params"]["layer1_conv"]["kernel"][2, 1, :8, :4])


@pytest.mark.parametrize("spec", [A, B], ids=["A", "B"])
def test_a_child_alone_and_in_the_supergraph_give_the_same_logits(supernet, spec):
    model, variables, x, fns = supernet
    d = jnp.asarray(nas.encode(spec))
    alone = nas.build(spec, num_classes=10, in_channels=1)
    child_vars = shared.extract(SHARED, variables, d, in_channels=1)
    alone_eval = fast_jit(lambda v: alone.apply(v, x, train=False))
    np.testing.assert_allclose(alone_eval(child_vars), fns["eval"](variables, d),
                               rtol=1e-4, atol=1e-5)
    got, got_stats = fast_jit(lambda v: alone.apply(v, x, train=True,
                                                    mutable=["batch_stats"]))(child_vars)
    want, want_stats = fns["train"](variables, d)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        got_stats["batch_stats"]["layer3"]["bn"]["var"],
        want_stats["batch_stats"]["layer3_bn"]["var"][:spec.layers[3].filters], rtol=1e-4)
    # One SGD step of the child alone = one step of the supergraph through the child.
    alone_p = fast_jit(sgd_step(lambda w: alone.apply(w, x, train=True, mutable=["batch_stats"])))(
        child_vars["params"], child_vars)
    super_p = fns["step"](variables["params"], variables, d)
    trained = shared.extract(SHARED, {**variables, "params": super_p}, d, in_channels=1)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           alone_p, trained["params"])
    np.testing.assert_allclose(alone_eval({**child_vars, "params": alone_p}),
                               alone_eval(trained), rtol=1e-4, atol=1e-5)


def test_uniform_children_take_every_choice_equally_often():
    space = Space(num_layers=4, strides=(1,))
    d = nas.uniform_decisions(space, 0, 6000)
    assert d.shape == (6000, len(space.layout())) and d.dtype == np.int32
    np.testing.assert_array_equal(d, nas.uniform_decisions(space, 0, 6000))
    assert not np.array_equal(d, nas.uniform_decisions(space, 1, 6000))
    for col, (_, kind, _) in enumerate(space.layout()):
        n = 2 if kind == "skip" else len(space.choices(kind))
        counts = np.bincount(d[:, col], minlength=n)
        assert len(counts) == n and counts.min() > 0.9 * 6000 / n, (kind, counts)
    nas.decode(space, d[0])


SHARED_TINY = dict(mode="shared_weights", hand_designed="",
                   space={"num_layers": 3, "filters": [4, 8]},
                   controller_steps=2, children_per_step=3, shared_steps=5, child_batch_size=16,
                   child_learning_rate=1.6)  # 0.1 at this batch size


def test_shared_weights_search_warms_up_and_resumes_to_the_same_children(data_dir, tmp_path):
    settings = dict(SHARED_TINY, data_dir=data_dir)
    read = lambda w: [json.loads(l) for l in (w / "children.jsonl").read_text().splitlines()]
    cold = search.run(search.SearchConfig(workdir=str(tmp_path / "cold"), shared_warmup=0,
                                          **settings), verbose=False)
    out = io.StringIO()
    warm = search.SearchConfig(workdir=str(tmp_path / "warm"), shared_warmup=200, **settings)
    search.run(warm, stream=out)
    rows = read(tmp_path / "warm")
    assert len(rows) == 6 and max(r["reward"] for r in rows) == search.best_row(rows)["reward"]
    assert all(nas.parse_spec(r["spec"]).space.strides == (1,) for r in rows)
    assert checkpoint.saved_steps(tmp_path / "warm") == [1, 2]
    assert "warm-up: 200 supergraph steps through uniformly random children" in out.getvalue()
    # 200 steps through random paths, before the first controller step, lift its children
    # (5 steps through 3-layer children score near the chance of 10 classes)
    first = lambda rows: np.mean([r["accuracy"] for r in rows if r["controller_step"] == 0])
    assert first(rows) > first(read(tmp_path / "cold")) + 0.2, (first(rows), cold)
    # stopped after the first step (its checkpoint holds the warmed-up weights), then rerun
    parts = dataclasses.replace(warm, workdir=str(tmp_path / "parts"))
    search.run(parts, verbose=False, stop_after=1)
    search.run(parts, verbose=False)
    assert read(tmp_path / "parts") == rows


def test_a_search_saved_before_the_warm_up_existed_resumes_with_its_setting(data_dir, tmp_path,
                                                                            monkeypatch):
    assert "shared_warmup" not in search.SearchConfig().identity()  # changes nothing there
    settings = dict(SHARED_TINY, data_dir=data_dir, workdir=str(tmp_path))
    assert search.SearchConfig(**settings).identity()["shared_warmup"] == 400
    saved = search.SearchConfig.identity  # the identity a search wrote before the setting
    monkeypatch.setattr(search.SearchConfig, "identity", lambda self: {
        k: v for k, v in saved(self).items() if k != "shared_warmup"})
    search.run(search.SearchConfig(**settings, shared_warmup=0), verbose=False, stop_after=1)
    assert "shared_warmup" not in json.loads((tmp_path / "search_config.json").read_text())
    monkeypatch.undo()
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"shared_warmup: 0 there, 400 here"):
        search.run(search.SearchConfig(**settings), verbose=False)
    out = search.run(search.SearchConfig(**settings, shared_warmup=0), verbose=False)
    assert out["controller_steps"] == 2
