"""The package's layers import downward only: engine <- models / rewards / tasks <- recipe <-
bench <- cli. Imports are read with `ast` (top-level and function-local alike, relative ones
resolved), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parents[1] / "src" / "branchgrpo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` (the module ``name``, default: its place under the package)
    imports (``from a import b`` gives ``a`` and ``a.b``)."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def _offending(paths: list[Path], allowed: tuple[str, ...], name: str | None = None,
               ) -> list[str]:
    """``path: module`` for each branchgrpo import of ``paths`` outside ``allowed`` prefixes."""
    bad = []
    for p in paths:
        for mod in sorted(imports_of(p, name)):
            if _under(mod, "branchgrpo") and mod != "branchgrpo" and not any(
                    _under(mod, a) for a in allowed):
                bad.append(f"{p.name}: {mod}")
    return bad


ENGINE = sorted((PKG / "engine").rglob("*.py"))


def test_the_engine_exists_and_holds_the_algorithm():
    names = {p.stem for p in ENGINE}
    assert {"sde", "schedule", "plans", "tree", "advantages", "pruning", "losses", "methods",
            "registry", "policy"} <= names


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: p.name)
def test_engine_imports_nothing_above_it(path):
    """No recipe module, config, models, rewards, tasks or bench: only the engine itself."""
    assert not _offending([path], ("branchgrpo.engine",))


def test_the_check_sees_upward_imports(tmp_path):
    """The parser catches a lazy relative import of the recipe and an absolute one of models
    in a module of the engine (here a probe file read as ``branchgrpo.engine.probe``)."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from ..config import Config\n"
                 "import branchgrpo.models.tiny\nfrom . import tree\n")
    assert _offending([f], ("branchgrpo.engine",), name="branchgrpo.engine.probe") == [
        "probe.py: branchgrpo.config", "probe.py: branchgrpo.config.Config",
        "probe.py: branchgrpo.models.tiny"]


def test_rewards_do_not_reach_up():
    """rewards/ imports the engine's registry and itself; the embedded task's rewards register
    from the tasks side, and the recipe (`branchgrpo.scoring`) imports them."""
    assert not _offending(sorted((PKG / "rewards").rglob("*.py")),
                          ("branchgrpo.engine", "branchgrpo.rewards"))


@pytest.mark.parametrize("module, forbidden", [
    ("dist.py", "branchgrpo.config"),
    ("checkpoint.py", "branchgrpo.train"),
    ("checkpoint_dcp.py", "branchgrpo.train"),
])
def test_recipe_infrastructure_does_not_know_the_recipe(module, forbidden):
    """dist gets plain values, not the Config; checkpoint gets the trained parts, not the
    training loop's State."""
    assert not [m for m in imports_of(PKG / module) if _under(m, forbidden)]


def test_nothing_below_the_cli_imports_the_bench():
    """bench/ is a tool over the recipe: no module outside it imports it (the CLI imports a
    bench module by name when its command runs)."""
    users = [p for p in PKG.rglob("*.py") if "bench" not in p.relative_to(PKG).parts
             and any(_under(m, "branchgrpo.bench") for m in imports_of(p))]
    assert not users
    assert 'import_module(f"branchgrpo.bench.{name}")' in (PKG / "cli.py").read_text()
