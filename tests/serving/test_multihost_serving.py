"""Two processes serve one DLRM over gRPC: its tables row-sharded over a mesh spanning both.

`xlaserve serve --coordinator ...` twice on 127.0.0.1, 2 CPU devices each (a 4-device global
mesh): process 0 serves gRPC, process 1 runs each batch in lockstep. Every wait is bounded.
"""

from __future__ import annotations

import re
import signal

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc

from clientutil import assert_served_like, infer
from procutil import SERVE, Proc, child_env, free_port
from servingutil import DLRM_TABLE_SIZES_DIVISIBLE, export_dlrm

BUCKETS = (1, 4, 8)
START_TIMEOUT_S = 120  # export + two processes loading and compiling 3 buckets on 2 shared cores
EXIT_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  # Every table's rows divide the 4 global devices, so each device holds a quarter of each.
  repo = tmp_path_factory.mktemp("repo")
  model = export_dlrm(repo, seed=7, buckets=BUCKETS, table_sizes=DLRM_TABLE_SIZES_DIVISIBLE)
  return repo, model, model.config


def _device_bytes(text: str) -> tuple[int, dict[int, int], int]:
  m = re.search(r"process (\d+): params bytes per local device: ([\d= ]+) \(whole model (\d+)"
                r" bytes\)", text)
  assert m, text
  held = dict(tuple(int(v) for v in kv.split("=")) for kv in m.group(2).split())
  return int(m.group(1)), held, int(m.group(3))


def test_two_processes_serve_row_sharded_dlrm(bundle):
  repo, model, cfg = bundle
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [Proc([*SERVE, "--model-repository", str(repo), "--coordinator", coordinator,
                 "--num-processes", "2", "--process-id", str(i), "--local-devices", "2",
                 "--sharding", "embedding_rows", "--grpc-port", "0", "--metrics-port", "-1",
                 "--http-port", "-1", "--compile-cache", "none"],
                env=child_env(own_devices=True)) for i in range(2)]
  leader, follower = procs
  try:
    try:
      address = leader.wait_serving(START_TIMEOUT_S)
    except AssertionError as e:
      raise AssertionError(f"{e}\n--- follower:\n{follower.text}") from None
    assert follower.wait_for(r"running the leader's batches", 10), follower.text
    assert "serves gRPC" in leader.text and "follower (runs the leader's batches)" in follower.text

    rng = np.random.default_rng(0)

    def reference(dense, sparse):
      return model(jnp.asarray(dense), jnp.asarray(sparse))

    parity = dict(rtol=1e-5, atol=1e-6, client_timeout=30)
    with tc.InferenceServerClient(address) as c:
      assert c.is_server_ready() and c.is_model_ready("dlrm")
      cases = [{"dense": rng.normal(size=(rows, 13)).astype(np.float32),
                "sparse": rng.integers(-1, 3000, size=(rows, 26))}  # missing and hashed ids
               for rows in (1, 3, 4, 8, 13)]  # buckets 1, 4, 4, 8; 13 rows split over two batches
      assert assert_served_like(c, "dlrm", cases, reference, **parity) == 5
      # int64 ids beyond int32 are refused before anything is broadcast; the group stays in step.
      too_big = np.full((2, 26), 2**40, np.int64)
      with pytest.raises(tc.InferenceServerException, match="outside int32") as refused:
        infer(c, "dlrm", {"dense": np.zeros((2, 13), np.float32), "sparse": too_big},
              client_timeout=30)
      assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
      after = {"dense": rng.normal(size=(2, 13)).astype(np.float32),
               "sparse": rng.integers(0, 3000, size=(2, 26))}
      assert assert_served_like(c, "dlrm", [after], reference, **parity) == 1
      batches = c.get_inference_statistics("dlrm").model_stats[0].execution_count
    assert batches == 7  # 1 + 1 + 1 + 1 + 2 + 1

    # Each process holds only its quarter of every table (the dense layers are replicated).
    table_bytes = sum(cfg.table_sizes) * cfg.embed_dim * 4
    seen: dict[int, int] = {}
    for i, p in enumerate(procs):
      pid, held, whole = _device_bytes(p.text)
      assert pid == i and len(held) == 2
      dense_bytes = whole - table_bytes
      assert all(n == table_bytes // 4 + dense_bytes for n in held.values()), held
      seen.update(held)
    assert len(seen) == 4  # four distinct devices: one global mesh over both processes

    leader.p.send_signal(signal.SIGTERM)
    for p in procs:
      assert p.wait(EXIT_TIMEOUT_S) == 0, p.text
    # The follower ran exactly the leader's batches: 3 warm-up buckets plus the served ones.
    m = follower.wait_for(r"the leader stopped after (\d+) batches", 5)
    assert m and int(m.group(1)) == len(BUCKETS) + batches, follower.text
  finally:
    for p in procs:
      p.kill()


def test_a_killed_follower_turns_the_leader_unready_until_it_returns(bundle):
  """kill -9 of the follower: the next request gets UNAVAILABLE at once, the leader turns not
  ready within the heartbeat bound and restarts itself (same pid) to re-form the group; once a
  new follower joins, it serves correct answers again."""
  repo, model, _ = bundle
  coordinator, port = f"127.0.0.1:{free_port()}", free_port()  # fixed: the same after a restart
  args = lambda i, grpc_port: [  # noqa: E731
      *SERVE, "--model-repository", str(repo), "--coordinator", coordinator, "--num-processes",
      "2", "--process-id", str(i), "--local-devices", "2", "--sharding", "embedding_rows",
      "--grpc-port", str(grpc_port), "--metrics-port", "-1", "--http-port", "-1",
      "--compile-cache", "none", "--heartbeat-timeout-s", "3"]
  leader = Proc(args(0, port), env=child_env(own_devices=True))
  follower = Proc(args(1, 0), env=child_env(own_devices=True))
  procs = [leader, follower]
  rng = np.random.default_rng(3)
  case = {"dense": rng.normal(size=(3, 13)).astype(np.float32),
          "sparse": rng.integers(0, 3000, size=(3, 26))}
  reference = lambda dense, sparse: model(jnp.asarray(dense), jnp.asarray(sparse))  # noqa: E731
  parity = dict(rtol=1e-5, atol=1e-6, client_timeout=30)
  try:
    address = leader.wait_serving(START_TIMEOUT_S)
    with tc.InferenceServerClient(address) as c:
      assert assert_served_like(c, "dlrm", [case], reference, **parity) == 1
      follower.kill()  # SIGKILL
      with pytest.raises(tc.InferenceServerException) as lost:
        infer(c, "dlrm", case, client_timeout=30)
      assert lost.value.status() == "StatusCode.UNAVAILABLE", lost.value
    assert leader.wait_for(r"the group lost a process", 20), leader.text
    assert leader.wait_for(r"re-forming the group after", 60), leader.text
    assert leader.p.poll() is None  # the same process (exec), never down
    follower = Proc(args(1, 0), env=child_env(own_devices=True))
    procs.append(follower)
    assert leader.wait_for(r"try it:(.|\n)*try it:", START_TIMEOUT_S), leader.text
    with tc.InferenceServerClient(address) as c:
      assert c.is_server_ready()
      assert assert_served_like(c, "dlrm", [case], reference, **parity) == 1
    leader.p.send_signal(signal.SIGTERM)
    assert leader.wait(EXIT_TIMEOUT_S) == 0, leader.text
    assert follower.wait(EXIT_TIMEOUT_S) == 0, follower.text
  finally:
    for p in procs:
      p.kill()
