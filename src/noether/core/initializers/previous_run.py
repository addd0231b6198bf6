"""Start from the weights (or EMA weights) of a checkpoint of an earlier run: fine-tuning."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from noether.core.checkpoint_store import CheckpointStore, Member
from noether.core.config import ConfigError
from noether.core.initializers.base import Initializer, InitializerConfig
from noether.core.object_storage import fetch_run, is_url
from noether.core.providers.path import PathProvider
from noether.core.writers.checkpoint_writer import CheckpointLoadError

if TYPE_CHECKING:
    from noether.core.models.base import ModelBase

_EMA_INFO = re.compile(r"^ema=(?P<factor>[0-9.eE+-]+)$")
_SHOWN_KEYS = 3


class KeyRename(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: str
    dst: str


class PreviousRunInitializerConfig(InitializerConfig):
    run_id: str
    """Id of the earlier run under this run's output_path, its run directory, or its URL (`s3://bucket/prefix/run`)."""
    model_name: str
    """The (sub)model's checkpoint name in that run, e.g. `classifier` or `composite.encoder`."""
    checkpoint_tag: str
    model_info: str | None = None
    """`ema={factor}` loads that EMA's weights instead of the live weights."""
    keys_to_remove: list[str] = []
    patterns_to_remove: list[str] = []
    """Keys containing any of these substrings are dropped."""
    patterns_to_rename: list[KeyRename] = []
    """Substring renames of the checkpoint's keys (`{src: encoder., dst: backbone.}`), applied in order."""

    @field_validator("model_info")
    @classmethod
    def _ema_info(cls, model_info: str | None) -> str | None:
        if model_info is not None and _EMA_INFO.match(model_info) is None:
            raise ValueError(f"expected 'ema=<factor>' (e.g. ema=0.999), got '{model_info}'")
        return model_info


class PreviousRunInitializer(Initializer):
    """Loads a checkpoint's weights into the model, after the configured key removals and renames.

    The filtered weights must fit the model exactly: every key present, none left over, shapes equal.
    """

    config: PreviousRunInitializerConfig

    def initialize(self, model: ModelBase) -> None:
        state_dict = self._filtered(self._load())
        _check_fit(state_dict, model.state_dict(), self._source())
        model.load_state_dict(state_dict)

    def _member(self) -> Member:
        info = self.config.model_info
        factor = float(_EMA_INFO.match(info)["factor"]) if info else None  # type: ignore[index]
        return Member(self.config.model_name, "model", factor)

    def _source(self) -> str:
        config = self.config
        ema = f" ({config.model_info})" if config.model_info else ""
        return f"checkpoint '{config.checkpoint_tag}' of {config.model_name}{ema} in run {config.run_id}"

    def _load(self) -> dict[str, torch.Tensor]:
        if not is_url(self.config.run_id):
            return self._load_from(self.config.run_id)
        with tempfile.TemporaryDirectory(prefix="noether-initializer-") as folder:
            try:
                run_dir = fetch_run(self.config.run_id, Path(folder), tags=[self.config.checkpoint_tag])
            except FileNotFoundError as error:
                raise ConfigError(f"run_id: {error}") from None
            return self._load_from(str(run_dir))

    def _load_from(self, run: str) -> dict[str, torch.Tensor]:
        try:
            paths = PathProvider.for_existing_run(run, self.output_path)
        except FileNotFoundError as error:
            raise ConfigError(f"run_id: {error}") from None
        store = CheckpointStore(paths.checkpoint_dir, paths.run_id)
        member, tag = self._member(), self.config.checkpoint_tag
        if not store.exists(member, tag):
            raise ConfigError(f"{self._source()} does not exist; {_what_there_is(store, member, tag)}")
        try:
            return store.load(member, tag)["state_dict"]
        except CheckpointLoadError as error:
            raise ConfigError(str(error)) from None

    def _filtered(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's weights after the removals and renames. Two keys renamed onto one are an error:
        keeping either would silently drop the other's weights."""
        config = self.config
        kept, sources = {}, {}
        for source_key, value in state_dict.items():
            if source_key in config.keys_to_remove or any(pattern in source_key for pattern in config.patterns_to_remove):
                continue
            key = source_key
            for rename in config.patterns_to_rename:
                key = key.replace(rename.src, rename.dst)
            if key in sources:
                raise ConfigError(
                    f"patterns_to_rename: keys '{sources[key]}' and '{source_key}' of {self._source()} both become '{key}'; "
                    "remove one of them (keys_to_remove) or rename them apart"
                )
            kept[key], sources[key] = value, source_key
        return kept


def _what_there_is(store: CheckpointStore, member: Member, tag: str) -> str:
    """What the run does hold, to point at the mistake: other tags of that model, or other models/EMAs of that tag."""
    tags = store.tags()
    with_member = [info.tag for info in tags if member in info.files]
    if with_member:
        return f"its checkpoints of that model: {', '.join(with_member)}"
    in_tag = next((info for info in tags if info.tag == tag), None)
    if in_tag is not None:
        names = sorted(
            {
                m.model_name + (f" (ema={m.ema_factor})" if m.ema_factor is not None else "")
                for m in in_tag.files
                if m.part == "model"
            }
        )
        return f"that checkpoint holds weights of: {', '.join(names)}"
    return f"it has no checkpoint '{tag}'" if tags else "it has no checkpoints"


def _check_fit(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    mismatched = [
        f"{key} {list(loaded[key].shape)} vs {list(value.shape)}"
        for key, value in expected.items()
        if key in loaded and loaded[key].shape != value.shape
    ]
    problems = [
        f"{label} {', '.join(keys[:_SHOWN_KEYS])}{' ...' if len(keys) > _SHOWN_KEYS else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise ConfigError(f"{source} does not fit the model: {'; '.join(problems)}")
