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
