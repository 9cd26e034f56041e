"""Remove submodules that a model's forward never calls."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prune_unused_modules(model: nn.Module, example_input: Any) -> nn.Module:
    """Replace every parameterised submodule that one forward pass does not call by ``nn.Identity``.

    Model zoos build whole backbones and use part of them (smp's PSPNet keeps ResNet stages 4-5);
    those parameters never get gradients, break DDP's reducer and waste memory.
    """
    called: set[nn.Module] = set()
    handles = [m.register_forward_pre_hook(lambda module, _: called.add(module)) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # containers (ModuleList/ModuleDict) are iterated, never called: a module is used when it or
    # anything inside it ran
    used = {m for m in model.modules() if any(sub in called for sub in m.modules())}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if name else None
        if parent in used and module not in used and any(True for _ in module.parameters()):
            setattr(parent, child, nn.Identity())
    return model
