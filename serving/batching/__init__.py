"""Batching decisions in plain Python (no JAX, no tensors): which queued rows form the next
batch, at which bucket, and which requests are refused at the door.

`rows.py` batches rows into batch buckets; `seq.py` routes requests by length onto a
(batch bucket x sequence bucket) grid; `admission.py` is the door check both share;
`slo.py` schedules by a latency target (arrival and drain rates, budgets).
"""

from serving.batching.admission import Admission, check_budget, check_deadline, check_queue_bounds
from serving.batching.config import BatchingConfig, shed_message
from serving.batching.rows import (SMALLER_BUCKET_GAIN, Batcher, BatchPlan,
                                   Decision, Pending, Slice, expired_by_deadline)
from serving.batching.seq import SeqBatcher, SeqBatchPlan, check_seq_buckets
from serving.batching.slo import LoadMeter
