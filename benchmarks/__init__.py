"""The benchmarks behind `python -m experiments.benchmark` (the entry point: its flags, the
restart with huge pages, the dispatch), one job a module:

- `common`: what every measurement shares: the model options the flags set, the one-line
  out-of-memory exit, page-fault counts.
- `checks`: the flag combinations refused in one line before any process starts.
- `step`: building, compiling and timing cnnjax's train (or eval) step; XLA's memory, FLOP and
  compile figures.
- `torch_side`: torchvision's same step, timed alike (torch is an optional extra).
- `trace`: --trace: the profiler's trace read back, operation by operation, classified by layer,
  pass and kind, and the idle time.
- `convs`: --convs: each distinct convolution timed alone; the matrix-product rate.
- `sweeps`: --compare, --all, --every_arch and --largest_batch: one measurement a fresh child
  process.
- `report`: the Markdown of BENCHMARKS.md: its tables, sections and machine lines.
- `input_pipeline`: --mode=input: the input pipeline against a tf.data reference, and the
  docs/data.md table.
"""
