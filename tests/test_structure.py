"""Module structure (issue 9): the package's import graph has no cycle, and no module reaches
into another with a function-level import, except where an import must wait (named below)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lambda_grpo": ROOT / "lambda_grpo"}
# Imports that must happen at call time, and why.
DEFERRED_OK = {
    # the Triton engine imports triton kernels, which must load after TRITON_INTERPRET is set
    ("lambda_grpo.api", "lambda_grpo._vocab_triton"),
    # the reference (autograd, float64) is not needed by users of the fast backends
    ("lambda_grpo.api", "lambda_grpo.reference"),
}


def _modules():
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "trainer" in parts:  # the trainer is an application on top of the package
                continue
            yield ".".join([pkg, *parts]), path


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> list:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_pkg else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    names = [base] + [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n.startswith("lambda_grpo")]


def _imports():
    mods = dict(_modules())
    top, deferred = {}, {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        top[name], deferred[name] = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, node, is_pkg)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("lambda_grpo")]
            else:
                continue
            targets = {t for t in targets if t in mods}
            where = top if node.col_offset == 0 else deferred
            where[name] |= targets
    return mods, top, deferred


def test_import_graph_has_no_cycle():
    _, top, _ = _imports()
    state = {}

    def visit(m, stack):
        state[m] = 1
        for d in top.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in top:
        if m not in state:
            visit(m, [])


def test_no_function_level_imports_inside_the_package():
    _, _, deferred = _imports()
    found = {(m, d) for m, ds in deferred.items() for d in ds}
    assert found <= DEFERRED_OK, f"function-level imports not justified in DEFERRED_OK: {sorted(found - DEFERRED_OK)}"


def test_engines_are_leaves_and_ops_import_no_engine():
    """The engines compute; the ops module drives them by name (importlib, at first use)."""
    _, top, _ = _imports()
    for engine in ("lambda_grpo._vocab_torch", "lambda_grpo._vocab_triton"):
        assert "lambda_grpo._ops" not in top[engine] and "lambda_grpo.api" not in top[engine]
    assert not {"lambda_grpo._vocab_torch", "lambda_grpo._vocab_triton"} & top["lambda_grpo._ops"]


# verl 0.9.1 installs its own test suite as a top-level package `tests` (a packaging slip: nothing
# of verl imports it at run time, which _imported_by_its_distribution checks). Our tests/ folder
# shadows that package when Python runs from the repository root, harmlessly.
SHADOW_OK = {"tests"}


def _top_level_names():
    """Importable names of the repository's top-level folders and modules."""
    for entry in sorted(ROOT.iterdir()):
        name = entry.stem if entry.is_file() and entry.suffix == ".py" else entry.name
        if (entry.is_dir() or entry.suffix == ".py") and name.isidentifier():
            yield name, entry


def _imported_by_its_distribution(name: str, dist_name: str) -> list:
    """Files of `dist_name` outside its `name` package that import `name` (at any indentation)."""
    import importlib.metadata as md
    import re

    pattern = re.compile(rf"^\s*(from|import)\s+{name}(\.|\s|$)", re.M)
    hits = []
    for f in md.distribution(dist_name).files or []:
        if f.suffix == ".py" and f.parts and f.parts[0] != name:
            try:
                if pattern.search(f.locate().read_text(errors="ignore")):
                    hits.append(str(f))
            except OSError:
                continue
    return hits


def test_no_top_level_dir_shadows_an_installed_module():
    """Every Makefile target runs Python from the repository root, which puts the root first on
    sys.path: a top-level folder (with or without __init__.py) or module named like a top-level
    module of an installed distribution would be imported instead of it (issue 16: a top-level
    kernels/ broke transformers 5.25, which imports the PyPI package `kernels`)."""
    import importlib.metadata as md

    provided = md.packages_distributions()
    clashes = []
    for name, entry in _top_level_names():
        dists = sorted({d for d in provided.get(name, []) if d.lower().replace("_", "-") != "lambda-grpo"})
        if not dists:
            continue
        if name in SHADOW_OK:
            for d in dists:
                users = _imported_by_its_distribution(name, d)
                assert not users, f"{name}/ shadows {d}'s top-level {name!r}, which {d} imports: {users[:3]}"
            continue
        clashes.append(f"{entry.name} (top-level {name!r} of {', '.join(dists)})")
    assert not clashes, "top-level entries of the repository shadow installed modules: " + "; ".join(clashes)


def test_installed_kernels_package_wins_from_the_repository_root():
    """From the root, `import kernels` is the installed distribution's package (when one is
    installed, as transformers >= 5.25 requires), and our kernels are lambda_grpo.kernels."""
    import importlib.util
    import subprocess
    import sys

    code = ("import importlib.util, kernels, lambda_grpo.kernels._config as c; "
            "print(kernels.__file__); print(c.__file__)")
    if importlib.util.find_spec("kernels") is None:
        code = "import lambda_grpo.kernels._config as c; print('-'); print(c.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs, ours = res.stdout.split()
    assert theirs == "-" or {"site-packages", "dist-packages"} & set(Path(theirs).parts), theirs
    assert Path(ours).resolve().is_relative_to(ROOT / "lambda_grpo"), ours
