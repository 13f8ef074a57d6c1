#!/usr/bin/env bash
# Runs Triton's perf_analyzer (shipped in tritonclient==2.41.0) against xlaserve, unchanged.
# First use fetches its two missing shared libraries into bench_out/pa_libs (no GPU needed):
# libb64.so.0d (Debian libb64-0d) and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12).
# Usage: benchmarks/perf_analyzer.sh -m dlrm -u 127.0.0.1:8001 -i grpc -b 32 --concurrency-range 1:16:4
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
libs="$root/bench_out/pa_libs"
pa="$(command -v perf_analyzer || true)"
if [ -z "$pa" ]; then
  echo "perf_analyzer not found: pip install 'tritonclient[grpc]==2.41.0' (pip install -e '.[bench]')" >&2
  exit 1
fi
if [ ! -e "$libs/libb64.so.0d" ] || [ ! -e "$libs/libcudart.so.12" ]; then
  echo "fetching perf_analyzer's shared libraries into $libs ..." >&2
  mkdir -p "$libs/tmp"
  (cd "$libs/tmp" && apt-get download libb64-0d >/dev/null 2>&1 && dpkg -x libb64-0d*.deb deb)
  cp "$(find "$libs/tmp/deb" -name 'libb64.so.0d*' | head -1)" "$libs/libb64.so.0d"
  python -m pip install --quiet --target "$libs/tmp/cudart" nvidia-cuda-runtime-cu12
  cp "$(find "$libs/tmp/cudart" -name 'libcudart.so.12*' | head -1)" "$libs/libcudart.so.12"
  rm -rf "$libs/tmp"
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$pa" "$@"
