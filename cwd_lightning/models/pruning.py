"""Remove submodules that do not contribute to a model's output."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    return []


def _outermost(model: nn.Module, dead: set[nn.Module]) -> dict[str, nn.Module]:
    """Names of the dead modules whose parent is alive (replacing those removes all the rest)."""
    modules = dict(model.named_modules())
    found = {}
    for name, module in modules.items():
        parent = modules[name.rpartition(".")[0]] if name else None
        if module in dead and parent is not None and parent not in dead:
            found[name] = module
    return found


def _replace(model: nn.Module, names: dict[str, nn.Module], replacement: dict[str, nn.Module] | None = None) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, (replacement or {}).get(name, nn.Identity()))


def prune_unused_modules(model: nn.Module, example_input: Any) -> nn.Module:
    """Replace by ``nn.Identity`` every parameterised submodule that does not contribute to the output.

    Model zoos build whole backbones and use part of them: smp's PSPNet never calls ResNet stages 4-5,
    and timm's feature wrapper runs stages whose features are then dropped. Their parameters never
    get gradients, which breaks DDP's reducer and wastes memory. Modules never called are removed;
    modules that are called but receive no gradient are removed only if the output stays identical.
    """
    was_training = model.training
    model.eval()
    try:
        called: set[nn.Module] = set()
        handles = [m.register_forward_pre_hook(lambda module, _: called.add(module)) for m in model.modules()]
        try:
            with torch.no_grad():
                reference = [t.clone() for t in _tensors(model(example_input))]
        finally:
            for handle in handles:
                handle.remove()
        # containers (ModuleList/ModuleDict) are iterated, never called: used if anything inside ran
        used = {m for m in model.modules() if any(sub in called for sub in m.modules())}
        has_params = {m for m in model.modules() if any(True for _ in m.parameters())}
        _replace(model, _outermost(model, has_params - used))

        model.zero_grad(set_to_none=True)
        with torch.enable_grad():  # also when the caller disabled gradients (notebooks, inference code)
            sum(t.float().sum() for t in _tensors(model(example_input))).backward()
        alive = {m for m in model.modules() if any(p.grad is not None for p in m.parameters())}
        model.zero_grad(set_to_none=True)
        candidates = _outermost(model, has_params & set(model.modules()) - alive)
        if candidates:
            _replace(model, candidates)
            with torch.no_grad():
                outputs = _tensors(model(example_input))
            same = len(outputs) == len(reference) and all(
                a.shape == b.shape and torch.allclose(a, b) for a, b in zip(outputs, reference, strict=True)
            )
            if not same:
                _replace(model, candidates, replacement=candidates)  # they matter after all: restore
    finally:
        model.train(was_training)
    return model
