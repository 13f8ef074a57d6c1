"""benchmarks/slo.py's --server-cpus / --harness-cpus: CPU lists parse as Linux writes them, and
pinning a process reaches every one of its threads (read back from the kernel)."""

import os
import subprocess
import sys

import pytest

from benchmarks.slo import cpu_list, parse_args, pin


def test_cpu_lists_parse_like_the_kernels():
  assert cpu_list("0,1") == {0, 1}
  assert cpu_list("2-5") == {2, 3, 4, 5}
  assert cpu_list("0,4-5,7") == {0, 4, 5, 7}
  args = parse_args(["--server-cpus", "0", "--harness-cpus", "1-1", "--client", "python"])
  assert (args.server_cpus, args.harness_cpus) == ({0}, {1})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity calls")
def test_pinning_reaches_every_thread_of_a_process():
  cpu = min(os.sched_getaffinity(0))
  code = ("import threading, time\n"
          "for _ in range(3):\n"
          "  threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
          "print('up', flush=True); time.sleep(30)\n")
  child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "up"
    tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
    assert len(tids) >= 4
    pin(child.pid, {cpu})
    assert all(os.sched_getaffinity(t) == {cpu} for t in tids)
    pin(child.pid, None)  # None leaves it as it is
    assert all(os.sched_getaffinity(t) == {cpu} for t in tids)
  finally:
    child.kill()
    child.wait()
