"""Mesh construction, rule fitting and batch-layout validation on 8 fake CPU devices."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from anatomix_jax.core import config as config_lib
from anatomix_jax.core import sharding


def test_mesh_autofill_and_axis_types():
  mesh = sharding.make_mesh(config_lib.mesh_config((-1, 2, 1)))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)


@pytest.mark.parametrize("shape, match", [((3, -1, 1), "does not divide"), ((-1, -1, 1), "at most one"),
                                          ((2, 2, 1), "uses 4 devices"), ((0, 8, 1), "positive")])
def test_mesh_errors(shape, match):
  with pytest.raises(sharding.ShardingError, match=match):
    sharding.make_mesh(config_lib.mesh_config(shape))


def test_fitting_to_shape_replicates_undivided_dims():
  mesh = sharding.make_mesh(config_lib.mesh_config((2, 2, 2)))
  assert sharding.fit_to_shape(P("fsdp", "tensor"), (6, 7), mesh) == P("fsdp", None)
  assert sharding.fit_to_shape(P(("data", "fsdp")), (4, 3), mesh) == P(("data", "fsdp"), None)
  assert sharding.fit_to_shape(P(("data", "fsdp")), (6,), mesh) == P("data")


def test_check_global_batch():
  mesh = sharding.make_mesh(config_lib.mesh_config((2, 2, 2)))
  rules = config_lib.DEFAULT_RULES
  assert sharding.check_global_batch(8, mesh, rules) == 8
  with pytest.raises(sharding.ShardingError, match="not divisible by the 4 data-parallel"):
    sharding.check_global_batch(6, mesh, rules)
  with pytest.raises(sharding.ShardingError, match="3 processes"):
    sharding.check_global_batch(8, mesh, rules, process_count=3)


def test_host_to_global_places_rows_on_data_axes():
  mesh = sharding.make_mesh(config_lib.mesh_config((2, 2, 2)))
  sh = sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES)
  local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
  out = sharding.host_to_global(local, sh)
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
  assert out["x"].sharding.spec == P(("data", "fsdp"))
  rows = {(s.index[0].start, s.index[0].stop) for s in out["x"].addressable_shards}
  assert rows == {(0, 2), (2, 4), (4, 6), (6, 8)}  # 4 row blocks, each on 2 tensor replicas


def test_parse_arg():
  arg = config_lib.parse_arg("demo,steps=7", demo=False, steps=3)
  assert arg.demo is True and arg.steps == 7
  with pytest.raises(ValueError, match="unknown config argument 'tiny'"):
    config_lib.parse_arg("tiny", demo=False)
  with pytest.raises(ValueError, match="needs a value"):
    config_lib.parse_arg("steps", steps=3)
  assert isinstance(config_lib.parse_arg(None, demo=False), ml_collections.ConfigDict)


def test_host_batch_size():
  assert sharding.host_batch_size(48, 2, 8) == 24
  assert sharding.host_batch_size(6, 1) == 6
  with pytest.raises(ValueError, match="not divisible by the 4 processes"):
    sharding.host_batch_size(6, 4)
  with pytest.raises(ValueError, match="data-parallel size 8"):
    sharding.host_batch_size(12, 2, 8)
  with pytest.raises(ValueError, match="not a multiple of the 4 processes"):
    sharding.host_batch_size(8, 4, 2)
  with pytest.raises(ValueError, match="positive"):
    sharding.host_batch_size(0, 1)
