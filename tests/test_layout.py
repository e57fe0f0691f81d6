"""The layout is the architecture: data flows CLI -> tileplan -> executor, through the public API.

Checked on the import statements of every module, so a shortcut cannot creep back in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[str]:
    """Every module a file imports (absolute names; relative imports resolved to the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            names.append(".".join(p for p in (base, node.module or "") if p))
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("executor"), ids=lambda p: p.name)
def test_executor_depends_on_torch_yaml_tqdm_only(path: Path) -> None:
    allowed = {"torch", "yaml", "tqdm", "executor"}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name in _imports(path):
        top = name.split(".")[0]
        assert top in allowed | stdlib, f"{path.name} imports {name}"


@pytest.mark.parametrize(
    "path", [*_modules("tileplan"), *_modules("bench"), *_modules("tools")],
    ids=lambda p: str(p.relative_to(ROOT)),
)  # fmt: skip
def test_everything_else_uses_only_the_executor_api(path: Path) -> None:
    for name in _imports(path):
        assert name == "executor" or not name.startswith("executor."), (
            f"{path.relative_to(ROOT)} imports {name}; use `from executor import ...`"
        )


def test_the_library_never_imports_the_cli() -> None:
    for path in _modules("tileplan"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        assert "tileplan.cli" not in _imports(path), f"{path.relative_to(ROOT)} imports the CLI"


def test_executor_imports_without_tileplan() -> None:
    code = "import sys, executor; assert not any(m.startswith('tileplan') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("path", [*_modules("tileplan"), *_modules("executor")],
                         ids=lambda p: str(p.relative_to(ROOT)))  # fmt: skip
def test_no_private_name_crosses_a_module(path: Path) -> None:
    """A name with a leading underscore belongs to its module: another module that needs it
    gets it made public, or the code moves."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("tileplan", "executor")
        ):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"


# The data room (tileplan/run): one module per concern, none a grab bag. Each stays near 400
# lines; the synthetic tissue renderer (one class with its constants) is the largest.
_DATA_ROOM_LINES = 500


@pytest.mark.parametrize(
    "path", [p for p in _modules("tileplan/run") if p.name != "trainer.py"],  # the training loop
    ids=lambda p: p.name,
)  # fmt: skip
def test_data_room_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= _DATA_ROOM_LINES, f"{path.name} has {lines} lines; split it by concern"
