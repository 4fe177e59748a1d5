"""The SDK and the client commands never import torch (issue 16): each check runs in a fresh
interpreter and looks at what it imported. The router's side, started for real, is
tests/integration/test_router_light_imports.py."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "numpy", "distserve.engine.engine", "services.worker.runtime")


def imported_after(code: str) -> dict[str, bool]:
    """Which HEAVY modules a fresh interpreter holds after running `code` (SystemExit is fine)."""
    probe = (
        "import json, sys\n"
        f"try:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import distserve; from distserve.client import Client, AsyncClient",
    "from distserve.cli import build_parser; build_parser()",
    "from distserve.cli import main; main(['generate', '--help'])",
    # a probe of a port where nothing listens: the whole command runs, and exits 1 (not SERVING)
    "from distserve.cli import main; main(['health', '--target', '127.0.0.1:9', '--timeout', '0.5'])",
    "from distserve.cli import main; main(['serve', 'router', '--help'])",
    "from distserve.cli import main; main(['settings'])",
    "from distserve.cli import main; main(['certs', '--out', __import__('tempfile').mkdtemp() + '/tls'])",
    "from distserve.cli import main; main(['bench', 'serve', '--help'])",
    "import distserve.bench.serve, distserve.tokenization; distserve.tokenization.load_tokenizer('tiny-llama')('hi')",
])
def test_client_side_imports_no_torch(code):
    held = imported_after(code)
    assert not any(held.values()), f"{code!r} imported {[m for m, v in held.items() if v]}"


def test_the_probe_sees_torch_where_it_is_imported():
    """The check itself can fail: a worker's runtime does import torch and the engine."""
    held = imported_after("import services.worker.runtime")
    assert held["torch"] and held["distserve.engine.engine"]


def test_library_modules_do_not_import_the_services():
    """Dependencies point one way (services -> distserve -> engine): the only library module that
    names the services is the CLI, the composition root, and it does so inside its commands."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "distserve"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cli.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(root.parent)}: {n}" for n in names if n == "services" or n.startswith("services.")]
    assert not offenders, offenders
    cli = ast.parse((root / "cli.py").read_text())
    top = [n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("services")]
