"""Config system: pydantic v2 models chosen by `kind`, loaded from YAML with dotted overrides.

A config entry names what it builds with `kind`, the dotted import path of a class or of its
config class. By convention a class `Foo` is configured by `FooConfig` defined in the same module,
so `kind: mypkg.Foo` and `kind: mypkg.FooConfig` mean the same thing and re-exports
(`noether.core.callbacks.BestCheckpointCallback`) work too.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import InitErrorDetails, PydanticCustomError

from noether.core.utils.formatting import one_line

CONFIG_SUFFIX = "Config"

Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A seed that random, numpy and torch all accept (numpy's global seeding is the narrowest: 0 <= seed < 2**32)."""


class ConfigError(Exception):
    """A user's config is wrong; the message names the path of every bad value."""


class RegistryConfig(BaseModel):
    """Base of all configs selected by `kind`; subclasses register themselves on definition."""

    # an infinite or NaN setting would only fail (or silently train on NaN) once the run is under way
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: str | None = None

    registry: ClassVar[dict[str, type[RegistryConfig]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RegistryConfig.registry[f"{cls.__module__}.{cls.__qualname__}"] = cls

    @classmethod
    def configured_class(cls) -> type:
        """The class this config builds: `FooConfig` builds `Foo` from the same module."""
        if not cls.__name__.endswith(CONFIG_SUFFIX):
            raise TypeError(f"config class {cls.__name__} must be named '<Class>{CONFIG_SUFFIX}'")
        module = importlib.import_module(cls.__module__)
        target_name = cls.__name__[: -len(CONFIG_SUFFIX)]
        target = getattr(module, target_name, None)
        if target is None:
            raise TypeError(f"{cls.__module__} defines {cls.__name__} but no class {target_name}")
        return target


def import_object(dotted_path: str) -> Any:
    """Import `package.module.Name`; raises ValueError with a readable reason."""
    module_name, _, attribute = dotted_path.rpartition(".")
    if not module_name:
        raise ValueError(f"'{dotted_path}' is not a dotted import path like 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        known = [
            name for config_name in RegistryConfig.registry for name in (config_name, config_name.removesuffix(CONFIG_SUFFIX))
        ]
        raise ValueError(f"cannot import module '{module_name}' ({error}){_did_you_mean(dotted_path, known)}") from None
    except ImportError as error:
        raise ValueError(f"cannot import module '{module_name}' ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        classes = [f"{module_name}.{name}" for name, value in vars(module).items() if isinstance(value, type)]
        raise ValueError(f"module '{module_name}' has no attribute '{attribute}'{_did_you_mean(dotted_path, classes)}") from None


def _did_you_mean(name: str, candidates: list[str]) -> str:
    """`; did you mean X?` for the candidate closest to a misspelt `name`, or nothing when none is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.8)
    return f"; did you mean {close[0]}?" if close else ""


def config_class_for_kind(kind: str, base: type[RegistryConfig]) -> type[RegistryConfig]:
    """Resolve `kind` to a registered config class that is a subclass of `base`."""
    if kind in RegistryConfig.registry:
        config_class = RegistryConfig.registry[kind]
    else:
        target = import_object(kind)
        if isinstance(target, type) and issubclass(target, RegistryConfig):
            config_class = target
        elif isinstance(target, type):
            config_class = getattr(importlib.import_module(target.__module__), target.__name__ + CONFIG_SUFFIX, None)
            if config_class is None:
                raise ValueError(f"'{kind}' has no config class {target.__name__}{CONFIG_SUFFIX} in {target.__module__}")
        else:
            raise ValueError(f"'{kind}' is not a class")
    if not issubclass(config_class, base):
        raise ValueError(f"'{kind}' is configured by {config_class.__name__}, which is not a {base.__name__}")
    try:
        config_class.configured_class()  # fail now, not when the run is built
    except TypeError as error:
        raise ValueError(f"'{kind}' cannot be built: {error}") from None
    return config_class


ConfigT = TypeVar("ConfigT", bound=RegistryConfig)


def _validate_by_kind(base: type[RegistryConfig]):
    def validate(value: Any, handler: Any) -> RegistryConfig:
        if isinstance(value, base):
            return value
        if not isinstance(value, dict):
            return handler(value)
        kind = value.get("kind")
        if kind is None:
            raise _kind_error(kind, "field required (the dotted import path of the class to build)")
        if not isinstance(kind, str):
            raise _kind_error(kind, f"must be a dotted import path like 'package.module.Class', not {kind!r}")
        try:
            config_class = config_class_for_kind(kind, base)
        except ValueError as error:
            raise _kind_error(kind, str(error)) from None
        return config_class.model_validate(value)

    return validate


def _kind_error(kind: Any, reason: str) -> ValidationError:
    """An error located at the entry's `kind` key, so the message names `....kind`."""
    error_type = PydanticCustomError("kind", "{reason}", {"reason": reason})
    return ValidationError.from_exception_data("kind", [InitErrorDetails(type=error_type, loc=("kind",), input=kind)])


def by_kind(base: type[ConfigT]) -> Any:
    """Field type accepting any registered subclass config of `base`, chosen by its `kind`."""
    return Annotated[base, WrapValidator(_validate_by_kind(base))]


def build(config: RegistryConfig, *args: Any, **kwargs: Any) -> Any:
    """Instantiate the class a config configures."""
    return type(config).configured_class()(config, *args, **kwargs)


def format_validation_error(error: ValidationError) -> str:
    """One line per bad value: `trainer.callbacks[1].dataset_key: field required`."""
    lines = []
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif "[" in str(part) or "function-wrap" in str(part):
                continue  # pydantic's names for union branches and wrap validators, not user keys
            else:
                path += f".{part}" if path else str(part)
        message = item["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        lines.append(f"{path or '<config>'}: {message}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.max_epochs=3` -> (['trainer', 'max_epochs'], 3); the value is parsed as YAML."""
    key, separator, raw_value = text.partition("=")
    keys = key.split(".")
    if not separator or not all(keys):
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_describe_yaml_error(error)})") from None
    return keys, value


def apply_override(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set `value` at the dotted `keys`; list entries are addressed by index, missing mappings are created."""
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, key, keys)]
        elif isinstance(node, dict):
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:depth])} is not a mapping or list")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, keys)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:-1])} is not a mapping or list")


def _list_index(node: list, key: str, keys: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override {'.'.join(keys)}: '{key}' is not an index of a list of {len(node)}")
    return int(key)


def load_yaml(path: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a YAML config into a dict and apply dotted `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_describe_yaml_error(error)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for text in overrides:
        apply_override(tree, *parse_override(text))
    return tree


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where it is."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None or mark is None:
        return one_line(error)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def validate_config(model: type[BaseModel], tree: dict[str, Any]) -> Any:
    """Validate a config tree; a failure becomes a ConfigError naming each bad value's path."""
    try:
        return model.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
