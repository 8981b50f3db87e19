"""Service configuration: one frozen pydantic-settings model per service, filled from defaults, env and flags.

A service declares its knobs once, as fields made with `setting(default, help)`:

    class StoreConfig(ServiceConfig):
        redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis index URL")

and gets, from that one declaration, the environment variable `KVC_REDIS_URL`, the flag
`--redis-url` (help text included, for `--help`) and typed parsing, all done by pydantic-settings.
Precedence: a flag given on the command line beats the environment, which beats the default.
Booleans are `--flag/--no-flag`; in the environment 1/0, true/false, yes/no, on/off.

`KVC_<FIELD>_FILE=/path` reads the value from a file instead (surrounding whitespace stripped),
the convention Docker and Kubernetes secrets are mounted for: a token never needs to sit in an
environment listing. `KVC_<FIELD>` itself, when set too, wins.

Constructing a config directly (`StoreConfig(port=0)`) reads neither: defaults and the arguments
only, so tests and in-process callers get what they wrote. A bad value raises InvalidArgument
naming where it came from (the flag, the variable or the field), which the entry points turn into
exit code 2.
"""

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, EnvSettingsSource, SettingsConfigDict

from kvcluster.errors import InvalidArgument

ENV_PREFIX = "KVC_"
FILE_SUFFIX = "_FILE"


def setting(default: Any, help: str, **bounds: Any) -> Any:
    """A config field with its help text (shown by --help and in docs/configuration.md) and any
    pydantic bounds (`ge=1`, `gt=0`, `le=1`) its values must keep."""
    return Field(default, description=help, **bounds)


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


class ServiceConfig(BaseSettings):
    """Base of every service config: `from_env` and `parse` fill it; plain construction takes defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    def __init__(self, **values: Any) -> None:
        """Defaults and `values` only (no environment); a bad value raises InvalidArgument naming its field."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(map(str, error["loc"]))
            raise InvalidArgument(field, f"{error['msg']}, got {error['input']!r}") from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # The environment is read by from_env alone, so a bad value can be named by its variable.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, replaced by any `KVC_<FIELD>` variables set, replaced by `overrides`."""
        return cls._build(environ, {name: (value, name) for name, value in overrides.items()})

    @classmethod
    def parse(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
              description: str | None = None, prog: str | None = None) -> Self:
        """Parse `argv` (default sys.argv[1:]) into flags and merge them over the environment."""
        parser = argparse.ArgumentParser(prog=prog, description=description)
        cli = CliSettingsSource(cls, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
                                cli_show_env_vars=True)
        flags = cli(args=sys.argv[1:] if argv is None else list(argv))()
        return cls._build(environ, {name: (value, flag_name(name)) for name, value in flags.items()})

    @classmethod
    def _build(cls, environ: Mapping[str, str] | None, given: dict[str, tuple[Any, str]]) -> Self:
        """Validate env values under `given` ones (field -> (value, where it came from))."""
        values = {**cls._env_values(os.environ if environ is None else environ), **given}
        sources = {name: source for name, (_, source) in values.items()}
        try:
            return cls(**{name: value for name, (value, _) in values.items()})
        except InvalidArgument as exc:  # named by its field: name the flag or variable the value came from
            raise InvalidArgument(sources.get(exc.field, exc.field), exc.problem) from None

    @classmethod
    def _env_values(cls, environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        """field -> (text, variable) for every `KVC_<FIELD>` or `KVC_<FIELD>_FILE` set."""
        file_variables = {name: env_name(name) + FILE_SUFFIX for name in cls.model_fields}
        from_files = {name: (read_setting_file(environ[variable], variable), variable)
                      for name, variable in file_variables.items() if variable in environ}
        source = EnvSettingsSource(cls)  # prefix and case rules from model_config
        source.env_vars = {key.lower(): value for key, value in environ.items()}
        return {**from_files, **{name: (text, env_name(name)) for name, text in source().items()}}
