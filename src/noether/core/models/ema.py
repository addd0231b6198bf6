"""Exponential moving averages (EMA) of a module's weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split tensors into lists of one device and dtype each.

    The fused ``torch._foreach_*`` kernels only take their fast path for such lists; a mixed list falls back to one
    kernel per tensor. The split only depends on devices, dtypes and order, so the lists of a tensor sequence and of
    its copies stay aligned.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())


def _local(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shards of sharded (FSDP) tensors, which share their storage: the fused kernels
    run on them directly, so each rank averages only its own 1/N of the weights."""
    with torch.no_grad():
        return [tensor.to_local() if isinstance(tensor, DTensor) else tensor for tensor in tensors]


class ModuleEma:
    """EMAs of one module's weights, one per factor: ``ema = factor * ema + (1 - factor) * live`` on every update.

    Floating-point parameters are averaged. Every other entry of the module's state dict, i.e. buffers such as
    BatchNorm running statistics and ``num_batches_tracked``, is not trained but tracks the live weights, so each
    factor gets a plain copy of it on every update; that keeps a swapped-in or saved EMA self-consistent, and lets
    swapped_in restore everything the body may change.

    The module's parameters and buffers are held by reference, so they must stay the same tensor objects for the
    lifetime of the EMA: optimizers update them in place, which is fine, whereas replacing a parameter or buffer
    attribute, or moving the module to another device or dtype afterwards, is not. Build the EMA after the module is
    placed (and sharded). Tied weights are averaged once.
    """

    def __init__(self, module: nn.Module, factors: Sequence[float]) -> None:
        factors = tuple(factors)
        if not factors:
            raise ValueError("ModuleEma needs at least one factor")
        for factor in factors:
            if not 0.0 <= factor < 1.0:
                raise ValueError(f"EMA factor must satisfy 0 <= factor < 1, got {factor!r}")
        if len(set(factors)) != len(factors):
            raise ValueError(f"duplicate EMA factors in {factors}")
        self.module = module
        self.factors = factors
        # Incremented by every swapped_in, i.e. every time live weights are copied out and back.
        self.copy_count = 0

        parameter_ids = {id(p) for p in module.parameters()}
        names = module.state_dict(keep_vars=True)
        unique = {id(tensor): tensor for tensor in names.values()}
        averaged: list[torch.Tensor] = []
        copied: list[torch.Tensor] = []
        for tensor in unique.values():
            (averaged if tensor.is_floating_point() and id(tensor) in parameter_ids else copied).append(tensor)
        self._live_averaged = _by_device_and_dtype(_local(averaged))
        self._live_copied = _by_device_and_dtype(_local(copied))

        self._ema: dict[float, dict[str, torch.Tensor]] = {}
        self._ema_averaged: dict[float, list[list[torch.Tensor]]] = {}
        self._ema_copied: dict[float, list[list[torch.Tensor]]] = {}
        for factor in factors:
            copies = {key: tensor.detach().clone() for key, tensor in unique.items()}
            self._ema[factor] = {name: copies[id(tensor)] for name, tensor in names.items()}
            self._ema_averaged[factor] = _by_device_and_dtype(_local([copies[id(t)] for t in averaged]))
            self._ema_copied[factor] = _by_device_and_dtype(_local([copies[id(t)] for t in copied]))
        # Holds the live weights while an EMA is swapped in; allocated on first use and reused.
        self._scratch: list[list[torch.Tensor]] | None = None
        self._swapped = False

    @torch.no_grad()
    def update(self) -> None:
        """Move every EMA towards the live weights; one fused in-place pass per factor, no allocation."""
        for factor in self.factors:
            for ema, live in zip(self._ema_averaged[factor], self._live_averaged):
                torch._foreach_lerp_(ema, live, 1.0 - factor)
            for ema, live in zip(self._ema_copied[factor], self._live_copied):
                torch._foreach_copy_(ema, live)

    @torch.no_grad()
    def reset_from_module(self) -> None:
        """Set every EMA to the live weights."""
        for factor in self.factors:
            for ema, live in zip(self._ema_all(factor), self._live_all()):
                torch._foreach_copy_(ema, live)

    def state_dict(self, factor: float) -> dict[str, torch.Tensor]:
        """The module's state dict with the EMA of ``factor`` in place of the live entries.

        Loads into a fresh module of the same architecture with ``load_state_dict``. Like ``nn.Module.state_dict``
        it returns references, not copies: the EMA tensors change with the next update.
        """
        self._check_factor(factor)
        state = self.module.state_dict()
        state.update(self._ema[factor])
        return state

    @torch.no_grad()
    def load_state_dict(self, factor: float, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state_dict`` into the EMA of ``factor`` in place.

        Strict: the keys must be exactly those of the module's state dict. Nothing is copied unless all keys and
        shapes match.
        """
        self._check_factor(factor)
        ema = self._ema[factor]
        expected = self.module.state_dict().keys()
        missing = [key for key in expected if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected]
        if missing or unexpected:
            raise ValueError(
                f"EMA state dict for factor {factor} does not match the module: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        mismatched = [
            f"{name}: {tuple(state_dict[name].shape)} vs {tuple(tensor.shape)}"
            for name, tensor in ema.items()
            if state_dict[name].shape != tensor.shape
        ]
        if mismatched:
            raise ValueError(f"EMA state dict for factor {factor} has mismatched shapes: {mismatched}")
        for name, tensor in ema.items():
            tensor.copy_(state_dict[name])

    @contextlib.contextmanager
    def swapped_in(self, factor: float) -> Iterator[nn.Module]:
        """Run the module with the EMA of ``factor`` as its weights, e.g. to evaluate it.

        The weights are copied, not re-pointed, so whatever the body does to the module (even a training step) leaves
        the EMA untouched, and the live weights are restored bit-identically on exit, also if the body raises. The
        first call allocates one scratch copy of the weights, which later calls reuse. Not reentrant.
        """
        self._check_factor(factor)
        if self._swapped:
            raise RuntimeError("an EMA is already swapped in; swapped_in cannot be nested")
        live = self._live_all()
        ema = self._ema_all(factor)
        if self._scratch is None:
            self._scratch = [[torch.empty_like(t) for t in group] for group in live]
        with torch.no_grad():
            for scratch, live_group, ema_group in zip(self._scratch, live, ema):
                torch._foreach_copy_(scratch, live_group)
                torch._foreach_copy_(live_group, ema_group)
        self.copy_count += 1
        self._swapped = True
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for scratch, live_group in zip(self._scratch, live):
                    torch._foreach_copy_(live_group, scratch)
            self._swapped = False

    def _live_all(self) -> list[list[torch.Tensor]]:
        return self._live_averaged + self._live_copied

    def _ema_all(self, factor: float) -> list[list[torch.Tensor]]:
        return self._ema_averaged[factor] + self._ema_copied[factor]

    def _check_factor(self, factor: float) -> None:
        if factor not in self._ema:
            raise ValueError(f"no EMA with factor {factor!r}; the factors are {self.factors}")
