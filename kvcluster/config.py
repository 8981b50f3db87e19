"""Service configuration: one frozen dataclass per service, filled from defaults, env and flags.

A service declares its knobs once, as dataclass fields made with `setting(default, help)`:

    @dataclass(frozen=True)
    class StoreConfig(ServiceConfig):
        redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis index URL")

and gets, from that one declaration, the environment variable `KVC_REDIS_URL`, the flag
`--redis-url` (help text included, for `--help`) and typed parsing. Precedence: a flag given on the
command line beats the environment, which beats the default. Supported field types: str, int,
float, bool (`--flag/--no-flag`; env 1/0, true/false, yes/no, on/off).

`KVC_<FIELD>_FILE=/path` reads the value from a file instead (surrounding whitespace stripped),
the convention Docker and Kubernetes secrets are mounted for: a token never needs to sit in an
environment listing. `KVC_<FIELD>` itself, when set too, wins.
"""

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from kvcluster.errors import InvalidArgument

ENV_PREFIX = "KVC_"
FILE_SUFFIX = "_FILE"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def setting(default: Any, help: str) -> Any:
    """A config field with its help text (shown by --help and naming its env variable)."""
    return dataclasses.field(default=default, metadata={"help": help})


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def read_setting_file(path: str, source: str) -> str:
    """A setting's value from the file `path` names; an empty one is refused, since an empty
    token would silently turn its check off."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidArgument(source, f"cannot read {path}: {exc.strerror}") from None
    if not text:
        raise InvalidArgument(source, f"{path} is empty")
    return text


def parse_value(kind: type, text: str, source: str) -> Any:
    """Convert env text to the field's type; InvalidArgument names the variable on failure."""
    if kind is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise InvalidArgument(source, f"expected one of {sorted(TRUE_WORDS | FALSE_WORDS)}, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise InvalidArgument(source, f"expected {kind.__name__}, got {text!r}") from None


class ServiceConfig:
    """Mixin for frozen config dataclasses: `from_env`, `add_arguments`, `from_args`, `parse`."""

    @classmethod
    def _fields(cls) -> list[tuple[dataclasses.Field, type]]:
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, replaced by any `KVC_<FIELD>` variables set, replaced by `overrides`."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, kind in cls._fields():
            name = env_name(field.name)
            if name in environ:
                values[field.name] = parse_value(kind, environ[name], name)
            elif name + FILE_SUFFIX in environ:
                source = name + FILE_SUFFIX
                values[field.name] = parse_value(kind, read_setting_file(environ[source], source), source)
        return cls(**{**values, **overrides})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field. Flags default to 'not given' so env and defaults can fill in."""
        for field, kind in cls._fields():
            help_text = (f"{field.metadata.get('help', '')} "
                         f"(env {env_name(field.name)}; default: {field.default!r})").replace("%", "%%")
            common = dict(dest=field.name, help=help_text, default=argparse.SUPPRESS)
            if kind is bool:
                parser.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction, **common)
            else:
                parser.add_argument(flag_name(field.name), type=kind, metavar=kind.__name__.upper(), **common)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Self:
        given = {f.name: getattr(args, f.name) for f, _ in cls._fields() if hasattr(args, f.name)}
        return cls.from_env(environ, **given)

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
              description: str | None = None, prog: str | None = None) -> Self:
        """Build the parser, parse `argv` (default sys.argv[1:]) and merge with the environment."""
        parser = argparse.ArgumentParser(prog=prog, description=description)
        cls.add_arguments(parser)
        return cls.from_args(parser.parse_args(argv), environ)

