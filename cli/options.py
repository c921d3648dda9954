"""Command-line options generated from the pydantic config models, so nothing is copied by hand (mergekit's
``add_merge_options``): a field added to or changed in a config shows up in every command built on it.

    @app.command()
    @config_options(BuildConfig, into="settings")
    def build(settings: dict, ray: bool = typer.Option(False, "--ray")) -> None:
        cfg = BuildConfig.create(**settings)

The rules, one option per field:
- the flag is ``--field-name`` (``top_k`` -> ``--top-k``; an alias wins: ``lambda_`` -> ``--lambda``); `Flag`
  renames one, gives it other units, or keeps old spellings as hidden aliases (a warning says which to use);
- the default and the help are the Field's; a field without a default is a required option;
- a ``Literal`` field is a choice (``--engine <vllm|hf>``): the command line refuses other values, naming them;
- a bool is ``--x/--no-x``; a list is a repeatable option; any other type is given as JSON.

``settings`` receives only the settings given, keyed by field name (or alias): the config fills in the rest and
knows which ones the user set. A parameter of the command with a field's name replaces that field's option (the
command handles it); ``skip`` leaves fields out, each with the reason.

Every command built with `config_options` or `common_options` also takes:
- ``--config FILE.yaml``: settings from a file whose keys are the config's fields (as ``config.yaml`` of a run
  spells them) and the command's own options; a flag given on the command line wins over the file. A command with
  several configs (``fuse``) reads each from its own section of the file (``train:``, ``merge:``);
- ``-v/--verbose``: INFO logs, the libraries' own logs and the traceback of an error (also before the command).
"""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any
from typing import Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fusion_cache.config import load_config_file
from fusion_cache.errors import ConfigError

# Parameters every wrapped command gets (names no command uses for its own).
_CTX = "config_options__ctx"
_FILE = "config_options__config"
_VERBOSE = "config_options__verbose"
_COMMON = (_CTX, _FILE, _VERBOSE)
# ctx.meta keys: the file's settings per config layer, and whether -v was given (read by the error boundary).
FILE_SETTINGS = "fusion_cache.config_file"
VERBOSE = "fusion_cache.verbose"


@dataclass(frozen=True)
class Flag:
    """A field shown under another flag, in other units, or with old spellings kept, unlike the rules give.

    Attributes:
        name: the flag, e.g. "--merge-seed" (None: the rules' name).
        scale: the field's value is the flag's times this (e.g. 1024**2 for a flag in MiB of a field in bytes).
        unit: the flag's unit, added to the help (e.g. "MiB").
        aliases: old spellings, accepted as hidden options with a warning that names the new one.
    """

    name: str | None = None
    scale: int = 1
    unit: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExposedConfig:
    """What `config_options` did with one model on one command (tests check that every field is accounted for)."""

    model: type[BaseModel]
    into: str
    flags: dict[str, str]  # field -> its generated flag
    own: frozenset[str]  # fields the command's own parameters handle
    skipped: dict[str, str]  # field -> why it has no option
    section: str | None = None  # the key of the --config file's section for this model (None: the top level)


@dataclass
class _Layer:
    """One config model on a command, as the --config reader needs it."""

    exposed: ExposedConfig
    params: set[str]  # the generated typer parameter names
    keys: dict[str, str]  # every name a file may use for a field (name and alias) -> the settings key
    # settings key -> option parameter of the fields without a default (required options: the file's value must
    # reach click too, through its default map, or click asks for the option)
    required: dict[str, str]


@dataclass
class _Common:
    """What the wrappers of one command share: its config layers (innermost first)."""

    layers: list[_Layer] = dc_field(default_factory=list)


