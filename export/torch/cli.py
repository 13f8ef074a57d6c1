"""`xlaserve export-torch MODEL.pt2 ...`: a `torch.export` archive -> an xlaserve bundle.

The archive is what `torch.export.save(torch.export.export(model, args, dynamic_shapes=...),
"model.pt2")` writes; its inputs' first dimension must be dynamic (the batch). `xlaserve`
hands this command to `python -m export.torch.cli` in its own process, so the serving package
never imports the exporter or torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

PROG = "xlaserve export-torch"


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def _names(text: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
  """The command's flags (shown by `xlaserve export-torch --help`)."""
  from export.config import DEFAULT_BATCH_BUCKETS

  p = argparse.ArgumentParser(
      prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("program", metavar="MODEL.pt2",
                 help="a torch.export archive (torch.export.save) with a dynamic batch dimension")
  p.add_argument("--repository", required=True,
                 help="model repository to write <name>/<version>/ into (xlaserve serve"
                 " --model-repository)")
  p.add_argument("--name", required=True, help="model name to serve it as")
  p.add_argument("--version", type=int, default=None,
                 help="version to write (default: one past the newest in the repository)")
  p.add_argument("--batch-buckets", type=_ints, default=DEFAULT_BATCH_BUCKETS,
                 help="comma-separated batch sizes the server compiles (default: %(default)s)")
  p.add_argument("--seq-buckets", type=_ints, default=(),
                 help="comma-separated sequence lengths to serve at, for a program with a"
                 " dynamic dimension besides the batch (one artifact per length)")
  p.add_argument("--platforms", type=_names, default=("cpu",),
                 help="comma-separated platforms to write StableHLO for: cpu, cuda, rocm, tpu"
                 " (default: cpu)")
  p.add_argument("--output-names", type=_names, default=None,
                 help="comma-separated names of the program's outputs, in order (default:"
                 " output, or output_0, output_1, ...)")
  p.add_argument("--max-queue-delay-us", type=int, default=2000,
                 help="the bundle's default batching delay in microseconds (default: 2000)")
  return p


def main(argv: list[str] | None = None) -> int:
  """Exports the archive; exit 0 with the bundle's path, 2 with the reason on a bad archive."""
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  import torch

  from export.config import ExportConfig
  from export.torch.exporter import export_torch
  from export.torch.ops import UnsupportedOperatorError

  try:
    config = ExportConfig(batch_buckets=args.batch_buckets, seq_buckets=args.seq_buckets,
                          platforms=args.platforms,
                          max_queue_delay_us=args.max_queue_delay_us)
    program = torch.export.load(args.program)
    path = export_torch(program, repository=args.repository, name=args.name,
                        version=args.version, output_names=args.output_names, config=config)
  except (OSError, ValueError, RuntimeError, UnsupportedOperatorError) as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
