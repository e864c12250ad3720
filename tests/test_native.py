"""The fused C kernels of dsu_models/nn/native.py compute the self-normalising
PReLU of docs/method.md section 5 (values and all three gradients, checked against
the plain formula in float64), are the path the layers take on CPU, and fall
back to PyTorch ops with a warning when they cannot be built."""
from __future__ import annotations

import warnings

import pytest
import torch

from dsu_models.nn import layers, native
from dsu_models.nn import plain as formula

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler here")


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    t = torch.randn(shape, generator=g) * 1.5
    # slopes below 0, at 0 and above 1, and a very negative shift whose
    # variance is floored (a ~ 0, b << 0)
    b = torch.randn(c, generator=g) * 0.8
    a = torch.rand(c, generator=g) * 1.6 - 0.3
    b[0], a[0] = -9.0, 0.0
    a[-1] = 0.0
    return t, b, a, torch.randn(shape, generator=g)


def _reference(t, b, a, grad):
    """Output and (grad_t, grad_b, grad_a) of the plain formula in float64, with
    ``t`` taken as already shifted: ``grad_b`` is the part through the moments."""
    t64, b64, a64 = (v.double().requires_grad_() for v in (t, b, a))
    view = [1, -1] + [1] * (t.dim() - 2)
    # the shift's two appearances cancel in d/db: only the moments' part is left
    out = formula.snprelu(t64 - b64.view(view), b64, a64)
    grads = torch.autograd.grad((out * grad.double()).sum(), (t64, b64, a64))
    return out.detach(), grads


@needs_compiler
@pytest.mark.parametrize("shape", [(6, 5), (64, 37), (3, 4, 5, 7), (9, 16, 8, 8), (2, 3, 32, 32)])
def test_kernels_match_formula(shape):
    """Channel counts and rows that are and are not multiples of the 8 vector
    lanes; (B, C) inputs take the kernels' flat path."""
    t, b, a, grad = _inputs(shape)
    want, want_grads = _reference(t, b, a, grad)
    out = native.snprelu_forward(t, b, a)
    grads = native.snprelu_backward(grad, t, b, a)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    no_grad_t = native.snprelu_backward(grad, t, b, a, need_grad_t=False)
    assert no_grad_t[0] is None
    torch.testing.assert_close(no_grad_t[1], grads[1])
    torch.testing.assert_close(no_grad_t[2], grads[2])


