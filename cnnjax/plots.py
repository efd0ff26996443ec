"""matplotlib figures of the lecture's comparisons: per-layer cost bars, the complexity chart and
training curves.

    layer_bars(cnnjax.profile("alexnet", 227), "alexnet.png")   # memory / params / MACs per layer
    complexity(experiments.complexity.complexity_rows(), "complexity.png")
    training_curves(["runs/vgg16-digits", "runs/vgg16-digits-from-vgg11-digits"], "curves.png")

Figures are built with `matplotlib.figure.Figure` and written with the Agg renderer, never through
pyplot: nothing opens a window, no global backend is switched (a notebook keeps its own), and each
function returns its Figure so a notebook can show it. As everywhere in cnnjax, one FLOP is one
multiply-add (MAC) and memory is activation memory (output elements x bytes, batch 1).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cnnjax.profile import Layer, Profile

FLOP_NOTE = "1 FLOP = 1 multiply-add (MAC)"

# Families of the complexity chart, in legend order: (key, legend label, name prefixes, colour).
FAMILIES = (
    ("alexnet", "AlexNet / ZFNet", ("alexnet", "zfnet"), "#8c564b"),
    ("vgg", "VGG", ("vgg",), "#d62728"),
    ("googlenet", "GoogLeNet", ("googlenet",), "#ff7f0e"),
    ("resnet", "ResNet / ResNeXt / SE", ("resnet", "resnext", "se_resnet", "wide_resnet"),
     "#1f77b4"),
    ("densenet", "DenseNet", ("densenet",), "#9467bd"),
    ("mobilenet", "MobileNet / MnasNet", ("mobilenet", "mnasnet"), "#2ca02c"),
    ("shufflenet", "ShuffleNet", ("shufflenet",), "#e377c2"),
)
_OTHER_FAMILY = ("other", "other", (), "#7f7f7f")

# Layer kinds of the bar chart (profile.Layer.kind) grouped into legend entries.
_KIND_GROUPS = (
    ("convolution", ("conv",), "#1f77b4"),
    ("grouped / depthwise conv", ("gconv", "dwconv"), "#17becf"),
    ("fully connected", ("linear",), "#ff7f0e"),
    ("batch norm", ("batchnorm",), "#7f7f7f"),
    ("pooling", ("maxpool", "avgpool", "adaptive_avgpool", "global_avgpool"), "#2ca02c"),
    ("LRN", ("lrn",), "#9467bd"),
    ("other", (), "#8c564b"),
    ("block (several kinds)", ("block",), "#bcbd22"),
)
CONV_KINDS = ("conv", "gconv", "dwconv")


def family(name: str) -> str:
    """The family key of a model name ('resnet' for se_resnet50, 'mobilenet' for mnasnet1_0)."""
    for key, _, prefixes, _ in FAMILIES:
        if name.startswith(prefixes):
            return key
    return _OTHER_FAMILY[0]


def _family_entry(key: str) -> tuple:
    return next((f for f in FAMILIES if f[0] == key), _OTHER_FAMILY)


def _kind_group(kind: str) -> tuple:
    return next((g for g in _KIND_GROUPS if kind in g[1]), _KIND_GROUPS[-2])


def check_path(name: str, value: Any) -> None:
    """`--name=value` must be a file to write a figure to: a known image suffix (the format is
    taken from it) in a directory that exists and is writable. Raises ValueError otherwise."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"--{name} must be a file path such as --{name}=figure.png")
    path = os.fspath(value)
    suffixes = sorted(FigureCanvasAgg.get_supported_filetypes())
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if os.path.isdir(path):
        raise ValueError(f"--{name}={path!r} is a directory; give a file name in it, "
                         f"such as {os.path.join(path, 'figure.png')!r}")
    if suffix not in suffixes:
        raise ValueError(f"--{name}={path!r} must end in one of "
                         f"{', '.join('.' + s for s in suffixes)} (the format is taken from it)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is a file" if os.path.lexists(directory) else "does not exist"
        raise ValueError(f"--{name}={path!r}: directory {directory} {what}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"--{name}={path!r}: directory {directory} is not writable")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas: a renderer to measure text, PNG output
    return fig


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return fig


# ---------------------------------------------------------------------------------------------
# Per-layer bars


def _grouped(layers: Sequence[Layer], depth: int | None) -> list[tuple[str, str, int, int, int]]:
    """(label, kind, bytes, params, macs) per bar: one per layer, or summed per name prefix of
    `depth` path components (depth=1: ResNet blocks, Inception modules, dense layers)."""
    rows: dict[str, list] = {}
    for layer in layers:
        key = layer.name if depth is None else "/".join(layer.name.split("/")[:depth])
        row = rows.setdefault(key, [key, layer.kind, 0, 0, 0])
        if row[1] != layer.kind:
            row[1] = "block"
        row[2] += layer.out_bytes
        row[3] += layer.params
        row[4] += layer.macs
    return [tuple(r) for r in rows.values() if any(r[2:])]  # an all-zero row draws nothing


def layer_bars(prof: Profile, path: str | os.PathLike | None = None, *,
               depth: int | None = None) -> Figure:
    """Three panels of bars sharing the layer axis: activation memory (KB), parameters (millions)
    and MACs (millions) of every layer of `prof`, coloured by layer kind; written to `path`.

    The figure grows with the number of rows so that labels never overlap (0.16 inch a row);
    `depth=1` sums the rows of each top-level block (a ResNet bottleneck, an Inception module),
    which reads better for nets of several hundred layers such as DenseNet-201.
    """
    rows = _grouped(prof.layers, depth)
    n = len(rows)
    labels = [r[0] for r in rows]
    values = (np.array([r[2] for r in rows]) / 1024, np.array([r[3] for r in rows]) / 1e6,
              np.array([r[4] for r in rows]) / 1e6)
    colours = [_kind_group(r[1])[2] for r in rows]
    label_chars = max(len(s) for s in labels)
    fig = _new_figure(4.0 + 0.065 * label_chars + 3 * 3.4, 2.4 + 0.16 * n)
    axes = fig.subplots(1, 3, sharey=True)

    conv_macs = sum(layer.macs for layer in prof.layers if layer.kind in CONV_KINDS)
    totals = (prof.activation_bytes / 1024, prof.params / 1e6, prof.macs / 1e6)
    units = ("KB", "M", "M")
    heads = []
    for v, total, unit, what in zip(values, totals, units, (
            "activation memory (KB, batch 1)", "parameters (millions)",
            f"MACs (millions; {FLOP_NOTE})")):
        i = int(np.argmax(v))
        share = f" ({v[i] / total:.0%})" if total else ""
        heads.append(f"{what}\ntotal {total:,.{1 if unit == 'KB' else 2}f} {unit}; largest "
                     f"{labels[i]}: {v[i]:,.{1 if unit == 'KB' else 2}f} {unit}{share}")
    if prof.macs:
        heads[2] += f"\nconvolutions: {conv_macs / prof.macs:.1%} of all MACs"
    y = np.arange(n)
    fmt = ("{:,.1f}", "{:,.3g}", "{:,.1f}")
    for ax, v, head, f in zip(axes, values, heads, fmt):
        ax.barh(y, v, color=colours, height=0.75)
        ax.set_title(head, fontsize=9, loc="left")
        ax.set_xlim(0, max(v.max(), 1e-9) * 1.22)  # room for the value at the end of a bar
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        # Values at the bar ends: every bar of a short net, the five largest of a long one.
        shown = range(n) if n <= 40 else np.argsort(v)[-5:]
        for i in shown:
            if v[i] > 0:
                ax.text(v[i], i, " " + f.format(v[i]), va="center", fontsize=7)
        ax.set_xlabel(head.split("\n")[0], fontsize=9)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].set_ylim(n - 0.5, -0.5)  # first layer at the top
    axes[0].set_ylabel("layer (in forward order)" + ("" if depth is None else
                                                    f", summed to depth {depth}"), fontsize=9)
    kinds = {_kind_group(r[1])[0] for r in rows}
    handles = [Patch(color=c, label=lab) for lab, _, c in _KIND_GROUPS if lab in kinds]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               frameon=False)
    h, w = prof.input_shape[1:3]
    fig.suptitle(f"{prof.name} at {h}x{w}: where the cost sits, layer by layer "
                 f"({prof.params / 1e6:,.2f}M params, {prof.macs / 1e9:,.3f} GFLOP; {FLOP_NOTE}; "
                 f"memory = output elements x bytes)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Label placement for scatter plots: a greedy search over offsets, in display pixels.


def _overlap(a: tuple, b: tuple) -> float:
    """Overlapping area of two boxes (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(ax, xs: Sequence[float], ys: Sequence[float], names: Sequence[str],
                  radii_pt: Sequence[float], fontsize: float = 7.5) -> None:
    """Writes each name next to its point where it overlaps no other label, no marker and stays
    inside the axes: tries 8 directions at growing distances (far ones get a leader line), and
    takes the least-overlapping spot if none is free. Call after a draw of the figure with its
    final layout and axes limits (the data -> pixel transform must not move afterwards)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    frame = ax.get_window_extent(renderer)
    marks = [(x - r * px_per_pt, y - r * px_per_pt, x + r * px_per_pt, y + r * px_per_pt)
             for (x, y), r in zip(pts, radii_pt)]
    placed: list[tuple] = []
    directions = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
    # Crowded points first (most neighbours within 60 px), so they get the nearest spots; a
    # point with a neighbour closer than 25 px gets its label at a distance, on a leader line,
    # so that it is clear which of the two it names.
    crowd = [sum(math.dist(p, q) < 60 for q in pts) for p in pts]
    near = [sum(math.dist(p, q) < 25 for q in pts) > 1 for p in pts]
    for i in sorted(range(len(names)), key=lambda i: -crowd[i]):
        probe = ax.text(0, 0, names[i], fontsize=fontsize)
        box = probe.get_window_extent(renderer)
        probe.remove()
        w, h = box.width, box.height
        best = None
        for step in (1.0, 1.8, 2.8, 4.0, 5.5, 7.5)[near[i]:]:
            for dx, dy in directions:
                gap = (radii_pt[i] + 2) * px_per_pt + (step - 1) * 14
                norm = math.hypot(dx, dy)
                ox, oy = dx / norm * gap, dy / norm * gap
                x0 = pts[i][0] + ox - (0 if dx > 0 else w if dx < 0 else w / 2)
                y0 = pts[i][1] + oy - (0 if dy > 0 else h if dy < 0 else h / 2)
                cand = (x0, y0, x0 + w, y0 + h)
                outside = (cand[0] < frame.x0 or cand[2] > frame.x1 or cand[1] < frame.y0
                           or cand[3] > frame.y1)
                cost = sum(_overlap(cand, b) for b in placed) * 4 + sum(
                    _overlap(cand, m) for j, m in enumerate(marks) if j != i)
                cost += 1e9 if outside else 0
                key = (cost, step)
                if best is None or key < best[0]:
                    best = (key, ox, oy, dx, dy, cand)
            if best[0][0] == 0:
                break
        (_, step), ox, oy, dx, dy, cand = best
        placed.append(cand)
        ann = ax.annotate(
            names[i], (xs[i], ys[i]), xytext=(ox / px_per_pt, oy / px_per_pt),
            textcoords="offset points", fontsize=fontsize,
            ha="left" if dx > 0 else "right" if dx < 0 else "center",
            va="bottom" if dy > 0 else "top" if dy < 0 else "center",
            arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=2)
            if step > 1 else None)
        ann.set_in_layout(False)


