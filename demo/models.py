"""Demo builders for the relevance, retrieval, DCN-v2 and ranking models (weights from a fixed
seed).

Sequence grids come from `benchmarks/padding.py` (padded / real tokens on ads length mixes):
queries (median 6 tokens) use sequence buckets {8, 16, 32, 64}: 1.9x padded tokens against
3.2x starting at 16; ad texts and query-ad pairs (median 32-41 tokens, nothing under 16)
use {32, 64, 128, 256}: 1.6-1.7x, the same as starting at 8 or 16 with fewer executables,
against 2.3-2.4x in one queue and 1.3x for a half-octave grid that compiles 2.75x as many.
Batch buckets are 1..64 in powers of two. Each builder takes (repository, *, tiny, platforms,
progress) like `demo.repository.BUILDERS` expects; the grids can be overridden (tests use small
ones). Their weights come from a fixed seed: they build in seconds, with no training.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Callable

logger = logging.getLogger(__name__)

QUERY_SEQ_BUCKETS: tuple[int, ...] = (8, 16, 32, 64)
TEXT_SEQ_BUCKETS: tuple[int, ...] = (32, 64, 128, 256)
TEXT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
# --demo-tiny: a start-up of seconds, for smoke tests.
TINY_BATCH_BUCKETS: tuple[int, ...] = (1, 4)
TINY_QUERY_SEQ_BUCKETS: tuple[int, ...] = (8, 16)
TINY_TEXT_SEQ_BUCKETS: tuple[int, ...] = (16, 32)


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
  (progress or (lambda m: logger.info("%s", m)))(msg)


def relevance_inputs() -> list:
  """Inputs of the cross-encoder's signature: token and segment ids [B, S], lengths [B]."""
  import export
  return [export.Input("token_ids", "int32", ("batch", "seq")),
          export.Input("segment_ids", "int32", ("batch", "seq")),
          export.Input("lengths", "int32", ("batch",))]


def tower_inputs() -> list:
  """Inputs of each tower's signature: token ids [B, S], lengths [B]."""
  import export
  return [export.Input("token_ids", "int32", ("batch", "seq")),
          export.Input("lengths", "int32", ("batch",))]


def build_relevance(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0, platforms: tuple[str, ...] = ("cpu",),
                    name: str = "relevance", dtype: str = "float32",
                    batch_buckets: tuple[int, ...] | None = None,
                    seq_buckets: tuple[int, ...] | None = None,
                    progress: Callable[[str], None] | None = None) -> pathlib.Path:
  """Exports the query-ad relevance cross-encoder as `<repository>/<name>/1`."""
  from flax import nnx

  import export
  from models.relevance import RelevanceConfig, RelevanceModel

  cfg = (RelevanceConfig.tiny() if tiny else RelevanceConfig.demo()).with_dtype(dtype)
  model = RelevanceModel(cfg, rngs=nnx.Rngs(seed))
  batch_buckets = batch_buckets or (TINY_BATCH_BUCKETS if tiny else TEXT_BATCH_BUCKETS)
  seq_buckets = seq_buckets or (TINY_TEXT_SEQ_BUCKETS if tiny else TEXT_SEQ_BUCKETS)
  _say(progress, f"{name}: exporting for {len(batch_buckets)} batch x {len(seq_buckets)}"
       " sequence buckets ...")
  return export.export_model(
      model, repository=repository, name=name, version=1, inputs=relevance_inputs(),
      config=export.ExportConfig(batch_buckets=batch_buckets, seq_buckets=seq_buckets,
                                 max_queue_delay_us=1000, platforms=platforms),
      extra={"description": "query-ad relevance cross-encoder: token_ids, segment_ids (0 query,"
                            " 1 ad) [B, S] and lengths [B] -> score [B, 1]",
             "vocab_size": cfg.encoder.vocab_size, "seed": seed, "dtype": dtype})


def build_two_tower(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0, platforms: tuple[str, ...] = ("cpu",),
                    name: str = "two_tower", batch_buckets: tuple[int, ...] | None = None,
                    query_seq_buckets: tuple[int, ...] | None = None,
                    ad_seq_buckets: tuple[int, ...] | None = None,
                    progress: Callable[[str], None] | None = None) -> pathlib.Path:
  """Exports the retrieval towers as one bundle `<repository>/<name>/1`, served as two
  models: `<name>_query` (signature query_embedding) and `<name>_ad` (ad_embedding)."""
  from flax import nnx

  import export
  from models.two_tower import TwoTower, TwoTowerConfig

  cfg = TwoTowerConfig.tiny() if tiny else TwoTowerConfig.demo()
  model = TwoTower(cfg, rngs=nnx.Rngs(seed))
  query_seq = query_seq_buckets or (TINY_QUERY_SEQ_BUCKETS if tiny else QUERY_SEQ_BUCKETS)
  ad_seq = ad_seq_buckets or (TINY_TEXT_SEQ_BUCKETS if tiny else TEXT_SEQ_BUCKETS)
  _say(progress, f"{name}: exporting the query and ad towers ...")
  return export.export_model(
      model, repository=repository, name=name, version=1,
      inputs={"query_embedding": tower_inputs(), "ad_embedding": tower_inputs()},
      signatures={"query_embedding": lambda m, **kw: m.query_embedding(**kw),
                  "ad_embedding": lambda m, **kw: m.ad_embedding(**kw)},
      config=export.ExportConfig(
          batch_buckets=batch_buckets or (TINY_BATCH_BUCKETS if tiny else TEXT_BATCH_BUCKETS),
          seq_buckets=ad_seq, signature_seq_buckets={"query_embedding": query_seq},
          signature_suffixes={"query_embedding": "query", "ad_embedding": "ad"},
          max_queue_delay_us=1000, platforms=platforms),
      extra={"description": "two-tower retrieval: token_ids [B, S], lengths [B] -> unit-norm"
                            " embedding [B, E]; dot products are cosine similarities",
             "embed_dim": cfg.embed_dim, "seed": seed})


