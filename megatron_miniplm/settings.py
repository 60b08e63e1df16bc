"""One declaration per setting: a stage's config dataclass is the source of its flags.

A field declared with ``setting(...)`` carries its help text and, where it differs
from ``--field-name``, its Megatron-LM flag. From the dataclass alone:

- ``add_arguments(parser, Cls)`` adds the flags, with the field's default and type;
- ``from_args(Cls, namespace)`` builds the config from parsed flags;
- ``to_argv(config)`` writes the flags that reproduce a config (the pipeline launches
  the tools this way, so a default lives in the dataclass only);
- ``from_mapping(Cls, dict)`` builds it from a YAML section, refusing unknown keys and
  values of the wrong type, with the key path;
- ``section_of(Cls, sets=...)`` derives the pipeline config's section of a stage: its flags
  less those the pipeline sets itself.

Booleans follow Megatron-LM: a field that defaults to False is a ``--flag``; one that
defaults to True is turned off by ``--no-flag`` (its ``flag`` metadata names it).
Nested config dataclasses contribute their own fields, flat, as Megatron-LM's flags are.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Mapping, Optional

_NO_DEFAULT = dataclasses.MISSING


def setting(default: Any = _NO_DEFAULT, *, help: str, flag: Optional[str] = None,
            choices: Optional[Iterable] = None, metavar: Optional[str] = None, group: Optional[str] = None,
            cli: bool = True, one_of: Optional[str] = None, fingerprinted: bool = True,
            default_factory: Any = _NO_DEFAULT) -> Any:
    """A dataclass field with what its command-line flag needs. ``cli=False``: not a flag
    (set by the tool or the pipeline itself). ``group``: its section in ``--help``.
    ``one_of``: the name of a choice this setting is one way of making; the settings of a
    class that share it are alternatives, and setting one drops the others (``alternatives``).
    ``fingerprinted=False``: how a run is watched (a logging sink), how it keeps its host
    memory, how often it saves or syncs its progress, or how many threads compute a result
    that does not depend on them: not what it makes; left out of the pipeline's stage
    fingerprints, so that changing it reruns nothing."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None,
                "metavar": metavar, "cli": cli, "group": group, "one_of": one_of, "fingerprinted": fingerprinted}
    if default_factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def alternatives(cls) -> dict[str, set[str]]:
    """Setting name -> the other settings of ``cls`` that make the same choice (``one_of``)."""
    groups: dict[str, set[str]] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("one_of"):
            groups.setdefault(f.metadata["one_of"], set()).add(f.name)
    return {name: members - {name} for members in groups.values() for name in members}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_config(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _default_of(f: dataclasses.Field):
    if f.default is not _NO_DEFAULT:
        return f.default
    if f.default_factory is not _NO_DEFAULT:
        return f.default_factory()
    return _NO_DEFAULT


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every flag of ``cls``, nested configs flattened in declaration order."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if f.metadata.get("cli") is False:
            continue
        if _is_config(tp):
            out.extend(cli_fields(tp))
        elif f.metadata.get("cli", False):
            out.append((f, hints[f.name]))
    return out


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (),
                  overrides: bool = False) -> None:
    """Add a flag per setting of ``cls`` (and of its nested configs) to ``parser``, in ``--help``
    sections by their ``group``. ``overrides``: no defaults and nothing required, so that the
    parsed namespace holds only the flags given (``given(namespace, cls)``), to apply over
    another source such as a model preset."""
    skip = set(skip)
    groups: dict[Optional[str], Any] = {None: parser}
    for f, tp in cli_fields(cls):
        if f.name in skip:
            continue
        group = f.metadata.get("group")
        if group not in groups:
            existing = [g for g in getattr(parser, "_action_groups", []) if g.title == group]
            groups[group] = existing[0] if existing else parser.add_argument_group(group)
        base, optional = _unwrap_optional(tp)
        default = argparse.SUPPRESS if overrides else _default_of(f)
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if base is bool:
            kwargs["action"] = "store_false" if _default_of(f) is True else "store_true"
            kwargs["default"] = default
        else:
            if typing.get_origin(base) in (list, tuple):
                (item,) = typing.get_args(base)[:1]
                kwargs["nargs"] = "+"
                kwargs["type"] = item
            else:
                kwargs["type"] = base
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if default is _NO_DEFAULT:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
                if default is not None and default is not argparse.SUPPRESS and not isinstance(default, (list, tuple)):
                    kwargs["help"] += f" (default: {default})"
        groups[group].add_argument(flag_of(f), **kwargs)