# ---------------------------------------------------------------------------------------------
# The complexity chart


def _bubble_area(params: float) -> float:
    """Marker area in points^2, proportional to the parameter count (138M -> 690 pt^2)."""
    return params / 1e6 * 5.0


def complexity(rows: Iterable[dict[str, Any]], path: str | os.PathLike | None = None) -> Figure:
    """The lecture's comparison of architectures, from `experiments.complexity.complexity_rows()`.

    Top panel: ImageNet top-1 against GMACs (log axis), one bubble per model with area
    proportional to its parameters, coloured by family; filled bubbles are torchvision's
    published accuracy, hollow ones with a starred name the paper's own figure. Models with
    neither are left out of this panel (named in its title). Bottom left: GMACs against
    parameters for every model. Bottom right: activation memory per image (float32, batch 1).
    """
    rows = list(rows)
    fig = _new_figure(20, 24)
    grid = fig.add_gridspec(2, 2, height_ratios=(11, 12), width_ratios=(1.35, 1))
    ax_acc = fig.add_subplot(grid[0, :])
    ax_ops = fig.add_subplot(grid[1, 0])
    ax_mem = fig.add_subplot(grid[1, 1])
    colour = {r["name"]: _family_entry(r["family"])[3] for r in rows}

    # Top-1 against GMACs.
    rated = [r for r in rows if r.get("top1") is not None]
    unrated = sorted(r["name"] for r in rows if r.get("top1") is None)
    xs = [r["macs"] / 1e9 for r in rated]
    ys = [float(r["top1"]) for r in rated]
    areas = [_bubble_area(r["params"]) for r in rated]
    for r, x, y, a in zip(rated, xs, ys, areas):
        paper = r.get("top1_kind") == "paper"
        c = colour[r["name"]]
        ax_acc.scatter([x], [y], s=a, facecolors="none" if paper else c, edgecolors=c,
                       alpha=1 if paper else 0.55, linewidths=1.6 if paper else 0.8, zorder=3)
        ax_acc.scatter([x], [y], s=4, color=c, zorder=4)  # the centre: the measured point
    ax_acc.set_xscale("log")
    if rated:
        ax_acc.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        ax_acc.set_ylim(math.floor(min(ys)) - 2.5, math.ceil(max(ys)) + 2)
    ax_acc.set_xlabel(f"GMACs per image, measured by cnnjax.profile (log scale; {FLOP_NOTE})")
    ax_acc.set_ylabel("ImageNet top-1 accuracy (%)")
    ax_acc.grid(alpha=0.3, which="both")
    ax_acc.set_title("Accuracy against operations; bubble area proportional to parameters"
                     + (f"\nno published top-1, left out here: {', '.join(unrated)}"
                        if unrated else ""), fontsize=11)
    fam_keys = [f[0] for f in FAMILIES + (_OTHER_FAMILY,) if any(r["family"] == f[0] for r in rows)]
    fam_handles = [Line2D([], [], ls="", marker="o", ms=9, color=_family_entry(k)[3],
                          label=_family_entry(k)[1]) for k in fam_keys]
    src_handles = [
        Line2D([], [], ls="", marker="o", ms=11, color="0.4", alpha=0.55,
               label="torchvision's published top-1"),
        Line2D([], [], ls="", marker="o", ms=11, mfc="none", mec="0.3", mew=1.6,
               label="paper's own figure (name*)"),
    ]
    size_handles = [Line2D([], [], ls="", marker="o", color="0.6", alpha=0.5,
                           ms=math.sqrt(_bubble_area(p)), label=f"{p / 1e6:.0f}M params")
                    for p in (5e6, 25e6, 60e6, 140e6)]
    leg = ax_acc.legend(handles=fam_handles + src_handles + size_handles, loc="upper left",
                        bbox_to_anchor=(1.01, 1), fontsize=9, labelspacing=1.3, borderpad=1,
                        frameon=False)
    leg.set_in_layout(True)

    # GMACs against parameters, every model.
    ox = [r["params"] / 1e6 for r in rows]
    oy = [r["macs"] / 1e9 for r in rows]
    ax_ops.scatter(ox, oy, s=30, c=[colour[r["name"]] for r in rows], zorder=3)
    ax_ops.set_xscale("log")
    ax_ops.set_yscale("log")
    if rows:
        ax_ops.set_xlim(min(ox) / 1.7, max(ox) * 2.2)
        ax_ops.set_ylim(min(oy) / 1.7, max(oy) * 1.7)
    ax_ops.set_xlabel("parameters (millions, log scale)")
    ax_ops.set_ylabel(f"GMACs per image (log scale; {FLOP_NOTE})")
    ax_ops.grid(alpha=0.3, which="both")
    ax_ops.set_title("Operations against parameters, every registered model", fontsize=11)

    # Activation memory per image, every model, largest first.
    by_mem = sorted(rows, key=lambda r: r["activation_bytes"])
    mem = [r["activation_bytes"] / 2**20 for r in by_mem]
    ax_mem.barh(range(len(by_mem)), mem, color=[colour[r["name"]] for r in by_mem], height=0.7)
    ax_mem.set_yticks(range(len(by_mem)), [r["name"] for r in by_mem], fontsize=8)
    ax_mem.set_ylim(-0.6, len(by_mem) - 0.4)
    for i, m in enumerate(mem):
        ax_mem.text(m, i, f" {m:,.1f}", va="center", fontsize=7)
    ax_mem.set_xlim(0, max(mem, default=1) * 1.15)
    ax_mem.set_xlabel("activation memory per image (MB = 2^20 bytes; float32, batch 1)")
    ax_mem.grid(axis="x", alpha=0.3)
    ax_mem.set_title("Activation memory: every layer's output, summed", fontsize=11)

    sizes = sorted({r.get("input_size") for r in rows if r.get("input_size")})
    fig.suptitle(f"Comparing complexity: {len(rows)} architectures at their quoted input size "
                 f"({', '.join(map(str, sizes))} px)", fontsize=14)
    fig.canvas.draw()  # runs the layout once: fixes where every data point lands in pixels
    _place_labels(ax_acc, xs, ys,
                  [r["name"] + ("*" if r.get("top1_kind") == "paper" else "") for r in rated],
                  [math.sqrt(a / math.pi) for a in areas], fontsize=8)
    _place_labels(ax_ops, ox, oy, [r["name"] for r in rows], [math.sqrt(30 / math.pi)] * len(rows))
    fig.set_layout_engine("none")  # keep the layout the labels were placed in
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Training curves


