"""Reading a training configuration: YAML or TOML files and `--set section.key=value` overrides, turned into the
checked TrainConfig of config.py (every value coerced to its setting's type, every key known, every range and rule
checked; a file that is not valid YAML or TOML is named with its line)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from .config import ConfigError, TrainConfig, _check_range, check_across_sections


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, annotation, key: str):
    """Check/convert `value` to `annotation` (str, int, float, bool, dict, optional of those)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a table of settings, got {value!r}")
    raise ConfigError(f"{key}: unsupported setting type {annotation}")


def _section_type(annotation):
    """The dataclass of a section's annotation (`Section` or `Section | None`), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        sections = [option for option in typing.get_args(annotation) if dataclasses.is_dataclass(option)]
        return sections[0] if sections else None
    return None


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table of settings, got {values!r}")
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in types_by_name:
            raise ConfigError(f"unknown key {full!r}; allowed keys here: {', '.join(types_by_name)}")
        annotation = types_by_name[key]
        section = _section_type(annotation)
        if section is not None and not (value is None and annotation is not section):
            kwargs[key] = _build(section, value, f"{full}.")
            continue
        words = getattr(cls, "BOOLEAN_WORDS", {}).get(key)
        if words is not None and isinstance(value, bool):
            value = words[value]
        kwargs[key] = _coerce(value, annotation, full)
        choices = getattr(cls, "CHOICES", {}).get(key)
        if callable(choices):
            choices = choices()
        if choices is not None and kwargs[key] not in choices:
            allowed = ", ".join("null" if c is None else str(c) for c in choices)
            raise ConfigError(f"{full}: {kwargs[key]!r} is not one of the allowed values: {allowed}")
        bounds = cls.RANGES.get(key) if hasattr(cls, "RANGES") else None
        if bounds is not None and kwargs[key] is not None:
            _check_range(kwargs[key], bounds, full)
    return cls(**kwargs)


def config_from_dict(values: dict) -> TrainConfig:
    config = _build(TrainConfig, values, "")
    check_across_sections(config)
    return config


def config_keys() -> dict[str, list[str]]:
    """Every setting as `key=default`, by section ("" for the top level): what `fused-hybrid train --help` lists."""
    defaults = TrainConfig()
    sections: dict[str, list[str]] = {"": []}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(defaults, field.name)
        if dataclasses.is_dataclass(value):
            sections[field.name] = [f"{f.name}={_shown(getattr(value, f.name))}" for f in dataclasses.fields(value)]
        else:
            sections[""].append(f"{field.name}={_shown(value)}")
    return sections


def _shown(value) -> str:
    """A default as it is written in a config (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def _set_dotted(values: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like section.key=value")
    key, raw = dotted.split("=", 1)
    import yaml

    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    """A YAML config's settings; malformed YAML or a key given twice in one mapping (which PyYAML would settle
    silently, the last one winning) is a ConfigError naming the file and the line."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    break  # PyYAML's own check names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        values = yaml.load(path.read_text(), Loader=StrictLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML: {problem}") from None
    return values if values is not None else {}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config (or start from the defaults) and apply overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        if path.suffix in (".yaml", ".yml"):
            values = _read_yaml(path)
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            try:
                values = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as error:  # its message ends in "(at line L, column C)"
                raise ConfigError(f"config file {str(path)!r}: not valid TOML: {error}") from None
        else:
            raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml or .toml")
    for override in overrides:
        _set_dotted(values, override)
    return config_from_dict(values)