def given(namespace: argparse.Namespace, cls) -> dict:
    """The settings of ``cls`` present in a namespace parsed with ``overrides=True``."""
    return {f.name: getattr(namespace, f.name) for f, _ in cli_fields(cls) if hasattr(namespace, f.name)}


def from_args(cls, namespace: argparse.Namespace, **given):
    """Build ``cls`` from parsed flags; ``given`` supplies fields that are not flags (or
    overrides them)."""
    values = dict(vars(namespace))
    values.update(given)
    return _build(cls, values)


def _build(cls, values: Mapping[str, Any]):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if f.name in values and not (_is_config(tp) and isinstance(values[f.name], Mapping)):
            kwargs[f.name] = values[f.name]
        elif _is_config(tp) and f.metadata.get("cli", True) is not False:
            nested = values.get(f.name) if isinstance(values.get(f.name), Mapping) else values
            kwargs[f.name] = _build(tp, nested)
    return cls(**kwargs)


def to_argv(config, *, skip: Iterable[str] = (), only_changed: bool = True) -> list[str]:
    """The flags that give ``config`` back through ``add_arguments`` + ``from_args``."""
    skip = set(skip)
    argv: list[str] = []
    for f, tp in cli_fields(type(config)):
        if f.name in skip:
            continue
        value = _lookup(config, f.name)
        default = _default_of(f)
        if only_changed and default is not _NO_DEFAULT and value == default:
            continue
        base, _ = _unwrap_optional(tp)
        if base is bool:
            if value != (default is True):
                argv.append(flag_of(f))
            continue
        if value is None:
            continue
        argv.append(flag_of(f))
        argv.extend(str(v) for v in value) if isinstance(value, (list, tuple)) else argv.append(str(value))
    return argv


def _lookup(config, name: str):
    """A field's value, looked for in nested configs too."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == name:
            return value
        if dataclasses.is_dataclass(value):
            try:
                return _lookup(value, name)
            except KeyError:
                pass
    raise KeyError(name)


def from_mapping(cls, data: Mapping[str, Any], where: str = "config", **given):
    """Build ``cls`` from a (YAML) mapping: nested configs as nested mappings. An unknown key
    or a value of the wrong type is refused, naming the key path."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(unknown_setting(where, unknown[0], known, cls.__name__))
    kwargs = dict(given)
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        if _is_config(tp) and isinstance(value, Mapping):
            value = from_mapping(tp, value, f"{where}.{name}")
        else:
            value = checked(value, hints[name], f"{where}.{name}", known[name].metadata.get("choices"))
        kwargs[name] = value
    return cls(**kwargs)


