"""The package's shape, read from its source: stages import one way, no
cycles, no project import hidden in a function, small modules and
functions. Every import is counted, function-level ones included."""

from __future__ import annotations

import ast
import pathlib

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "mnist_resnet"
# A module may import its own folder and the folders before it.
LAYERS = ("core", "data", "model", "workdir", "training", "commands")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO_ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
  return {_module_name(p): ast.parse(p.read_text(), str(p))
          for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
  """(imported module, at the top level?) for every import in `tree`; a
  `from package import name` counts as importing package.name when that is
  a module."""
  top = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}"
               if f"{node.module}.{a.name}" in MODULES else node.module
               for a in node.names]
    found += [(n, id(node) in top) for n in names]
  return found


def _project_imports(module: str) -> list[tuple[str, bool]]:
  return [(n, at_top) for n, at_top in _imports(MODULES[module])
          if n == "mnist_resnet" or n.startswith("mnist_resnet.")]


def _layer(module: str) -> int:
  """Index in LAYERS; the entry-point shims at the top come last."""
  parts = module.split(".")
  if len(parts) > 2 and parts[1] in LAYERS:
    return LAYERS.index(parts[1])
  return len(LAYERS)


def test_every_module_is_in_a_stage_folder_or_a_command_shim():
  for module in MODULES:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] not in LAYERS:
      # mnist_resnet.X: a shim for `python -m mnist_resnet.X`.
      assert f"mnist_resnet.commands.{parts[1]}" in MODULES, module
    else:
      assert len(parts) <= 3 and (len(parts) == 1 or parts[1] in LAYERS), (
          module)


def test_imports_follow_the_stage_order():
  wrong = [f"{m} ({LAYERS[_layer(m)] if _layer(m) < len(LAYERS) else 'shim'}"
           f") imports {n}"
           for m in MODULES for n, _ in _project_imports(m)
           if n in MODULES and _layer(n) > _layer(m)]
  assert not wrong, "\n".join(wrong)


def test_no_project_import_inside_a_function():
  hidden = [f"{m} imports {n} inside a function" for m in MODULES
            for n, at_top in _project_imports(m) if not at_top]
  assert not hidden, "\n".join(hidden)


def test_the_package_never_imports_the_repository_configs():
  found = [m for m in MODULES for n, _ in _imports(MODULES[m])
           if n == "configs" or n.startswith("configs.")]
  assert not found, found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph`, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done.
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycles():
  graph = {m: {n for n, _ in _project_imports(m) if n in MODULES and n != m}
           for m in MODULES}
  cycle = _cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_small(module):
  tree = MODULES[module]
  path = PACKAGE.parent / (module.replace(".", "/") + (
      "/__init__.py" if (PACKAGE.parent / module.replace(".", "/")).is_dir()
      else ".py"))
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
  long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
          for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, long


def _required_parameters(node: ast.FunctionDef) -> int:
  args = node.args
  positional = args.posonlyargs + args.args
  required = len(positional) - len(args.defaults)
  required -= bool(positional) and positional[0].arg in ("self", "cls")
  return required + sum(d is None for d in args.kw_defaults)


def test_functions_take_few_required_parameters():
  many = [f"{m}.{node.name}: {_required_parameters(node)}"
          for m, tree in MODULES.items() for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef)
          and _required_parameters(node) > 9]
  assert not many, many
  loop = next(node for node in ast.walk(MODULES["mnist_resnet.training.loop"])
              if isinstance(node, ast.FunctionDef)
              and node.name == "train_loop")
  assert len(loop.args.args) + len(loop.args.kwonlyargs) <= 7
