"""torch.load(weights_only=True) support for QuantizedTensor, set up by `import flash_quant`.

A saved QuantizedTensor pickles as a call to
`flash_quant.quantized_tensor._rebuild_quantized_tensor(state)`; torch's weights-only
unpickler calls it only once it is registered as a safe global. Registering needs
torch.serialization, and `import flash_quant` must not import torch (the `flash-quant`
CLI starts without it). So: if torch is already imported, register now; otherwise register
the moment torch imports torch.serialization (a one-shot import hook), so a plain
`import flash_quant` before or after `import torch` makes torch.load work.

What is registered is a torch-free trampoline under the pickled name: the real rebuild
(and the C++ extension it needs) loads on the first QuantizedTensor read.
"""
from __future__ import annotations

import importlib.machinery  # (not importlib.abc: it costs ~20 ms of the CLI's start)
import sys

#: The global a saved QuantizedTensor names (kept stable: files saved by any version load).
PICKLED_REBUILD = "flash_quant.quantized_tensor._rebuild_quantized_tensor"
_TORCH_SERIALIZATION = "torch.serialization"


def rebuild_quantized_tensor(state):
    """Trampoline to quantized_tensor._rebuild_quantized_tensor (imported on first use)."""
    from .quantized_tensor import _rebuild_quantized_tensor

    return _rebuild_quantized_tensor(state)


def _register(serialization) -> None:
    serialization.add_safe_globals([(rebuild_quantized_tensor, PICKLED_REBUILD)])


class _RegisteringLoader:
    """Runs torch.serialization's own loader, then registers the safe global."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register(module)

    def __getattr__(self, name):  # get_source, get_code, ... (inspect, linecache)
        return getattr(self._inner, name)


class _AfterTorchSerialization:
    """One-shot: finds torch.serialization with the normal finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TORCH_SERIALIZATION:
            return None
        _remove_hook()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


_HOOK = _AfterTorchSerialization()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def register_safe_globals() -> None:
    """Registers now if torch.serialization is loaded, else when torch loads it."""
    serialization = sys.modules.get(_TORCH_SERIALIZATION)
    if serialization is not None and hasattr(serialization, "add_safe_globals"):
        _register(serialization)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
