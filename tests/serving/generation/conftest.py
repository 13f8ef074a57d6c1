"""Session fixtures: the tiny decoder trained for a few seconds, its bundles, a loaded engine."""

from __future__ import annotations

import dataclasses

import pytest
from flax import nnx

from export.generative import GenerativeExportConfig, ad_corpus, export_generative, train
from models.decoder import Decoder, DecoderConfig
from models.tokenizer import ByteTokenizer
from serving.telemetry.compile_watch import CompileCounter


@pytest.fixture(scope="session")
def compile_counter() -> CompileCounter:
  return CompileCounter().install()


@pytest.fixture(scope="session")
def tiny_trained() -> tuple[Decoder, dict]:
  """Trained, so greedy generations have clear winners (no near-ties between float paths)."""
  config = GenerativeExportConfig.tiny()
  model = Decoder(DecoderConfig.tiny(), rngs=nnx.Rngs(config.seed))
  return model, train(model, ad_corpus(seed=config.seed), config, ByteTokenizer())


@pytest.fixture(scope="session")
def tiny_model(tiny_trained) -> Decoder:
  return tiny_trained[0]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_trained, tmp_path_factory):
  model, training = tiny_trained
  path = tmp_path_factory.mktemp("repo") / "decoder" / "1"
  return export_generative(model, path, GenerativeExportConfig.tiny(),
                           extra={"training": training})


@pytest.fixture(scope="session")
def tiny_int8_bundle(tiny_model, tmp_path_factory):
  """int8 KV cache; one prefill bucket keeps its compile time down."""
  path = tmp_path_factory.mktemp("repo") / "decoder_int8" / "1"
  config = dataclasses.replace(GenerativeExportConfig.tiny(), kv_dtype="int8",
                               prefill_lengths=(128,))
  return export_generative(tiny_model, path, config, name="decoder_int8")


@pytest.fixture(scope="session")
def tiny_engine(tiny_bundle, compile_counter):
  from serving.generation.engine import BundleEngine

  engine = BundleEngine(tiny_bundle, compile_counter=compile_counter)
  yield engine
  engine.close()


@pytest.fixture
def service(tiny_engine):
  """make(**ServiceConfig fields) -> a started GenerationService over the tiny engine; each is
  stopped after the test, which then checks it left no request or KV page behind."""
  from serving.generation.service import GenerationService, ServiceConfig

  services = []

  def make(**config):
    svc = GenerationService(tiny_engine, config=ServiceConfig(max_waiting=1000, **config)).start()
    services.append(svc)
    return svc

  yield make
  for svc in services:
    svc.stop(drain=False)
    st = svc.stats()
    assert st["running"] == st["waiting"] == st["kv_pages_used"] == 0, st
