"""Faults injected into a real `xlaserve serve` process, one start for all of them: a compile
cache folder that cannot be made (under a regular file, so even root cannot), a bundle whose
StableHLO file is truncated, and a bundle exported by a newer jax. The server starts, says why it
serves without the cache and what to do; each broken model is UNAVAILABLE with a reason that names
the problem (ModelIndex and the error of a request to it); the good model answers correctly
(numpy reference) throughout, and the example call the start-up line prints works on it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from procutil import serve

RNG = np.random.default_rng(7)
W = RNG.integers(-4, 5, size=(8, 3)).astype(np.float32)  # integers: x @ W is exact in f32


def _export(repo) -> None:
  """`affine` (y = x @ W), and two broken copies of it: `truncated`, `newjax`."""
  import jax.numpy as jnp

  import export

  export.export_model(lambda p, inputs: {"y": jnp.dot(inputs["x"], p["w"])}, params={"w": W},
                      repository=repo, name="affine",
                      inputs=[export.Input("x", "float32", ("batch", 8))],
                      config=export.ExportConfig(batch_buckets=(1, 4)))
  for name in ("truncated", "newjax"):
    shutil.copytree(repo / "affine", repo / name)
    manifest = repo / name / "1" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "name": name}))
  for f in (repo / "truncated" / "1").glob("*.jaxexport"):
    f.write_bytes(f.read_bytes()[:100])
  manifest = repo / "newjax" / "1" / "manifest.json"
  manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "jax_version": "99.0.0"}))


def _infer(c: tg.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
  i = tg.InferInput("x", list(x.shape), "FP32")
  i.set_data_from_numpy(x)
  return c.infer(model, [i]).as_numpy("y")


def test_faults_leave_the_server_serving(tmp_path):
  _export(tmp_path / "repo")
  blocker = tmp_path / "not-a-folder"
  blocker.write_text("a file where the cache folder's parent should be")
  proc = serve(["--model-repository", str(tmp_path / "repo"), "--grpc-port", "0",
                "--http-port", "-1", "--metrics-port", "-1",
                "--compile-cache", str(blocker / "cache")])
  try:
    x = RNG.integers(-5, 6, size=(3, 8)).astype(np.float32)
    with tg.InferenceServerClient(proc.address) as c:
      np.testing.assert_array_equal(_infer(c, "affine", x), x @ W)
      index = {m["name"]: m for m in c.get_model_repository_index(as_json=True)["models"]}
      for model, needle in (("truncated", "cannot deserialize StableHLO"),
                            ("newjax", "exported with jax 99.0.0, newer than this server's jax")):
        assert index[model]["state"] == "UNAVAILABLE" and needle in index[model]["reason"], index
        assert not c.is_model_ready(model)
        with pytest.raises(InferenceServerException) as e:
          _infer(c, model, x)
        assert e.value.status() == "StatusCode.UNAVAILABLE" and needle in e.value.message()
      np.testing.assert_array_equal(_infer(c, "affine", x), x @ W)
    # The start-up line's example call works, on a model that is served.
    example = re.search(r"try it: (python -c .*)$", proc.text, re.M).group(1)
    assert "'affine'" in example, example
    out = subprocess.run(["bash", "-c", example.replace("python ", f"{sys.executable} ", 1)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "'y': array(" in out.stdout, (out.stdout, out.stderr)
  finally:
    proc.kill()
  text = proc.text
  assert f"compile cache {blocker / 'cache'} is unusable" in text, text
  assert "--compile-cache none" in text and "Traceback" not in text, text
