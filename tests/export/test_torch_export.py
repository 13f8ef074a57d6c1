"""export.torch in process: the op table against torch eager on a zoo of ops, embedding bags
(padded and with offsets), unsupported operators, the CUDA artifacts' embedding-bag kernels and
`xlaserve export-torch` on a .pt2 archive. Tolerance (float32, CPU): rtol 1e-5, atol 1e-6."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bundle import find_artifact, read_manifest  # noqa: E402
from demo.torch_models import TorchCtrConfig, TorchDLRM, TorchDCNv2, ctr_inputs  # noqa: E402
from export import ExportConfig  # noqa: E402
from export.torch import UnsupportedOperatorError, export_torch, lowered  # noqa: E402
from export.torch import cli, torch_program  # noqa: E402
from procutil import REPO_ROOT, child_env  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
TRITON = "__gpu$xla.gpu.triton"


def _run(model, args, rows=(2, 7)):
  """The lowered program jitted, against torch eager at several batch sizes (one capture)."""
  prog = torch_program(model, args)
  model.eval()  # what the capture ran (it leaves the module's mode as it found it)
  fn = jax.jit(lowered(prog))
  params = {k: jnp.asarray(v) for k, v in prog.params.items()}
  for n in rows:
    xs = [a.repeat(n // a.shape[0] + 1, *([1] * (a.dim() - 1)))[:n] for a in args]
    with torch.no_grad():
      want = model(*xs)
    got = fn(params, {i.name: jnp.asarray(x.numpy()) for i, x in zip(prog.inputs, xs)})
    wants = want if isinstance(want, tuple) else (want,)
    for w, g in zip(wants, got.values()):
      np.testing.assert_allclose(np.asarray(g), w.numpy(), rtol=RTOL, atol=ATOL, err_msg=str(n))
  return prog


class Zoo(torch.nn.Module):
  """Ops a ranking model is made of, beyond the demo models'."""

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm1d(6)
    self.ln = torch.nn.LayerNorm(6)
    self.lin = torch.nn.Linear(6, 6)
    with torch.no_grad():
      self.bn.running_mean.uniform_(-1, 1)
      self.bn.running_var.uniform_(0.5, 2)

  def forward(self, x, k):
    h = self.ln(torch.nn.functional.gelu(self.bn(x)))
    h = torch.nn.functional.leaky_relu(self.lin(h), 0.1) + torch.tanh(h) * torch.exp(-h.abs())
    top, idx = torch.topk(h, 3, dim=1)
    soft = torch.softmax(h, dim=-1) + torch.log_softmax(h, dim=-1).mean(dim=1, keepdim=True)
    g = torch.gather(h, 1, (k % 6)[:, None])  # [B, 1]
    pad = torch.nn.functional.pad(h[:, 1:4], (1, 2), value=0.5)
    cond = torch.where(h > 0, h, torch.zeros_like(h)).cumsum(dim=1)
    srt, order = torch.sort(h[:, :4], dim=1, descending=True)
    a, b, *_ = torch.unbind(h.reshape(-1, 3, 2), dim=1)  # [B, 2] each
    smooth = torch.nn.functional.softplus(a) + torch.nn.functional.elu(b)
    filled = h.masked_fill(h < -0.5, 0.25) * h.max()
    out = torch.cat([soft, pad, cond.clamp(max=3.0), g, top, idx.float(), srt, order.float(),
                     smooth, filled], dim=1)
    return out / (1.0 + h.var(dim=1, keepdim=True)), (k // 2) % 3


def test_op_zoo_matches_eager():
  torch.manual_seed(0)
  _run(Zoo(), (torch.randn(4, 6), torch.randint(0, 50, (4,))), rows=(7,))


class Bags(torch.nn.Module):
  """Padded bags (sum and mean, with padding_idx) and 1-D ids with offsets."""

  def __init__(self):
    super().__init__()
    self.sum = torch.nn.EmbeddingBag(30, 4, mode="sum", padding_idx=2)
    self.mean = torch.nn.EmbeddingBag(30, 4, mode="mean", padding_idx=0)
    self.weighted = torch.nn.EmbeddingBag(30, 4, mode="sum")

  def forward(self, ids):  # ids [B, 4]
    flat = ids.reshape(-1)
    rows = torch.arange(0, flat.shape[0], ids.shape[1])  # offsets of [B, 4] bags: recognised
    halves = torch.arange(0, flat.shape[0], 2)  # bags of 2 ids: 2B bags, the jnp lowering
    weights = (flat.float() + 1) / 10
    return torch.cat([self.sum(ids) + self.mean(ids) + self.mean(flat, rows),
                      self.weighted(flat, rows, per_sample_weights=weights),
                      self.mean(flat, halves).reshape(-1, 8),
                      self.sum(flat, halves).reshape(-1, 8)], dim=1)


def test_embedding_bags_match_eager_and_padded_ones_run_on_the_kernel():
  torch.manual_seed(1)
  ids = torch.randint(0, 30, (5, 4))
  ids[0] = 0  # an all-padding bag: mean is zero
  ids[1, :2] = 2
  prog = _run(Bags(), (ids,), rows=(5, 9))
  # Padded ids, and 1-D ids whose offsets are every row's start: the kernel. Weighted bags and
  # other offsets take the jnp lowering.
  assert prog.bag_rewrites == 3


def test_unsupported_operator_fails_the_export_naming_it(tmp_path):
  class Odd(torch.nn.Module):
    def forward(self, x):
      return torch.special.bessel_j0(x) + 1

  with pytest.raises(UnsupportedOperatorError, match=r"aten\.special_bessel_j0\.default") as e:
    export_torch(Odd(), (torch.randn(2, 3),), repository=tmp_path, name="odd")
  assert "bessel_j0(x)" in str(e.value)  # the model line that calls it
  assert not (tmp_path / "odd").exists()  # nothing written


def test_a_fixed_batch_is_refused():
  with pytest.raises(ValueError, match="batch"):
    torch_program(torch.nn.Linear(3, 1), (torch.randn(1, 3),))


@pytest.mark.parametrize("model_cls,bags", [
    (TorchDLRM, True), pytest.param(TorchDCNv2, False, marks=pytest.mark.slow)])
def test_cuda_artifacts_run_the_lookups_on_the_embedding_bag_kernel(tmp_path, model_cls, bags):
  cfg = TorchCtrConfig.tiny()
  torch.manual_seed(0)
  path = export_torch(model_cls(cfg), ctr_inputs(cfg, 3, bags=bags), repository=tmp_path,
                      name="ctr", config=ExportConfig(batch_buckets=(1, 8),
                                                      platforms=("cpu", "cuda")))
  sig = read_manifest(path).signatures["serve"]
  assert sorted(sig.artifacts) == ["cpu", "cuda@b1", "cuda@b8"]
  for bucket in (1, 8):
    text = jax.export.deserialize(bytearray(
        (path / find_artifact(sig.artifacts, "cuda", batch=bucket)).read_bytes())).mlir_module()
    assert text.count(f"stablehlo.custom_call @{TRITON}") == len(cfg.table_rows), bucket
  cpu = jax.export.deserialize(bytearray((path / sig.artifacts["cpu"]).read_bytes()))
  assert TRITON not in cpu.mlir_module()


def test_export_torch_command_writes_a_bundle_from_a_pt2_archive(tmp_path, capsys):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
  batch = torch.export.Dim("batch", min=1)
  torch.export.save(torch.export.export(model, (torch.randn(3, 4),),
                                        dynamic_shapes=({0: batch},)), tmp_path / "m.pt2")
  torch.export.save(torch.export.export(model, (torch.randn(3, 4),)), tmp_path / "fixed.pt2")
  repo = str(tmp_path / "repo")
  assert cli.main([str(tmp_path / "m.pt2"), "--name", "mlp", "--repository", repo,
                   "--batch-buckets", "1,4", "--output-names", "logits"]) == 0
  assert capsys.readouterr().out.strip().endswith("mlp/1")
  manifest = read_manifest(tmp_path / "repo" / "mlp" / "1")
  assert manifest.batch_buckets == (1, 4) and manifest.extra["source"] == "torch"
  assert [o.name for o in manifest.signatures["serve"].outputs] == ["logits"]
  # An archive captured without a dynamic batch is refused, nothing written.
  assert cli.main([str(tmp_path / "fixed.pt2"), "--name", "fixed", "--repository", repo]) == 2
  assert "dynamic batch" in capsys.readouterr().err
  assert not (tmp_path / "repo" / "fixed").exists()


def test_xlaserve_hands_export_torch_to_the_exporter_process():
  """`xlaserve export-torch` runs `python -m export.torch.cli`: its own flags and help."""
  out = subprocess.run([sys.executable, "-m", "serving.cli", "export-torch", "--help"],
                       capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                       env=child_env())
  assert out.returncode == 0, out.stderr
  assert "usage: xlaserve export-torch" in out.stdout and "--batch-buckets" in out.stdout
  assert "export-torch" in subprocess.run(
      [sys.executable, "-m", "serving.cli", "--help"], capture_output=True, text=True,
      timeout=120, cwd=REPO_ROOT, env=child_env()).stdout


def test_an_onnx_operator_without_a_lowering_fails_the_export_naming_it(tmp_path):
  pytest.importorskip("jaxonnxruntime")
  from export.onnx_export import export_onnx

  class Remainder(torch.nn.Module):
    def forward(self, ids):
      return ids % 7

  onnx_file = tmp_path / "mod.onnx"
  torch.onnx.export(Remainder(), (torch.randint(0, 50, (2, 3)),), str(onnx_file), dynamo=False,
                    input_names=["ids"], dynamic_axes={"ids": {0: "batch"}})
  with pytest.raises(UnsupportedOperatorError, match="Mod"):
    export_onnx(onnx_file, repository=tmp_path, name="mod")
  assert not (tmp_path / "mod").exists()


def test_a_sequence_dimension_is_exported_per_sequence_bucket(tmp_path):
  """seq_dims: the token dimension varies; each sequence bucket gets its artifact, and a
  shorter request padded up to its bucket scores like torch eager on the unpadded rows."""
  from bundle import restore_params
  from demo.torch_models import TorchEncoderScorer, token_inputs

  torch.manual_seed(0)
  model = TorchEncoderScorer(vocab=50, seq=16, dim=8, heads=2, layers=1)
  ids, lengths = token_inputs(3, vocab=50, seq=10)
  path = export_torch(model, (ids, lengths), repository=tmp_path, name="enc",
                      seq_dims={"token_ids": 1},
                      config=ExportConfig(batch_buckets=(1, 4), seq_buckets=(8, 16)))
  manifest = read_manifest(path)
  sig = manifest.signatures["serve"]
  assert [(t.name, t.dims) for t in sig.inputs] == [("token_ids", ("batch", "seq")),
                                                   ("lengths", ("batch",))]
  params = restore_params(path, manifest)
  model.eval()
  for length, bucket in ((5, 8), (8, 8), (13, 16)):
    ids, lengths = token_inputs(4, vocab=50, seq=length, seed=length)
    padded = np.zeros((4, bucket), np.int32)
    padded[:, :length] = ids.numpy()
    exp = jax.export.deserialize(bytearray(
        (path / find_artifact(sig.artifacts, "cpu", batch=4, seq=bucket)).read_bytes()))
    got = exp.call(params, {"token_ids": padded, "lengths": lengths.numpy().astype(np.int32)})
    with torch.no_grad():
      want = model(ids, lengths).numpy()
    np.testing.assert_allclose(np.asarray(got["output"]), want, rtol=RTOL, atol=ATOL,
                               err_msg=f"length {length} in bucket {bucket}")
