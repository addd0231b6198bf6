"""Whether a higher value of a metric is better."""

from __future__ import annotations

import re

DEFAULT_HIGHER_IS_BETTER = {"loss": False, "accuracy": True}
_CALLBACK_PREFIX = re.compile(r"^((best|ema)=[^/]+/)+")


class MetricPropertyProvider:
    """Losses are lower-is-better, accuracies higher-is-better; config entries override by key prefix.

    `overrides` maps a metric key or a leading part of one (`f1`, `loss/val`) to higher_is_better;
    the longest matching entry wins. Prefixes added by nesting (`best=…/`, `ema=…/`) are ignored.
    """

    def __init__(self, overrides: dict[str, bool] | None = None) -> None:
        self.rules = {**DEFAULT_HIGHER_IS_BETTER, **(overrides or {})}

    def higher_is_better(self, metric_key: str) -> bool:
        key = _CALLBACK_PREFIX.sub("", metric_key)
        parts = key.split("/")
        for length in range(len(parts), 0, -1):
            rule = self.rules.get("/".join(parts[:length]))
            if rule is not None:
                return rule
        raise ValueError(
            f"unknown whether higher is better for metric '{metric_key}'; "
            f"set metric_higher_is_better: {{'{parts[0]}': true|false}} in the config"
        )
