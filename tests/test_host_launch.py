"""flash_quant.cuda.host.launch without a GPU: a stand-in JIT function and compiled kernel
record what a launch passes (the logic of the cache; the compiled launchers themselves
run in the GPU tests, test_cuda_gpu.py)."""
import os

# as the other CPU test files of the Triton code: importing flash_quant.cuda decorates its
# kernels, in interpreter mode only if this is set first (else a later interpreter test
# module in the same session would get compiled-mode kernels)
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from flash_quant.cuda import host  # noqa: E402


class _Param:
    def __init__(self, name):
        self.name = name


class _Compiled:
    packed_metadata = "packed"
    function = "function"

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.log.append(("direct", args))


class _JIT:
    """fn[grid](*args, **meta) as Triton's JITFunction: compiles (here: records) and launches."""

    def __init__(self, names):
        self.params = [_Param(n) for n in names]
        self.log = []

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.log.append(("jit", grid, args, dict(meta)))
            return _Compiled(self.log)
        return call


class _Driver:
    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)


@pytest.fixture
def fake_driver(monkeypatch):
    monkeypatch.setattr(host, "driver", _Driver)
    monkeypatch.delenv("FLASH_QUANT_DIRECT_LAUNCH", raising=False)


def test_second_launch_goes_to_the_compiled_kernel(fake_driver):
    fn = _JIT(["X", "Y", "n", "A", "B"])
    x, y = torch.zeros(64), torch.zeros(64)
    kernels = {}
    meta = dict(B=2, A=1, num_warps=4)  # kwargs in any order; num_warps is an option, not a parameter
    host.launch(fn, (3, 2), (x, y, 7), meta, kernels, "k")
    assert [e[0] for e in fn.log] == ["jit"]
    n = host.direct_launches()
    host.launch(fn, (3, 2), (x, y, 7), meta, kernels, "k")
    assert fn.log[-1][0] == "direct" and host.direct_launches() == n + 1
    # grid padded to 3-d, the current stream, the constexprs after the positional arguments
    # in signature order (A then B)
    assert fn.log[-1][1] == (3, 2, 1, 1234, "function", "packed", None,
                             host.knobs.runtime.launch_enter_hook, host.knobs.runtime.launch_exit_hook,
                             x, y, 7, 1, 2)


def test_alignment_and_key_select_their_own_kernels(fake_driver):
    fn = _JIT(["X", "n", "C"])
    kernels = {}
    buf = torch.zeros(65)
    aligned, odd = buf[:64], buf[1:]
    assert aligned.data_ptr() % 16 == 0 and odd.data_ptr() % 16 != 0
    host.launch(fn, (1,), (aligned, 5), dict(C=0), kernels, "k")
    host.launch(fn, (1,), (odd, 5), dict(C=0), kernels, "k")  # other alignment: compile again
    host.launch(fn, (1,), (aligned, 5), dict(C=1), kernels, "k2")  # other key: compile again
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit"]
    host.launch(fn, (1,), (odd, 5), dict(C=0), kernels, "k")
    assert fn.log[-1][0] == "direct" and fn.log[-1][1][-2:] == (5, 0)
    assert len(kernels) == 3


def test_kernels_are_per_current_device(fake_driver, monkeypatch):
    """A loaded kernel belongs to one device: another current device compiles (loads) again."""
    fn = _JIT(["X"])
    kernels = {}
    x = torch.zeros(4)
    host.launch(fn, (1,), (x,), {}, kernels, "k")
    monkeypatch.setattr(_Driver.active, "get_current_device", staticmethod(lambda: 1))
    host.launch(fn, (1,), (x,), {}, kernels, "k")
    assert [e[0] for e in fn.log] == ["jit", "jit"] and len(kernels) == 2


def test_switched_off_or_interpreted_launches_always_bind(fake_driver, monkeypatch):
    monkeypatch.setenv("FLASH_QUANT_DIRECT_LAUNCH", "0")
    fn = _JIT(["X"])
    kernels = {}
    for _ in range(2):
        host.launch(fn, (1,), (torch.zeros(4),), {}, kernels, "k")
    assert [e[0] for e in fn.log] == ["jit", "jit"] and not kernels
    monkeypatch.delenv("FLASH_QUANT_DIRECT_LAUNCH")

    class _Interpreted(_JIT):  # TRITON_INTERPRET=1: fn[grid] returns no compiled kernel
        def __getitem__(self, grid):
            return lambda *a, **m: self.log.append(("jit",))

    fn = _Interpreted(["X"])
    for _ in range(2):
        host.launch(fn, (1,), (torch.zeros(4),), {}, kernels, "k")
    assert len(fn.log) == 2 and not kernels
