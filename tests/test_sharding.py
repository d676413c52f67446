"""Sharded forward passes on 8 fake CPU devices equal the unsharded one, with parameters really sharded."""

import os

import jax
import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "tiny.py")


def test_eight_devices():
  assert jax.device_count() == 8


TP_SHAPE = {"model.num_heads": "8", "model.num_kv_heads": "8", "model.mlp_hidden": "256", "model.vocab_size": "304"}


@pytest.mark.parametrize("preset,overrides", [("fsdp", {}), ("fsdp_tp", {"sharding.ici.tensor": "2"}), ("dp", {}),
                                              ("tp", TP_SHAPE)])
def test_sharded_forward_matches_unsharded(preset, overrides):
  config = config_lib.load_config(TINY, {"sharding.preset": preset, **overrides})
  model = llada.build_model(config.model)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(preset)
  params, shardings = partitioning.init_sharded_params(model, jax.random.key(0), mesh, rules)
  ids = jax.random.randint(jax.random.key(1), (8, 24), 0, config.model.vocab_size)
  host = jax.device_get(params)
  expected = np.asarray(model.apply({"params": host}, ids))

  # Parameters are really split: for presets that shard parameters, the big matrices are not whole on any device.
  sharded = [x for x in jax.tree.leaves(params) if x.ndim >= 2 and
             x.addressable_shards[0].data.shape != x.shape]
  if preset == "dp":
    assert not sharded
  else:
    assert len(sharded) >= 7, [x.sharding for x in jax.tree.leaves(params)]
    wte = params["wte"]
    assert wte.addressable_shards[0].data.size < wte.size

  with partitioning.axis_rules(mesh, rules):
    fwd = jax.jit(lambda p, i: model.apply({"params": p}, i),
                  in_shardings=(shardings, partitioning.batch_sharding(mesh, rules)))
    out = fwd(params, ids)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


def test_mesh_errors_name_the_problem():
  config = config_lib.load_config(TINY, {"sharding.ici.fsdp": "3", "sharding.ici.data": "-1"})
  with pytest.raises(mesh_lib.MeshError, match="8 devices cannot be split"):
    mesh_lib.create_mesh(config.sharding)
  config = config_lib.load_config(TINY, {"sharding.ici.fsdp": "3"})
  with pytest.raises(mesh_lib.MeshError, match="use 3 devices but 8 are available"):
    mesh_lib.create_mesh(config.sharding)
  config = config_lib.load_config(TINY, {"sharding.ici.fsdp": "2", "sharding.ici.data": "2"})
  with pytest.raises(mesh_lib.MeshError, match="use 4 devices but 8 are available"):
    mesh_lib.create_mesh(config.sharding)
