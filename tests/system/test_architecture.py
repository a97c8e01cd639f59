"""The layout's rules that import-linter cannot see (its contracts are in pyproject.toml).

- Importing the workers' server loads no key-plane, provider, lifecycle, audit-trail or PKCS#11
  module: the workers reach keys only over gRPC, whatever lazy import a module might add.
- No module imports another module's private (`_name`) names or private modules.
- The broker's layer folders are exactly the ones the import-linter contracts name, so a new
  folder cannot slip past them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "workers", "migrations", "tests")

# Loaded by `import workers.server` only over the workers' dead bodies.
KEY_PLANE = (
    "broker.keys",
    "broker.providers",
    "broker.lifecycle",
    "broker.audit",
    "broker.service",
    "broker.cli",
    "pkcs11",
    "azure",
)


def _imported_modules(statement: str) -> list[str]:
    """The modules a fresh interpreter loads for `statement`, from `python -X importtime`."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    # Lines look like "import time:       123 |        456 |   package.module".
    return [
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ][1:]  # the first line is the header


def test_importtime_sees_the_modules_it_loads() -> None:
    """The probe itself works: importing the key store does load key-plane modules."""
    loaded = _imported_modules("import broker.keys.key_store")
    assert "broker.keys.key_store" in loaded
    assert "broker.providers.interface" in loaded


def test_workers_server_loads_no_key_plane_module() -> None:
    loaded = _imported_modules("import workers.server")
    assert "workers.server" in loaded
    assert "broker.rpc.grpc_server" in loaded
    leaked = sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in KEY_PLANE))
    assert leaked == []


def _python_files() -> list[Path]:
    return [
        p
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "broker/api/" not in p.as_posix()
    ]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_private_names_of_another() -> None:
    """Neither `from m import _name`, nor `import m._private`, nor `m._name` on an imported
    module of ours: what two modules share is public."""
    modules = {_module_name(p) for p in _python_files()}
    offences = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        # Local names bound to modules of ours (`from broker.keys import key_wrapping`).
        module_names = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            for alias in node.names
            if f"{node.module}.{alias.name}" in modules
        }
        offences += [
            f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_names
            and _is_private(node.attr)
        ]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.split(".")[0] in PACKAGES
            ):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if any(_is_private(part) for part in node.module.split(".")):
                    offences.append(f"{where}: private module {node.module}")
                offences += [
                    f"{where}: {node.module}.{alias.name}"
                    for alias in node.names
                    if _is_private(alias.name)
                ]
            elif isinstance(node, ast.Import):
                offences += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: private module {alias.name}"
                    for alias in node.names
                    if any(_is_private(part) for part in alias.name.split("."))
                    and alias.name.split(".")[0] in PACKAGES
                ]
    assert offences == [], "\n".join(offences)


def test_every_layer_folder_is_named_by_the_import_rules() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {m.strip() for line in layers for m in line.split("|")}
    folders = {
        f"broker.{p.name}"
        for p in (ROOT / "broker").iterdir()
        if p.is_dir() and (p / "__init__.py").exists()
    }
    assert folders == named
    loose = sorted(p.name for p in (ROOT / "broker").glob("*.py") if p.name != "__init__.py")
    assert loose == [], "the broker's modules live in its layer folders"


def test_module_names_match_their_files() -> None:
    """A sanity check of the walk above: every package module is found under its dotted name."""
    names = {_module_name(p) for p in _python_files()}
    assert {"broker.keys.key_store", "workers.server", "broker.cli"} <= names