def read_history(workdir: str | os.PathLike) -> dict[str, list]:
    """A run's metrics.jsonl as columns: train (step, loss) and eval (step, loss, top-1).

    ValueError when WORKDIR holds no metrics (not the --workdir of a run that logged a step)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        raise ValueError(f"{os.fspath(workdir)!r} has no metrics ({path} is missing or empty): "
                         "expected the --workdir of a run of python -m experiments.train")
    return {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
            "eval_step": [r["step"] for r in evals], "eval_loss": [r["eval_loss"] for r in evals],
            "eval_top1": [100 * r["eval_top1"] for r in evals]}


def run_labels(workdirs: Sequence[str | os.PathLike],
               labels: Sequence[str] | None = None) -> list[str]:
    """One legend label per run: `labels` when given (ValueError unless exactly one per run),
    else each workdir's folder name."""
    workdirs = list(workdirs)
    if not workdirs:
        raise ValueError("training curves need at least one run's workdir")
    if labels is None:
        return [os.path.basename(os.path.normpath(w)) for w in workdirs]
    labels = list(labels)
    if len(labels) != len(workdirs):
        raise ValueError(f"{len(labels)} labels ({','.join(labels)}) for {len(workdirs)} runs: "
                         "give one per run")
    return labels


def training_curves(workdirs: Sequence[str | os.PathLike], path: str | os.PathLike | None = None,
                    *, labels: Sequence[str] | None = None) -> Figure:
    """Loss (training, and test at each evaluation; log scale) and test top-1 against the step,
    one colour per run: the curves of the lecture's comparisons (VGG-16 from scratch against
    VGG-16 started from VGG-11, seeds of one recipe, ...). Labels default to the folder names."""
    labels = run_labels(workdirs, labels)
    return history_curves([read_history(w) for w in workdirs], labels, path)


