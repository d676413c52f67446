"""The package's import structure, read from the source (so it cannot drift from the code):

* no import cycle between modules, counting imports inside functions;
* library code never imports the command line (`mmada_jax.cli`), and argparse appears only there;
* parameter key names of the backbone are known only to `models/` and `convert/`.
"""

import ast
import os
import re

PACKAGE = "mmada_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, name)
  return out


def _package_of(module: str, path: str) -> str:
  return module if path.endswith("__init__.py") else module.rpartition(".")[0]


def _imported(module: str, path: str, known: set[str]) -> set[str]:
  """The package modules that `module` imports anywhere in its file (module level or inside functions)."""
  targets = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      targets.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = _package_of(module, path).split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      targets.add(base)
      targets.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
  edges = set()
  own = module.split(".")
  for target in targets:
    parts = target.split(".")
    for i in range(1, len(parts) + 1):
      name = ".".join(parts[:i])
      # Importing a module also runs its packages' __init__; the importer's own packages are already loading.
      if name in known and name != module and own[:i] != parts[:i]:
        edges.add(name)
  return edges


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imported(m, p, set(modules)) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_cycles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_function_local_and_relative_imports(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("import os\ndef f():\n  from mmada_jax.models import llada\n  from . import other\n")
  known = {"mmada_jax", "mmada_jax.models", "mmada_jax.models.llada", "mmada_jax.pkg", "mmada_jax.pkg.other"}
  assert _imported("mmada_jax.pkg.m", str(path), known) == {"mmada_jax.models", "mmada_jax.models.llada",
                                                            "mmada_jax.pkg.other"}


def test_no_import_cycles():
  cycles = _cycles(_graph())
  assert not cycles, "import cycles (counting imports inside functions):\n" + "\n".join(" <-> ".join(c)
                                                                                         for c in cycles)


def test_library_never_imports_the_command_line():
  offenders = sorted(f"{m} imports {t}" for m, targets in _graph().items() if not m.startswith(f"{PACKAGE}.cli")
                     for t in targets if t == f"{PACKAGE}.cli" or t.startswith(f"{PACKAGE}.cli."))
  assert not offenders, offenders


def test_argparse_only_in_the_command_line():
  offenders = [m for m, p in _modules().items() if not m.startswith(f"{PACKAGE}.cli")
               and re.search(r"^\s*(import argparse|from argparse)", open(p, encoding="utf-8").read(), re.M)]
  assert not offenders, offenders


def test_parameter_names_only_in_models_and_convert():
  # ("blocks" is left out: samplers report a count under that name; a walk over the layers meets the names below.)
  names = re.compile(r"""["'](wte|lm_head|attn_norm|ff_norm|ln_f|q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|"""
                     r"""ff_out|qkv_stacked|gate_up_stacked)["']\]""")
  offenders = []
  for module, path in _modules().items():
    if module.split(".")[1:2] in (["models"], ["convert"]):
      continue
    for k, line in enumerate(open(path, encoding="utf-8"), 1):
      if names.search(line):
        offenders.append(f"{os.path.relpath(path, ROOT)}:{k}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
