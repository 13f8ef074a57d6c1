#!/bin/bash
# Runs the checks that need a CUDA GPU on a lent machine (its own python3, jax and CUDA), logs under $OUT.
#
#   bash tools/gpu_check.sh [tests|kernels|tune|serve|native|quick|pipeline|slo|more]...   (default: tests kernels)
#
# The machine has no network: wheels it lacks (tritonclient, grpcio-health-checking) travel in .whl/
# (see docs/DEVELOPING.md, "On a lent GPU"). Our pins are for the CPU machines; here we use the image's jax.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
steps=${*:-tests kernels}
native_env() {  # grpc++ and RapidJSON from the carried Debian packages (.gdeb/), for setup.py and the C++ load generator
  mkdir -p /tmp/g; for f in .gdeb/*.deb; do dpkg -x "$f" /tmp/g; done
  L=/tmp/g/usr/lib/x86_64-linux-gnu
  # Debian's libz.so points at /lib/...libz.so.1.2.13 by an absolute path: point it into /tmp/g
  [ -e /tmp/g/lib/x86_64-linux-gnu/libz.so.1 ] && ln -sf /tmp/g/lib/x86_64-linux-gnu/libz.so.1 $L/libz.so
  export PATH=/tmp/site/bin:/tmp/g/usr/bin:$PATH PKG_CONFIG_PATH=$L/pkgconfig:/tmp/g/usr/share/pkgconfig \
    PKG_CONFIG_SYSROOT_DIR=/tmp/g CPATH=/tmp/g/usr/include LIBRARY_PATH=$L:/tmp/g/lib/x86_64-linux-gnu \
    LD_LIBRARY_PATH=$L:${LD_LIBRARY_PATH:-}
}
demo_bundles() {  # the demo DLRM and light CTR model, exported for CPU and CUDA
  [ -e /tmp/repo/ctr_light/1/manifest.json ] || timeout 200 python3 -c "import pathlib
from demo.repository import build_ctr_light, build_dlrm
build_dlrm(pathlib.Path('/tmp/repo'), platforms=('cpu', 'cuda'))
build_ctr_light(pathlib.Path('/tmp/repo'), platforms=('cpu', 'cuda'))" 2>&1 | tail -2
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 - <<'EOF'
import importlib
for m in ("jax", "jaxlib", "flax", "orbax.checkpoint", "grpc", "google.protobuf", "numpy", "triton", "tritonclient"):
  try:
    mod = importlib.import_module(m)
    print(f"{m:18s} {getattr(mod, '__version__', '?')}")
  except Exception as e:  # noqa: BLE001
    print(f"{m:18s} MISSING ({e})")
import jax
print("devices:", jax.devices(), [d.device_kind for d in jax.devices()])
EOF
for step in $steps; do
  echo "=== $step"
  case $step in
    tests)  # the compiled-kernel classes (skipped on CPU) and everything else that runs here
      timeout 420 python3 -m pytest -q -p no:cacheprovider -n 6 -k "not Interpret" \
        ${TESTS:-tests/pallas_kernels tests/export/test_cuda_export.py} 2>&1 | tee -a "$OUT/run.log" | tail -60 ;;
    kernels)
      timeout 300 python3 benchmarks/kernels.py --out "$OUT/kernels" 2>&1 | tee -a "$OUT/run.log" | tail -60 ;;
    tune)  # --quick: one tuned shape per family (a full --tune times 126 candidates; run it alone)
      timeout 300 python3 benchmarks/kernels.py --tune --quick --out "$OUT/kernels" 2>&1 | tee -a "$OUT/run.log" | tail -40
      cp pallas_kernels/tuned_block_sizes.py "$OUT/" ;;
    serve)  # the demo DLRM exported for CUDA, served; benchmarks/serving.py, then perf_analyzer
      export PATH=/tmp/site/bin:$PATH
      timeout 200 python3 -c "import pathlib, logging; logging.basicConfig(level=logging.INFO)
from demo.repository import build_ctr_light, build_dlrm
build_dlrm(pathlib.Path('/tmp/repo'), platforms=('cpu', 'cuda'))
build_ctr_light(pathlib.Path('/tmp/repo'), platforms=('cpu', 'cuda'))" 2>&1 | tail -5
      timeout 200 python3 benchmarks/serving.py --saturation-concurrency 32,128 --repository /tmp/repo --model dlrm,ctr_light --duration 6 --processes 4 --protocol grpc --pairs 2 \
        --out "$OUT/serving" 2>&1 | tee -a "$OUT/run.log" | tail -30
      python3 -m serving.cli serve --model-repository /tmp/repo --grpc-port 18001 --metrics-port -1 \
        > /tmp/server.log 2>&1 &
      for _ in $(seq 120); do grep -q "try it:" /tmp/server.log && break; sleep 1; done
      timeout 100 bash benchmarks/perf_analyzer.sh -m dlrm -u 127.0.0.1:18001 -i grpc -b 32 \
        --concurrency-range 1:16:4 2>&1 | tee -a "$OUT/run.log" | tail -14
      timeout 40 bash benchmarks/perf_analyzer.sh -m dlrm -u 127.0.0.1:18001 -i grpc -b 1 \
        --concurrency-range 16:16 --percentile 99 2>&1 | tee -a "$OUT/run.log" | tail -8
      tail -5 /tmp/server.log; kill %1 ;;
    debug)
      python3 - <<'PY'
import jax, jax.numpy as jnp
from pallas_kernels import quantize
from pallas_kernels.quantized_matmul import quantized_matmul_reference
x = jnp.array([[127.0, -63.5], [0.0, 0.0]])
x_q, s = quantize.quantize_activations_int8(x)
print("amax/scale", s, "codes", x_q)
w_q = jnp.array([[1, 2], [2, -1]], jnp.int8)
print("int dot", jnp.dot(x_q, w_q, preferred_element_type=jnp.int32))
print("ref", quantized_matmul_reference(x, w_q, jnp.array([1.0, 0.5]), mode="w8a8"))
print("jit quantize", jax.jit(quantize.quantize_activations_int8)(x))
PY
      ;;
    native)  # build the native front end from carried Debian grpc++ packages (.gdeb/), then measure
      native_env
      XLASERVE_REQUIRE_NATIVE=1 timeout 240 python3 setup.py -q build_ext --inplace -j 8 2>&1 | tail -5
      python3 -c "import serving.frontend._native; print('native front end built')" || exit 1
      demo_bundles
      timeout 240 python3 benchmarks/serving.py --saturation-concurrency 32,128 --repository /tmp/repo --model dlrm,ctr_light --frontend ${FRONTENDS:-both} --duration 5 --protocol grpc --pairs 2 \
        --processes 6 --out "$OUT/serving" 2>&1 | tee -a "$OUT/run.log" | tail -40
      if [ -z "${NO_PA:-}" ]; then
        python3 -m serving.cli serve --model-repository /tmp/repo --grpc-port 18002 --metrics-port -1 \
          --frontend native > /tmp/server_native.log 2>&1 &
        for _ in $(seq 120); do grep -q "try it:" /tmp/server_native.log && break; sleep 1; done
        timeout 90 bash benchmarks/perf_analyzer.sh -m dlrm -u 127.0.0.1:18002 -i grpc -b 32 -p 2000 -s 30 \
          --concurrency-range 1:16:5 2>&1 | tee -a "$OUT/run.log" | grep -E "concurrency:|Throughput|p99 lat"
        timeout 40 bash benchmarks/perf_analyzer.sh -m dlrm -u 127.0.0.1:18002 -i grpc -b 1 -p 2000 -s 30 \
          --concurrency-range 16:16 --percentile 99 2>&1 | tee -a "$OUT/run.log" | grep -E "concurrency:|Throughput|p99 lat"
        timeout 40 bash benchmarks/perf_analyzer.sh -m dlrm -u 127.0.0.1:18002 -i grpc -b 32 -p 3000 -s 30 \
          --request-rate-range ${RATE:-1600}:${RATE:-1600} --percentile 99 2>&1 | tee -a "$OUT/run.log" \
          | grep -E "Request Rate:|Throughput|p50 lat|p99 lat|error|fail"
        tail -8 /tmp/server_native.log
        kill %1
      fi ;;
    quick)  # one lease: kernel tests while the native front end builds and the bundles export,
      # then the serving benchmark alone on the quiet machine, then the light model without CUDA graphs
      native_env
      ( XLASERVE_REQUIRE_NATIVE=1 timeout 300 python3 setup.py -q build_ext --inplace -j 10 > "$OUT/build.log" 2>&1
        demo_bundles > "$OUT/export.log" 2>&1 ) &
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -n 5 -k "not Interpret" \
        ${TESTS:-tests/pallas_kernels tests/export/test_cuda_export.py} 2>&1 | tee -a "$OUT/run.log" | tail -25
      wait; tail -3 "$OUT/build.log" "$OUT/export.log"
      python3 -c "import serving.frontend._native; print('native front end built')" || exit 1
      timeout 320 python3 benchmarks/serving.py --saturation-concurrency 32,128 --repository /tmp/repo --model dlrm,ctr_light --duration 4 --protocol grpc,http --pairs 2 \
        --processes 6 --out "$OUT/serving" 2>&1 | tee -a "$OUT/run.log" | tail -32
      timeout 100 python3 benchmarks/serving.py --saturation-concurrency 32,128 --repository /tmp/repo --model ctr_light --duration 4 --protocol grpc --pairs 1 \
        --processes 6 --server-args=--no-gpu-graphs --out "$OUT/nographs" 2>&1 | tee -a "$OUT/run.log" | tail -14 ;;
    pipeline)  # the demo retrieval -> ranking pipeline, tensors handed over on the device, then via the host
      [ -e /tmp/prepo/ads_pipeline/1/manifest.json ] || timeout 300 python3 -c "import pathlib
from demo.ads import build_ad_index, build_ads_pipeline
from demo.models import build_ranker, build_two_tower
for b in (build_two_tower, build_ranker, build_ad_index, build_ads_pipeline):
  b(pathlib.Path('/tmp/prepo'), platforms=('cpu', 'cuda'))" 2>&1 | tail -2
      for h in device host; do
        timeout 150 python3 benchmarks/pipeline.py --repository /tmp/prepo --handoff $h --seconds 4 --rounds 1 \
          --concurrency 16,32 --out "$OUT/pipeline_$h" 2>&1 | tee -a "$OUT/run.log" | tail -12
      done ;;
    slo)  # issue 16's LoadGen figure with the harness off the servers' cores: both CPU servers on
      # cores 0-1 (as on the 2-core machines), LoadGen and its client on 2-7 (needs the native front
      # end built by `native` or `quick`, and mlcommons_loadgen's wheel in .whl/)
      native_env; demo_bundles
      JAX_PLATFORMS=cpu timeout ${SLO_TIMEOUT:-420} python3 benchmarks/slo.py --repository /tmp/repo --rows 1 \
        --steps 4 --trials 2 --server-cpus 0,1 --harness-cpus 2-7 --out "$OUT/slo" 2>&1 | tee -a "$OUT/run.log" | tail -24 ;;
    more)  # model, export and end-to-end serving tests, on the GPU
      timeout ${MORE_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n 8 -x --timeout 120 \
        tests/models tests/export tests/serving/test_dlrm_e2e.py 2>&1 | tee -a "$OUT/run.log" | tail -40 ;;
    *) echo "unknown step $step" ;;
  esac
done
