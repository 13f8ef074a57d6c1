"""A compile cache folder that cannot be used is no reason not to serve: `xlaserve serve` with
`--compile-cache` under a regular file (so the folder cannot be made, even by root) starts, says
why it serves without the cache and what to do, and answers correctly (numpy reference)."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as tg

from procutil import serve

RNG = np.random.default_rng(7)
W = RNG.integers(-4, 5, size=(8, 3)).astype(np.float32)  # integers: x @ W is exact in f32


def test_unusable_compile_cache_still_serves(tmp_path):
  import jax.numpy as jnp

  import export

  export.export_model(lambda p, inputs: {"y": jnp.dot(inputs["x"], p["w"])}, params={"w": W},
                      repository=tmp_path / "repo", name="affine",
                      inputs=[export.Input("x", "float32", ("batch", 8))],
                      config=export.ExportConfig(batch_buckets=(1, 4)))
  blocker = tmp_path / "not-a-folder"
  blocker.write_text("a file where the cache folder's parent should be")
  proc = serve(["--model-repository", str(tmp_path / "repo"), "--grpc-port", "0",
                "--http-port", "-1", "--metrics-port", "-1",
                "--compile-cache", str(blocker / "cache")])
  try:
    x = RNG.integers(-5, 6, size=(3, 8)).astype(np.float32)
    i = tg.InferInput("x", [3, 8], "FP32")
    i.set_data_from_numpy(x)
    with tg.InferenceServerClient(proc.address) as c:
      np.testing.assert_array_equal(c.infer("affine", [i]).as_numpy("y"), x @ W)
  finally:
    proc.kill()
  text = proc.text
  assert f"compile cache {blocker / 'cache'} is unusable" in text, text
  assert "--compile-cache none" in text and "Traceback" not in text, text
