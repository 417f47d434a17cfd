"""The import graph of the library points down: no cycle, and no import from a lower layer to a higher one.

Every module of ``attnlab`` and ``kernels_pallas`` is read with ``ast`` (module-level and function-level imports
alike) and placed in a layer by its dotted name (the longest matching prefix of ``LAYERS``). Package ``__init__``
modules only re-export names and are not nodes of the graph; an import of a package is an import of the modules
it names.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("attnlab", "kernels_pallas")

# Bottom to top. A module may import modules of its own layer or of lower layers only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("attnlab.fields", "attnlab.ops.scores", "attnlab.ops.masks", "attnlab.attention.special_tokens"),  # the contract
    ("attnlab.ops", "attnlab.layers"),  # the dense reference, linear-attention forms, nn building blocks
    ("kernels_pallas", "attnlab.attention.blocked"),  # Pallas kernels and the pure-JAX blocked path (same tile math)
    ("attnlab.attention.dispatch",),  # attend(): the backend table
    ("attnlab.attention",),  # configs, projections, variants and their math
    ("attnlab.parallel",),  # mesh and logical-axis sharding rules, jax.distributed start-up
    ("attnlab.model", "attnlab.data"),
    ("attnlab.pretrained",),  # Hugging Face checkpoints -> ModelConfig + DecoderLM parameters
    ("attnlab.inference",),  # generation and cache sharding over the models' cache protocol
    ("attnlab.state",),  # building and restoring a train state, checkpoints, the model-on-a-batch function
    ("attnlab.eval", "attnlab.analysis", "attnlab.streaming"),
    ("attnlab.train",),
    ("attnlab.configs",),  # gin: binds the typed configs of every layer below
    ("attnlab.app",),  # whole-workdir jobs
    ("attnlab.cli",),
)
# Optional heavy dependencies may be imported inside functions; nothing else may.
LAZY_ALLOWED = ("matplotlib", "datasets", "torch", "transformers", "huggingface_hub", "safetensors", "libtpu",
                "tokenizers", "tensorboardX", "pydoc_data")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()
PACKAGE_INITS = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _layer(module: str) -> int:
  best, rank = -1, None
  for i, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
        best, rank = len(prefix), i
  if rank is None:
    raise AssertionError(f"module {module} is in no layer of tests/test_layering.py: add it to LAYERS")
  return rank


def _resolve(name: str) -> list[str]:
  """Project modules an import of ``name`` reaches (a package's ``__init__`` stands for the modules it imports)."""
  if name in PACKAGE_INITS:
    return [m for m in _imports(name)[0] if m.startswith(name + ".")] or []
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return [name] if name else []


def _imports(module: str) -> tuple[list[str], list[tuple[int, str]]]:
  """(project modules imported anywhere in ``module``, [(line, name)] of imports inside functions)."""
  tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
  targets, lazy = [], []
  package = module if module in PACKAGE_INITS else module.rpartition(".")[0]

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        if isinstance(child, ast.Import):
          names = [a.name for a in child.names]
        else:
          base = child.module or ""
          if child.level:
            anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
            base = ".".join(anchor + ([base] if base else []))
          names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
        if in_function:
          lazy.extend((child.lineno, n) for n in names)
        targets.extend(n for n in names if n.split(".")[0] in PACKAGES)
      visit(child, inner)

  visit(tree, False)
  return targets, lazy


def _graph() -> dict[str, set[str]]:
  graph = {}
  for module in MODULES:
    if module in PACKAGE_INITS:
      continue
    reached = set()
    for name in _imports(module)[0]:
      for target in _resolve(name):
        if target != module and target not in PACKAGE_INITS:
          reached.add(target)
    graph[module] = reached
  return graph


GRAPH = _graph()


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  return [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
          for m, targets in graph.items() for t in sorted(targets) if _layer(t) > _layer(m)]


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
  state, stack, cycles = {}, [], []

  def walk(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        walk(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      walk(node)
  return cycles


def test_every_module_has_a_layer():
  for module in GRAPH:
    _layer(module)


def test_no_import_points_up():
  upward = upward_imports(GRAPH)
  assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_cycles():
  cycles = find_cycles(GRAPH)
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_imports_inside_functions():
  found = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {name}" for m in MODULES
           for line, name in _imports(m)[1] if name.split(".")[0] not in LAZY_ALLOWED]
  assert not found, "imports inside functions (only optional heavy dependencies may be):\n" + "\n".join(found)


def test_the_checks_catch_a_planted_upward_import_and_cycle():
  planted = {m: set(t) for m, t in GRAPH.items()}
  planted["attnlab.ops.dense"].add("attnlab.attention.dispatch")  # the kernel oracle calling the dispatch
  assert any(line.startswith("attnlab.ops.dense ") for line in upward_imports(planted))
  assert any("attnlab.ops.dense" in c and "attnlab.attention.dispatch" in c for c in find_cycles(planted))
