"""Register bnbx's LoRA layer on every peft ``LoraConfig``, without importing peft (slow) at ``import bnbx``.

If peft is already imported the patch is applied at once; otherwise a meta-path finder applies it right
after ``peft.tuners.lora.config`` has been executed. The patch wraps ``LoraConfig.__post_init__`` so that
new configs, including those ``PeftModel.from_pretrained`` builds from ``adapter_config.json``, carry
``{bnbx.nn.Linear4bit: PeftLoraLinear, ...}`` in their custom-module mapping.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any, Optional, Sequence

_TARGET = "peft.tuners.lora.config"
_MARK = "__bnbx_registers_lora_layers__"


def _patch(config_module: Any) -> None:
    cls = getattr(config_module, "LoraConfig", None)
    if cls is None or getattr(cls.__post_init__, _MARK, False):
        return
    original = cls.__post_init__

    def __post_init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from .peft import register  # peft is fully imported by the time a config is created

        register(self)

    setattr(__post_init__, _MARK, True)
    __post_init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__post_init__ = __post_init__


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Patch peft's LoraConfig now if peft is loaded, else when it is (idempotent)."""
    module = sys.modules.get(_TARGET)
    if module is not None:
        _patch(module)
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
