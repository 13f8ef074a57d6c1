"""Triton's metadata answers for a served version, built from its runner's declared surface:
ModelMetadata (tensors) and ModelConfig (batch dims implicit, buckets as preferred sizes,
instances, decoupled policy; a context model's context and candidate inputs as parameters)."""

from __future__ import annotations

from bundle import BY_TRITON, PipelineSpec, TensorSpec
from serving.frontend.memory_usage import add_instance_group
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
  if (bound := batching.queue_wait_bound_s) is not None:  # Triton's queue timeout, REJECT
    cfg.dynamic_batching.default_queue_policy.default_timeout_microseconds = int(bound * 1e6)
    cfg.dynamic_batching.default_queue_policy.allow_timeout_override = True
  if batching.latency_slo_s is not None:
    cfg.parameters["latency_slo_ms"].string_value = f"{batching.latency_slo_s * 1e3:g}"
    cfg.parameters["latency_slo_percentile"].string_value = f"{rec.config.latency_slo_percentile:g}"
  cfg.version_policy.latest.num_versions = rec.config.latest_n
  if rec.manifest is not None and rec.manifest.serving.get("deterministic"):
    cfg.parameters["deterministic"].string_value = "true"  # batch-invariant scores
  add_instance_group(cfg, runner, rec.config.device_ids)
  if runner.capabilities.decoupled:  # several responses per request (streaming)
    cfg.model_transaction_policy.decoupled = True
  if rec.manifest is not None and rec.manifest.pipeline is not None:
    _ensemble(cfg, rec.manifest.pipeline)
  tables = getattr(getattr(runner, "engine", None), "table_stats", None)
  if tables is not None:  # embedding cache placement: table=device or table=cached:rows/rows
    cfg.parameters["embedding_tables"].string_value = ",".join(
        f"{t['table']}=" + ("device" if t["placement"] == "device"
                            else f"cached:{t['cache_rows']}/{t['rows']}") for t in tables())
  context = [t.name for t in runner.inputs if t.per_request]
  if context and rec.manifest is not None and rec.manifest.pipeline is None:  # a context model: these inputs carry one row per request (ModelMetadata: [1, ...])
    cfg.parameters["context_inputs"].string_value = ",".join(context)
    cfg.parameters["candidate_inputs"].string_value = ",".join(
        t.name for t in runner.inputs if t.name not in context)
    if batching.max_batch_requests:
      cfg.parameters["max_batch_requests"].string_value = str(batching.max_batch_requests)
  return cfg


def _ensemble(cfg: mc.ModelConfig, pipeline: PipelineSpec) -> None:
  """A pipeline as Triton describes an ensemble: platform "ensemble", one scheduling step per
  model step (input_map: the model's input -> the pipeline tensor feeding it; output_map: the
  model's output -> "<step>.<output>"). Op steps are host glue Triton has no word for: they are
  listed in the `pipeline_ops` parameter."""
  cfg.platform = "ensemble"
  cfg.ClearField("dynamic_batching")
  used = {src.tensor for st in pipeline.steps for src in st.inputs.values()}
  used |= {src.tensor for src in pipeline.outputs.values()}
  ops = []
  for step in pipeline.steps:
    if step.op is not None:
      ops.append(f"{step.name}:{step.op}")
      continue
    s = cfg.ensemble_scheduling.step.add(model_name=step.model,
                                         model_version=step.version or -1)
    for name, src in step.inputs.items():
      s.input_map[name] = src.tensor
    for tensor in sorted(t for t in used if t.startswith(step.name + ".")):
      s.output_map[tensor.split(".", 1)[1]] = tensor
  if ops:
    cfg.parameters["pipeline_ops"].string_value = ",".join(ops)
