"""Fused CPU kernels for the elementwise layers of docs/method.md section 5, built
from ``native_kernels.c`` with the system's C compiler on first use and loaded
with ``ctypes``: the self-normalising PReLU, the normalised residual add, and a
2x spread that is both the 2x2 average pool's backward and nearest 2x
upsampling. ``layers.py`` uses them on CPU for float32 tensors.

Why: on CPU these layers written as PyTorch ops are memory-bound. The
activation's backward, for one, makes about eight passes over
activation-sized tensors plus ~35 per-channel ops of a few microseconds each;
the kernels make one pass each way, in PyTorch's own OpenMP thread pool
(figures in docs/benchmarks.md, "Stage throughput and Ray overhead").

The shared library is cached under ``$DSU_NATIVE_CACHE`` (default
``$XDG_CACHE_HOME/disunknown`` or ``~/.cache/disunknown``), named by a hash of
the source, the compiler command and the CPU's flags, so a change of any of
them builds a new one and machines sharing a home directory do not load each
other's ``-march=native`` code. It is written to a temporary name and renamed,
so concurrent processes (Ray workers) never load a half-written file. Without
a compiler, or with ``DSU_NATIVE=0``, :func:`library` returns ``None`` and the
layers keep their PyTorch-ops path (the same math; ``tests/test_native.py``
checks both against the plain formulas).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native_kernels.c")
_FLAGS = ["-O3", "-fPIC", "-shared"]
# Tried in this order until one builds. With -fopenmp the library needs
# libgomp.so.1, which resolves to the one PyTorch has already loaded, so the
# kernels run in PyTorch's own thread pool (see run_jobs in the source).
_OPTIONAL_FLAGS = (["-fopenmp", "-march=native"], ["-fopenmp"], ["-march=native"], [])
# Below this many elements one thread does the work (PyTorch's own grain size).
_PARALLEL_MIN = 1 << 15

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    """False when the environment turns the kernels off (``DSU_NATIVE=0``)."""
    return os.environ.get("DSU_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("DSU_NATIVE_CACHE"):
        return Path(os.environ["DSU_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "disunknown"


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(cc: str, flags: list[str], directory: Path | None = None) -> Path:
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *flags, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"dsu_native-{key}.so"


def _directories() -> list[Path]:
    """The cache directory, then a per-user one under the temporary directory
    for when the cache cannot be written (a read-only home)."""
    return [cache_dir(), Path(tempfile.gettempdir()) / f"disunknown-native-{os.getuid()}"]


def _build(cc: str, flags: list[str], target: Path) -> str | None:
    """Compiles the source to ``target``; returns the compiler's error text on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".building-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            output = (proc.stderr or proc.stdout).strip()[-2000:]
            return output or f"exit status {proc.returncode}"
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        warnings.warn("dsu_models.nn.native: no C compiler (cc, gcc or clang; or $CC) found; "
                      "the elementwise layers run as PyTorch ops (slower on CPU, same results)",
                      RuntimeWarning, stacklevel=3)
        return None
    errors = []
    for flags in (_FLAGS + extra for extra in _OPTIONAL_FLAGS):
        for directory in _directories():
            path = _library_path(cc, flags, directory)
            try:
                err = None if path.exists() else _build(cc, flags, path)
                if err is None:
                    lib = ctypes.CDLL(str(path))
                    _declare(lib)
                    return lib
            except OSError as exc:  # this directory cannot be written (or read): the next
                errors.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            except subprocess.SubprocessError as exc:
                err = f"{type(exc).__name__}: {exc}"
            errors.append(f"{cc} {' '.join(flags)}: {err}")
            break  # the compiler failed; another directory will not help
    warnings.warn("dsu_models.nn.native: building " + str(SOURCE) + " failed; the elementwise "
                  "layers run as PyTorch ops (slower on CPU, same results):\n" + "\n".join(errors),
                  RuntimeWarning, stacklevel=3)
    return None


