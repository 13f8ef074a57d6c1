"""Runners own a served model version's queue and execution: submit -> batcher decision ->
padded batch -> engine -> outputs cut back per request -> the request's completion sink.

`base.py` is the `Runner` protocol every runner implements (row, sequence, generation), with
declared capabilities, statistics and delivery; `rows.py` and `seq.py` are the batched ones;
`pipeline.py` runs a pipeline's steps over the others, `handoff.py` passes tensors between them
on the device.
"""

from serving.runners.base import (Observer, Runner, RunnerCapabilities, RunnerStats, deliver)
from serving.runners.context import ContextRunner
from serving.runners.handoff import DeviceRows, Handoff
from serving.runners.queued import QueuedRowRunner, RowQueueFactory
from serving.runners.rows import ModelRunner
from serving.runners.seq import SeqRunner, SeqStats, make_runner
