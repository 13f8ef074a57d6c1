"""Multi-host serving: one model on a mesh spanning every process, fed by process 0's server.

A model too big for one host runs multi-controller (`jax.distributed`): every process loads the
same bundle onto one global mesh (each restores only the shards its devices hold) and compiles
the same executable per bucket. Process 0 (the leader) runs the normal gRPC server; its engine,
`LockstepEngine`, sends each padded batch through `sharding.multihost.LockstepLoop.leader_step`
(JAX's `multihost_utils.broadcast_one_to_all`), so the followers (`run_follower`) execute the
same bucket in the same order. The model's collectives (e.g. embedding_rows' all-reduce) then
cross processes, over gloo on CPU or NCCL on GPU.

One model version per repository, loaded once at start: hot reload and a second load are refused;
an unload drops the leader's shards and parks the followers until process 0 exits, which
releases them (`LockstepEngine.stop_followers`) before every process leaves the group. Waits are
bounded: connecting and the shutdown barrier (`timeout_s`). A follower that dies (or goes silent
for `heartbeat_timeout_s`) does not take the leader down: the leader answers UNAVAILABLE, turns
not ready, and restarts itself (`os.execv`, same pid and command line) to re-form the group,
waiting for every process to be back before it serves again; a follower exits within a second
of its leader's going, through the broken gloo connection, for its supervisor to restart; a process that cannot open the bundle, sees a
different one, or fails to compile makes every process fail its load, naming it (a failure
inside orbax's restore is bounded by orbax's own cross-process barriers). An idle follower
needs no keepalive on CPU: one waited 330 s in a gloo broadcast and carried on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys
from typing import Any, Callable

import bundle as bundle_lib
from bundle import BundleError, Manifest
from serving.engines import Engine, Progress, param_bytes
from serving.engines.lockstep import (DEFAULT_STRATEGY, MULTIHOST_STRATEGIES, LockstepEngine,
                                      device_bytes_line, load_everywhere)

logger = logging.getLogger(__name__)

REJOIN_ENV = "XLASERVE_REJOINING"  # set in a leader that restarted itself to re-form its group


@dataclasses.dataclass(frozen=True, slots=True)
class MultihostConfig:
  """This process's place in a multi-process server (`xlaserve serve --coordinator ...`)."""

  coordinator: str  # host:port of process 0's coordination service
  num_processes: int
  process_id: int
  local_devices: int | None = None  # CPU devices in this process (a CPU stand-in for GPUs/host)
  timeout_s: int = 60  # connecting to the coordinator, and the shutdown barrier
  heartbeat_timeout_s: int = 10  # a peer silent this long is gone (the leader re-forms the group)

  def __post_init__(self):
    host, sep, port = self.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
    if self.num_processes < 1:
      raise ValueError(f"--num-processes must be >= 1, got {self.num_processes}")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"--process-id must be in 0..{self.num_processes - 1}, got"
                       f" {self.process_id}")
    if self.local_devices is not None and self.local_devices < 1:
      raise ValueError(f"--local-devices must be >= 1, got {self.local_devices}")
    if self.timeout_s < 1 or self.heartbeat_timeout_s < 1:
      raise ValueError("timeouts must be >= 1 s")

  @property
  def is_leader(self) -> bool:
    return self.process_id == 0


def initialize(cfg: MultihostConfig) -> None:
  """Joins the process group (bounded); must run before anything touches a JAX device."""
  from sharding import multihost

  multihost.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                       local_cpu_devices=cfg.local_devices, timeout_s=cfg.timeout_s,
                       heartbeat_timeout_s=cfg.heartbeat_timeout_s, recoverable=True)


def restart(say: Progress, why: str) -> None:
  """Replaces this process with a fresh run of its own command line (a leader re-forming its
  group: a JAX runtime cannot rejoin a group in process). Does not return."""
  say(f"{why}: restarting (same command line) to re-form the process group")
  sys.stdout.flush()
  sys.stderr.flush()
  os.environ[REJOIN_ENV] = why
  os.execv(sys.executable, sys.orig_argv)


