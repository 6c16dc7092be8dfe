"""Settings: one config path (dataclass -> CLI flags and ADA_DDNN_* env vars) for every role.

Each process role has a frozen dataclass. Its fields give the flags (`--deadline-ms`, dest
`deadline_ms`) and env vars (`ADA_DDNN_DEADLINE_MS`); the field's annotation gives the parser and
its trailing `# comment` gives the help text. Precedence: overrides > flags > env > the command's
own defaults > the field's default.
Field metadata: `help` (replaces the comment), `choices` (allowed values), `flags` (flag names
instead of the derived one), `cli` (False: env only), and the allowed range: `min` and `max`
(inclusive) or `above` (exclusive), for a number or each item of a tuple; --help shows it and
`check_fields` (each config's `__post_init__`) enforces it with choices, whatever built the
instance. Part of the base: it knows no role.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

from pipeline.errors import SettingsError

ENV_PREFIX = "ADA_DDNN_"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none")
Converter = tuple[Callable[[str], Any], str]


def env_name(field_name: str) -> str:
    """Env var of a field: "deadline_ms" -> "ADA_DDNN_DEADLINE_MS"."""
    return ENV_PREFIX + field_name.upper()


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _source_comments(klass: type) -> dict[str, str]:
    """Trailing comment of each `name: type ...` statement directly in the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    stmt: list[tokenize.TokenInfo] = []
    comment, depth, stmt_depth = "", 0, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            comment = comment or (tok.string.lstrip("#").strip() if stmt else "")
        elif tok.type == tokenize.NEWLINE:
            named = len(stmt) > 1 and stmt[0].type == tokenize.NAME and stmt[1].string == ":"
            if named and stmt_depth == 1 and comment:
                found.setdefault(stmt[0].string, comment)
            stmt, comment = [], ""
        elif tok.type != tokenize.NL:
            stmt_depth = depth if not stmt else stmt_depth
            stmt.append(tok)
    return found


@functools.cache  # tokenizing class sources is most of a command's start-up
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> help text: metadata "help", else the trailing comment in the class source."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_source_comments(klass))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    comments = {name: text for name, text in comments.items() if name in fields}
    comments.update({n: f.metadata["help"] for n, f in fields.items() if "help" in f.metadata})
    return comments


def range_text(metadata: typing.Mapping[str, Any]) -> str:
    """The range a field's metadata allows, as --help and errors say it ("" when none)."""
    low, high, above = metadata.get("min"), metadata.get("max"), metadata.get("above")
    if low is not None and high is not None:
        return f"{low}..{high}"
    parts = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
             f"<= {high}" if high is not None else ""]
    return " and ".join(p for p in parts if p)


def _in_range(metadata: typing.Mapping[str, Any], value: Any) -> bool:
    low, high, above = metadata.get("min"), metadata.get("max"), metadata.get("above")
    return ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above))


