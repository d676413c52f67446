"""Logical axis names and the sharding presets that map them onto mesh axes (Decision 2).

Model code names axes with the logical names below and never a mesh axis. A preset is data: default per-axis mesh sizes
for ICI and DCN plus a rule table `logical name -> mesh axes`. `config.sharding.preset` selects one;
`config.sharding.rule_overrides.<logical>=<mesh axes>` replaces single rules (comma-separated axes, "" = replicated).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical names used by the model code.
PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed", "activation_heads",
                   "activation_mlp", "activation_vocab", "activation_kv")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

Rule = tuple[str, ...]  # mesh axes a logical axis is split over; () = replicated

# Rules shared by every preset; presets replace entries.
_BASE_RULES: dict[str, Rule] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "norm": (),
    "layers": (),
    "activation_batch": ("data", "fsdp"),
    "activation_length": (),
    "activation_embed": (),
    "activation_heads": ("tensor",),
    "activation_kv": (),
    "activation_mlp": ("tensor",),
    "activation_vocab": ("tensor",),
}

PRESETS: dict[str, dict] = {
    # ZeRO-3 style: parameters split over `fsdp` along the embedding axis, batch over data x fsdp. The default.
    "fsdp": {"ici": {"data": 1, "fsdp": -1, "tensor": 1}, "dcn": {"data": -1, "fsdp": 1, "tensor": 1}, "rules": {}},
    # FSDP plus Megatron-style tensor parallelism inside a slice (heads / mlp / vocab over `tensor`).
    "fsdp_tp": {"ici": {"data": 1, "fsdp": -1, "tensor": 4}, "dcn": {"data": -1, "fsdp": 1, "tensor": 1},
                "rules": {}},
    # Pure data parallelism: every device holds all parameters.
    "dp": {"ici": {"data": -1, "fsdp": 1, "tensor": 1}, "dcn": {"data": -1, "fsdp": 1, "tensor": 1},
           "rules": {"embed": (), "activation_batch": ("data",)}},
    # Pure tensor parallelism: parameters split over `tensor`, batch replicated.
    "tp": {"ici": {"data": 1, "fsdp": 1, "tensor": -1}, "dcn": {"data": -1, "fsdp": 1, "tensor": 1},
           "rules": {"embed": (), "activation_batch": ("data",)}},
    # Multislice: data parallel across slices (DCN), FSDP inside each slice (ICI).
    "dp_fsdp": {"ici": {"data": 1, "fsdp": -1, "tensor": 1}, "dcn": {"data": -1, "fsdp": 1, "tensor": 1},
                "rules": {}},
}


def parse_rule(value) -> Rule:
  """'fsdp' -> ('fsdp',); 'data,fsdp' -> ('data', 'fsdp'); '' or None -> ()."""
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(p.strip() for p in value.split(",") if p.strip())
  return tuple(value)


def resolve_rules(preset: str, overrides: Mapping[str, object] | None = None) -> dict[str, Rule]:
  """The rule table of `preset` with `overrides` applied."""
  if preset not in PRESETS:
    raise ValueError(f"sharding.preset: unknown preset {preset!r} (known: {sorted(PRESETS)})")
  rules = dict(_BASE_RULES)
  rules.update(PRESETS[preset]["rules"])
  for name, value in (overrides or {}).items():
    rules[name] = parse_rule(value)
  return rules


def as_flax_rules(rules: Mapping[str, Rule]) -> tuple[tuple[str, object], ...]:
  """Converts to the `(logical, mesh_axes)` sequence that flax.linen.logical_axis_rules expects."""
  out = []
  for name, axes in rules.items():
    out.append((name, None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))))
  return tuple(out)


def validate_sharding_config(s) -> list[str]:
  """Returns error strings (empty when valid) for a `config.sharding` section."""
  errors: list[str] = []
  if s.preset not in PRESETS:
    return [f"sharding.preset: unknown preset {s.preset!r} (known: {sorted(PRESETS)})"]
  for level in ("ici", "dcn"):
    sizes = s[level]
    unknown = sorted(set(sizes.keys()) - set(MESH_AXES))
    if unknown:
      errors.append(f"sharding.{level}: unknown mesh axes {unknown} (mesh axes: {list(MESH_AXES)})")
    for axis, size in sizes.items():
      if not isinstance(size, int) or (size < 1 and size not in (0, -1)):
        errors.append(f"sharding.{level}.{axis}: must be a positive size, -1 (fill) or 0 (preset default), "
                      f"got {size!r}")
  for name, value in s.rule_overrides.items():
    if name not in LOGICAL_AXES:
      errors.append(f"sharding.rule_overrides.{name}: unknown logical axis (known: {list(LOGICAL_AXES)})")
      continue
    bad = [a for a in parse_rule(value) if a not in MESH_AXES]
    if bad:
      errors.append(f"sharding.rule_overrides.{name}: unknown mesh axes {bad} (mesh axes: {list(MESH_AXES)})")
  return errors


def mesh_sizes(sharding_config, level: str) -> dict[str, int]:
  """Per-axis sizes for `level` ('ici' or 'dcn'): the preset's, with non-zero config entries taking precedence."""
  sizes = dict(PRESETS[sharding_config.preset][level])
  for axis, size in sharding_config[level].items():
    if size != 0:
      sizes[axis] = size
  return {a: sizes[a] for a in MESH_AXES}


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, Rule]):
  """PartitionSpec for a tuple of logical names under `rules` (unknown names are replicated)."""
  parts = []
  for n in names:
    axes = rules.get(n, ()) if n is not None else ()
    parts.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
  return PartitionSpec(*parts)
