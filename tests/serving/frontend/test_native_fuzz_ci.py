"""The native front end's parsers under libFuzzer with AddressSanitizer and UBSan (fuzz/): builds
both targets with fuzz/build.sh and runs each from the seeds, the checked-in corpus and the past
crashes (fuzz/regressions/) for a fixed run count with a fixed seed; any crash, leak, sanitizer
report or broken invariant fails. Skipped, saying why, without clang and its libFuzzer runtime
(apt-get install clang libclang-rt-dev) unless XLASERVE_REQUIRE_NATIVE=1 and clang is there.
Longer runs: docs/DEVELOPING.md."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
FUZZ = ROOT / "fuzz"
# Per target: (libFuzzer -runs, a wall-clock cap in seconds): about 12 s each on 2 cores, after a
# ~40 s build. The cap only binds on a slower machine (the run then stops early, still failing on
# any report).
BUDGET = {"grpc_request_fuzz": (600_000, 20), "http_infer_fuzz": (250_000, 20)}
REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
           "ERROR: libFuzzer", "fuzz invariant broken", "SUMMARY: ")
TRIVIAL = ('#include <cstddef>\n#include <cstdint>\nextern "C" int LLVMFuzzerTestOneInput('
           'const uint8_t*, size_t) { return 0; }\n')


def _missing(tmp: pathlib.Path) -> str | None:
  """Why the fuzz targets cannot be built here, or None."""
  for tool in ("clang++", "pkg-config"):
    if shutil.which(tool) is None:
      return f"{tool} is not installed (apt-get install clang libclang-rt-dev pkg-config)"
  if subprocess.run(["pkg-config", "--exists", "grpc++", "RapidJSON"]).returncode != 0:
    return "pkg-config finds no grpc++ or RapidJSON (apt-get install libgrpc++-dev rapidjson-dev)"
  try:
    import pybind11  # noqa: F401  (the native headers include it)
  except ImportError:
    return "pybind11 is not installed (pip install -e '.[test]')"
  src = tmp / "trivial.cc"
  src.write_text(TRIVIAL)
  probe = subprocess.run(["clang++", "-fsanitize=fuzzer,address,undefined", str(src), "-o",
                          str(tmp / "trivial")], capture_output=True, text=True)
  if probe.returncode != 0:
    return ("clang cannot link a libFuzzer/ASan binary (apt-get install libclang-rt-dev): "
            + probe.stderr.strip()[-300:])
  return None


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> pathlib.Path:
  """The built targets and the seeds (OUT/grpc, OUT/http) in one folder."""
  out = tmp_path_factory.mktemp("fuzz")
  why = _missing(out)
  if why is not None:
    if os.environ.get("XLASERVE_REQUIRE_NATIVE") == "1" and shutil.which("clang++"):
      pytest.fail(f"XLASERVE_REQUIRE_NATIVE=1 and clang is installed, but {why}")
    pytest.skip(why)
  env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
  build = subprocess.run(["bash", str(FUZZ / "build.sh"), str(out)], capture_output=True,
                         text=True, env=env, timeout=600)
  assert build.returncode == 0, build.stdout + build.stderr
  seeds = subprocess.run([sys.executable, str(FUZZ / "seeds.py"), str(out / "seeds")],
                         capture_output=True, text=True, env=env, timeout=120)
  assert seeds.returncode == 0, seeds.stderr
  return out


def final_stats(log: str) -> dict[str, int]:
  """exec count, exec/s, cov and ft of a libFuzzer run, from its last status line and stats."""
  done = re.findall(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)", log, re.M)
  assert done, log[-3000:]
  runs, cov, ft = map(int, done[-1])
  rate = re.search(r"stat::average_exec_per_sec:\s+(\d+)", log)
  return {"runs": runs, "cov": cov, "ft": ft, "exec_per_s": int(rate.group(1)) if rate else 0}


@pytest.mark.parametrize("target,kind", [("grpc_request_fuzz", "grpc"),
                                         ("http_infer_fuzz", "http")])
def test_fuzz_target_finds_nothing(built, tmp_path, target, kind):
  runs, cap = BUDGET[target]
  corpora = [FUZZ / "corpus" / kind, FUZZ / "regressions" / kind, built / "seeds" / kind]
  work = tmp_path / "corpus"
  work.mkdir()
  cmd = [str(built / target), "-seed=1", f"-runs={runs}", f"-max_total_time={cap}",
         # Linux keeps a process's peak RSS across execve, so the fuzzer would inherit this
         # test process's (GBs after the model tests) and report a false OOM at once: bound
         # single allocations instead of RSS.
         "-timeout=10", "-rss_limit_mb=0", "-malloc_limit_mb=1024", "-print_final_stats=1",
         f"-dict={FUZZ / f'{kind}.dict'}", f"-artifact_prefix={tmp_path}/",
         str(work), *(str(c) for c in corpora if c.is_dir())]
  env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
         "UBSAN_OPTIONS": "print_stacktrace=1"}
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap + 120, env=env)
  log = proc.stdout + proc.stderr
  crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(
      ("crash-", "leak-", "timeout-", "oom-")))
  reports = [line for line in log.splitlines() if line.startswith(REPORTS) or
             any(r in line for r in REPORTS[:3])]
  assert proc.returncode == 0 and not crashes and not reports, (
      f"{target}: rc {proc.returncode}, artifacts {crashes} (copy them into "
      f"fuzz/regressions/{kind}/ and see docs/DEVELOPING.md)\n" + "\n".join(reports[:20])
      + "\n" + log[-6000:])
  stats = final_stats(log)
  print(f"{target}: {stats['runs']} execs, {stats['exec_per_s']} exec/s, cov {stats['cov']}, "
        f"ft {stats['ft']}")
  assert stats["runs"] >= min(runs, 10_000), stats  # it ran, not just loaded the corpus
  # The seeds reach past the parsers into validation: far more edges than parsing alone.
  assert stats["cov"] >= (300 if kind == "grpc" else 800), stats
