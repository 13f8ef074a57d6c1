#!/usr/bin/env bash
# Builds the native front end's fuzz targets with libFuzzer, AddressSanitizer and
# UndefinedBehaviorSanitizer (clang): OUT/grpc_request_fuzz (wire.cc: ModelInfer parsing and
# validation) and OUT/http_infer_fuzz (http_conn.cc's head parser, http_infer.cc's binary-tensor
# fast path). Usage: fuzz/build.sh [OUT] (default build/fuzz); CXX and PYTHON override clang++
# and python3 (whose include dir and pybind11 the native headers need). docs/DEVELOPING.md says
# how to run them.
#
# The targets link the front end's own sources, not the extension: each unit is compiled with
# -ffunction-sections and the link drops (--gc-sections, -z start-stop-gc) every function the
# target cannot reach, so the server's gRPC, Python and epoll code paths need not be linked.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/fuzz}
CXX=${CXX:-clang++}
PYTHON=${PYTHON:-python3}
NATIVE=serving/frontend/native
mkdir -p "$OUT/obj"

py_inc=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pybind_inc=$("$PYTHON" -c "import pybind11; print(pybind11.get_include())")
# shellcheck disable=SC2046  # pkg-config's flags are words
FLAGS=(-std=c++17 -O1 -gline-tables-only -fno-omit-frame-pointer
       -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -fsanitize-ignorelist=fuzz/ubsan_ignorelist.txt
       -fsanitize-address-globals-dead-stripping -ffunction-sections -fdata-sections
       -I "$NATIVE" -I fuzz -I "$py_inc" -I "$pybind_inc"
       $(pkg-config --cflags grpc++ RapidJSON))

compile() {  # source object
  "$CXX" "${FLAGS[@]}" -c "$1" -o "$OUT/obj/$2.o"
}
pids=()
compile "$NATIVE/wire.cc" wire & pids+=($!)
compile "$NATIVE/http_conn.cc" http_conn & pids+=($!)
compile fuzz/grpc_request_fuzz.cc grpc_request_fuzz & pids+=($!)
compile fuzz/http_infer_fuzz.cc http_infer_fuzz & pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done

link() {  # target objects...
  local target=$1
  shift
  "$CXX" -fsanitize=fuzzer,address,undefined -Wl,--gc-sections -Wl,-z,start-stop-gc \
    "${@/#/$OUT/obj/}" -o "$OUT/$target"
}
link grpc_request_fuzz grpc_request_fuzz.o wire.o
link http_infer_fuzz http_infer_fuzz.o http_conn.o wire.o
echo "built $OUT/grpc_request_fuzz $OUT/http_infer_fuzz"