def history_curves(histories: Sequence[dict[str, list]], labels: Sequence[str],
                   path: str | os.PathLike | None = None) -> Figure:
    """`training_curves` of histories already read (`read_history`), one label each."""
    fig = _new_figure(12, 4.5)
    ax_loss, ax_top1 = fig.subplots(1, 2)
    for i, (h, label) in enumerate(zip(histories, labels)):
        c = f"C{i % 10}"
        ax_loss.plot(h["step"], h["loss"], color=c, lw=1, alpha=0.6, label=f"{label}: train")
        ax_loss.plot(h["eval_step"], h["eval_loss"], "o--", color=c, ms=4,
                     label=f"{label}: test")
        last = f": last {h['eval_top1'][-1]:.1f}%" if h["eval_top1"] else ""
        ax_top1.plot(h["eval_step"], h["eval_top1"], "o-", color=c, ms=4, label=label + last)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (log scale)", yscale="log",
                title="Loss: training (lines) and test (dashed, at each evaluation)")
    ax_top1.set(xlabel="step", ylabel="test top-1 (%)", title="Test accuracy")
    for ax in (ax_loss, ax_top1):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Architecture search (cnnjax.nas)


def search_curves(children: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]],
                  path: str | os.PathLike | None = None, *, title: str = "") -> Figure:
    """A search's progress against the controller step: every child's reward (dots), the mean
    reward of each step, the REINFORCE baseline and the best reward so far (left); the summed
    entropy of the controller's decisions (right). Rows as in children.jsonl / controller.jsonl."""
    fig = _new_figure(12, 4.5)
    ax_r, ax_h = fig.subplots(1, 2)
    x = [s["controller_step"] + 1 for s in steps]
    if children:
        m = max(c["child"] for c in children) + 1
        jitter = [(c["child"] - (m - 1) / 2) * 0.5 / max(m, 1) for c in children]
        ax_r.scatter([c["controller_step"] + 1 + j for c, j in zip(children, jitter)],
                     [c["reward"] for c in children], s=14, color="0.6", zorder=2,
                     label="a child's reward")
    ax_r.plot(x, [s["mean_reward"] for s in steps], "o-", color="C0", ms=4, zorder=3,
              label="mean reward of the step")
    ax_r.plot(x, [s["baseline"] for s in steps], "--", color="C1", zorder=3,
              label="baseline (EMA of rewards) used at the step")
    ax_r.step(x, [s["best_reward"] for s in steps], where="post", color="C2", zorder=3,
              label="best reward so far")
    ax_r.set(xlabel="controller step", ylabel="reward (validation accuracy, held out of train)",
             title="Rewards of the sampled children")
    ax_h.plot(x, [s["entropy"] for s in steps], "o-", color="C3", ms=4)
    ax_h.set(xlabel="controller step", ylabel="entropy (nats, summed over a child's decisions)",
             title="Controller entropy: falls as the policy commits")
    for ax in (ax_r, ax_h):
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def search_children(children: Sequence[dict[str, Any]], hand: Sequence[dict[str, Any]],
                    path: str | os.PathLike | None = None, *, title: str = "",
                    budget: int | None = None) -> Figure:
    """Every child as a point of validation accuracy against MACs (left) and parameters
    (right), coloured by the controller step that sampled it, the best starred, and the
    hand-designed models trained on the same data and budget beside them (black diamonds):
    the lecture's figure of searched against designed networks, in small."""
    fig = _new_figure(13, 5.5)
    axes = fig.subplots(1, 2, sharey=True)
    best = max(children, key=lambda c: c["reward"], default=None)
    last = max((c["controller_step"] for c in children), default=0)
    points, labels = None, []
    for ax, key, unit in zip(axes, ("macs", "params"), ("MACs", "parameters")):
        xs = [c[key] for c in children]
        ys = [100 * c["accuracy"] for c in children]
        points = ax.scatter(xs, ys, c=[c["controller_step"] + 1 for c in children], s=22,
                            cmap="viridis", vmin=1, vmax=last + 1, alpha=0.85, zorder=3)
        names, lx, ly, radii = [], [], [], []
        if best is not None:
            ax.scatter([best[key]], [100 * best["accuracy"]], marker="*", s=260, color="red",
                       edgecolors="black", linewidths=0.6, zorder=5)
            names.append(f"best child {best['name']}")
            lx.append(best[key])
            ly.append(100 * best["accuracy"])
            radii.append(9.0)
        for h in hand:
            ax.scatter([h[key]], [100 * h["accuracy"]], marker="D", s=45, color="black",
                       zorder=4)
            names.append(h["arch"])
            lx.append(h[key])
            ly.append(100 * h["accuracy"])
            radii.append(4.0)
        allx = xs + lx
        if allx:
            ax.set_xscale("log")
            ax.set_xlim(min(allx) / 2, max(allx) * 2)
        ax.set_xlabel(f"{unit} (log scale" + (f"; {FLOP_NOTE})" if key == "macs" else ")"))
        ax.grid(alpha=0.3, which="both")
        labels.append((lx, ly, names, radii))
    ally = [100 * c["accuracy"] for c in children] + [100 * h["accuracy"] for h in hand]
    if ally:
        axes[0].set_ylim(max(0, min(ally) - 8), min(100, max(ally)) + 4)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].set_title("Accuracy against operations", fontsize=10)
    axes[1].set_title("Accuracy against parameters", fontsize=10)
    if points is not None and children:
        fig.colorbar(points, ax=axes, label="controller step that sampled the child",
                     shrink=0.9)
    handles = [Line2D([], [], ls="", marker="o", color=colormaps["viridis"](0.5),
                      label="sampled child (coloured by its controller step)"),
               Line2D([], [], ls="", marker="*", ms=14, color="red", mec="black",
                      label="best child")]
    if hand:
        handles.append(Line2D([], [], ls="", marker="D", color="black",
                              label="hand-designed cnnjax model, same data"
                              + (f" and {budget} steps" if budget else "")))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.canvas.draw()  # fixes the layout, so labels can be placed in pixels
    for ax, args in zip(axes, labels):
        _place_labels(ax, *args, fontsize=8)
    fig.set_layout_engine("none")
    return _save(fig, path)
