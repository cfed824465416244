"""The layering of the code base: the library never imports its recipes or benchmarks.

- No module under vnm_jax/ imports ``train``, ``bench`` or ``vnm_recipes``: checked on the
  source (every import statement, parsed with ``ast``, and any dynamic import or path
  trick: importlib, ``__import__``, runpy, ``sys.path``, ``__file__``, or a string naming
  those packages) and at run time (what ``import vnm_jax`` loads).
- ``import vnm_jax`` does not import orbax (checkpoints import it when used).
- No library module is longer than 500 lines unless its docstring says why (a line
  starting "Longer than 500 lines:").
- The recipes use the library's public API only: no private module or name.
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "vnm_jax"
RECIPES = ROOT / "vnm_recipes"
FORBIDDEN = ("train", "bench", "vnm_recipes")
MAX_LINES = 500
LONG_MODULE_REASON = "Longer than 500 lines:"
# Calls and names a library module has no reason to use: they import by name or by path.
DYNAMIC_IMPORTS = {"import_module", "__import__", "spec_from_file_location",
                   "module_from_spec", "run_path", "run_module", "exec_module", "find_spec"}


def _modules(package: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _docstrings(tree: ast.AST) -> set[int]:
  """ids of the string constants that are docstrings (modules, classes, functions)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        found.add(id(body[0].value))
  return found


def _forbidden_uses(path: pathlib.Path, package: pathlib.Path = LIBRARY) -> list[str]:
  """Every way ``path`` (a module of ``package``) could reach train/, bench/ or vnm_recipes."""
  source = path.read_text()
  tree = ast.parse(source, str(path))
  docstrings = _docstrings(tree)
  named = re.compile(r"(^|[\s/\\.'\"])(" + "|".join(FORBIDDEN) + r")([/\\.]|$)")
  uses = []
  for node in ast.walk(tree):
    where = f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', '?')}"
    if isinstance(node, ast.Import):
      uses += [f"{where} import {a.name}" for a in node.names
               if a.name.split(".")[0] in FORBIDDEN]
    elif isinstance(node, ast.ImportFrom):
      if node.level == 0 and node.module and node.module.split(".")[0] in FORBIDDEN:
        uses.append(f"{where} from {node.module} import ...")
      depth = len(path.relative_to(package).parts)  # a relative import may not leave it
      if node.level > depth:
        uses.append(f"{where} relative import above the package (level {node.level})")
    elif isinstance(node, ast.Name) and node.id in DYNAMIC_IMPORTS | {"__file__"}:
      uses.append(f"{where} uses {node.id}")
    elif isinstance(node, ast.Attribute) and node.attr in DYNAMIC_IMPORTS:
      uses.append(f"{where} calls .{node.attr}")
    elif (isinstance(node, ast.Attribute) and node.attr == "path"
          and isinstance(node.value, ast.Name) and node.value.id == "sys"):
      uses.append(f"{where} uses sys.path")
    elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in docstrings and named.search(node.value)):
      uses.append(f"{where} names {node.value!r}")
  return uses


def test_library_modules_never_import_recipes_or_benchmarks():
  uses = [use for path in _modules(LIBRARY) for use in _forbidden_uses(path)]
  assert not uses, "vnm_jax must not reach train/, bench/ or vnm_recipes:\n" + "\n".join(uses)


def test_the_source_check_catches_imports_and_path_tricks(tmp_path):
  package = tmp_path / "vnm_jax"
  package.mkdir()
  module = package / "probe.py"
  module.write_text('"""A docstring may mention vnm_recipes and bench/kernel.py."""\n'
                    "import importlib\n"
                    "import train.vit\n"
                    "from vnm_recipes import cli\n"
                    "from ... import bench\n"
                    "importlib.import_module('vnm_recipes.cli')\n"
                    "from . import masks\n"
                    "where = __file__ + '/../bench/kernel.py'\n")
  uses = _forbidden_uses(module, package)
  text = "\n".join(uses)
  for expected in ("import train.vit", "from vnm_recipes import", "relative import above",
                   ".import_module", "names 'vnm_recipes.cli'", "uses __file__",
                   "names '/../bench/kernel.py'"):
    assert expected in text, text
  assert "docstring" not in text and len(uses) == 7, text


def _run(code: str) -> str:
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_import_vnm_jax_loads_neither_recipes_nor_orbax():
  # One fresh interpreter: what `import vnm_jax` loaded, then whether a Checkpointer
  # (which needs orbax) imports it.
  loaded, checkpointer = _run(
      "import sys, tempfile, vnm_jax\n"
      "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
      "vnm_jax.Checkpointer(tempfile.mkdtemp()).close()\n"
      "print('orbax.checkpoint' in sys.modules)").splitlines()[-2:]
  for name in (*FORBIDDEN, "orbax"):
    assert name not in loaded.split(), f"import vnm_jax imported {name}"
  assert checkpointer == "True"


def test_library_modules_are_short_or_say_why():
  long = []
  for path in _modules(LIBRARY):
    lines = path.read_text().count("\n")
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    if lines > MAX_LINES and not any(line.startswith(LONG_MODULE_REASON)
                                     for line in docstring.splitlines()):
      long.append(f"{path.relative_to(ROOT)}: {lines} lines")
  assert not long, (f"modules over {MAX_LINES} lines without a '{LONG_MODULE_REASON}' line "
                    f"in their docstring: {long}")


def test_recipes_use_only_the_public_api():
  private = []
  for path in _modules(RECIPES):
    for node in ast.walk(ast.parse(path.read_text())):
      where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vnm_jax"):
        if any(part.startswith("_") for part in node.module.split(".")):
          private.append(f"{where} from {node.module}")
        private += [f"{where} {a.name}" for a in node.names if a.name.startswith("_")]
      elif isinstance(node, ast.Import):
        private += [f"{where} import {a.name}" for a in node.names
                    if a.name.startswith("vnm_jax") and "._" in a.name]
      elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and isinstance(node.value, ast.Name) and node.value.id == "vnm_jax"):
        private.append(f"{where} vnm_jax.{node.attr}")
  assert not private, "the recipes use private library names:\n" + "\n".join(private)


def test_public_api_names_exist_once():
  import vnm_jax

  assert len(set(vnm_jax.__all__)) == len(vnm_jax.__all__)
  missing = [name for name in vnm_jax.__all__ if not hasattr(vnm_jax, name)]
  assert not missing


def test_installed_packages_are_namespaced():
  tomllib = pytest.importorskip("tomllib")
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())
  include = config["tool"]["setuptools"]["packages"]["find"]["include"]
  assert set(include) <= {"vnm_jax*", "vnm_recipes*"}, include
  assert config["project"]["scripts"]["vnm-jax"] == "vnm_recipes.cli:main"
