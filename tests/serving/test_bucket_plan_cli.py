"""Request sizes recorded by the real server on both batch queues (`xlaserve_request_rows`), read
back by `xlaserve plan-buckets` from a saved scrape: the counts equal what the client sent, and
the printed plan is the optimum for them."""

import collections

import grpc
import numpy as np
import pytest

from serving.cli import main as cli_main
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.plan_buckets import size_counts
from servingutil import mock_factory, mock_request, serving, write_mock_bundle


@pytest.mark.parametrize("frontend,batch_queue", [("auto", "native"), ("python", "python")])
def test_recorded_sizes_and_the_plan(tmp_path, capsys, frontend, batch_queue):
  write_mock_bundle(tmp_path / "repo", "mock", 1)  # buckets 1, 2, 4, 8
  sent = collections.Counter({1: 9, 3: 5, 5: 4, 8: 2, 11: 1})  # 11 rows: split over batches
  with serving(tmp_path / "repo", mock_factory(), frontend=frontend,
               batch_queue=batch_queue) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    for n, times in sent.items():
      for _ in range(times):
        stub.ModelInfer(mock_request(np.ones((n, 4), np.float32), np.ones((n, 1), np.int32)))
    text = bg.server.metrics.exposition().decode()
  assert size_counts(text, "mock", "1") == {n: float(c) for n, c in sent.items()}
  scrape = tmp_path / "scrape.txt"
  scrape.write_text(text)
  assert cli_main(["plan-buckets", "--metrics", str(scrape), "--model", "mock",
                   "--current", "1,2,4,8", "--buckets", "4"]) == 0
  out = capsys.readouterr().out
  # 11-row requests count as 8 (split); sizes 1, 3, 5, 8 then fit 4 buckets exactly.
  assert "learned   4 buckets 1 3 5 8: padded/real 1.000" in out
  assert "current   4 buckets 1 2 4 8: padded/real" in out