def config_options(
    model: type[BaseModel],
    *,
    into: str,
    skip: Mapping[str, str] | None = None,
    flags: Mapping[str, Flag] | None = None,
    section: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so that it takes one option per field of ``model`` (see the module docstring).

    Args:
        model: the config model whose fields become options.
        into: the command's parameter that receives ``{field: value}`` of the settings given.
        skip: fields left out, each with the reason (shown by the tests' inventory).
        flags: fields whose flag or unit differs from the rules.
        section: the --config file's key that holds this model's settings (None: the file's top level).

    Raises:
        ValueError: ``into`` is not a parameter of the command, a generated flag is already taken, or ``skip`` or
            ``flags`` names a field ``model`` does not have.
    """
    skip = dict(skip or {})
    flags = dict(flags or {})
    unknown = (set(skip) | set(flags)) - set(model.model_fields)
    if unknown:
        raise ValueError(f"{model.__name__} has no field(s) {sorted(unknown)}")

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(command)
        if into not in sig.parameters:
            raise ValueError(f"{command.__name__} has no parameter {into!r} for the {model.__name__} settings")
        hints = typing.get_type_hints(command)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
            for p in sig.parameters.values()
            if p.name != into
        ]
        taken = {d for p in own if isinstance(p.default, typer.models.ParameterInfo) for d in _decls(p)}
        taken |= {"--config", "-v", "--verbose"}
        # parameter -> (settings key, flag value -> field's, [(hidden alias parameter, its flag)])
        fields: dict[str, tuple[str, Callable[[Any], Any], list[tuple[str, str]]]] = {}
        generated, exposed = [], {}
        for name, field in model.model_fields.items():
            if name in skip or name in sig.parameters:
                continue
            params, flag_names, convert = _option(f"{into}__{name}", name, field, flags.get(name))
            clash = taken & set(flag_names)
            if clash:
                raise ValueError(f"{command.__name__}: {model.__name__}.{name}'s flag {sorted(clash)} is taken")
            taken |= set(flag_names)
            generated += params
            exposed[name] = flag_names[0]
            old = [(p.name, p.default.param_decls[0].split("/")[0]) for p in params[1:]]
            fields[params[0].name] = (field.alias or name, convert, old)
        own_fields = frozenset((set(model.model_fields) & set(sig.parameters)) - set(skip))
        info = ExposedConfig(model, into, exposed, own_fields, skip, section)
        keys = {
            k: (f.alias or n)
            for n, f in model.model_fields.items()
            if n not in skip and n not in own_fields
            for k in {n, f.alias or n}
        }
        required = {
            (f.alias or n): f"{into}__{n}"
            for n, f in model.model_fields.items()
            if f.is_required() and n in exposed and (n not in flags or flags[n].scale == 1)
        }
        layer = _Layer(info, {p.name for p in generated}, keys, required)

        def settings_of(kwargs: dict, ctx: typer.Context) -> dict:
            """The file's settings of this layer, then every flag given on the command line over them."""
            settings = dict(ctx.meta.get(FILE_SETTINGS, {}).get(id(layer), {}))
            for pname, (key, convert, aliases) in fields.items():
                value = kwargs.pop(pname)
                if _given(ctx, pname):
                    settings[key] = convert(value)
                for alias, old_flag in aliases:
                    old_value = kwargs.pop(alias)
                    if _given(ctx, alias) and not _given(ctx, pname):
                        new_flag = exposed[pname.removeprefix(f"{into}__")]
                        typer.secho(f"warning: {old_flag} is deprecated; use {new_flag}", fg=typer.colors.YELLOW,
                                    err=True)  # fmt: skip
                        settings[key] = convert(old_value)
            return settings

        return _wrap(command, own, generated, layer, settings_of, into)

    return decorate


def common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command without a config model ``--config FILE.yaml`` (its own options' values) and ``-v``."""
    sig = inspect.signature(command)
    hints = typing.get_type_hints(command)
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
        for p in sig.parameters.values()
    ]
    return _wrap(command, own, [], None, None, None)


def _wrap(command, own, generated, layer: _Layer | None, settings_of, into: str | None):
    """The command with the common parameters (added once, by the innermost wrapper) and this layer's options."""
    sig = inspect.signature(command)
    stacked = _CTX in sig.parameters  # an inner wrapper added the common parameters: share them
    common: _Common = getattr(command, "config_common", None) or _Common()
    if layer is not None:
        common.layers.append(layer)

    def run(**kwargs: Any) -> Any:
        ctx = kwargs[_CTX] if stacked else kwargs.pop(_CTX)
        if not stacked:
            kwargs.pop(_FILE)
            kwargs.pop(_VERBOSE)
        if settings_of is None:
            return command(**kwargs)
        settings = settings_of(kwargs, ctx)
        return command(**kwargs, **{into: settings})

    extra = []
    if not stacked:
        extra = [
            inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
            inspect.Parameter(
                _FILE,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=str | None,
                default=typer.Option(
                    None,
                    "--config",
                    help="YAML file of settings (keys: the flags' names with _ for -, e.g. a run's config.yaml); "
                    "flags given here win over it",
                    is_eager=True,
                    callback=_file_reader(common),
                    show_default=False,
                    metavar="FILE.yaml",
                ),
            ),
            inspect.Parameter(
                _VERBOSE,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=bool,
                default=typer.Option(
                    False,
                    "-v",
                    "--verbose",
                    help="INFO logs, the libraries' logs, tracebacks of errors",
                    is_eager=True,
                    callback=_verbose,
                    metavar="",
                ),
            ),
        ]
    params = [*own, *extra, *generated]
    run.__signature__ = inspect.Signature(params, return_annotation=sig.return_annotation)
    run.__annotations__ = {p.name: p.annotation for p in params}
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(run, attr, getattr(command, attr))
    run.config_common = common
    run.exposed_configs = [l_.exposed for l_ in common.layers]
    return run


def _given(ctx: typer.Context, pname: str) -> bool:
    """Whether the option was given on the command line (or through click's default map, e.g. --config)."""
    source = ctx.get_parameter_source(pname)
    return source is not None and source.name != "DEFAULT"


def _verbose(ctx: typer.Context, param: typer.core.TyperOption, value: bool) -> bool:
    """``-v`` after the command name: the same as before it (`fusion_cache.cli.main` sets the levels)."""
    if value:
        ctx.meta[VERBOSE] = True
        from fusion_cache.cli.logs import configure_logging

        configure_logging(verbose=True)
    return value


def _file_reader(common: _Common) -> Callable[[typer.Context, typer.core.TyperOption, str | None], str | None]:
    """The --config callback: the file's settings go to each config layer (``ctx.meta``) and, for the command's own
    options, to click's default map (so the command line still wins over them)."""

    def read(ctx: typer.Context, param: typer.core.TyperOption, value: str | None) -> str | None:
        if not value:
            return value
        try:
            data = load_config_file(value)
        except ConfigError as e:
            raise typer.BadParameter(str(e).removeprefix(f"--config {value}: "), param=param) from None
        generated = {p for layer in common.layers for p in layer.params}
        own = {
            p.name: p
            for p in ctx.command.params
            if p.name not in generated and p.name not in _COMMON and p.expose_value and p.name != "help"
        }
        sections = {layer.exposed.section: layer for layer in common.layers if layer.exposed.section}
        top = [layer for layer in common.layers if layer.exposed.section is None]
        per_layer: dict[int, dict] = {id(layer): {} for layer in common.layers}
        defaults: dict[str, Any] = {}
        for key, v in data.items():
            if key in sections:
                layer = sections[key]
                if not isinstance(v, dict):
                    raise typer.BadParameter(f"{value}: section {key!r} must be a mapping, got {v!r}", param=param)
                for sub, sv in v.items():
                    per_layer[id(layer)][_settings_key(layer, sub, f"{key}.", value, param)] = sv
            elif top and key in top[0].keys:
                per_layer[id(top[0])][top[0].keys[key]] = v
            elif key.replace("-", "_") in own:
                defaults[key.replace("-", "_")] = _default_value(own[key.replace("-", "_")], v)
            else:
                valid = sorted({*own, *sections, *(top[0].keys if top else ())})
                raise typer.BadParameter(f"{value}: unknown key {key!r}; valid keys: {', '.join(valid)}", param=param)
        params = {p.name: p for p in ctx.command.params}
        for layer in common.layers:
            for key, pname in layer.required.items():
                if key in per_layer[id(layer)]:
                    defaults[pname] = _default_value(params[pname], per_layer[id(layer)][key])
        ctx.meta[FILE_SETTINGS] = per_layer
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return read


def _settings_key(layer: _Layer, key: str, prefix: str, path: str, param: typer.core.TyperOption) -> str:
    if key in layer.keys:
        return layer.keys[key]
    reason = layer.exposed.skipped.get(key)
    if reason is not None:
        raise typer.BadParameter(f"{path}: {prefix}{key} is not set here ({reason})", param=param)
    raise typer.BadParameter(
        f"{path}: unknown key {prefix}{key!r}; valid keys: {', '.join(sorted(set(layer.keys)))}", param=param
    )


def _default_value(param: typer.core.TyperOption, value: Any) -> Any:
    """A file value for click's default map: lists stay lists; a path or a number is given as text when it is one."""
    if isinstance(value, (dict, list)) and not param.multiple:
        return json.dumps(value)
    return value


def _decls(p: inspect.Parameter) -> list[str]:
    """The flags of a command's own option (typer's default: ``--name-with-dashes``)."""
    decls = [d for decl in (p.default.param_decls or ()) for d in decl.split("/")]
    return [d for d in decls if d.startswith("-")] or ["--" + p.name.replace("_", "-")]


def _option(
    pname: str, name: str, field: FieldInfo, flag: Flag | None
) -> tuple[list[inspect.Parameter], list[str], Callable[[Any], Any]]:
    """The typer parameters of one field (the option, then one hidden option per old spelling), its flag names,
    and the conversion of its value to the field's."""
    base, optional = _strip_optional(field.annotation)
    flag_name = (flag.name if flag and flag.name else None) or "--" + (field.alias or name).replace("_", "-")
    help_ = field.description or ""
    if flag and flag.unit:
        help_ += f" (in {flag.unit})"
    scale = flag.scale if flag else 1
    aliases = list(flag.aliases) if flag else []
    # a required field with old spellings: click cannot require one of several options, so the config does (the
    # field's error names it when neither spelling is given)
    default = ... if field.is_required() and not aliases else field.get_default(call_default_factory=True)
    if field.is_required() and aliases:
        default = None
    if default is not ... and default is not None and scale != 1:
        default = default // scale
    extra: dict[str, Any] = {}
    names = [flag_name]
    convert = (lambda v: v * scale) if scale != 1 else (lambda v: v)
    is_list = typing.get_origin(base) is list
    item = typing.get_args(base)[0] if is_list and typing.get_args(base) else str
    kind = item if is_list else base
    choices = _choices(kind)
    if choices is not None and all(isinstance(c, str) for c in choices):
        # a choice the command line checks; typer takes a Literal, and a list of choices as an Enum of them
        kind = Literal[choices] if not is_list else enum.Enum(f"{name}_choices", {c: c for c in choices}, type=str)
        if is_list:
            convert = _enum_values
    elif choices is not None:
        extra["metavar"] = "[" + "|".join(map(str, choices)) + "]"
        kind = str
    elif kind is bool and not is_list:
        no = "--no-" + flag_name.removeprefix("--")
        names = [flag_name, no]
        flag_name = f"{flag_name}/{no}"
        extra["metavar"] = ""  # a flag takes no value: no <bool> in the help
        aliases = [f"{a}/--no-{a.removeprefix('--')}" for a in aliases]
    elif isinstance(kind, type) and issubclass(kind, (str, Path)):
        kind = str  # a Path field takes a string too (and an fsspec URL must not become a Path)
    elif kind not in (int, float, bool):  # a dict, a model, ...: given as JSON (`_from_json`)
        help_ += " (JSON)"
        kind = str
        convert = _from_json
        if default is not ... and default is not None:
            extra["show_default"] = json.dumps(default, default=str)
            default = None
    if is_list:
        help_ += " (repeat the flag for several)"
        kind = list[kind]
    annotation = kind | None if (optional or default is None) else kind
    option = typer.Option(default, flag_name, help=help_, **extra)
    params = [inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)]
    for i, alias in enumerate(aliases):
        hidden = typer.Option(None, alias, hidden=True, **{k: v for k, v in extra.items() if k == "metavar"})
        params.append(
            inspect.Parameter(f"{pname}__alias{i}", inspect.Parameter.KEYWORD_ONLY, default=hidden,
                              annotation=kind | None)
        )  # fmt: skip
        names += [d for d in alias.split("/")]
    if is_list and not (choices is not None and all(isinstance(c, str) for c in choices)):
        list_convert = convert
        return params, names, lambda v: [list_convert(x) for x in v]
    return params, names, convert


def _enum_values(values: list[enum.Enum] | None) -> list[str]:
    return [v.value if isinstance(v, enum.Enum) else v for v in values or []]


def _from_json(text: str) -> Any:
    """A JSON option's value; text that is not JSON is passed on as is, for the config to name the field."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` annotation, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


def inventory(command: Callable[..., Any]) -> list[ExposedConfig]:
    """What `config_options` generated on ``command`` (a typer command's callback), one entry per model."""
    return list(getattr(command, "exposed_configs", []))
