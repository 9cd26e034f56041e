"""Forward hooks by dotted module path that record outputs only inside ``with recorder:``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.hooks import RemovableHandle


def resolve_module(model: nn.Module, path: str, side: str = "model") -> nn.Module:
    """Return ``model.get_submodule(path)`` or fail naming the closest valid paths."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    close = difflib.get_close_matches(path, [name for name in modules if name], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if path.isidentifier():  # YAML and jsonargparse read the old selector form [out] as a list holding 'out'
        hint += f"; for the key {path!r} of the model's output write the path '/{path}' (old form: '[{path}]')"
    top = ", ".join(repr(name) for name, _ in model.named_children())
    raise ValueError(f"no module {path!r} in {side}{hint} (top-level modules: {top})")


class ForwardRecorder:
    """Records the outputs of named submodules during one forward pass.

    Hooks exist only inside the ``with`` block: entering clears the previous step's outputs and
    registers the hooks, leaving removes them. So nothing is recorded (or kept alive) outside the
    distillation forward, and no handle outlives its step.

    A recorded tensor that the model changes in place later in its forward (an inplace ReLU or ``out +=
    identity`` after the tapped module) no longer holds the module's output; reading it is an error naming
    the module, rather than a silent comparison of another tensor.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], side: str = "model") -> None:
        self.side = side
        self.paths = list(dict.fromkeys(paths))
        self._modules = {path: resolve_module(model, path, side) for path in self.paths}
        self._handles: list[RemovableHandle] = []
        self.outputs: dict[str, list[Any]] = {}
        self._versions: dict[str, list[int | None]] = {}  # each recorded tensor's version counter when recorded

    def __enter__(self) -> ForwardRecorder:
        self.outputs = {path: [] for path in self.paths}
        self._versions = {path: [] for path in self.paths}
        for path, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook_for(path)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _hook_for(self, path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[path].append(output)
            self._versions[path].append(_version(output))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.outputs = {}
        self._versions = {}

    def load(self, outputs: dict[str, list[Any]]) -> None:
        """Outputs recorded elsewhere (the teacher cache's) in place of a forward's."""
        self.outputs, self._versions = outputs, {}

    def to_float32(self) -> None:
        """Every recorded bf16/fp16 tensor (in nested outputs too) in fp32, each first checked as ``get`` checks it:
        a teacher run in lower precision gives the losses fp32 tensors."""
        for path, calls in self.outputs.items():
            for call in range(len(calls)):
                calls[call] = tree_map(_upcast, self.get(path, call))
        self._versions = {path: [_version(output) for output in calls] for path, calls in self.outputs.items()}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def calls(self, path: str) -> list[Any]:
        """The outputs of every call of ``path`` in the recorded forward pass, in call order."""
        calls = self.outputs.get(path)
        if not calls:
            raise RuntimeError(
                f"module {path!r} of the {self.side} produced no output in the recorded forward pass: "
                "is it used by the model's forward()?"
            )
        return calls

    def get(self, path: str, call: int | None = None) -> Any:
        """The output of ``path``: of its only call, or of call ``call`` when it runs several times."""
        calls = self.calls(path)
        if call is None:
            if len(calls) != 1:
                raise RuntimeError(f"module {path!r} of the {self.side} ran {len(calls)} times; name the call")
            call = 0
        if call >= len(calls):
            raise RuntimeError(f"module {path!r} of the {self.side} ran {len(calls)} time(s), there is no call {call}")
        versions = self._versions.get(path)
        if versions and versions[call] is not None and _version(calls[call]) != versions[call]:
            raise RuntimeError(
                f"the output of {self.side} module {path!r} was changed in place after it was recorded (an "
                "inplace activation or addition follows it in the forward): tap the module that makes the "
                "changed tensor instead"
            )
        return calls[call]


def _upcast(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dtype in (torch.bfloat16, torch.float16):
        return value.float()
    return value


def _version(output: Any) -> int | None:
    """A tensor's in-place version counter; None where there is none (not a tensor, made under inference
    mode as Lightning's validation runs, or traced by ``torch.compile``: reading it there breaks the graph in
    two, so a compiled student's taps go unchecked; the eager run of the same model checks them)."""
    if not isinstance(output, Tensor) or torch.compiler.is_compiling() or output.is_inference():
        return None
    return output._version
