"""Regenerates serving/frontend/protocol/*_pb2*.py with grpcio-tools from the official Triton protos.

The source is the FileDescriptorSet in serving/frontend/protocol/triton_protos.pb: the
descriptors of Triton's `grpc_service.proto` and `model_config.proto` (release
r23.12, BSD-3 licence, see serving/frontend/protocol/LICENSE-triton), exactly as the
pinned `tritonclient==2.41.0` ships them. Byte-identical descriptors let our
server and `tritonclient` live in one process (protobuf's pool refuses a
different file under the same name). Run: `python tools/gen_protos.py [--out DIR]
[--refresh-descriptors]`; a test re-runs it and checks the committed files match.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO_DIR = HERE.parent / "serving" / "frontend" / "protocol"
DESCRIPTOR_SET = PROTO_DIR / "triton_protos.pb"
FILES = ("model_config.proto", "grpc_service.proto")


def refresh_descriptors() -> None:
  """Rebuilds triton_protos.pb from the installed tritonclient (the pinned release)."""
  from google.protobuf import descriptor_pb2
  from tritonclient.grpc import model_config_pb2, service_pb2

  fds = descriptor_pb2.FileDescriptorSet()
  for mod in (model_config_pb2, service_pb2):
    fds.file.add().MergeFromString(mod.DESCRIPTOR.serialized_pb)
  DESCRIPTOR_SET.write_bytes(fds.SerializeToString(deterministic=True))


def generate(out: pathlib.Path) -> list[pathlib.Path]:
  """Runs grpc_tools.protoc on the descriptor set; rewrites imports to be package-relative."""
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"--descriptor_set_in={DESCRIPTOR_SET}",
           f"--python_out={tmp}", f"--grpc_python_out={tmp}", *FILES]
    subprocess.run(cmd, check=True)
    written = []
    for src in sorted(pathlib.Path(tmp).glob("*.py")):
      text = src.read_text()
      text = re.sub(r"^import (model_config_pb2|grpc_service_pb2) as", r"from . import \1 as",
                    text, flags=re.M)
      dst = out / src.name
      dst.write_text(text)
      written.append(dst)
  return written


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=PROTO_DIR,
                      help="where to write the generated modules (default: serving/frontend/protocol)")
  parser.add_argument("--refresh-descriptors", action="store_true",
                      help="first rebuild triton_protos.pb from the installed tritonclient")
  args = parser.parse_args()
  if args.refresh_descriptors:
    refresh_descriptors()
  for p in generate(args.out):
    print(p)


if __name__ == "__main__":
  main()
