"""Stages 0 and 1: a full-size flat gradient buffer, with ``param.grad`` as views into it."""

from __future__ import annotations

import torch

from hf_zero.flat_buffer import FlatParamGroup
from hf_zero.stages.base import ZeroStage


class FullGradStage(ZeroStage[FlatParamGroup]):
    """Keeps one gradient buffer per group, laid out like the parameters.

    Autograd accumulates straight into the views (``param.grad`` is set before backward), so
    gradient accumulation needs no copy; a gradient that arrives in a fresh tensor (someone
    set ``param.grad = None``) is folded into the buffer by the hook.
    """

    keeps_full_grads = True

    def __init__(self, groups: list[FlatParamGroup], *args, **kwargs):
        self.grad_buffers = [torch.zeros_like(g.data) for g in groups]   # 1D, model dtype, like data
        self._grad_views = [g.param_views(buf) for g, buf in zip(groups, self.grad_buffers)]
        for g, views in zip(groups, self._grad_views):
            for p, view in zip(g.params, views):
                p.grad = view
        super().__init__(groups, *args, **kwargs)
        self._group_index = {id(g): i for i, g in enumerate(groups)}

    def _accept_grad(self, group: FlatParamGroup, index: int, param: torch.Tensor) -> None:
        view = self._grad_views[self._group_index[id(group)]][index]
        grad = param.grad   # just accumulated (the hook fires only then)
        if grad is not view:
            assert grad is not None
            view.add_(grad)
            param.grad = view

    def zero_grad(self) -> None:
        for buf in self.grad_buffers:
            buf.zero_()
        for g, views in zip(self.groups, self._grad_views):
            for p, view in zip(g.params, views):
                p.grad = view

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"grads": list(self.grad_buffers)}
