"""Repeated optimisation steps, replayed as one CUDA graph on a GPU.

Instance optimisation (the zero-shot pyramid, the affine pre-alignment) runs the same small step --
forward, backward, Adam update -- tens to hundreds of times on tensors whose shapes do not change. On
a GPU such a step is a few hundred small kernels, and launching them one by one from Python costs more
than running them. :class:`RepeatedStep` runs the first steps eagerly (they warm up the libraries'
handles), then records one step as a CUDA graph and replays it: one launch per step. On a CPU, with
``SAMIR_CUDA_GRAPHS=0``, or where recording fails, every step runs eagerly; the arithmetic is the same.

A step function must not read values back to the host (no ``float(tensor)``, no branches on data)
and must build no new tensors from host data: constants come from :func:`samir.spatial.device_constant`.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger(__name__)

WARMUP_STEPS = 1  # eager steps before recording (lazily created library handles, allocator pools)


def graphs_enabled(device: torch.device) -> bool:
    """CUDA graphs on a CUDA device unless ``SAMIR_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get("SAMIR_CUDA_GRAPHS", "1") != "0"


class Adam:
    """Adam (Kingma and Ba, 2015) computed as ``torch.optim.Adam`` computes it, written out.

    ``torch.optim``'s first step imports ``torch._dynamo``, a slow import that a fresh ``samir register``
    process paid before its first result (bench/README, "Design notes"). The step count is a tensor on the
    parameters' device, so a step can be recorded in a CUDA graph."""

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        groups = list(params)
        groups = groups if groups and isinstance(groups[0], dict) else [{"params": groups}]
        self.param_groups = [{"params": list(g["params"]), "lr": float(g.get("lr", lr))} for g in groups]
        self.betas, self.eps = betas, eps
        self.state: Dict[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p not in self.state:
                    self.state[p] = (torch.zeros((), device=p.device, dtype=p.dtype), torch.zeros_like(p),
                                     torch.zeros_like(p))
                count, first, second = self.state[p]
                count.add_(1)
                first.lerp_(p.grad, 1 - beta1)
                second.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                # p -= lr / (1 - beta1^t) * first / (sqrt(second / (1 - beta2^t)) + eps), in place
                denominator = second.sqrt().div_((1 - beta2 ** count).sqrt()).add_(self.eps)
                p.addcdiv_(first, denominator.mul_((1 - beta1 ** count) / group["lr"]), value=-1.0)


class RepeatedStep:
    """``step()`` runs ``loss_fn()``, its backward pass and ``optimizer.step()``; returns the loss (detached).

    The returned tensor is the same object at every replay of a recorded step: read it before the next
    call. ``recorded`` says whether steps are being replayed from a CUDA graph."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], optimizer: "Adam",
                 device: torch.device, use_graph: Optional[bool] = None):
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.use_graph = graphs_enabled(device) if use_graph is None else use_graph
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.loss: Optional[torch.Tensor] = None
        self.eager_steps = 0
        self.failure = ""

    @property
    def recorded(self) -> bool:
        return self.graph is not None

    def _eager(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.eager_steps += 1
        return loss.detach()

    def _record(self) -> None:
        self.optimizer.zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.loss_fn()
            loss.backward()
            self.optimizer.step()
            self.loss = loss.detach()
        self.graph = graph

    def step(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        if not self.use_graph:
            return self._eager()
        if self.eager_steps < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._eager()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        try:
            self._record()
        except RuntimeError as exc:  # an operation that cannot be recorded: carry on eagerly
            self.graph, self.use_graph, self.failure = None, False, str(exc).splitlines()[0]
            log.warning("optimisation step not recorded as a CUDA graph (%s); running it step by step", self.failure)
            torch.cuda.synchronize()
            return self._eager()
        self.graph.replay()
        return self.loss
