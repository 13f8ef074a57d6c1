"""The XLA:CPU flag `xlaserve serve` adds with a one-thread pool (--xla-cpu-threads 1, the
default with sync dispatch): the user's own setting wins, and XLA accepts it and computes the
same numbers with it."""

import os
import subprocess
import sys

import numpy as np

from serving.cli import ONE_THREAD_SCHEDULE_FLAG, one_thread_schedule_flags


def test_the_flag_is_added_unless_the_user_set_it():
  assert one_thread_schedule_flags({}) == ONE_THREAD_SCHEDULE_FLAG
  mine = "--xla_dump_to=/tmp/x"
  assert one_thread_schedule_flags({"XLA_FLAGS": mine}).split() == [mine,
                                                                    ONE_THREAD_SCHEDULE_FLAG]
  theirs = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
  assert one_thread_schedule_flags({"XLA_FLAGS": theirs}) == theirs


def test_xla_accepts_it_and_computes_the_same():
  """A small MLP with parallel branches (the shape the scheduler reorders), against numpy."""
  rng = np.random.default_rng(0)
  x, w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (8, 32), (8, 32)))
  code = ("import sys, numpy as np, jax, jax.numpy as jnp\n"
          "x, w1, w2 = (np.frombuffer(bytes.fromhex(h), np.float32) for h in sys.argv[1:4])\n"
          "x, w1, w2 = x.reshape(16, 8), w1.reshape(8, 32), w2.reshape(8, 32)\n"
          "f = jax.jit(lambda x: jnp.tanh(x @ w1).sum(1) + jax.nn.relu(x @ w2).sum(1))\n"
          "print(np.asarray(f(x)).tobytes().hex())\n")
  env = dict(os.environ, XLA_FLAGS=one_thread_schedule_flags({}), JAX_PLATFORMS="cpu",
             PJRT_NPROC="1")
  out = subprocess.run([sys.executable, "-c", code, x.tobytes().hex(), w1.tobytes().hex(),
                        w2.tobytes().hex()], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  got = np.frombuffer(bytes.fromhex(out.stdout.strip()), np.float32)
  want = np.tanh(x @ w1).sum(1) + np.maximum(x @ w2, 0).sum(1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
