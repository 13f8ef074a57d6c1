"""`xlaserve update`: applies live updates to a served model's params from update files.

Each file is a numpy .npz (numpy.savez): per param leaf, an array named by the leaf's path
(see the model's manifest) with its new rows, and `rows:<leaf>` (or one shared `rows`) naming
them; for the embedding tables of a model served with an embedding cache, ids (hashed modulo
the table's rows, new ids too). A directory is a stream of deltas, applied in file-name order.
Every file is one update, validated whole by the server and applied between two batches (a
batch sees all of it or none; answers carry the params_generation that scored them); a bad
file is refused with nothing applied, and the command stops there.

  xlaserve update --url http://127.0.0.1:8000 --model ads deltas/
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from serving import http_client

NPZ_TYPE = "application/x-npz"


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("update", help="apply live param/embedding updates to a served model",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("paths", nargs="+", metavar="PATH",
                 help="update files (.npz), or directories of them (applied in name order)")
  p.add_argument("--url", default="http://127.0.0.1:8000",
                 help="the server's HTTP address (its --http-port)")
  p.add_argument("--model", required=True, help="model name")
  p.add_argument("--version", default=None, help="model version (default: the served one)")
  p.add_argument("--token", default=None,
                 help="bearer token, when the server was started with one")
  p.add_argument("--timeout-s", type=float, default=600.0,
                 help="seconds to wait for each update to be applied")


def update_files(paths: list[str]) -> list[pathlib.Path]:
  """The files to send, in order; raises ValueError for a path that holds none."""
  out = []
  for p in map(pathlib.Path, paths):
    files = sorted(p.glob("*.npz")) if p.is_dir() else [p] if p.is_file() else []
    if not files:
      raise ValueError(f"{p}: no .npz update file there")
    out += files
  return out


def send(url: str, model: str, version: str | None, body: bytes, token: str | None,
         timeout_s: float) -> dict:
  """POSTs one update; returns the server's JSON answer or raises RuntimeError with its error."""
  path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/params"
  return http_client.call_json(url, "POST", path, body=body, content_type=NPZ_TYPE, token=token,
                               timeout_s=timeout_s)


def main(args: argparse.Namespace) -> int:
  try:
    files = update_files(args.paths)
  except ValueError as e:
    print(f"xlaserve update: {e}", file=sys.stderr)
    return 2
  for i, f in enumerate(files, 1):
    t0 = time.perf_counter()
    try:
      answer = send(args.url, args.model, args.version, f.read_bytes(), args.token,
                    args.timeout_s)
    except (OSError, RuntimeError, ValueError) as e:
      print(f"xlaserve update: {f}: {e}; files after it were not sent", file=sys.stderr)
      return 1
    print(f"[{i}/{len(files)}] {f.name}: {answer['rows']} rows, generation"
          f" {answer['generation']} ({time.perf_counter() - t0:.2f}s)", flush=True)
  return 0
