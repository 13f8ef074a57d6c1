"""The house rules that keep the tree readable, checked on every run: the import layering
(import-linter contracts in pyproject.toml) and the size limits on modules and functions."""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("serving", "bundle", "export", "models", "demo", "sharding", "pallas_kernels")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _lint_imports(cwd: pathlib.Path) -> subprocess.CompletedProcess:
  script = pathlib.Path(sys.executable).parent / "lint-imports"
  if not script.exists():
    pytest.fail(f"{script} is missing: install the test extras (pip install -e '.[test]')")
  return subprocess.run([str(script), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                        cwd=cwd, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
                        capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
  result = _lint_imports(ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "0 broken" in result.stdout


@pytest.mark.parametrize("module,bad_import,contract", [
    ("serving/engines/base.py", "import models.dlrm", "never imports a concrete model"),
    ("serving/batching/rows.py", "import serving.frontend.codec", "layered along a request"),
    ("bundle/manifest.py", "import export.exporter", "the bundle format is a leaf"),
    ("models/layers.py", "import serving.types", "models never import serving"),
])
def test_a_broken_import_fails_the_check(tmp_path, module, bad_import, contract):
  """The contracts are not vacuous: one forbidden import in a copy of the tree breaks them."""
  for pkg in PACKAGES:
    shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns(
        "__pycache__", "*.so", "*.pb", "*.cc", "*.h"))
  shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
  target = tmp_path / module
  target.write_text(target.read_text() + f"\n{bad_import}  # deliberately forbidden\n")
  result = _lint_imports(tmp_path)
  assert result.returncode != 0, result.stdout
  broken = [line for line in result.stdout.splitlines() if " BROKEN" in line]
  assert any(contract in line for line in broken), result.stdout


def _sources() -> list[pathlib.Path]:
  files = [p for pkg in (*PACKAGES, "tests", "benchmarks", "tools") for p in (ROOT / pkg).rglob("*.py")]
  return sorted(p for p in files if "_pb2" not in p.name and "__pycache__" not in p.parts)


def test_no_module_over_the_line_limit():
  native = sorted((ROOT / "serving/frontend/native").glob("*.[ch]*"))  # the C++ front end too
  over = {str(p.relative_to(ROOT)): n for p in (*_sources(), *native)
          if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
  assert not over, f"modules over {MAX_MODULE_LINES} lines (split them along a seam): {over}"


def test_no_function_over_the_line_limit():
  """Benchmarks' `main`s (a table of steps and prints) are the one exception."""
  over = {}
  for path in _sources():
    for node in ast.walk(ast.parse(path.read_text())):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      lines = node.end_lineno - node.lineno + 1
      if lines > MAX_FUNCTION_LINES and not (path.parent.name == "benchmarks"
                                             and node.name == "main"):
        over[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = lines
  assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_serving_a_bundle_loads_no_model_exporter_or_demo_code():
  """At run time too: a server process that reads a manifest imports none of them (nor JAX)."""
  code = ("import sys, bundle, serving.server, serving.kinds;"
          f" bundle.read_manifest({str(ROOT / 'tests/golden/repo/golden/1')!r});"
          " print(sorted({m.split('.')[0] for m in sys.modules}"
          " & {'models', 'export', 'demo', 'jax', 'flax'}))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]", result.stdout
