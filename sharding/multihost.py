"""Multi-host serving in lockstep: the leader receives batches, every process runs the same step.

A jitted step over a mesh that spans several processes is one SPMD program: every process must
call it with the same shapes in the same order. Process 0 (the leader, which owns the request
queue) announces each batch with a control word `[op, bucket]` and then the padded bucket
itself, both with `jax.experimental.multihost_utils.broadcast_one_to_all` (a psum over all
devices, so it rides the same collectives as the model: gloo on CPU, NCCL on GPU); followers
wait in `follower_loop`, receive, and call the same step. The number of distinct shapes is the
number of buckets, as in single-host serving.

Waits: `initialize` bounds connecting to the coordinator; a follower blocked in a broadcast is
released by the leader's `stop()`, or, if the leader dies, by the broken collective connection
(or, in a group that is not `recoverable`, the coordination service's heartbeat timeout). The
leader's `keepalive()` is a no-op round trip: it fails at once when a process is gone, which is
how a serving leader notices a dead follower while idle (serving/multihost.py).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

OP_STOP, OP_STEP, OP_NOOP = 0, 1, 2


def initialize(
    coordinator_address: str, num_processes: int, process_id: int, *,
    local_cpu_devices: int | None = None, timeout_s: int = 60, heartbeat_timeout_s: int = 30,
    recoverable: bool = False,
) -> None:
  """`jax.distributed.initialize` with bounded waits; must run before anything touches a device.

  `local_cpu_devices` sets this process's CPU device count (the CPU stand-in for GPUs per host).
  `recoverable`: a dead process no longer ends the others through the coordination service
  (they see it in failing collectives, and decide; see `say_goodbye` for leaving).
  """
  if local_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", local_cpu_devices)
  jax.config.update("jax_enable_recoverability", recoverable)
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, initialization_timeout=timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s, shutdown_timeout_seconds=timeout_s)
  logger.info("process %d/%d up: %d local of %d global devices", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())


def say_goodbye(timeout_s: float = 0.0) -> bool:
  """Followers: records in the coordination service that this process leaves now. The leader
  (`timeout_s` > 0) waits, bounded, until every follower has; True when all had. In a
  `recoverable` group leaving is not synchronised by the service, and a follower whose service
  stops under it aborts: the leader stops its service only after these goodbyes."""
  from jax._src import distributed  # the key-value store has no public API in jax 0.10

  client = distributed.global_state.client
  if jax.process_index() != 0:
    client.key_value_set(f"xlaserve/left/{jax.process_index()}", "1")
    return True
  try:
    for i in range(1, jax.process_count()):
      client.blocking_key_value_get(f"xlaserve/left/{i}", int(timeout_s * 1000))
  except Exception:  # a follower that died or is slow: leave anyway
    return False
  return True


def _to_host(x: jax.Array) -> np.ndarray:
  """A global array as one host array (a collective when it is not replicated: call everywhere)."""
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class LockstepLoop:
  """Runs `step(params, *inputs)` on every process for batches the leader receives.

  `buckets[i]` is the tuple of host input specs (shape, dtype) of bucket i; `input_shardings[i]`
  their global shardings (e.g. `plan.input_sharding(ndim, batch=...)`). The leader calls
  `leader_step(i, inputs)` for each padded batch and `stop()` at the end; the others call
  `follower_loop()`, which returns after `stop()`. Both sides end up calling the same `step`.
  """

  def __init__(
      self,
      step: Callable[..., Any],
      params: Any,
      buckets: Sequence[Sequence[jax.ShapeDtypeStruct]],
      input_shardings: Sequence[Sequence[jax.sharding.Sharding]],
      *,
      leader: int = 0,
  ):
    if len(buckets) != len(input_shardings):
      raise ValueError(f"{len(buckets)} buckets but {len(input_shardings)} sharding tuples")
    self._step = step
    self._params = params
    self._buckets = [tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in b) for b in buckets]
    self._shardings = [tuple(s) for s in input_shardings]
    self._leader = leader
    self._stopped = False

  @property
  def is_leader(self) -> bool:
    return jax.process_index() == self._leader

  def _broadcast(self, tree: Any) -> Any:
    return multihost_utils.broadcast_one_to_all(tree, is_source=self.is_leader)

  def _control(self, op: int, bucket: int) -> tuple[int, int]:
    word = self._broadcast(np.asarray([op, bucket], np.int32))
    return int(word[0]), int(word[1])

  def _run(self, bucket: int, host_inputs: Sequence[np.ndarray]) -> Any:
    host_inputs = self._broadcast(tuple(host_inputs))
    arrays = [jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx])
              for x, sh in zip(host_inputs, self._shardings[bucket], strict=True)]
    out = self._step(self._params, *arrays)
    return jax.tree.map(_to_host, out)

  def leader_step(self, bucket: int, inputs: Sequence[np.ndarray]) -> Any:
    """Leader only: runs one padded batch of bucket `bucket` everywhere; returns host outputs."""
    if not self.is_leader:
      raise RuntimeError("leader_step runs on the leader; followers run follower_loop()")
    if self._stopped:
      raise RuntimeError("the loop was stopped")
    specs = self._buckets[bucket]
    inputs = tuple(np.asarray(x) for x in inputs)
    for x, s in zip(inputs, specs, strict=True):
      if x.shape != s.shape or x.dtype != s.dtype:
        raise ValueError(f"bucket {bucket} takes {s.shape} {s.dtype}, got {x.shape} {x.dtype}")
    self._control(OP_STEP, bucket)
    return self._run(bucket, inputs)

  def keepalive(self) -> None:
    """Leader only: a no-op round trip, so idle followers see traffic."""
    if self.is_leader and not self._stopped:
      self._control(OP_NOOP, 0)

  def stop(self) -> None:
    """Leader only: releases the followers' loops."""
    if self.is_leader and not self._stopped:
      self._control(OP_STOP, 0)
      self._stopped = True

  def follower_loop(self) -> int:
    """Followers: serve the leader's batches until it stops; returns the number of steps run."""
    if self.is_leader:
      raise RuntimeError("the leader calls leader_step(); follower_loop is for the others")
    steps = 0
    while True:
      op, bucket = self._control(OP_NOOP, 0)
      if op == OP_STOP:
        logger.info("follower %d: stop after %d steps", jax.process_index(), steps)
        return steps
      if op == OP_NOOP:
        continue
      if op != OP_STEP or not 0 <= bucket < len(self._buckets):
        raise RuntimeError(f"bad control word from the leader: op={op} bucket={bucket}")
      zeros = tuple(np.zeros(s.shape, s.dtype) for s in self._buckets[bucket])
      self._run(bucket, zeros)
      steps += 1
