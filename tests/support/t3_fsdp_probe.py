"""A test-only callback that reports, from inside a run under torchrun, how each rank's models are
sharded and in which precision they compute: `kind: tests.support.t3_fsdp_probe.ShardingProbe`.

After update `at_update` every rank writes `{report_dir}/rank{rank}.json`:

- per leaf model, the module paths that are FSDP units (`""` is the model itself);
- per parameter, its full and local (this rank's shard) number of elements, its dtype and whether it
  requires gradients;
- the dtype of every linear layer's weight as the layer ran its forward passes in training (what it
  computed with), collected by forward pre-hooks over the updates so far.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import PositiveInt
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from noether.core.callbacks.base import CallBackBaseConfig
from noether.core.callbacks.periodic import PeriodicCallback
from noether.core.utils.training.counter import UpdateCounter


class ShardingProbeConfig(CallBackBaseConfig):
    every_n_updates: PositiveInt | None = 1
    at_update: PositiveInt = 1
    report_dir: str


class ShardingProbe(PeriodicCallback):
    config: ShardingProbeConfig

    def __init__(self, callback_config: ShardingProbeConfig, context: Any) -> None:
        super().__init__(callback_config, context)
        self.forward_dtypes: dict[str, set[str]] = {}

    def logged_metric_prefixes(self) -> list[str]:
        return []

    def before_training(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        for name, leaf in self.context.model.named_models().items():
            for path, module in leaf.named_modules():
                if isinstance(module, nn.Linear):
                    module.register_forward_pre_hook(self._recorder(f"{name}:{path}"))

    def _recorder(self, where: str):
        def record(module: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():  # a training forward, not an evaluation pass
                self.forward_dtypes.setdefault(where, set()).add(str(module.weight.dtype))

        return record

    def after_update(self, *, update_counter: UpdateCounter, **kwargs: Any) -> None:
        if update_counter.update != self.config.at_update:
            return
        forward_dtypes = {key: sorted(value) for key, value in self.forward_dtypes.items()}
        report: dict[str, Any] = {"models": {}, "forward_weight_dtypes": forward_dtypes}
        for name, leaf in self.context.model.named_models().items():
            report["models"][name] = {
                "units": sorted(path for path, module in leaf.named_modules() if isinstance(module, FSDPModule)),
                "parameters": {
                    path: {
                        "full": parameter.numel(),
                        "local": parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel(),
                        "dtype": str(parameter.dtype),
                        "requires_grad": parameter.requires_grad,
                    }
                    for path, parameter in leaf.named_parameters()
                },
            }
        directory = Path(self.config.report_dir)
        directory.mkdir(parents=True, exist_ok=True)
        staged = directory / f".rank{self.context.rank}.json.tmp"
        staged.write_text(json.dumps(report, indent=1, sort_keys=True))
        staged.replace(directory / f"rank{self.context.rank}.json")
