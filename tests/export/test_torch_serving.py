"""PyTorch models exported with `export.torch.export_torch` (and one through ONNX), served by `xlaserve serve` (a real
server process over gRPC, unmodified tritonclient) and compared with torch eager on the same
rows: across bucket boundaries and requests split over batches. The server process never loads
torch. Tolerance (float32, CPU): rtol 1e-5, atol 1e-6.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

torch = pytest.importorskip("torch")

from clientutil import assert_served_like, call_concurrently, infer  # noqa: E402
from demo.torch_models import (TorchCtrConfig, TorchDCNv2, TorchDLRM,  # noqa: E402
                               TorchEncoderScorer, ctr_inputs, token_inputs)
from export import ExportConfig, read_manifest  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.torch import export_torch  # noqa: E402
from procutil import serve  # noqa: E402

BUCKETS = (1, 4, 16)
ROWS = (1, 3, 4, 5, 16, 17, 40)  # each bucket, past each boundary, split over 3 batches
RTOL, ATOL = 1e-5, 1e-6
SEQ, VOCAB = 12, 100


def _models() -> dict[str, tuple[torch.nn.Module, callable]]:
  """name -> (model, rows(n, seed) -> inputs as torch tensors)."""
  torch.manual_seed(0)
  cfg = TorchCtrConfig.tiny()
  return {
      "torch_dlrm": (TorchDLRM(cfg), lambda n, seed: ctr_inputs(cfg, n, bags=True, seed=seed)),
      "torch_dcn": (TorchDCNv2(cfg), lambda n, seed: ctr_inputs(cfg, n, bags=False, seed=seed)),
      "torch_encoder": (TorchEncoderScorer(vocab=VOCAB, seq=SEQ, dim=16, heads=2, layers=2),
                        lambda n, seed: token_inputs(n, vocab=VOCAB, seq=SEQ, seed=seed)),
  }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("torch_repo")
  models = _models()
  for name, (model, rows) in models.items():
    export_torch(model, rows(3, seed=0), repository=repo, name=name, output_names=["score"],
                 config=ExportConfig(batch_buckets=BUCKETS))
  # The DCN again through ONNX (torch's TorchScript-based ONNX exporter, then jaxonnxruntime).
  dcn, rows = models["torch_dcn"]
  onnx_file = repo.parent / "dcn.onnx"
  torch.onnx.export(dcn.eval(), rows(3, seed=0), str(onnx_file), dynamo=False,
                    input_names=["dense", "sparse"], output_names=["score"],
                    dynamic_axes={"dense": {0: "batch"}, "sparse": {0: "batch"}})
  export_onnx(onnx_file, repository=repo, name="onnx_dcn",
              config=ExportConfig(batch_buckets=BUCKETS))
  models["onnx_dcn"] = models["torch_dcn"]
  proc = serve(["--model-repository", str(repo), "--grpc-port", "0", "--http-port", "-1",
                "--metrics-port", "-1", "--compile-cache", "none"])
  try:
    yield proc, models, repo
  finally:
    proc.kill()


def _eager(model: torch.nn.Module, **inputs: np.ndarray) -> dict[str, np.ndarray]:
  model.eval()
  with torch.no_grad():
    return {"score": model(*(torch.from_numpy(v) for v in inputs.values())).numpy()}


@pytest.mark.parametrize("name", ["torch_dlrm", "torch_dcn", "torch_encoder", "onnx_dcn"])
def test_served_equals_torch_eager(served, name):
  proc, models, repo = served
  model, rows = models[name]
  names = [i.name for i in read_manifest(repo / name / "1").signatures["serve"].inputs]
  cases = [dict(zip(names, (t.numpy() for t in rows(n, seed=n)))) for n in ROWS]
  with tc.InferenceServerClient(proc.address) as client:
    assert assert_served_like(client, name, cases, lambda **kw: _eager(model, **kw),
                              rtol=RTOL, atol=ATOL) == len(ROWS)


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows(served):
  proc, models, _ = served
  model, rows = models["torch_dlrm"]
  cases = [tuple(t.numpy() for t in rows(n, seed=100 + i)) for i, n in enumerate(
      [1, 2, 3, 5, 7, 9, 11, 13, 15, 20, 2, 1])]
  got = call_concurrently(proc.address, lambda c, d, s: infer(
      c, "torch_dlrm", {"dense": d, "sparse": s}, ["score"])["score"], cases)
  for (d, s), g in zip(cases, got):
    np.testing.assert_allclose(g, _eager(model, dense=d, sparse=s)["score"], rtol=RTOL,
                               atol=ATOL)


def test_manifest_records_the_torch_source_and_the_kernel_rewrites(served):
  _, _, repo = served
  extra = {n: read_manifest(repo / n / "1").extra for n in ("torch_dlrm", "torch_dcn")}
  assert extra["torch_dlrm"]["source"] == "torch"
  assert extra["torch_dlrm"]["embedding_bags_on_kernel"] == len(TorchCtrConfig.tiny().table_rows)
  assert extra["torch_dcn"]["embedding_bags_on_kernel"] == 0  # nn.Embedding: no bag to rewrite
  sig = read_manifest(repo / "torch_dlrm" / "1").signatures["serve"]
  assert [(t.name, t.dtype, t.shape) for t in sig.inputs] == [
      ("dense", "float32", (-1, 5)), ("sparse", "int64", (-1, 3, 3))]


def _mapped_libraries(pid: int) -> str:
  return pathlib.Path(f"/proc/{pid}/maps").read_text()


def test_the_server_process_never_loads_torch(served):
  proc, _, _ = served
  import os
  assert "libtorch" in _mapped_libraries(os.getpid())  # the check sees torch where it is loaded
  maps = _mapped_libraries(proc.p.pid)
  assert "libjax" in maps or "xla_extension" in maps or "jaxlib" in maps  # it is the server
  assert "libtorch" not in maps and "site-packages/torch/" not in maps


def test_bad_input_is_invalid_argument_and_the_model_keeps_serving(served):
  proc, models, _ = served
  model, rows = models["torch_dcn"]
  dense, sparse = (t.numpy() for t in rows(2, seed=1))
  with tc.InferenceServerClient(proc.address) as client:
    with pytest.raises(InferenceServerException) as e:  # wrong feature count
      infer(client, "torch_dcn", {"dense": dense[:, :4], "sparse": sparse})
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert assert_served_like(client, "torch_dcn", [{"dense": dense, "sparse": sparse}],
                              lambda **kw: _eager(model, **kw), rtol=RTOL, atol=ATOL) == 1
