"""TLS and bearer-token auth against the real server, with tritonclient and raw gRPC stubs."""

from __future__ import annotations

import pathlib

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from certutil import write_cert
from clientutil import assert_served_like
from procutil import run_cli
from serving.frontend import auth
from serving.frontend import native as native_frontend
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.server import ServerConfig
from servingutil import expected, mock_factory, mock_reference, mock_request, outputs, rpc_code, \
    serving, wait_until

NATIVE, WHY = native_frontend.load_extension()

TOKEN = "s3cr3t-Token_42"


def _triton_infer(client, n=2, **kw):
  x = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
  k = np.full((n, 1), 2, np.int32)
  assert assert_served_like(client, "mock", [{"x": x, "k": k}], mock_reference, **kw) == 1


def test_tls_with_tritonclient(mock_repo, cert_files):
  cert, key = cert_files
  with serving(mock_repo, mock_factory(), tls_cert_file=cert, tls_key_file=key) as bg:
    with tc.InferenceServerClient(bg.address, ssl=True, root_certificates=cert) as c:
      assert c.is_server_ready() and c.is_model_ready("mock")
      _triton_infer(c)
    # A plaintext client cannot talk to a TLS port.
    with grpc.insecure_channel(bg.address) as ch:
      code = rpc_code(pb_grpc.GRPCInferenceServiceStub(ch).ServerLive, pb.ServerLiveRequest(),
                      timeout=5)
      assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.skipif(NATIVE is None, reason=WHY)
def test_a_renewed_certificate_serves_new_connections_without_a_restart(mock_repo, tmp_path):
  cert, key = write_cert(tmp_path / "tls")
  old = tmp_path / "old.pem"
  old.write_bytes(pathlib.Path(cert).read_bytes())
  with serving(mock_repo, mock_factory(), tls_cert_file=cert, tls_key_file=key,
               tls_reload_s=1) as bg:
    assert bg.server.frontend == "native"  # the native server terminates TLS itself

    def live(root: pathlib.Path) -> bool:
      try:
        with tc.InferenceServerClient(bg.address, ssl=True, root_certificates=str(root)) as c:
          return c.is_server_live(client_timeout=5)
      except InferenceServerException:
        return False

    assert live(old)
    write_cert(tmp_path / "tls")  # renewed in place: a new key and certificate
    new = pathlib.Path(cert)
    assert wait_until(lambda: live(new), timeout=10)  # no restart
    assert not live(old)  # new connections get only the new certificate
    with tc.InferenceServerClient(bg.address, ssl=True, root_certificates=str(new)) as c:
      _triton_infer(c)


def test_bearer_token_guards_every_model_rpc_and_does_no_model_work(mock_repo):
  engines = {}
  with serving(mock_repo, mock_factory(engines), auth_token=TOKEN) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    x, k = np.ones((2, 4), np.float32), np.ones((2, 1), np.int32)
    guarded = [
        (stub.ModelInfer, mock_request(x, k)),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="mock")),
        (stub.ModelConfig, pb.ModelConfigRequest(name="mock")),
        (stub.ModelReady, pb.ModelReadyRequest(name="mock")),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name="mock")),
        (stub.ServerMetadata, pb.ServerMetadataRequest()),
        (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="mock")),
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="mock")),
        (stub.ModelInfer, mock_request(x, k, model="no-such-model")),
    ]
    wrong = [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
             (("authorization", f"Basic {TOKEN}"),), (("x-api-key", TOKEN),),
             (("authorization", f"Bearer {TOKEN}x"),)]
    for fn, req in guarded:
      for md in wrong:
        code = rpc_code(fn, req, metadata=md)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (fn, md, code)
    # Streaming methods are refused the same way.
    responses = stub.ModelStreamInfer(iter([mock_request(x, k)]))
    with pytest.raises(grpc.RpcError) as e:
      list(responses)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Nothing reached a model: no batch ran, no request was counted, nothing was unloaded.
    assert engines[("mock", 1)].batches == []
    assert bg.server.repository.get("mock").runner.stats.inference_count == 0
    assert bg.server.auth.denied == len(guarded) * len(wrong) + 1
    # Liveness, readiness and grpc.health stay open for probes.
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    # With the token everything works (the scheme is case-insensitive, as in RFC 6750).
    for value in (f"Bearer {TOKEN}", f"bearer {TOKEN}"):
      md = (("authorization", value),)
      resp = stub.ModelInfer(mock_request(x, k), metadata=md)
      np.testing.assert_array_equal(outputs(resp)["y"], expected(x, k)[0])
      assert stub.ModelReady(pb.ModelReadyRequest(name="mock"), metadata=md).ready


def test_tls_and_token_together_with_tritonclient(mock_repo, cert_files):
  cert, key = cert_files
  with serving(mock_repo, mock_factory(), tls_cert_file=cert, tls_key_file=key,
               auth_token=TOKEN) as bg:
    with tc.InferenceServerClient(bg.address, ssl=True, root_certificates=cert) as c:
      assert c.is_server_live()
      with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|credentials"):
        _triton_infer(c)
      _triton_infer(c, headers={"authorization": f"Bearer {TOKEN}"})
      md = c.get_model_metadata("mock", headers={"authorization": f"Bearer {TOKEN}"})
      assert md.name == "mock"


def test_token_sources_and_validation(tmp_path):
  f = tmp_path / "token"
  f.write_text(f"  {TOKEN}\n")
  assert auth.load_token(f, environ={}) == TOKEN
  assert auth.load_token(None, environ={auth.TOKEN_ENV: TOKEN}) == TOKEN
  assert auth.load_token(None, environ={}) is None
  with pytest.raises(ValueError, match="use one"):
    auth.load_token(f, environ={auth.TOKEN_ENV: TOKEN})
  with pytest.raises(ValueError, match="cannot read"):
    auth.load_token(tmp_path / "missing", environ={})
  for bad in ("", "two words", "tab\there", "caf\u00e9"):
    with pytest.raises(ValueError):
      auth.check_token(bad)
  assert TOKEN not in repr(ServerConfig(model_repository=".", auth_token=TOKEN))
  with pytest.raises(ValueError, match="both a certificate and a key"):
    ServerConfig(model_repository=".", tls_cert_file="cert.pem")


def test_cli_takes_no_token_on_the_command_line(tmp_path):
  p = run_cli("--auth-token", TOKEN)  # no such flag, and no abbreviation of --auth-token-file
  assert p.returncode == 2 and "unrecognized arguments" in p.stderr
  p = run_cli("--model-repository", str(tmp_path), "--auth-token-file", str(tmp_path / "missing"))
  assert p.returncode == 2 and "cannot read the auth token file" in p.stderr
  help_text = run_cli("--help").stdout
  assert "--auth-token-file" in help_text and "XLASERVE_AUTH_TOKEN" in help_text