def check_fields(obj: Any) -> None:
    """Each field of the dataclass instance `obj` within its declared choices and range (metadata
    `choices`, `min`, `max`, `above`; None passes, as does each item of a tuple that does): a
    ValueError naming the field, the range and the value otherwise. Every config's
    `__post_init__` calls it first, so a config built in code is held to what the flags are."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        items = value if isinstance(value, tuple) else (value,)
        choices = f.metadata.get("choices")
        if choices is not None and any(v not in choices for v in items):
            raise ValueError(f"{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        allowed = range_text(f.metadata)
        if not allowed:
            continue
        each = "each " if isinstance(value, tuple) else ""
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise ValueError(f"{f.name} must be {each}a number {allowed}, got {value!r}")
        if not all(_in_range(f.metadata, v) for v in items):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise ValueError(f"{f.name} must be {each}{allowed}, got {shown}")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse `type` for a plain flag: an int >= `low`, else an error naming the bound."""
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def fraction(raw: str) -> float:
    """An argparse `type` for a plain flag: a number in 0..1."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in 0..1, got {raw}")
    return value


def confidence_level(raw: str) -> float:
    """An argparse `type` for a confidence level: 0 (no bound, the estimate itself) or 0.5..1, 1 excluded."""
    value = fraction(raw)
    if value != 0 and not 0.5 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be 0 or in 0.5..1 (1 excluded), got {raw}")
    return value


def env_int(field_name: str, default: int, low: int = 0) -> int:
    """The int in env var ADA_DDNN_<FIELD_NAME> (>= `low`), else `default`; bad text raises
    SettingsError naming the variable (read when a command runs, never while parsers are built)."""
    raw = os.environ.get(env_name(field_name))
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{env_name(field_name)}={raw!r}: must be an int") from None
    if value < low:
        raise SettingsError(f"{env_name(field_name)}={raw!r}: must be >= {low}")
    return value


def _parse_bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text not in _TRUE + _FALSE:
        raise ValueError(raw)
    return text in _TRUE


def _parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None` / `Optional[X]`, else (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _converter(tp: Any) -> Converter | None:
    """(text -> value, description of the expected text) for a supported annotation, else None."""
    simple: dict[Any, Converter] = {
        bool: (_parse_bool, "a bool (1/0/true/false/yes/no/on/off)"),
        int: (lambda raw: int(raw.strip()), "an int"),
        float: (_parse_float, "a finite float"),
        str: (str, "a str"),
    }
    inner, optional = _unwrap(tp)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if optional:
        found = _converter(inner)
        if found is None:
            return None
        conv, desc = found
        return (lambda raw: None if raw.strip().lower() in _NONE else conv(raw)), f"{desc} or none"
    if tp in simple:
        return simple[tp]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in simple:
        item, desc = simple[args[0]]

        def split(raw: str) -> tuple[Any, ...]:
            return tuple(item(part) for part in raw.split(",")) if raw.strip() else ()

        return split, f"comma-separated values, each {desc}"
    if origin is Literal:
        by_text = {str(value): value for value in args}  # a miss raises KeyError
        return (lambda raw: by_text[raw.strip()]), "one of " + ", ".join(map(repr, args))
    return None


def _field_parser(
    cls: type, name: str, error: type[Exception] = SettingsError
) -> Callable[[str], Any]:
    """text -> value of field `name`; bad text raises `error` naming the field and the type."""
    field = _init_fields(cls)[name]
    tp = typing.get_type_hints(cls)[name]
    found = _converter(tp)
    if found is None:
        raise TypeError(f"{name} of {cls.__name__}: unsupported settings type {tp!r}")
    conv, desc = found
    choices = field.metadata.get("choices")

    def parse(raw: str) -> Any:
        where = f"{raw!r}: {name} of {cls.__name__} must be"
        try:
            value = conv(raw)
        except (ValueError, KeyError):
            raise error(f"{where} {desc}") from None
        items = value if isinstance(value, tuple) else (value,)
        if choices is not None and value is not None and any(v not in choices for v in items):
            raise error(f"{where} one of {', '.join(map(repr, choices))}")
        return value

    return parse


def parse_value(cls: type, name: str, raw: str) -> Any:
    """The text `raw` converted to the type of field `name` of dataclass `cls`."""
    return _field_parser(cls, name)(raw)


def env_values(cls: type, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of `cls` (but `skip`) whose env var is set, parsed; bad text: SettingsError."""
    values: dict[str, Any] = {}
    for name in _init_fields(cls).keys() - set(skip):
        raw = os.environ.get(env_name(name))
        if raw is not None:
            try:
                values[name] = parse_value(cls, name, raw)
            except SettingsError as err:
                raise SettingsError(f"{env_name(name)}={err}") from None
    return values


def config_from_env(cls: type, **overrides: Any) -> Any:
    """An instance of `cls`: each field from `overrides`, else its env var, else its default."""
    return cls(**{**env_values(cls, skip=overrides), **overrides})


def _default(field: dataclasses.Field) -> Any:
    """The field's default (calling its default_factory), else MISSING."""
    factory = field.default_factory
    return field.default if factory is dataclasses.MISSING else factory()


def _defaults_key(cls: type) -> str:
    """Namespace attribute holding a command's own defaults for the fields of `cls`."""
    return f"_defaults_{cls.__module__}.{cls.__qualname__}"