@needs_compiler
def test_threaded_split_gives_the_same_result(monkeypatch):
    t, b, a, grad = _inputs((13, 6, 9, 9))
    single = native.snprelu_forward(t, b, a), native.snprelu_backward(grad, t, b, a)
    monkeypatch.setattr(native, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    out, grads = native.snprelu_forward(t, b, a), native.snprelu_backward(grad, t, b, a)
    assert torch.equal(out, single[0]) and torch.equal(grads[0], single[1][0])
    for got, want in zip(grads[1:], single[1][1:]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_layers_take_the_native_path_on_cpu(monkeypatch, frozen):
    """SNPReLU in float32 on CPU runs the kernels; with ``DSU_NATIVE=0`` the
    PyTorch-ops path, with the same values and gradients."""
    calls = []
    for name in ("snprelu_forward", "snprelu_backward"):
        fn = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, _fn=fn, _n=name: calls.append(_n) or _fn(*args))
    act = layers.SNPReLU(5)
    g = torch.Generator().manual_seed(4)  # not the global RNG: the values must not depend on test order
    with torch.no_grad():
        act.bias.normal_(generator=g)
        act.slope.uniform_(0.0, 1.0, generator=g)
    act.requires_grad_(not frozen)
    t, _, _, grad = _inputs((4, 5, 6, 6))

    def run():
        x = t.clone().requires_grad_()
        out = act(x)
        params = [] if frozen else [act.bias, act.slope]
        return (out, *torch.autograd.grad((out * grad).sum(), [x, *params]))

    fast = run()
    assert calls == ["snprelu_forward", "snprelu_backward"]
    monkeypatch.setenv("DSU_NATIVE", "0")
    slow = run()
    assert len(calls) == 2
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # float64 and gradcheck keep the PyTorch-ops path (tests/test_perf_equivalence.py)
    monkeypatch.delenv("DSU_NATIVE")
    act.double()(t.double())
    assert len(calls) == 2


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("DSU_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    with pytest.warns(RuntimeWarning, match="native_kernels.c failed"):
        assert native.library() is None
    assert list(tmp_path.iterdir()) == []  # no half-built library left behind
    t, b, a, grad = _inputs((3, 4, 5, 5))
    x = t.clone().requires_grad_()
    out = layers.snprelu(x, b, a)
    want, (want_grad_t, _, _) = _reference(t, b, a, grad)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    (out * grad).sum().backward()
    torch.testing.assert_close(x.grad.double(), want_grad_t, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("DSU_NATIVE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    built = list((tmp_path / "tmp").glob("disunknown-native-*/dsu_native-*.so"))
    assert len(built) == 1


def test_no_compiler_warns_once(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DSU_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is None and "lib" not in native._state
    assert not native.applies(torch.zeros(2, 3))


@needs_compiler
def test_library_is_built_once_and_named_by_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("DSU_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    built = sorted(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("dsu_native-")
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert sorted(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    cc = native._compiler()
    assert native._library_path(cc, ["-O3"]) != native._library_path(cc, ["-O2"])


@needs_compiler
@pytest.mark.parametrize("shape", [(6, 5), (64, 37), (3, 4, 5, 7), (9, 16, 8, 8)])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_residual_add_kernels_match_formula(shape, frozen, monkeypatch):
    g = torch.Generator().manual_seed(1)
    add = layers.ResidualAdd(shape[1], 0.3)
    with torch.no_grad():
        add.alpha.uniform_(-1.0, 1.0, generator=g)
        add.beta.uniform_(0.1, 1.0, generator=g)
    add.requires_grad_(not frozen)
    sc, res, grad = (torch.randn(shape, generator=g) for _ in range(3))
    calls = []
    fn = native.residual_backward
    monkeypatch.setattr(native, "residual_backward", lambda *a: calls.append(1) or fn(*a))

    def run(module, dtype, shortcut_grad=True):
        x = sc.to(dtype, copy=True).requires_grad_(shortcut_grad)
        y = res.to(dtype, copy=True).requires_grad_()
        out = module(x, y)
        params = [] if frozen else [module.alpha, module.beta]
        inputs = [t for t in (x, y) if t.requires_grad] + params
        return out, torch.autograd.grad((out * grad.to(dtype)).sum(), inputs)

    out, grads = run(add, torch.float32)
    assert calls and out.grad_fn.name() == "_ResidualAddFunctionBackward"
    monkeypatch.setenv("DSU_NATIVE", "0")  # a float64 twin takes the PyTorch-ops path
    want, want_grads = run(double_twin(add), torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, w in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    monkeypatch.delenv("DSU_NATIVE")
    _, only_res = run(add, torch.float32, shortcut_grad=False)  # a shortcut that needs no grad
    torch.testing.assert_close(only_res[0], grads[1])


def double_twin(add):
    twin = layers.ResidualAdd(add.alpha.numel(), 0.5).double()
    with torch.no_grad():
        twin.alpha.copy_(add.alpha)
        twin.beta.copy_(add.beta)
    twin.requires_grad_(add.alpha.requires_grad)
    return twin


@needs_compiler
@pytest.mark.parametrize("size,pad", [((8, 8), 0), ((6, 6), 1), ((10, 14), 1), ((4, 6), 0),
                                      ((16, 16), 0)])
def test_pool_backward_kernel_matches_aten(size, pad, monkeypatch):
    calls = []
    fn = native.spread2x2
    monkeypatch.setattr(native, "spread2x2", lambda *a: calls.append(a[1:]) or fn(*a))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, *size, generator=g, requires_grad=True)
    out = layers.avg_pool_2x2(x, pad)
    grad = torch.randn(out.shape, generator=g)
    got, = torch.autograd.grad((out * grad).sum(), x)
    assert calls == [(*size, pad, 0.25)]
    x64 = x.detach().double().requires_grad_()
    want = torch.nn.functional.avg_pool2d(x64, 2, padding=pad, count_include_pad=True)
    want_grad, = torch.autograd.grad((want * grad.double()).sum(), x64)
    torch.testing.assert_close(out.double(), want)
    torch.testing.assert_close(got.double(), want_grad)


@needs_compiler
@pytest.mark.parametrize("size,crop", [((4, 4), 0), ((4, 4), 1), ((7, 5), 1), ((8, 6), 2)])
def test_upsample_kernel_matches_interpolate(size, crop):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, *size, generator=g, requires_grad=True)
    out = layers.upsample_2x(x, crop)
    assert out.grad_fn.name() == "_Upsample2xBackward"
    grad = torch.randn(out.shape, generator=g)
    got, = torch.autograd.grad((out * grad).sum(), x)
    x64 = x.detach().double().requires_grad_()
    want = formula.upsample_2x(x64, crop)
    want_grad, = torch.autograd.grad((want * grad.double()).sum(), x64)
    assert out.shape == want.shape == (2, 3, 2 * size[0] - 2 * crop, 2 * size[1] - 2 * crop)
    torch.testing.assert_close(out.double(), want)
    torch.testing.assert_close(got.double(), want_grad, rtol=1e-6, atol=1e-6)  # float32 sums of 4


@needs_compiler
def test_spread_refuses_to_read_beyond_its_input():
    with pytest.raises(ValueError, match="reads beyond a 4x4 input"):
        native.spread2x2(torch.zeros(1, 1, 4, 4), 10, 8, 1, 1.0)
