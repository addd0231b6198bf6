"""Weights & Biases (extra `[wandb]`): one W&B run per run, continued on resume."""

from __future__ import annotations

import re
import secrets
from typing import Any, Literal

from pydantic import model_validator

from noether.core.trackers.base import Tracker, TrackerConfig, require_extra


class WandbTrackerConfig(TrackerConfig):
    project: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    """`offline` writes `{run_dir}/wandb/offline-run-*` folders, uploaded later by `wandb sync`."""

    @model_validator(mode="after")
    def _wandb_installed(self) -> WandbTrackerConfig:
        require_extra("wandb", "wandb")
        return self


class WandbTracker(Tracker):
    """Logs each metrics row with its `update` as the x-axis of every chart, so charts show updates
    also when W&B's own step counter goes on across a resume.

    The W&B run id is made on a fresh start (the run id plus a random suffix, so that a run id used
    again after deleting its directory does not append to an old W&B run) and kept in
    `{run_dir}/wandb_run_id`; a resume continues that W&B run. W&B cannot take back what is already
    logged (rewinding is a server feature W&B does not offer offline), so the updates that the
    stopped run logged after its checkpoint are logged again by the resumed run.
    """

    config: WandbTrackerConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run = None

    def start(self, resumed_update: int | None) -> None:
        import wandb

        id_file = self.paths.run_dir / "wandb_run_id"
        if resumed_update is not None and id_file.exists():
            wandb_id = id_file.read_text().strip()
        else:
            wandb_id = f"{re.sub(r'[^A-Za-z0-9_-]', '-', self.paths.run_id)[:48]}-{secrets.token_hex(4)}"
            id_file.write_text(wandb_id + "\n")
        self.run = wandb.init(
            project=self.config.project,
            entity=self.config.entity,
            mode=self.config.mode,
            dir=self.paths.run_dir,
            id=wandb_id,
            name=self.paths.run_id,
            resume="allow",
            config=self.run_config if resumed_update is None else None,
            reinit="create_new",  # leaves a user's own `wandb.run` alone
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric("update")
        self.run.define_metric("*", step_metric="update")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"update": step, **values})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