def build_dcn_v2(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0, platforms: tuple[str, ...] = ("cpu",),
                 name: str = "dcn_v2",
                 batch_buckets: tuple[int, ...] | None = None,
                 progress: Callable[[str], None] | None = None) -> pathlib.Path:
  """Exports the DCN-v2 CTR model as `<repository>/<name>/1` (DLRM's inputs and output)."""
  from flax import nnx

  import export
  from models.dcn_v2 import DCNv2, DCNv2Config

  cfg = DCNv2Config.tiny() if tiny else DCNv2Config.demo()
  model = DCNv2(cfg, rngs=nnx.Rngs(seed))
  _say(progress, f"{name}: exporting ...")
  return export.export_model(
      model, repository=repository, name=name, version=1,
      inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
              export.Input("sparse", "int64", ("batch", cfg.num_sparse))],
      config=export.ExportConfig(
          batch_buckets=batch_buckets or ((1, 4, 16) if tiny else
                                          (1, 2, 4, 8, 16, 32, 64, 128, 256)),
          max_queue_delay_us=1000, platforms=platforms),
      extra={"description": "DCN-v2 CTR model: 13 dense + 26 categorical features -> prob",
             "table_sizes": list(cfg.table_sizes), "seed": seed})


RANKER_BUCKETS: tuple[int, ...] = (1, 4, 16, 64, 128, 256, 512, 1024)  # candidates per batch
RANKER_REQUEST_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # requests per batch


def ranker_inputs(cfg) -> tuple[list, list]:
  """(context inputs, candidate inputs) of the ranking model: a user's click history [1, H],
  profile [1, U] (and the query's embedding [1, Q]) once per request; each candidate ad's ids
  [N, F] and dense features."""
  import export
  query = [export.Input("query", "float32", ("batch", cfg.query_dim))] if cfg.query_dim else []
  return ([export.Input("history", "int32", ("batch", cfg.history_len)),
           export.Input("user_dense", "float32", ("batch", cfg.user_dense)), *query],
          [export.Input("ad_sparse", "int32", ("batch", len(cfg.ad_table_sizes))),
           export.Input("ad_dense", "float32", ("batch", cfg.ad_dense))])


def build_ranker(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0,
                 platforms: tuple[str, ...] = ("cpu",), name: str = "ranker", flat: bool = False,
                 query_dim: int | None = None, batch_buckets: tuple[int, ...] | None = None,
                 request_buckets: tuple[int, ...] | None = None,
                 progress: Callable[[str], None] | None = None) -> pathlib.Path:
  """Exports the ads ranking model (models/ranking.py) as `<repository>/<name>/1` with its user
  side as context inputs (computed once per request); `flat` exports the same model with every
  input per candidate (the user's rows repeated by the client), for comparison. `query_dim`
  (default: the two-tower embedding's) adds the query embedding to the context (0: none)."""
  import dataclasses

  from flax import nnx

  import export
  from models.ranking import Ranker, RankerConfig
  from models.two_tower import TwoTowerConfig

  cfg = RankerConfig.tiny() if tiny else RankerConfig.demo()
  if query_dim is None:  # the demo pipeline feeds it the two-tower query embedding
    query_dim = TwoTowerConfig.tiny().embed_dim if tiny else cfg.query_dim
  cfg = dataclasses.replace(cfg, query_dim=query_dim)
  model = Ranker(cfg, rngs=nnx.Rngs(seed))
  config = export.ExportConfig(
      batch_buckets=batch_buckets or ((1, 4, 16) if tiny else RANKER_BUCKETS),
      request_buckets=request_buckets or ((1, 2, 4) if tiny else RANKER_REQUEST_BUCKETS),
      max_queue_delay_us=1000, platforms=platforms)
  context, candidates = ranker_inputs(cfg)
  extra = {"description": "ads ranking: user click history [1, H], profile [1, U] and query"
                          " embedding [1, Q] once per request, N candidate ads (ids [N, F], dense [N, D]) -> prob [N, 1]"
                          + (" (flat: user inputs repeated on every row)" if flat else ""),
           "seed": seed}
  _say(progress, f"{name}: exporting {'flat' if flat else 'the user side and the scoring'} ...")
  if flat:
    return export.export_model(model, repository=repository, name=name, version=1,
                               inputs=context + candidates, config=config, extra=extra)
  return export.export_context_model(
      model, repository=repository, name=name, version=1, context_inputs=context,
      candidate_inputs=candidates, context_fn=lambda m, **kw: m.context(**kw),
      score_fn=lambda m, ctx, **kw: m.score(ctx, **kw), config=config, extra=extra)
