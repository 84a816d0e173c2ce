"""Checked dataclasses from YAML: the one mechanism behind pico-train's, pico-analyze's and the study configs.

    config = from_dict(PicoTrainingConfig, apply_overrides(tree, ["training.max_steps=50"]))

`from_dict` builds nested dataclasses from a mapping, coercing values to the field types (YAML's "3e-4" is a
string: it becomes a float) and naming the dotted key of whatever is wrong ("'training.max_steps' must be an
integer, got 'ten'"). Unknown keys are errors that name the closest valid key. `dacite` or OmegaConf structured
configs would do the building, but neither reports pico's key paths and suggestions, and the coercion is small.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import difflib
import importlib.util
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts.

    One error can carry several problems (`ConfigError.of(problems)`), each naming the key that fixes it: the
    recipes print one `error:` line per problem."""

    @classmethod
    def of(cls, problems: Sequence[str]) -> ConfigError:
        error = cls("\n".join(problems))
        error.problems = list(problems)
        return error

    @property
    def problems(self) -> list[str]:
        return self.__dict__.get("problems") or [str(self)]

    @problems.setter
    def problems(self, problems: list[str]) -> None:
        self.__dict__["problems"] = problems


def error_lines(error: ConfigError) -> str:
    """What the recipes print for a config error: one `error:` line per problem."""
    return "\n".join(f"error: {problem}" for problem in error.problems)


class Problems:
    """Collects config problems so that every one found before training is reported together.

    problems = Problems()
    with problems.check():
        open_dataset(...)  # a ConfigError here is recorded, and the next check still runs
    problems.raise_any()
    """

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as error:
            self.found.extend(error.problems)

    def raise_any(self) -> None:
        if self.found:
            raise ConfigError.of(self.found)


def wandb_problem(key: str = "monitoring.save_to_wandb") -> str | None:
    """Weights & Biases logging asked for without the wandb package: one behaviour for training and analysis."""
    if importlib.util.find_spec("wandb") is None:
        return f"{key} is true but the wandb package is not installed: pip install wandb, or set {key}=false"
    return None


def config_fields(cls: type) -> dict[str, Any]:
    """A config dataclass's keys and their types: its fields, then the sections its `config_sections()` adds.

    A section added that way (the training modes' `training.<mode>`, from their registry) is a dataclass set as
    an instance attribute: the dataclass's `__post_init__` gives it its default."""
    hints = typing.get_type_hints(cls)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    extra = getattr(cls, "config_sections", None)
    return {**keys, **(extra() if extra is not None else {})}


def as_dict(instance: Any) -> Any:
    """`dataclasses.asdict`, with the sections of `config_sections()` too."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {name: as_dict(getattr(instance, name)) for name in config_fields(type(instance))}
    if isinstance(instance, (list, tuple)):
        return type(instance)(as_dict(value) for value in instance)
    if isinstance(instance, dict):
        return {key: as_dict(value) for key, value in instance.items()}
    return copy.deepcopy(instance)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config dataclass, sections included."""
    keys = []
    for name, annotation in config_fields(cls).items():
        path = f"{prefix}{name}"
        keys.append(path)
        if dataclasses.is_dataclass(annotation):
            keys.extend(all_keys(annotation, path + "."))
    return keys