def _declare(lib: ctypes.CDLL) -> None:
    long_, ptr, int_ = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    lib.dsu_snprelu_forward.argtypes = [long_, long_, long_, ptr, ptr, ptr, ptr, int_]
    lib.dsu_snprelu_backward.argtypes = [long_, long_, long_, ptr, ptr, ptr, ptr, ptr, ptr,
                                         ptr, int_]
    lib.dsu_residual_forward.argtypes = [long_, long_, long_, ptr, ptr, ptr, ptr, ptr, int_]
    lib.dsu_residual_backward.argtypes = [long_, long_, long_, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                          ptr, ptr, int_]
    lib.dsu_spread2x2.argtypes = [long_, long_, long_, ptr, long_, long_, long_, ctypes.c_float,
                                  ptr, int_]
    for fn in (lib.dsu_snprelu_forward, lib.dsu_snprelu_backward, lib.dsu_residual_forward,
               lib.dsu_residual_backward, lib.dsu_spread2x2):
        fn.restype = int_


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; ``None`` if unavailable."""
    if not enabled():
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]  # type: ignore[return-value]


def applies(*tensors: Tensor) -> bool:
    """Whether the kernels can run on ``tensors`` (all CPU float32; kernels built)."""
    return (all(x.device.type == "cpu" and x.dtype == torch.float32 for x in tensors)
            and library() is not None)


def _shape(t: Tensor) -> tuple[int, int, int]:
    n, c = t.shape[0], t.shape[1]
    return n, c, t.numel() // max(n * c, 1)


def _threads(t: Tensor) -> int:
    return torch.get_num_threads() if t.numel() >= _PARALLEL_MIN else 1


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"dsu_models.nn.native: {what} could not allocate its work buffers")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def snprelu_forward(t: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """``(prelu(t; a) - mean(b, a)) / std(b, a)``; ``t: (B, C, ...)`` float32 on
    CPU, ``b, a: (C,)``. Call only where :func:`applies` is true."""
    t, b, a = t.contiguous(), b.detach().contiguous(), a.detach().contiguous()
    out = torch.empty_like(t)
    n, c, s = _shape(t)
    _check(library().dsu_snprelu_forward(n, c, s, t.data_ptr(), b.data_ptr(), a.data_ptr(),
                                         out.data_ptr(), _threads(t)), "snprelu_forward")
    return out


def snprelu_backward(grad: Tensor, t: Tensor, b: Tensor, a: Tensor,
                     need_grad_t: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(grad_t, grad_b, grad_a)`` of ``sum(grad * snprelu_forward(t, b, a))``,
    where ``grad_b`` is only the part through the moments (as in
    ``layers._SNPReLUFunction``); ``grad_t`` is ``None`` unless ``need_grad_t``."""
    grad, t = grad.contiguous(), t.contiguous()
    b, a = b.detach().contiguous(), a.detach().contiguous()
    grad_t = torch.empty_like(t) if need_grad_t else None
    grad_b, grad_a = torch.empty_like(b), torch.empty_like(a)
    n, c, s = _shape(t)
    _check(library().dsu_snprelu_backward(
        n, c, s, grad.data_ptr(), t.data_ptr(), b.data_ptr(), a.data_ptr(), _ptr(grad_t),
        grad_b.data_ptr(), grad_a.data_ptr(), _threads(t)), "snprelu_backward")
    return grad_t, grad_b, grad_a


def residual_forward(shortcut: Tensor, residual: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``shortcut * alpha + residual * beta`` per channel; ``shortcut, residual:
    (B, C, ...)`` of one shape, ``alpha, beta: (C,)``, all float32 on CPU."""
    sc, res = shortcut.contiguous(), residual.contiguous()
    al, be = alpha.detach().contiguous(), beta.detach().contiguous()
    out = torch.empty_like(sc)
    n, c, s = _shape(sc)
    _check(library().dsu_residual_forward(n, c, s, sc.data_ptr(), res.data_ptr(), al.data_ptr(),
                                          be.data_ptr(), out.data_ptr(), _threads(sc)),
           "residual_forward")
    return out


def residual_backward(grad: Tensor, shortcut: Tensor | None, residual: Tensor | None,
                      alpha: Tensor, beta: Tensor, needs: tuple[bool, bool, bool]
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad * residual_forward(...))`` for (shortcut,
    residual, alpha, beta); ``needs`` says which of shortcut, residual and the
    coefficients (both) are wanted (the inputs are only read for the latter)."""
    g = grad.contiguous()
    al, be = alpha.detach().contiguous(), beta.detach().contiguous()
    d_sc = torch.empty_like(g) if needs[0] else None
    d_res = torch.empty_like(g) if needs[1] else None
    d_al = d_be = sc = res = None
    if needs[2]:
        sc, res = shortcut.contiguous(), residual.contiguous()
        d_al, d_be = torch.empty_like(al), torch.empty_like(be)
    n, c, s = _shape(g)
    _check(library().dsu_residual_backward(
        n, c, s, g.data_ptr(), _ptr(sc), _ptr(res), al.data_ptr(), be.data_ptr(), _ptr(d_sc),
        _ptr(d_res), _ptr(d_al), _ptr(d_be), _threads(g)), "residual_backward")
    return d_sc, d_res, d_al, d_be


def spread2x2(x: Tensor, height: int, width: int, pad: int, scale: float) -> Tensor:
    """``out[..., y, x] = scale * x[..., (y + pad) // 2, (x + pad) // 2]`` of
    size ``(height, width)``: nearest 2x upsampling cropped by ``pad`` per side
    (``scale`` 1), or the 2x2 average pool's backward (``scale`` 1/4, ``pad``
    its padding). ``x: (B, C, h, w)`` float32 on CPU."""
    x = x.contiguous()
    b, c, h, w = x.shape
    if (height - 1 + pad) // 2 >= h or (width - 1 + pad) // 2 >= w:
        raise ValueError(f"spread2x2: {height}x{width} with pad {pad} reads beyond a {h}x{w} input")
    out = x.new_empty(b, c, height, width)
    _check(library().dsu_spread2x2(b * c, h, w, x.data_ptr(), height, width, pad, scale,
                                   out.data_ptr(), _threads(out)), "spread2x2")
    return out
