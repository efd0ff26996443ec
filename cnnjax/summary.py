"""The lecture's per-layer table for any registered model.

    python -m cnnjax.summary --arch=alexnet --input_size=227
    python -m cnnjax.summary --arch=resnet50 --format=markdown
    python -m cnnjax.summary --arch=alexnet --input_size=227 --plot=alexnet.png  # also the bars
    python -m cnnjax.summary --arch_spec=runs/nas/best_spec.json --in_channels=1 --num_classes=10

Columns: layer, kind, input C and HxW, filters, kernel, stride, pad, output C and HxW, memory
(KB of output activations at batch 1), params (thousands) and MFLOP, where, as in the lecture and
torchvision, one FLOP is one multiply-add. `--plot` also draws the three columns memory, params
and MFLOP as per-layer bars (`cnnjax.plots.layer_bars`); `--plot_depth=1` sums each top-level
block (a ResNet bottleneck, an Inception module) into one bar, for nets of hundreds of layers.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys

from cnnjax import flags
from cnnjax.profile import Layer, Profile, profile

HEADER = ("layer", "kind", "in_C", "in_HxW", "filters", "kernel", "stride", "pad", "out_C",
          "out_HxW", "memory_KB", "params_k", "MFLOP")
NOTE = ("MFLOP = millions of multiply-adds (1 FLOP = 1 MAC); memory = output elements x bytes, "
        "batch 1")


def _hw(shape: tuple[int, ...]) -> str:
    if len(shape) == 4:
        return f"{shape[1]}x{shape[2]}" if shape[1] != shape[2] else str(shape[1])
    return "1" if shape else ""


def _kxk(v) -> str:
    if v is None:
        return ""
    return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))


def row_values(layer: Layer) -> tuple:
    pad = "" if layer.padding is None else _kxk(tuple(p[0] for p in layer.padding))
    conv_like = layer.kind in ("conv", "gconv", "dwconv", "linear")
    kind = f"gconv/{layer.groups}" if layer.kind == "gconv" else layer.kind
    return (layer.name, kind, layer.input_shape[-1] if layer.input_shape else "",
            _hw(layer.input_shape), layer.output_shape[-1] if conv_like else "",
            _kxk(layer.kernel), _kxk(layer.stride), pad,
            layer.output_shape[-1] if layer.output_shape else "", _hw(layer.output_shape),
            round(layer.out_bytes / 1024, 1), round(layer.params / 1e3, 3),
            round(layer.macs / 1e6, 3))


def total_values(prof: Profile) -> tuple:
    return ("TOTAL", "", "", "", "", "", "", "", "", "", round(prof.activation_bytes / 1024, 1),
            round(prof.params / 1e3, 3), round(prof.macs / 1e6, 3))


def render(prof: Profile, fmt: str = "table") -> str:
    rows = [row_values(layer) for layer in prof.layers] + [total_values(prof)]
    if fmt == "json":
        return json.dumps({"model": prof.name, "input_shape": prof.input_shape, "note": NOTE,
                           "params": prof.params, "macs": prof.macs,
                           "activation_bytes": prof.activation_bytes, "layers": prof.rows()},
                          indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([HEADER, *rows])
        return buf.getvalue()
    title = (f"{prof.name} at {prof.input_shape[1]}x{prof.input_shape[2]}: "
             f"{prof.params:,} params, {prof.macs / 1e6:,.1f} MFLOP ({NOTE})")
    cells = [tuple(map(str, r)) for r in (HEADER, *rows)]
    if fmt == "markdown":
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "---|" * len(HEADER))
        return title + "\n\n" + "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    fmt_row = lambda c: "  ".join(v.rjust(w) if i > 1 else v.ljust(w)
                                  for i, (v, w) in enumerate(zip(c, widths)))
    rule = "-" * len(fmt_row(cells[0]))
    return "\n".join([title, rule, fmt_row(cells[0]), rule, *map(fmt_row, cells[1:-1]), rule,
                      fmt_row(cells[-1])])


def main(argv: list[str] | None = None) -> int:
    parser = flags.ArgumentParser(prog="python -m cnnjax.summary", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="a registered model name")
    which.add_argument("--arch_spec", metavar="PATH",
                       help="a cnnjax.nas spec file (a search's best_spec.json)")
    parser.add_argument("--input_size", type=int, default=None,
                        help="input height and width (default: the size the model is quoted "
                             "at; a spec's: the size it was searched at)")
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--format", choices=("table", "csv", "json", "markdown"), default="table")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="also draw per-layer bars of memory, params and MACs to PATH")
    parser.add_argument("--plot_depth", type=int, default=None,
                        help="sum the bars of each block of this many name levels (1: blocks)")
    args = parser.parse_args(argv)
    from cnnjax.models.registry import model_spec
    try:
        flags.optional(flags.POSITIVE_INT).check("input_size", args.input_size)
        flags.optional(flags.POSITIVE_INT).check("plot_depth", args.plot_depth)
        flags.POSITIVE_INT.check("in_channels", args.in_channels)
        flags.POSITIVE_INT.check("num_classes", args.num_classes)
        if args.plot is not None:
            from cnnjax import plots
            plots.check_path("plot", args.plot)
        heads = {"num_classes": args.num_classes, "in_channels": args.in_channels}
        if args.arch_spec is not None:
            from cnnjax.models import nasnet, nasspec
            try:
                spec = nasspec.load_spec(args.arch_spec)
            except nasspec.SpecError as e:
                raise ValueError(f"--arch_spec: {e}") from None
            model = nasnet.build(spec, **heads)
            size = spec.space.input_size if args.input_size is None else args.input_size
            prof = dataclasses.replace(profile(model, size), name=model.arch)
        else:
            size = model_spec(args.arch).input_size if args.input_size is None \
                else args.input_size
            prof = profile(args.arch, size, **heads)
        text = render(prof, args.format)
    except ValueError as e:
        return flags.fail(e)
    print(text)
    if args.plot is not None:
        plots.layer_bars(prof, args.plot, depth=args.plot_depth)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
