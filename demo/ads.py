"""The demo ad corpus, its retrieval index, and the retrieval -> ranking pipeline over them.

`ad_index` is a predict bundle whose params are the corpus: each ad's two-tower ad embedding
(the demo `two_tower` model's ad tower, same seed), its id and its ranking features, one ad
per slot, plus 10% free slots (`valid` 0). Its one signature takes query embeddings [B, E] and
returns the exact top-K ads by inner product (cosine: the embeddings are unit vectors), found
in XLA on the device, with their features. Ads are added, removed or replaced while serving by
setting slots' rows (`POST /v2/models/ad_index/params`, serving/frontend/params.py): all leaves
of one update change between two batches, so a query sees one generation of the index.
`ads_pipeline` chains: query text -> tokenize -> `two_tower_query` -> `ad_index` -> `ranker`
(the query embedding and the user as context, the K retrieved ads as candidates) -> the top n
ads by predicted click probability.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

DEMO_ADS, TINY_ADS = 100_000, 2_000
DEMO_K, TINY_K = 200, 20  # ads retrieved per query, then ranked
TOP_N = 10  # ads the pipeline answers with
TITLE_LEN = 32  # ad titles are embedded at this many bytes (the ad number first: distinct)
INDEX_BUCKETS, TINY_INDEX_BUCKETS = (1, 2, 4, 8, 16), (1, 4)  # queries per batch

_BRANDS = ("Acme", "Nimbus", "Vertex", "Solace", "Kite", "Orbit", "Maple", "Harbor", "Zenith",
           "Pioneer", "Lumen", "Cobalt")
_PRODUCTS = ("running shoes", "coffee maker", "headphones", "yoga mat", "backpack", "desk lamp",
             "water bottle", "rain jacket", "smart watch", "office chair", "tent", "blender")
_HOOKS = ("free shipping", "20% off", "new season", "best seller", "limited offer", "eco",
          "for kids", "pro edition", "two for one", "lifetime warranty")


def ad_corpus(n: int, seed: int = 0, *, table_sizes: tuple[int, ...] = (500_000, 50_000, 1_000, 50),
              dense: int = 8) -> dict[str, np.ndarray]:
  """n generated ads: distinct titles [n] (bytes), ad_ids [n], ranking features ad_sparse [n, F] (ad id,
  advertiser, category, format, each within its table) and ad_dense [n, dense]."""
  rng = np.random.default_rng(seed)
  b, p, h = (rng.integers(0, len(x), n) for x in (_BRANDS, _PRODUCTS, _HOOKS))
  titles = np.array([f"#{a} {_BRANDS[i]} {_PRODUCTS[j]} - {_HOOKS[k]}".encode()
                     for a, (i, j, k) in enumerate(zip(b, p, h))], dtype=object)
  ids = np.arange(n, dtype=np.int32)
  sparse = np.stack([ids % table_sizes[0], b * 997 + p, p, h][:len(table_sizes)], axis=1)
  sparse = (sparse % np.array(table_sizes)).astype(np.int32)
  return {"titles": titles, "ad_ids": ids, "ad_sparse": sparse,
          "ad_dense": rng.normal(size=(n, dense)).astype(np.float32)}


def byte_tokens(texts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [n, length] int32: UTF-8 bytes, 0-padded, lengths [n]): the pipeline's tokenize op."""
  ids = np.zeros((len(texts), length), np.int32)
  lengths = np.zeros(len(texts), np.int32)
  for i, t in enumerate(texts):
    codes = np.frombuffer(t[:length], np.uint8)
    ids[i, :len(codes)] = codes
    lengths[i] = len(codes)
  return ids, lengths


def embed_ads(towers, titles: np.ndarray, *, batch: int = 1024,
              progress: Callable[[str], None] | None = None) -> np.ndarray:
  """The ad tower's unit embeddings [n, E] of `titles`, in fixed-size batches (one compile);
  says how far it got about every 10 s."""
  import time

  import jax

  fn = jax.jit(lambda ids, lengths: towers.ad(ids, lengths))
  ids, lengths = byte_tokens(titles, TITLE_LEN)
  out, said = [], time.monotonic()
  for start in range(0, len(titles), batch):
    if progress is not None and time.monotonic() - said > 10:
      progress(f"ad_index: {start:,} of {len(titles):,} ads embedded ...")
      said = time.monotonic()
    chunk_ids, chunk_len = ids[start:start + batch], lengths[start:start + batch]
    pad = batch - len(chunk_ids)
    if pad:
      chunk_ids = np.concatenate([chunk_ids, np.zeros((pad, TITLE_LEN), np.int32)])
      chunk_len = np.concatenate([chunk_len, np.ones(pad, np.int32)])
    out.append(np.asarray(fn(chunk_ids, chunk_len))[:batch - pad])
  return np.concatenate(out)


def retrieve(params: dict, inputs: dict, *, k: int) -> dict:
  """Exact maximum inner product top-k over the index; removed ads (valid 0) never come back."""
  import jax
  import jax.numpy as jnp

  scores = inputs["query"] @ params["embeddings"].T  # [B, N]
  scores = jnp.where(params["valid"][None, :] > 0, scores, -jnp.inf)
  top, idx = jax.lax.top_k(scores, k)
  return {"ad_ids": params["ad_ids"][idx], "scores": top,
          "ad_sparse": params["ad_sparse"][idx], "ad_dense": params["ad_dense"][idx]}


