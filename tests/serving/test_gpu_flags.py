"""The CUDA-graph XLA flags `xlaserve serve` adds by default: the user's own settings win, and
XLA (which aborts on an unknown flag) accepts them on CPU, where they change nothing."""

import os
import subprocess
import sys

from serving.cli import GPU_GRAPH_FLAGS, gpu_graph_flags


def test_flags_are_added_unless_the_user_set_them():
  assert gpu_graph_flags({}).split() == list(GPU_GRAPH_FLAGS)
  mine = "--xla_gpu_graph_min_graph_size=7 --xla_dump_to=/tmp/x"
  got = gpu_graph_flags({"XLA_FLAGS": mine}).split()
  assert got[:2] == mine.split() and "--xla_gpu_graph_min_graph_size=1" not in got
  assert any(f.startswith("--xla_gpu_enable_command_buffer=") for f in got)


def test_xla_accepts_them_on_cpu():
  env = dict(os.environ, XLA_FLAGS=gpu_graph_flags({}), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp;"
                        " print(float(jax.jit(lambda x: (x * 2).sum())(jnp.arange(4.0))))"],
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "12.0"
