"""The library below, the pipeline above: dsu_models never imports Ray or MLflow."""
from __future__ import annotations

import subprocess
import sys


def test_dsu_models_imports_neither_ray_nor_mlflow():
    code = ("import sys, pkgutil, importlib, dsu_models\n"
            "for m in pkgutil.walk_packages(dsu_models.__path__, 'dsu_models.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'mlflow'))\n"
            "print(len([n for n in sys.modules if n.startswith('dsu_models')]), bad)\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split()[0]) > 20  # it really imported the whole package


def test_ray_data_decode_step_does_not_import_torch():
    """Ray Data's decode workers import ``pipelines.data.decode`` (by reference) and run it;
    torch there would cost every worker process about 0.3 GiB."""
    code = ("import sys, numpy as np\n"
            "from pipelines.data.decode import Decode\n"
            "from dsu_models.data.codec import encode_png\n"
            "img = (np.arange(48, dtype=np.uint8) * 5).reshape(4, 4, 3)\n"
            "out = Decode(3, 4, ['a'])({'id': np.array([7]), 'image': [encode_png(img)], 'a': np.array([2])})\n"
            "assert out['image'].shape == (1, 3, 4, 4) and out['labels'].tolist() == [[2]]\n"
            "assert out['image'].dtype == np.uint8 and out['image'][0, 0, 0, 1] == 15, out['image']\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'torch')[:3])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_preparing_the_procedural_datasets_does_not_import_torch(tmp_path):
    """Ray runs ``prepared.run_task`` in worker processes; for the built-in
    procedural datasets (the default dataset) it needs no torch."""
    code = ("import sys\n"
            "from dsu_models.data.prepared import begin, run_task\n"
            "for name in ('shapes3d', 'sprites'):\n"
            f"    plan, _, staging = begin(name, {str(tmp_path)!r} + '/' + name, False, num_samples=300)\n"
            "    stats = [run_task(plan, i, t, staging) for i, t in enumerate(plan.tasks)]\n"
            "    assert sum(sum(s['rows'].values()) for s in stats) == 300, stats\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'torch')[:3])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def _module_imports() -> dict[str, set[str]]:
    """Every module of dsu_models and pipelines -> the project modules it imports (at the
    top or inside a function: a lazy import still ties the two modules together)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for top in ("dsu_models", "pipelines"):
        for path in (root / top).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_circles():
    """No module reaches itself through its imports. Package ``__init__`` modules are left
    out: they import their own modules by design."""
    graph = _module_imports()
    packages = {name for name in graph if any(other.startswith(name + ".") for other in graph)}
    circles = []

    def walk(start, node, path):
        for dep in sorted(graph[node] - packages):
            if dep == start:
                circles.append(" -> ".join(path + [dep]))
            elif dep not in path and len(path) < 8:
                walk(start, dep, path + [dep])

    for name in sorted(set(graph) - packages):
        walk(name, name, [name])
    assert not circles, "\n".join(circles[:20])


def test_no_two_modules_or_public_functions_share_a_name():
    """A name says where a thing lives: no two modules of one file name, and no
    two public top-level functions or classes of one name, in dsu_models/ and
    pipelines/. Exempt by design: ``main`` (each command's entry point), the
    interface every data source module implements (``plan``, ``read``; the
    procedural ones also ``render`` and ``factor_table``), and
    dsu_models/nn/plain.py, whose formulas mirror dsu_models/nn/layers.py's fast
    layers name for name so that tests can compare the two."""
    import ast
    from collections import defaultdict
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted(p for top in ("dsu_models", "pipelines") for p in (root / top).rglob("*.py"))
    modules, names = defaultdict(list), defaultdict(list)
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.name not in ("__init__.py", "__main__.py"):
            modules[path.name].append(rel)
        if rel == "dsu_models/nn/plain.py":
            continue
        source_module = rel.startswith("dsu_models/data/sources/")
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            if node.name == "main" or (source_module and node.name in ("plan", "read", "render", "factor_table")):
                continue
            names[node.name].append(rel)
    clashes = {k: v for k, v in modules.items() if len(v) > 1}
    clashes.update({k: v for k, v in names.items() if len(v) > 1})
    assert not clashes, clashes