def suggest(name: str, candidates: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to a mistyped `name`, if any is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


def unknown_key(path: str, siblings: Sequence[str], root: type | None = None) -> ConfigError:
    """Name the closest valid key: a sibling with a similar name, else any key of `root` with a similar path."""
    section, _, leaf = path.rpartition(".")
    close = suggest(leaf, siblings)
    if close is not None:
        close = f"{section}.{close}" if section else close
    elif root is not None:
        close = suggest(path, all_keys(root))
    hint = f"; did you mean '{close}'?" if close else f"; valid keys here: {', '.join(siblings)}"
    return ConfigError(f"Unknown config key '{path}'{hint}")


def unknown_keys_listed(
    section: str, unknown: Sequence[str], valid: Sequence[str], lead: str = "Unknown"
) -> ConfigError:
    """pico-analyze's and the study's form: every unknown key of a section at once, with the valid ones."""
    where = f" in {section}" if section else ""
    for_key = (lambda key: f" for '{key}'") if len(unknown) > 1 else (lambda key: "")
    hints = [f"'{close}'{for_key(key)}" for key in unknown if (close := suggest(str(key), valid))]
    hint = f"; did you mean {', '.join(hints)}?" if hints else ""
    return ConfigError(f"{lead} key(s) {list(unknown)}{where}; valid keys: {list(valid)}{hint}")


def check_keys(section: str, given: Mapping[str, Any], valid: Sequence[str], lead: str = "Unknown") -> None:
    """Raise `unknown_keys_listed` when `given` holds keys outside `valid`."""
    unknown = [key for key in given if key not in valid]
    if unknown:
        raise unknown_keys_listed(section, unknown, valid, lead)


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check (and gently convert, e.g. YAML's string "3e-4" to a float) a value against its field type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, path)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise ConfigError(f"'{path}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, collections.abc.Mapping) or annotation is Any:
        if origin is not None and not isinstance(value, Mapping):
            raise ConfigError(f"'{path}' must be a mapping, got {value!r}")
        return dict(value) if origin is not None else value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{path}' must be true or false, got {value!r}")
    if annotation is int:
        if not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = float("nan")
            if number.is_integer():
                return int(number)
        raise ConfigError(f"'{path}' must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{path}' must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{path}' must be a string, got {value!r}")
    raise ConfigError(f"'{path}' has an unsupported type {annotation}")


# Called with (section, unknown keys, valid keys) and returns the error to raise.
UnknownKeys = Callable[[str, list[str], list[str]], ConfigError]


def from_dict(
    cls: type,
    values: Any,
    prefix: str = "",
    *,
    visit: Callable[[str], None] | None = None,
    unknown: UnknownKeys | None = None,
    none_is_default: bool = False,
    root: type | None = None,
) -> Any:
    """Build the dataclass `cls` (and its nested dataclass sections) from a mapping.

    A missing key or a null section takes the field's default. `visit` sees each given key's dotted path
    (for notes on keys that mean something else here); `unknown` turns unknown keys into the caller's error
    (by default: the first one, with the closest key of `root` named); `none_is_default` lets null stand for
    the default of a field that cannot be null (pico-analyze accepted that)."""
    section = prefix.rstrip(".")
    if not isinstance(values, Mapping):
        raise ConfigError(f"'{section or 'config'}' must be a mapping, got {values!r}")
    root = root or cls
    hints = config_fields(cls)
    names = list(hints)
    bad = [key for key in values if key not in names]
    if bad:
        raise (unknown or (lambda _s, keys, valid: unknown_key(f"{prefix}{keys[0]}", valid, root)))(
            section, bad, names
        )
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if visit is not None:
            visit(path)
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = from_dict(
                annotation,
                value or {},
                path + ".",
                visit=visit,
                unknown=unknown,
                none_is_default=none_is_default,
                root=root,
            )
        elif value is None and none_is_default and not _nullable(annotation):
            continue
        else:
            kwargs[key] = coerce(value, annotation, path)
    fields = {f.name for f in dataclasses.fields(cls)}
    sections = {key: kwargs.pop(key) for key in list(kwargs) if key not in fields}
    instance = cls(**kwargs)
    for key, section in sections.items():  # the sections of `config_sections()`
        setattr(instance, key, section)
    return instance


def _nullable(annotation: Any) -> bool:
    return annotation is Any or (
        typing.get_origin(annotation) in (typing.Union, types.UnionType)
        and type(None) in typing.get_args(annotation)
    )


def load_yaml(path: str | Path, what: str) -> Any:
    """A config file's YAML; `what` names the file in errors ("Config file", "Analysis config")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error


# --- dotted overrides ---------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`training.max_steps=50` -> ("training.max_steps", 50); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested mapping, creating sections on the way."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{dotted}' goes through '{key}', which is not a section")
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str] | None) -> dict[str, Any]:
    """Apply `section.key=value` strings to `tree` in place (later ones win) and return it."""
    for override in overrides or []:
        set_dotted(tree, *parse_override(override))
    return tree


def leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The dotted paths of a nested mapping's non-mapping values."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


__all__ = [
    "ConfigError",
    "all_keys",
    "apply_overrides",
    "as_dict",
    "check_keys",
    "coerce",
    "config_fields",
    "from_dict",
    "leaf_keys",
    "load_yaml",
    "parse_override",
    "set_dotted",
    "suggest",
    "unknown_key",
    "unknown_keys_listed",
]