def build_ad_index(repository: pathlib.Path, *, tiny: bool = False, seed: int = 0,
                   platforms: tuple[str, ...] = ("cpu",), num_ads: int | None = None,
                   k: int | None = None, progress: Callable[[str], None] | None = None
                   ) -> pathlib.Path:
  """Exports `<repository>/ad_index/1`: the generated corpus embedded by the demo two-tower
  model's ad tower (seed 0, as `build_two_tower` builds it) and served as a top-k index."""
  import functools

  from flax import nnx

  import export
  from models.ranking import RankerConfig
  from models.two_tower import TwoTower, TwoTowerConfig

  say = progress or (lambda msg: logger.info("%s", msg))
  n = num_ads or (TINY_ADS if tiny else DEMO_ADS)
  k = k or (TINY_K if tiny else DEMO_K)
  towers = TwoTower(TwoTowerConfig.tiny() if tiny else TwoTowerConfig.demo(), rngs=nnx.Rngs(0))
  rcfg = RankerConfig.tiny() if tiny else RankerConfig.demo()
  corpus = ad_corpus(n, seed, table_sizes=rcfg.ad_table_sizes, dense=rcfg.ad_dense)
  say(f"ad_index: embedding {n:,} generated ads with the two-tower ad tower ...")
  free = n // 10  # empty slots (valid 0) for ads added while serving (POST .../params)
  grow = lambda x, fill: np.concatenate([x, np.full((free, *x.shape[1:]), fill, x.dtype)])  # noqa: E731
  params = {"embeddings": grow(embed_ads(towers, corpus["titles"], progress=say), 0.0),
            "ad_ids": grow(corpus["ad_ids"], -1), "ad_sparse": grow(corpus["ad_sparse"], 0),
            "ad_dense": grow(corpus["ad_dense"], 0.0),
            "valid": grow(np.ones(n, np.float32), 0.0)}
  dim = params["embeddings"].shape[1]
  return export.export_model(
      functools.partial(retrieve, k=k), params=params, repository=repository, name="ad_index",
      version=1, inputs=[export.Input("query", "float32", ("batch", dim))],
      config=export.ExportConfig(batch_buckets=TINY_INDEX_BUCKETS if tiny else INDEX_BUCKETS,
                                 max_queue_delay_us=500,
                                 platforms=platforms),
      extra={"description": f"exact top-{k} retrieval over {n:,} ad embeddings (inner product);"
                            f" slots {n}..{n + free - 1} are free for ads added while serving",
             "num_ads": n, "slots": n + free, "k": k})


def pipeline_config(*, k: int, top_n: int = TOP_N, ranker=None) -> dict:
  """The demo pipeline as data: query text and user in, the top_n ads and their scores out."""
  from models.ranking import RankerConfig

  r = ranker or RankerConfig.demo()
  per_ad = lambda step, width: {"from": f"retrieve.{step}", "reshape": [k, width]}  # noqa: E731
  return {
      "inputs": [{"name": "query", "datatype": "BYTES", "shape": [1]},
                 {"name": "history", "datatype": "INT32", "shape": [1, r.history_len]},
                 {"name": "user_dense", "datatype": "FP32", "shape": [1, r.user_dense]}],
      "outputs": [{"name": "ad_ids", "datatype": "INT32", "shape": [1, top_n],
                   "from": "select.ad_ids"},
                  {"name": "scores", "datatype": "FP32", "shape": [1, top_n],
                   "from": "select.scores"}],
      "steps": [
          {"name": "tokenize", "op": "tokenize", "inputs": {"text": "query"},
           "options": {"max_len": 64}},
          {"name": "embed", "model": "two_tower_query",
           "inputs": {"token_ids": "tokenize.token_ids", "lengths": "tokenize.lengths"}},
          {"name": "retrieve", "model": "ad_index", "inputs": {"query": "embed.embedding"}},
          {"name": "rank", "model": "ranker",
           "inputs": {"history": "history", "user_dense": "user_dense",
                      "query": "embed.embedding",
                      "ad_sparse": per_ad("ad_sparse", len(r.ad_table_sizes)),
                      "ad_dense": per_ad("ad_dense", r.ad_dense)}},
          {"name": "select", "op": "top_k", "options": {"k": top_n},
           "inputs": {"scores": {"from": "rank.prob", "reshape": [1, k]},
                      "ad_ids": "retrieve.ad_ids"}},
      ]}


def build_ads_pipeline(repository: pathlib.Path, *, tiny: bool = False,
                       platforms: tuple[str, ...] = ("cpu",),
                       progress: Callable[[str], None] | None = None) -> pathlib.Path:
  """Writes `<repository>/ads_pipeline/1`: retrieval -> ranking in one call (no weights)."""
  import export
  from models.ranking import RankerConfig

  del platforms  # a pipeline has no compiled code of its own
  (progress or (lambda msg: logger.info("%s", msg)))("ads_pipeline: writing its steps ...")
  return export.export_pipeline(
      pipeline_config(k=TINY_K if tiny else DEMO_K,
                      ranker=RankerConfig.tiny() if tiny else RankerConfig.demo()),
      repository=repository, name="ads_pipeline", version=1,
      description="query text + user -> two_tower_query -> top-k over ad_index -> ranker with"
                  " the query and user as context -> the top 10 ads")