def _shown_default(cls: type, name: str, fallback: Any) -> str:
    """The default --help shows: the env var's value when it parses, else `fallback`."""
    try:
        env = env_values(cls, skip=_init_fields(cls).keys() - {name})
    except SettingsError:
        return f"{fallback!r}, but {env_name(name)} does not parse"
    value = env.get(name, fallback)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                    exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per field of `cls` (not excluded, metadata cli not False); dest = field name.

    A flag that is not given leaves nothing in the namespace (argparse.SUPPRESS), so that
    `config_from_args` reads the env var then, at run time: a bad env value of a command that is
    not run never stops another one. `defaults` are this command's own defaults (below env)."""
    fields, defaults, exclude = _init_fields(cls), dict(defaults or {}), set(exclude)
    unknown = (exclude | defaults.keys()) - fields.keys()
    if unknown:
        raise ValueError(f"not fields of {cls.__name__}: {', '.join(sorted(unknown))}")
    if defaults:
        parser.set_defaults(**{_defaults_key(cls): defaults})
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for name, field in fields.items():
        if name in exclude or field.metadata.get("cli", True) is False:
            continue
        default = defaults.get(name, _default(field))
        required = default is dataclasses.MISSING and env_name(name) not in os.environ
        tail = "required" if required else f"default {_shown_default(cls, name, default)}"
        allowed = range_text(field.metadata)
        tail = f"{allowed}; {tail}" if allowed else tail
        help_text = f"{comments.get(name, '')} (env {env_name(name)}; {tail})".lstrip().replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "help": help_text, "default": argparse.SUPPRESS}
        if required:
            kwargs["required"] = True
        flags = field.metadata.get("flags") or ["--" + name.replace("_", "-")]
        inner, optional = _unwrap(hints[name])
        if inner is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        literal = typing.get_args(inner) if typing.get_origin(inner) is Literal else ()
        choices = field.metadata.get("choices") or literal
        if choices and typing.get_origin(inner) is not tuple:
            kwargs["choices"] = (*choices, None) if optional else tuple(choices)
        convert = _field_parser(cls, name, argparse.ArgumentTypeError)
        parser.add_argument(*flags, type=convert, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls`: overrides, else flags given, else env, else the command's defaults,
    else the field's default. A bad env value raises SettingsError naming the variable."""
    given = {n: getattr(args, n) for n in _init_fields(cls) if n not in overrides and hasattr(args, n)}
    command_defaults = getattr(args, _defaults_key(cls), {})
    env = env_values(cls, skip=given.keys() | overrides.keys())
    try:
        return cls(**{**command_defaults, **env, **given, **overrides})
    except ValueError as err:  # a range or choice check of the class: say where the value came from
        text = str(err)
        name = text.split(" ", 1)[0].rstrip(":,")
        fields = _init_fields(cls)
        if name in env and name in fields:
            raise SettingsError(f"{env_name(name)}={os.environ.get(env_name(name))!r}: {text}") from None
        if name in given and name in fields:
            flag = (fields[name].metadata.get("flags") or ["--" + name.replace("_", "-")])[0]
            raise SettingsError(f"{flag}: {text}") from None
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    return value


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of the dataclass instance `cfg` (tuples become lists), for --print-config."""
    return _jsonable(dataclasses.asdict(cfg))


def add_command(subparsers: argparse._SubParsersAction, name: str, cls: type, func: Callable[[argparse.Namespace], int],
                *, help: str, description: str | None = None, check: str | None = None,
                exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """A role's sub-command: one flag per field of `cls`, `--print-config`, and `--check` when
    `check` (its help) is given; `func(args)` runs it."""
    p = subparsers.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, cls, exclude=exclude, defaults=defaults)
    if check:
        p.add_argument("--check", action="store_true", help=check)
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    p.set_defaults(func=func)
    return p


def printed(cfg: Any, args: argparse.Namespace) -> bool:
    """Print `cfg` as JSON when the command was given `--print-config`; True if it was."""
    if not getattr(args, "print_config", False):
        return False
    shown = {k: _PASSWORD.sub(r"\1***@", v) if isinstance(v, str) else v for k, v in config_dict(cfg).items()}
    print(json.dumps(shown, indent=2))
    return True


_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")  # the password of scheme://user:password@host
