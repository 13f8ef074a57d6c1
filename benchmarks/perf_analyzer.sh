#!/usr/bin/env bash
# Runs Triton's perf_analyzer (shipped in tritonclient==2.41.0) against xlaserve, unchanged.
# First use fetches its two missing shared libraries into bench_out/pa_libs (no GPU needed):
# libb64.so.0d (Debian libb64-0d) and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12).
# Usage: benchmarks/perf_analyzer.sh -m dlrm -u 127.0.0.1:8001 -i grpc -b 32 --concurrency-range 1:16:4
# With `--serve native|python [--repository DIR]` first, it also starts `xlaserve serve` with that
# gRPC front end on the port given by -u (the HTTP port with `-i http`; demo repository by
# default), waits until the models are loaded, runs perf_analyzer and stops the server: compare
# the front ends back to back with
#   benchmarks/perf_analyzer.sh --serve python -m dlrm -u 127.0.0.1:8011 -i grpc -b 32 ...
#   benchmarks/perf_analyzer.sh --serve native -m dlrm -u 127.0.0.1:8011 -i grpc -b 32 ...
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
libs="$root/bench_out/pa_libs"
serve="" repo=""
if [ "${1:-}" = "--serve" ]; then
  serve="$2"; shift 2
  if [ "${1:-}" = "--repository" ]; then repo="$2"; shift 2; fi
fi
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
if [ -z "$serve" ]; then
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  exec "$pa" "$@"
fi
url="" proto="grpc" prev=""
for a in "$@"; do
  if [ "$prev" = "-u" ]; then url="$a"; fi
  if [ "$prev" = "-i" ]; then proto="$a"; fi
  prev="$a"
done
if [ -z "$url" ]; then echo "--serve needs -u HOST:PORT (the port to serve on)" >&2; exit 2; fi
log="$(mktemp)"
if [ "$proto" = "http" ]; then ports=(--grpc-port 0 --http-port "${url##*:}")
else ports=(--grpc-port "${url##*:}" --http-port -1); fi
python -m serving.cli serve --frontend "$serve" --host "${url%:*}" "${ports[@]}" \
  --metrics-port -1 ${repo:+--model-repository "$repo"} >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1200); do
  if grep -q "models loaded" "$log"; then break; fi
  if ! kill -0 $server 2>/dev/null; then cat "$log" >&2; exit 1; fi
  sleep 0.5
done
grep "front end" "$log" >&2 || true
LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$pa" "$@"
