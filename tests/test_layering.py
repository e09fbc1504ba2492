"""The package's layering, read from its imports (ast): each package imports only itself and the
layers below it, no two packages import each other, nobody uses another module's ``_private``
names. README "Layout" draws the same table."""

import ast
import itertools
import os
import textwrap

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "anatomix_jax")

# Lower numbers sit lower; a package may import its own modules and those of lower layers.
LAYERS = {
    "anatomy": 0, "core": 0, "ops": 0,   # constants, sharding/checkpointing/loop, array ops
    "models": 1,                         # Flax modules
    "convert": 2,                        # weights and HF configs in and out
    "data": 3,                           # image reading, scene graphs, records, augmentation
    "instruct": 4, "rag": 4,             # instruction records; the sentence database
    "synthetic": 5, "evaluation": 5,     # the embedded synthetic data; metrics and overlays
    "stage1": 6,
    "stage2": 7,                         # uses stage 1's trained APM (stage1.load)
    "aot": 8,                            # ahead-of-time compiles of both stages' steps
    "original": 8,                       # the original AnatomiX's files in and out, both stages
    "main": 9,
}


def _modules(root: str):
  """(dotted module name, package, path) of every .py file under ``root``."""
  base = os.path.basename(root)
  for directory, _, files in os.walk(root):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
        module = rel.removesuffix(".__init__")
        parts = module.split(".")
        yield module, parts[1] if len(parts) > 1 else base, path


def _imports(module: str, path: str, base: str):
  """(imported module, imported names, node) for each ``base`` import of a file."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == base:
          yield alias.name, [], node
    elif isinstance(node, ast.ImportFrom):
      target = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(anchor + ([node.module] if node.module else []))
      if target.split(".")[0] == base:
        yield target, [a.name for a in node.names], node


def violations(root: str, layers: dict[str, int]) -> list[str]:
  """Every breach of the layering rules in the package at ``root``."""
  base = os.path.basename(root)
  known = {m for m, _, _ in _modules(root)}
  found, edges = [], set()
  for module, package, path in _modules(root):
    aliases = {}
    for target, names, node in _imports(module, path, base):
      # ``from pkg import module`` names a module; ``from module import name`` a name in it.
      targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in known] or [target]
      for t in targets:
        parts = t.split(".")
        other = parts[1] if len(parts) > 1 else base
        if other == base:
          continue
        if package not in layers or other not in layers:
          found.append(f"{path}:{node.lineno}: {package} or {other} has no layer")
          continue
        if other != package:
          edges.add((package, other))
          if layers[other] >= layers[package]:
            found.append(f"{path}:{node.lineno}: {package} (layer {layers[package]}) imports "
                         f"{t} (layer {layers[other]})")
      for n in names:
        if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in known:
          found.append(f"{path}:{node.lineno}: imports the private name {n} of {target}")
      if isinstance(node, ast.ImportFrom):
        for a in node.names:
          if f"{target}.{a.name}" in known:
            aliases[a.asname or a.name] = f"{target}.{a.name}"
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__") and aliases[node.value.id] != module):
        found.append(f"{path}:{node.lineno}: uses the private {aliases[node.value.id]}."
                     f"{node.attr}")
  for a, b in itertools.combinations(sorted({p for e in edges for p in e}), 2):
    if (a, b) in edges and (b, a) in edges:
      found.append(f"packages {a} and {b} import each other")
  return found


def test_the_package_keeps_its_layers():
  assert violations(PACKAGE, LAYERS) == []


def test_every_package_has_a_layer():
  packages = {p for _, p, _ in _modules(PACKAGE)} - {"anatomix_jax"}
  assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def _write(root, files):
  for rel, text in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(textwrap.dedent(text))


@pytest.mark.parametrize("files, expected", [
    # a model importing a stage (upward)
    ({"models/m.py": "from pkg.stage1 import task\n", "stage1/task.py": ""},
     ["models (layer 1) imports pkg.stage1.task (layer 6)"]),
    # two packages importing each other, one of them upward
    ({"data/a.py": "import pkg.instruct.b\n", "instruct/b.py": "from pkg.data import a\n"},
     ["data (layer 3) imports pkg.instruct.b (layer 4)", "data and instruct import each other"]),
    # a private name, imported and used as an attribute
    ({"stage2/d.py": "from pkg.stage1.data import _seed\nfrom pkg.stage1 import data\n"
                     "data._augment()\n", "stage1/data.py": "def _seed(): pass\n"},
     ["private name _seed of pkg.stage1.data", "uses the private pkg.stage1.data._augment"]),
    # relative imports resolve too
    ({"core/c.py": "from ..evaluation import e\n", "evaluation/e.py": ""},
     ["core (layer 0) imports pkg.evaluation.e (layer 5)"]),
])
def test_violations_are_found(tmp_path, files, expected):
  root = tmp_path / "pkg"
  _write(root, {"__init__.py": "", **{os.path.dirname(k) + "/__init__.py": "" for k in files},
                **files})
  found = violations(str(root), LAYERS)
  assert len(found) == len(expected), found
  for want in expected:
    assert any(want in f for f in found), (want, found)


def test_downward_and_same_package_imports_pass(tmp_path):
  root = tmp_path / "pkg"
  _write(root, {"__init__.py": "", "core/__init__.py": "", "models/__init__.py": "",
                "stage1/__init__.py": "", "core/s.py": "def f(): pass\n",
                "models/m.py": "from pkg.core import s\nfrom pkg.models import n\ns.f()\n",
                "models/n.py": "", "stage1/t.py": "from . import u\nfrom pkg.models import m\n",
                "stage1/u.py": ""})
  assert violations(str(root), LAYERS) == []
