"""What TLS costs the native gRPC front end: the same server plaintext and over TLS, measured
with Triton's perf_analyzer (unmodified, `--ssl-grpc-use-ssl`) in one run.

  python benchmarks/tls_cost.py [--repository DIR] [--model ctr_light] [--duration 4]
                                [--rounds 2] [--out bench_out/tls_cost]

Two cases, as issue 19 names them: 1-row requests at concurrency 16 and 32-row requests at
saturation (concurrency 32). Plaintext and TLS servers alternate round by round (a fresh
server each time, a self-signed CA and server certificate made here), so drift on a shared
machine hits both alike; the median round per configuration is reported with the ratio TLS /
plaintext. Prints a table, writes tls_cost.png and tls_cost.json to --out. The target: TLS
costs at most 15 %.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.http_serving import (free_port, perf_analyzer, say,  # noqa: E402
                                     scratch_repository, start_server)
from benchmarks.loadgen import format_table  # noqa: E402

CASES = (("1-row c16", 1, 16), ("32-row c32", 32, 32))


def make_certificates(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """(ca.pem, server.pem, server.key): a throwaway CA and a certificate for 127.0.0.1 it signs."""
  import ipaddress

  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls-bench CA")])

  def cert(subject, public_key, *, ca: bool, san=None):
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
         .public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
      b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(ca_key, hashes.SHA256())

  ca = cert(ca_name, ca_key.public_key(), ca=True)
  server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
                key.public_key(), ca=False,
                san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
  paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
  paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
  paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
  paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return paths


def one_round(args: argparse.Namespace, tls: bool, certs: tuple) -> dict[str, dict]:
  """Both cases against one fresh server, plaintext or TLS."""
  port = free_port()
  extra = ["--tls-cert", str(certs[1]), "--tls-key", str(certs[2])] if tls else []
  pa_extra = (["--ssl-grpc-use-ssl", "--ssl-grpc-root-certifications-file", str(certs[0])]
              if tls else [])
  proc = start_server(args.repository, port, -1, [*extra, *args.server_args.split()])
  try:
    return {name: perf_analyzer(f"localhost:{port}", args.model, "grpc", rows, conc,
                                args.duration, pa_extra) for name, rows, conc in CASES}
  finally:
    proc.terminate()
    proc.wait(60)


def plot(table: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.5))
  names = [n for n, _, _ in CASES]
  for i, mode in enumerate(("plaintext", "tls")):
    ax.bar([j + 0.4 * i for j in range(len(names))], [table[mode][n] for n in names], 0.4,
           label=mode)
  ax.set_xticks([j + 0.2 for j in range(len(names))], names)
  ax.set_ylabel("rows/s (median round)")
  ax.set_title("native gRPC front end: TLS vs plaintext")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repository", type=pathlib.Path, default=None,
                 help="model repository (default: the built-in demo repository)")
  p.add_argument("--model", default="ctr_light", help="the model to load-test")
  p.add_argument("--duration", type=float, default=4.0, help="seconds per perf_analyzer window")
  p.add_argument("--rounds", type=int, default=2, help="rounds per configuration")
  p.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/tls_cost"))
  args = p.parse_args()
  if args.repository is None:
    from demo.repository import ensure_demo_repository
    args.repository = ensure_demo_repository(say)
  args.repository = scratch_repository(args.repository, args.model)  # only the model loads
  args.out.mkdir(parents=True, exist_ok=True)
  runs: dict[str, list[dict]] = {"plaintext": [], "tls": []}
  with tempfile.TemporaryDirectory() as d:
    certs = make_certificates(pathlib.Path(d))
    for r in range(args.rounds):
      for mode in ("plaintext", "tls"):
        say(f"round {r + 1}/{args.rounds}: {mode}")
        runs[mode].append(one_round(args, mode == "tls", certs))
  table = {m: {n: statistics.median(run[n]["rows_per_s"] for run in rs) for n, _, _ in CASES}
           for m, rs in runs.items()}
  rows = [[n, f"{table['plaintext'][n]:,.0f}", f"{table['tls'][n]:,.0f}",
           f"{table['tls'][n] / table['plaintext'][n]:.3f}",
           f"{1 - table['tls'][n] / table['plaintext'][n]:.1%}"] for n, _, _ in CASES]
  print(format_table(["case", "plaintext rows/s", "TLS rows/s", "TLS / plain", "cost"], rows))
  (args.out / "tls_cost.json").write_text(json.dumps({"median": table, "rounds": runs},
                                                     indent=1))
  plot(table, args.out / "tls_cost.png")
  say(f"wrote {args.out}/tls_cost.json and tls_cost.png")


if __name__ == "__main__":
  main()