def select_bundle(repository: str | pathlib.Path, default_strategy: str | None = None
                  ) -> tuple[pathlib.Path, Manifest, str]:
  """The one model version a multi-host server serves, and its strategy; same on every process.

  Raises ValueError unless the repository holds exactly one predict model whose version policy
  selects exactly one version.
  """
  from serving.repository import ModelRepository

  repo = ModelRepository(repository)
  names = repo.discover()
  if len(names) != 1:
    raise ValueError(f"multi-host serving serves exactly one model, but {repo.root} holds"
                     f" {len(names)} ({', '.join(names) or 'none'}); give it a repository"
                     " holding only that model")
  name = names[0]
  try:
    cfg = repo.read_config(name)
  except BundleError as e:
    raise ValueError(str(e)) from e
  versions = cfg.select(repo.complete_versions(name))
  if len(versions) != 1:
    raise ValueError(f"multi-host serving serves one version of {name}; its version policy"
                     f" selects {versions or 'none'} (set config.json to one version)")
  path = repo.model_dir(name) / str(versions[0])
  manifest = bundle_lib.read_manifest(path)
  if manifest.kind != "predict" or len(manifest.signatures) != 1 or any(
      s.has_seq for s in manifest.signatures.values()):
    raise ValueError(f"{path}: multi-host serving takes a predict bundle with one batch-only"
                     f" signature (kind {manifest.kind!r},"
                     f" signatures {sorted(manifest.signatures)})")
  strategy = cfg.sharding or default_strategy or DEFAULT_STRATEGY
  if strategy not in MULTIHOST_STRATEGIES:
    raise ValueError(f"multi-host serving runs one program over every process's devices:"
                     f" strategy {strategy!r} is not one of {MULTIHOST_STRATEGIES}")
  return path, manifest, strategy


class LeaderSession:
  """Process 0's side: the engine factory the server uses, then the orderly end of the group."""

  def __init__(self, cfg: MultihostConfig, path: pathlib.Path, manifest: Manifest, strategy: str,
               *, progress: Progress | None = None):
    self.cfg, self.path, self.manifest, self.strategy = cfg, path.resolve(), manifest, strategy
    self.say = progress or (lambda msg: None)
    self.engine: LockstepEngine | None = None
    self.exit_code = 0
    self.lost: str | None = None  # why the group broke (the leader then re-forms it)
    self._watch: Any = None

  def factory(self, path: pathlib.Path, manifest: Manifest, model_cfg: Any) -> Engine:
    """The repository's EngineFactory: the selected version, once."""
    if pathlib.Path(path).resolve() != self.path:
      raise BundleError(f"multi-host serving serves only {self.path}, loaded at start")
    if self.engine is not None:
      raise BundleError("multi-host serving loads its model once, at start; restart every"
                        " process to change it")
    self.engine = LockstepEngine(path, manifest=manifest, strategy=self.strategy)
    return self.engine

  def on_loaded(self, server: Any) -> None:
    """A leader whose model did not load stops (its followers have already failed); one whose
    model serves watches the group (every second) for a process gone or a failed step."""
    if not server.repository.all_ready:
      self.say("multi-host model did not load: stopping (exit 1)")
      self.exit_code = 1
      server.request_stop()
      return
    from serving.repository.periodic import Periodic

    self._watch = Periodic("multihost-watch", lambda: self._check(server), lambda: 1.0)
    self._watch.start()

  def _check(self, server: Any) -> None:
    """A no-op round trip through every process (between batches); when it or a batch fails
    (a process gone), stops the server: UNAVAILABLE, not ready, then `finish` re-forms."""
    if self.lost is not None or server.stopping.is_set() or self.engine is None:
      return
    broken = self.engine.keepalive()
    if broken is None:
      return
    self.lost = f"the group lost a process ({broken})"
    self.say(f"{self.lost}: not ready; requests get UNAVAILABLE until the group is back")
    server.request_stop()

  def finish(self) -> int:
    """After the server stopped: releases the followers, then leaves the process group (or,
    when the group broke, restarts this process to re-form it: does not return)."""
    import jax

    if self._watch is not None:
      self._watch.stop()
    if self.lost is not None:
      restart(self.say, self.lost)
    if self.engine is not None:
      self.engine.stop_followers()
      self.engine.close()
      self.say("followers released")
    self.say("leaving the process group")
    from sharding.multihost import say_goodbye

    if not say_goodbye(self.cfg.timeout_s):
      logger.warning("not every follower said goodbye within %ss", self.cfg.timeout_s)
    try:
      jax.distributed.shutdown()
    except Exception as e:  # a follower already gone: nothing left to wait for
      logger.warning("jax.distributed.shutdown: %s", e)
    return self.exit_code


