"""Hooks on a network's modules that always come off again.

A hook left on a backbone runs in every later pass of every user of that backbone (and keeps alive
what it refers to), so each owner of hooks holds them in one ``Hooks`` and closes it when done:
``close()``, or the end of a ``with`` block.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """Forward hooks (``after``) and forward pre-hooks (``before``) on modules, removed together by
    ``close()`` or at the end of a ``with`` block; closing twice is harmless."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []  # the hooks now on, in the order put on

    def after(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, inputs, output)`` after each forward of ``module``."""
        self.handles.append(module.register_forward_hook(hook))

    def before(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, inputs)`` before each forward of ``module``."""
        self.handles.append(module.register_forward_pre_hook(hook))

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