def unknown_setting(where: str, name: Any, known: Iterable[str], of: str) -> str:
    """The refusal of an unknown key ``name`` under ``where``: its path, the closest known
    name (a typo's likely meaning), then every known one."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{where}.{name}: not a setting of {of}{hint} (known: {', '.join(known)})"


def checked(value: Any, tp, where: str, choices: Optional[tuple] = None) -> Any:
    """``value`` if a field of type ``tp`` takes it (an int where a float is declared too), or a
    ValueError naming ``where``. Types outside the settings' vocabulary (bool, int,
    float, str, lists of those, Optional, a config dataclass) are not checked."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: a value is required, got null")
    if choices and base in (str, int) and value not in choices:
        # YAML 1.1 reads on/off/yes/no as booleans: a choice written bare arrives as one
        quote = " (YAML reads on, off, yes and no as true or false: quote the value)" if isinstance(value, bool) else ""
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}{quote}")
    if _is_config(base):
        if isinstance(value, base):
            return value
        raise ValueError(f"{where}: expected a mapping of {base.__name__} settings, got {value!r}")
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)  # an int is a number too
    elif base is str:
        ok = isinstance(value, str)
    elif typing.get_origin(base) in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(base)[:1] or (Any,)
        return [checked(v, item, f"{where}[{k}]") for k, v in enumerate(value)]
    else:
        return value
    if not ok:
        raise ValueError(f"{where}: expected {_type_name(base)}, got {value!r}")
    return value


def _type_name(tp) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class Section:
    """A stage's settings as a pipeline config section (``section_of``): the stage config's
    flags minus those the pipeline sets itself, flat as the tool's flags are."""

    stage: type = None  # the stage's config class
    pipeline_sets: frozenset = frozenset()  # its settings the pipeline gives (``stage_config``)
    extras: frozenset = frozenset()  # settings of the section that are not the stage's

    def given(self) -> dict:
        """The settings that differ from the section's defaults, less those that only say how a
        run is watched: what a stage's fingerprint holds (an unchanged stage keeps its outputs
        when a setting is added to its config with a default)."""
        default = type(self)()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name) and f.metadata.get("fingerprinted", True)}

    def stage_settings(self) -> dict:
        """The section's values that are the stage's settings."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.extras}

    def stage_config(self, **sets):
        """The stage's config: this section's settings and the pipeline's (``sets``), which must
        be exactly the settings it declared it gives, plus any that are not flags (e.g. a model)."""
        flags = {f.name for f, _ in cli_fields(self.stage)}
        missing = sorted(self.pipeline_sets - set(sets))
        stray = sorted(set(sets) & flags - self.pipeline_sets)
        if missing or stray:
            raise TypeError(f"{type(self).__name__}.stage_config: the pipeline must give exactly "
                            f"{sorted(self.pipeline_sets)} (missing {missing}, not its own {stray})")
        return _build(self.stage, {**self.stage_settings(), **sets})


def section_of(stage: type, *, sets: Iterable[str], name: str,
               extra: Iterable[tuple[str, Any, dataclasses.Field]] = ()) -> type:
    """A dataclass for the pipeline config section of ``stage``: every flag of ``stage`` (nested
    configs flattened) except those in ``sets``, which the pipeline gives when it builds the
    stage's config, with the same defaults, types, help and alternatives; plus ``extra`` fields
    that belong to the section only (name, type, ``setting(...)``)."""
    sets = frozenset(sets)
    hints = {f.name: tp for f, tp in cli_fields(stage)}
    unknown = sets - set(hints)
    if unknown:
        raise TypeError(f"section_of({stage.__name__}): not its flags: {sorted(unknown)}")
    fields = []
    for f, tp in cli_fields(stage):
        if f.name in sets:
            continue
        if _default_of(f) is _NO_DEFAULT:
            raise TypeError(f"section_of({stage.__name__}): {f.name} has no default; the pipeline must set it")
        kwargs = ({"default_factory": f.default_factory} if f.default_factory is not _NO_DEFAULT
                  else {"default": f.default})
        fields.append((f.name, tp, dataclasses.field(metadata=f.metadata, **kwargs)))
    extra = list(extra)
    cls = dataclasses.make_dataclass(name, fields + extra, bases=(Section,))
    cls.stage, cls.pipeline_sets, cls.extras = stage, sets, frozenset(n for n, _, _ in extra)
    cls.__doc__ = f"The pipeline's {stage.__name__} settings (its other settings are the pipeline's)."
    return cls


def to_mapping(config) -> dict:
    """A config as plain data (for YAML/JSON): nested configs as nested dicts."""
    return dataclasses.asdict(config)
