"""Rules are complete, and every parameter of every model in models/ resolves under every strategy."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import models
from sharding import LOGICAL_AXES, MESH_AXES, STRATEGIES, STRATEGY_RULES, ShardingPlan, rules_for
from sharding.rules import mesh_axes_of


def test_every_strategy_maps_every_logical_axis_to_mesh_axes():
  assert set(STRATEGIES) == {"replicated", "tensor", "tensor+data", "embedding_rows",
                             "embedding_tables"}
  for name, rules in STRATEGY_RULES.items():
    assert tuple(rules) == LOGICAL_AXES, name
    for axis, value in rules.items():
      assert set(mesh_axes_of(value)) <= set(MESH_AXES), (name, axis, value)
  assert all(v is None for v in rules_for("replicated").values())
  with pytest.raises(ValueError, match="unknown sharding strategy"):
    rules_for("fsdp")


def _model_factories():
  """(name, build) for each nnx.Module in models/ whose first argument is a config dataclass
  of its module (built with the `tiny` preset if there is one, else the defaults; only shapes
  are traced). Modules without one (shared layers) are not models."""
  found = []
  for info in pkgutil.iter_modules(models.__path__):
    module = importlib.import_module(f"models.{info.name}")
    configs = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == module.__name__ and dataclasses.is_dataclass(c)]
    modules = [m for _, m in inspect.getmembers(module, inspect.isclass)
               if m.__module__ == module.__name__ and issubclass(m, nnx.Module)]
    for cfg_cls in configs:
      for m in modules:
        params = list(inspect.signature(m.__init__).parameters.values())[1:]
        if params and params[0].annotation in (cfg_cls, cfg_cls.__name__):
          make = cfg_cls.tiny if hasattr(cfg_cls, "tiny") else cfg_cls
          found.append((f"{info.name}.{m.__name__}",
                        lambda m=m, make=make: m(make(), rngs=nnx.Rngs(0))))
  return found


FACTORIES = _model_factories()


def test_dlrm_is_discovered():
  assert "dlrm.DLRM" in [name for name, _ in FACTORIES]


@pytest.mark.parametrize("name,build", FACTORIES, ids=[n for n, _ in FACTORIES])
def test_every_param_resolves_under_every_strategy(name, build):
  abstract = nnx.eval_shape(build)  # shapes only, nothing allocated
  params = nnx.state(abstract, nnx.Param)
  variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert variables, name
  axes, shapes = [], []
  for v in variables:
    a = v.get_metadata().get("logical_axes")
    assert a is not None, f"{name}: a parameter {v.shape} has no logical_axes metadata"
    assert len(a) == len(v.shape), f"{name}: {a} vs shape {v.shape}"
    axes.append(tuple(a))
    shapes.append(tuple(v.shape))
  for strategy in STRATEGIES:
    for n in (1, 2, 8):
      plan = ShardingPlan.create(strategy, n)
      for a, s in zip(axes, shapes):
        spec = plan.spec_for(a, s)  # raises on an unknown logical axis name
        assert isinstance(spec, P) and len(spec) == len(s)
      shardings = plan.param_shardings(axes, shapes)
      assert len(shardings) == len(axes)
      for sh, s in zip(shardings, shapes):
        sh.shard_shape(s)  # raises if a dimension does not divide