# ---- the command line -------------------------------------------------------------------------
def start_from_args(args: Any, say: Progress,
                    report: Callable[[str], None]) -> tuple[LeaderSession | None, int]:
  """`xlaserve serve --coordinator ...`: joins the group; a follower runs here until released.

  Returns (session, 0) on the leader, which then serves; (None, 2) for flags that do not fit
  multi-host serving. A follower exits the process here when released (0) or failed (1).
  `report` gets the error a user must read (the CLI prints it to stderr).
  """
  try:
    if args.model_repository is None:
      raise ValueError("multi-host serving needs --model-repository (holding one model)")
    if args.devices is not None:
      raise ValueError("--devices does not apply with --coordinator: the mesh spans every"
                       " device of every process (set --local-devices per process)")
    if args.repository_poll_s:
      raise ValueError("--repository-poll-s: multi-host serving loads its model once, at start")
    cfg = MultihostConfig(args.coordinator, args.num_processes, args.process_id,
                          args.local_devices,
                          heartbeat_timeout_s=args.heartbeat_timeout_s)
    path, manifest, strategy = select_bundle(args.model_repository, args.sharding)
  except (ValueError, BundleError, FileNotFoundError) as e:
    report(f"xlaserve: {e}")
    return None, 2
  role = "leader (serves gRPC)" if cfg.is_leader else "follower (runs the leader's batches)"
  rejoining = os.environ.pop(REJOIN_ENV, None)
  say(f"process {cfg.process_id} of {cfg.num_processes}, {role}: joining {cfg.coordinator}"
      f" to serve {path} with {strategy}"
      + (f" (re-forming the group after: {rejoining})" if rejoining else ""))
  try:
    initialize(cfg)
  except Exception as e:  # a peer not back within timeout_s
    if not (cfg.is_leader and rejoining):
      raise
    restart(say, f"the group did not re-form within {cfg.timeout_s}s ({type(e).__name__});"
            f" still waiting after: {rejoining}")
  if cfg.is_leader:
    return LeaderSession(cfg, path, manifest, strategy, progress=say), 0
  try:
    run_follower(path, strategy=strategy, manifest=manifest, progress=say)
  except Exception as e:
    logger.exception("follower %d failed", cfg.process_id)
    report(f"xlaserve: follower {cfg.process_id} failed: {type(e).__name__}: {e}")
    _exit(1)
  _exit(0)


# ---- a follower -----------------------------------------------------------------------------
def run_follower(bundle_dir: str | pathlib.Path, *, strategy: str = DEFAULT_STRATEGY,
                 manifest: Manifest | None = None, progress: Progress | None = None) -> int:
  """Processes != 0: load the same bundle the same way, run the leader's batches until it stops.

  Returns the number of batches run (warm-up included). Call after `initialize`; says goodbye
  to the group when the leader released it (the process should then exit, `_exit`).
  """
  import jax

  say = progress or (lambda msg: None)
  path = pathlib.Path(bundle_dir)
  manifest = manifest or bundle_lib.read_manifest(path)
  program = load_everywhere(path, manifest, strategy, say)
  say(device_bytes_line(program.params, param_bytes(manifest)))
  say(f"follower {jax.process_index()}/{jax.process_count()}: running the leader's batches"
      f" (buckets {program.buckets}) until it stops")
  steps = program.loop.follower_loop()
  say(f"follower {jax.process_index()}: the leader stopped after {steps} batches")
  from sharding.multihost import say_goodbye

  say_goodbye()
  return steps


def _exit(code: int) -> None:
  """A follower's end: straight out of the process. `jax.distributed.shutdown` would abort it
  (a recoverable group's leader may stop its service first), and the leader is told by
  `say_goodbye` instead."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
