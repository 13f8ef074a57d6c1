"""The generated protocol modules are reproducible and wire-identical to tritonclient's."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_regenerating_protos_reproduces_committed_modules(tmp_path):
  subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
                 check=True, capture_output=True)
  committed = ROOT / "serving" / "frontend" / "protocol"
  names = sorted(p.name for p in tmp_path.glob("*.py"))
  assert names == ["grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "model_config_pb2.py",
                   "model_config_pb2_grpc.py"]
  for name in names:
    assert (tmp_path / name).read_text() == (committed / name).read_text(), name


def test_descriptors_match_tritonclient():
  import tritonclient.grpc.model_config_pb2 as tc_mc
  import tritonclient.grpc.service_pb2 as tc_svc

  from serving.frontend.protocol import grpc_service_pb2, model_config_pb2

  assert grpc_service_pb2.DESCRIPTOR.serialized_pb == tc_svc.DESCRIPTOR.serialized_pb
  assert model_config_pb2.DESCRIPTOR.serialized_pb == tc_mc.DESCRIPTOR.serialized_pb
  methods = {m.name for m in grpc_service_pb2.DESCRIPTOR.services_by_name[
      "GRPCInferenceService"].methods}
  assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
          "ModelConfig", "ModelStatistics", "ModelInfer", "ModelStreamInfer",
          "RepositoryIndex"} <= methods
