"""Options shared by every command that runs a proxy, each with its environment variable.

Each option is made from its Setting (..settings): name, variable, default, type, check and help
are written there once. An option checks its value as the config's build() does, so a bad one
is refused with the same words from the command line, a variable or Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..config import Config, ConfigError
from ..settings import OLLAMA, PROXY, Setting

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    _ParamType = click.ParamType[Any]
else:  # ParamType is generic only in newer click releases
    _ParamType = click.ParamType


class _Checked(_ParamType):
    """A setting's own click type, plus its check; refuses a value in ConfigError's words."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.name = setting.type.name

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None
                    ) -> str | None:
        inner: Any = self.setting.type  # click < 8.2 passes no ctx
        metavar = inner.get_metavar(param, ctx) if ctx is not None else inner.get_metavar(param)
        return None if metavar is None else str(metavar)

    def split_envvar_value(self, rv: str) -> Sequence[str]:
        return self.setting.type.split_envvar_value(rv)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str
                       ) -> list[click.shell_completion.CompletionItem]:
        return self.setting.type.shell_complete(ctx, param, incomplete)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        try:
            return self.setting.parse_one(value)
        except ConfigError as exc:
            raise click.UsageError(str(exc), ctx) from None


class _KeepEmpty(click.Option):
    """An option whose empty environment variable is a value, not "unset" (Setting.keep_empty)."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        value = super().resolve_envvar_value(ctx)
        if value is None and isinstance(self.envvar, str):
            return os.environ.get(self.envvar)
        return value


def option(setting: Setting) -> Callable[[F], F]:
    """The click option of `setting`, reading its environment variable too."""
    kwargs: dict[str, Any] = {}
    if setting.is_flag:
        decl = f"{setting.flag}/--no-{setting.flag.removeprefix('--')}"
    else:
        decl = setting.flag
        kwargs.update(type=_Checked(setting), metavar=setting.metavar, multiple=setting.multiple)
    if setting.keep_empty:
        kwargs["cls"] = _KeepEmpty
    return click.option(decl, setting.name, default=setting.default, help=setting.help,
                        envvar=setting.env, show_envvar=True, show_default=True, **kwargs)


def options(settings: Iterable[Setting]) -> Callable[[F], F]:
    """The options of `settings`, in their order."""
    ordered = list(settings)

    def decorate(f: F) -> F:
        for setting in reversed(ordered):
            f = option(setting)(f)
        return f
    return decorate


def proxy_options(f: F) -> F:
    """The options every command that runs a proxy shares."""
    return options(PROXY)(f)


# --- Ollama wrapper ---
def ollama_options(f: F) -> F:
    """How the proxy starts and watches `ollama serve` (when no --upstream is given)."""
    return options(OLLAMA)(f)


def some_options(*names: str) -> Callable[[F], F]:
    """Only the settings `names`, for a command that uses no more of them (its --help lists
    only what it reads)."""
    return options((PROXY + OLLAMA)[name] for name in names)


# `status` reads where the proxy and Ollama are and where the metrics are served.
STATUS_SETTINGS = ("listen", "metrics_path", "upstream", "ollama_host")
# `run` finds the proxy or starts one in the background: where it listens, which Ollama it
# fronts (or which program it starts, and how long it waits for it). Every other setting reaches
# the background `serve` through its environment variable, or start `serve` yourself.
RUN_SETTINGS = ("listen", "upstream", "ollama_host", "ollama_bin", "ollama_start_timeout")


def _given(ctx: click.Context, source: click.core.ParameterSource) -> list[click.Option]:
    """The settings of `ctx` (options with an environment variable) that came from `source`."""
    return [p for p in ctx.command.params
            if isinstance(p, click.Option) and isinstance(p.envvar, str) and p.name is not None
            and ctx.get_parameter_source(p.name) == source]


def given_args(ctx: click.Context) -> list[str]:
    """The settings given on the command line, as arguments for another `serve` (one started in
    the background, or by a service manager)."""
    args: list[str] = []
    for param in _given(ctx, click.core.ParameterSource.COMMANDLINE):
        value = ctx.params[param.name or ""]
        if param.is_flag:
            args += param.opts[:1] if value else param.secondary_opts[:1]
        elif param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
        elif value is not None:
            args += [param.opts[0], str(value)]
    return args


def given_environ(ctx: click.Context) -> dict[str, str]:
    """The settings given by environment variable, as variables (kept out of command lines,
    where other users could read them)."""
    return {str(p.envvar): os.environ[str(p.envvar)]
            for p in _given(ctx, click.core.ParameterSource.ENVIRONMENT)}


def from_environ(*names: str) -> dict[str, str]:
    """The settings `names` that are set by their environment variables (for a command that
    takes no options of its own)."""
    settings = [(PROXY + OLLAMA)[name] for name in names]
    return {s.name: os.environ[s.env] for s in settings if s.env in os.environ}


def build_config(**options: Any) -> Config:
    try:
        return Config.build(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
