"""Triton's metadata answers for a served version, built from its runner's declared surface:
ModelMetadata (tensors) and ModelConfig (batch dims implicit, buckets as preferred sizes,
instances, decoupled policy; a context model's context and candidate inputs as parameters)."""

from __future__ import annotations

from bundle import BY_TRITON, TensorSpec
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import model_config_pb2 as mc
from serving.repository import ServedVersion
from serving.runners import Runner
from serving.types import Code, ServingError

PLATFORM = "xlaserve_jax"


def config_type(datatype: str) -> int:
  """Triton model_config DataType of a wire datatype name (from the one datatype table)."""
  return mc.DataType.Value(BY_TRITON[datatype].config_type)


def _tensor_metadata(specs: tuple[TensorSpec, ...]) -> list:
  return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                  shape=list(t.shape)) for t in specs]


def model_metadata(rec: ServedVersion, runner: Runner, versions: list[str]) -> pb.ModelMetadataResponse:
  """ModelMetadata: the served tensors with -1 for bucketed dimensions."""
  return pb.ModelMetadataResponse(name=rec.name, versions=versions, platform=PLATFORM,
                                  inputs=_tensor_metadata(runner.inputs),
                                  outputs=_tensor_metadata(runner.outputs))


def model_config(rec: ServedVersion, max_batch_size: int) -> mc.ModelConfig:
  """Triton's ModelConfig: batch dims are implicit (dims exclude the leading -1)."""
  runner = rec.runner
  if runner is None:
    raise ServingError(Code.UNAVAILABLE, f"model {rec.name!r} version {rec.version} was"
                       " unloaded; retry")
  batching = runner.config
  cfg = mc.ModelConfig(
      name=rec.name, platform=PLATFORM, backend="xlaserve",
      max_batch_size=max_batch_size,
      input=[mc.ModelInput(name=t.name, data_type=config_type(t.datatype), dims=list(t.shape[1:]))
             for t in runner.inputs],
      output=[mc.ModelOutput(name=t.name, data_type=config_type(t.datatype),
                             dims=list(t.shape[1:])) for t in runner.outputs],
      dynamic_batching=mc.ModelDynamicBatching(
          preferred_batch_size=list(batching.buckets),
          max_queue_delay_microseconds=int(batching.max_queue_delay_s * 1e6)),
  )
  cfg.version_policy.latest.num_versions = rec.config.latest_n
  cfg.instance_group.add(count=runner.capabilities.instances,
                         kind=mc.ModelInstanceGroup.KIND_AUTO)
  if runner.capabilities.decoupled:  # several responses per request (streaming)
    cfg.model_transaction_policy.decoupled = True
  context = [t.name for t in runner.inputs if t.dims and t.dims[0] is None]
  if context:  # a context model: these inputs carry one row per request (ModelMetadata: [1, ...])
    cfg.parameters["context_inputs"].string_value = ",".join(context)
    cfg.parameters["candidate_inputs"].string_value = ",".join(
        t.name for t in runner.inputs if t.name not in context)
    if batching.max_batch_requests:
      cfg.parameters["max_batch_requests"].string_value = str(batching.max_batch_requests)
  return cfg
