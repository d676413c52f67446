"""Golden sharding dumps: what every preset does to every parameter and to the batches, pinned in tests/golden/.

For each preset, on the 8 fake CPU devices, tests/golden/shardings_<preset>.json records the mesh, the rule table, and
for every parameter of the tiny model its shape, logical axis names and resulting mesh PartitionSpec, plus the
PartitionSpecs of a train batch and of a UniGRPO batch. A change in the presets, the rules, the model's axis names or
the divisibility fallback shows up as a readable diff.

The tiny model is widened (8 heads, MLP 256, 304 vocabulary rows) so that every axis divides 8 and `tp` really splits.
Regenerate after an intended change and review the diff:

  MMADA_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_shardings.py && git diff tests/golden
"""

import difflib
import json
import os
import pathlib

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec

from mmada_jax import config as config_lib
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "experiments" / "tiny.py")
GOLDEN = ROOT / "tests" / "golden"
WIDE = {"model.num_heads": "8", "model.num_kv_heads": "8", "model.mlp_hidden": "256", "model.vocab_size": "304"}
TRAIN_BATCH = (16, 24)  # rows, length of every array of a task
RL_B, RL_P, RL_C, RL_MU, RL_K = 16, 6, 10, 2, 1


def spec_json(spec: PartitionSpec, ndim: int) -> list:
  """PartitionSpec -> JSON list with one entry per dimension: null, an axis name, or a list of axis names."""
  parts = list(spec) + [None] * (ndim - len(spec))
  return [list(p) if isinstance(p, tuple) else p for p in parts]


def rl_batch_shapes() -> dict:
  b, t, s = RL_B, RL_P + RL_C, jax.ShapeDtypeStruct
  shapes = {"tokens": (b, t), "attn": (b, t), "maskable": (b, RL_C), "eligible": (b, RL_C), "adv": (b,),
            "row_weight": (b,), "uid": (b,), "ratios": (RL_MU, RL_K, b), "old": (RL_MU, RL_K, b, RL_C),
            "ref": (RL_MU, RL_K, b, RL_C), "mask_key": (2,)}
  return {k: s(v, "float32") for k, v in shapes.items()}


def dump(preset: str) -> dict:
  """The sharding facts of `preset` as a JSON-ready dict."""
  from mmada_jax.rl import step as rl_step

  config = config_lib.load_config(TINY, {"sharding.preset": preset, **WIDE})
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(preset, dict(config.sharding.rule_overrides))
  boxed = partitioning.abstract_variables(llada.build_model(config.model))["params"]
  logical = partitioning.logical_specs(boxed)
  shardings = partitioning.mesh_shardings(boxed, mesh, rules)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  params = {}
  for (path, lspec), sh, leaf in zip(jax.tree_util.tree_leaves_with_path(logical, is_leaf=is_spec),
                                     jax.tree.leaves(shardings), jax.tree.leaves(nn.unbox(boxed))):
    params["/".join(k.key for k in path)] = {"shape": list(leaf.shape), "logical": spec_json(lspec, leaf.ndim),
                                             "mesh": spec_json(sh.spec, leaf.ndim)}
  train = partitioning.batch_sharding(mesh, rules, len(TRAIN_BATCH))
  rl = rl_step.batch_shardings(rl_batch_shapes(), mesh, rules)
  return {"preset": preset, "devices": len(mesh.devices.flat), "mesh": dict(mesh.shape),
          "rules": {k: list(v) for k, v in rules.items()}, "params": params,
          "train_batch": {"shape": list(TRAIN_BATCH), "mesh": spec_json(train.spec, len(TRAIN_BATCH))},
          "rl_batch": {k: spec_json(v.spec, len(rl_batch_shapes()[k].shape)) for k, v in sorted(rl.items())}}


def as_text(d: dict) -> str:
  """JSON with one line per parameter / batch entry (so that a diff names exactly what changed)."""
  one = lambda v: json.dumps(v, sort_keys=True, separators=(", ", ": "))
  blocks = []
  for key, value in sorted(d.items()):
    if isinstance(value, dict) and value:
      inner = ",\n".join(f"  {one(k)}: {one(v)}" for k, v in sorted(value.items()))
      blocks.append(f" {one(key)}: {{\n{inner}\n }}")
    else:
      blocks.append(f" {one(key)}: {one(value)}")
  return "{\n" + ",\n".join(blocks) + "\n}\n"


def golden_diff(preset: str, got: str) -> str | None:
  """None when `got` equals the golden file of `preset`, else a unified diff with the way to regenerate."""
  path = GOLDEN / f"shardings_{preset}.json"
  want = path.read_text() if path.exists() else ""
  if got == want:
    return None
  diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), f"golden/{path.name}",
                                      f"now ({preset})", n=1))
  return (f"shardings of preset {preset!r} differ from {path.relative_to(ROOT)}:\n{diff}\nif the change is intended: "
          f"MMADA_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_shardings.py")


@pytest.mark.parametrize("preset", sorted(rules_lib.PRESETS))
def test_golden_shardings(preset):
  got = as_text(dump(preset))
  if os.environ.get("MMADA_REGEN_GOLDEN") == "1":
    GOLDEN.mkdir(exist_ok=True)
    (GOLDEN / f"shardings_{preset}.json").write_text(got)
    pytest.skip(f"regenerated tests/golden/shardings_{preset}.json")
  message = golden_diff(preset, got)
  if message:
    pytest.fail(message, pytrace=False)


def test_a_changed_rule_shows_as_a_readable_diff(monkeypatch):
  monkeypatch.setitem(rules_lib.PRESETS["fsdp_tp"], "rules", {"mlp": ()})  # MLP no longer split over `tensor`
  message = golden_diff("fsdp_tp", as_text(dump("fsdp_tp")))
  assert message and "MMADA_REGEN_GOLDEN=1" in message
  lines = message.splitlines()
  assert any(x.startswith('-  "blocks/mlp/ff_out/kernel"') and '"mesh": [null, "tensor", "fsdp"]' in x for x in lines)
  assert any(x.startswith('+  "blocks/mlp/ff_out/kernel"') and '"mesh": [null, null, "fsdp"]' in x for x in lines)
  assert any(x.startswith('+  "mlp": []') for x in lines)  # the rule table line too


def test_every_preset_has_a_golden_file():
  names = {p.name for p in GOLDEN.glob("shardings_*.json")}
  assert names == {f"shardings_{p}.json" for p in rules_lib.PRESETS}, names
