"""Run by tests/test_train.py in a fresh process: two train steps on N CPU devices vs one device.

    python tests/multidevice_step.py N DATA_DIR   -> prints one JSON line of differences
"""
import dataclasses
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))

import numpy as np  # noqa: E402

from cnnjax import parallel, train  # noqa: E402


def run(mesh, config):
    config = dataclasses.replace(config)
    info, model, train_data, _, _, tx, train_step, _ = train.build(config, mesh)
    state = train.init_state(model, tx, config, info.channels, mesh)
    initial = parallel.to_host(state.params)
    step = jax.jit(train_step, in_shardings=(parallel.replicated(mesh),
                                             parallel.batch_sharding(mesh)),
                   out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
    losses = []
    for k in range(2):
        state, metrics = step(state, parallel.global_batch(train_data.batch(k), mesh))
        losses.append(float(parallel.to_host(metrics)["loss"]))
    return state, losses, initial


def main():
    config = train.TrainConfig(arch="resnet18", dataset="digits", data_dir=sys.argv[2],
                               batch_size=16, num_steps=2, learning_rate=0.4,
                               warmup_epochs=1.0)  # 2 steps: lr 0 at step 0, the peak at step 1
    many, one = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])
    state_n, loss_n, _ = run(many, config)
    state_1, loss_1, initial = run(one, config)
    diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                            for x, y in zip(jax.tree_util.tree_leaves(parallel.to_host(a)),
                                            jax.tree_util.tree_leaves(parallel.to_host(b))))
    # Every device holds the same BatchNorm statistics (they were computed over the global batch).
    same_on_devices = all(
        all(np.array_equal(np.asarray(s.data), np.asarray(leaf.addressable_shards[0].data))
            for s in leaf.addressable_shards)
        for leaf in jax.tree_util.tree_leaves(state_n.batch_stats))
    print(json.dumps({"devices": many.size, "loss_n": loss_n, "loss_1": loss_1,
                      "params_diff": diff(state_n.params, state_1.params),
                      "batch_stats_diff": diff(state_n.batch_stats, state_1.batch_stats),
                      "bn_identical_on_devices": same_on_devices,
                      # the scales of what was summed: the largest update, the largest statistic
                      "step_max": diff(state_1.params, initial),
                      "stats_max": max(float(np.max(np.abs(np.asarray(x)))) for x in
                                       jax.tree_util.tree_leaves(parallel.to_host(
                                           state_1.batch_stats))),
                      "shards": len(jax.tree_util.tree_leaves(state_n.batch_stats)[0]
                                    .addressable_shards)}))


if __name__ == "__main__":
    main()
