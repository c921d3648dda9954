"""Command-line options generated from the pydantic config models, so nothing is copied by hand (mergekit's
``add_merge_options``): a field added to or changed in a config shows up in every command built on it.

    @app.command()
    @config_options(BuildConfig, into="settings")
    def build(settings: dict, ray: bool = typer.Option(False, "--ray")) -> None:
        cfg = BuildConfig.create(**settings)

The rules, one option per field:
- the flag is ``--field-name`` (``top_k`` -> ``--top-k``; an alias wins: ``lambda_`` -> ``--lambda``); `Flag`
  renames one or gives it other units;
- the default and the help are the Field's; a field without a default is a required option;
- a ``Literal`` field shows its values (``--engine [vllm|hf]``); the config checks them, so a bad value gets the
  config's error, which names the field, the value and the valid values;
- a bool is ``--x/--no-x``; a list is a repeatable option; any other type is given as JSON.

``settings`` receives only the options given on the command line, keyed by field name (or alias): the config fills
in the rest and knows which ones the user set. A parameter of the command with a field's name replaces that field's
option (the command handles it); ``skip`` leaves fields out, each with the reason.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

# The parameter that receives typer's context (to tell given options from defaults).
_CTX = "config_options__ctx"


@dataclass(frozen=True)
class Flag:
    """A field shown under another flag, or in other units, than the rules give.

    Attributes:
        name: the flag, e.g. "--merge-seed".
        scale: the field's value is the flag's times this (e.g. 1024**2 for a flag in MiB of a field in bytes).
        unit: the flag's unit, added to the help (e.g. "MiB").
    """

    name: str
    scale: int = 1
    unit: str = ""


@dataclass(frozen=True)
class ExposedConfig:
    """What `config_options` did with one model on one command (tests check that every field is accounted for)."""

    model: type[BaseModel]
    into: str
    flags: dict[str, str]  # field -> its generated flag
    own: frozenset[str]  # fields the command's own parameters handle
    skipped: dict[str, str]  # field -> why it has no option


def config_options(
    model: type[BaseModel],
    *,
    into: str,
    skip: Mapping[str, str] | None = None,
    flags: Mapping[str, Flag] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so that it takes one option per field of ``model`` (see the module docstring).

    Args:
        model: the config model whose fields become options.
        into: the command's parameter that receives ``{field: value}`` of the options given.
        skip: fields left out, each with the reason (shown by the tests' inventory).
        flags: fields whose flag or unit differs from the rules.

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
        fields: dict[str, tuple[str, Callable[[Any], Any]]] = {}  # parameter -> (settings key, flag value -> field's)
        generated, exposed = [], {}
        for name, field in model.model_fields.items():
            if name in skip or name in sig.parameters:
                continue
            param, flag_names, convert = _option(f"{into}__{name}", name, field, flags.get(name))
            clash = taken & set(flag_names)
            if clash:
                raise ValueError(f"{command.__name__}: {model.__name__}.{name}'s flag {sorted(clash)} is taken")
            taken |= set(flag_names)
            generated.append(param)
            exposed[name] = flag_names[0]
            fields[param.name] = (field.alias or name, convert)

        def run(**kwargs: Any) -> Any:
            ctx = kwargs[_CTX] if stacked else kwargs.pop(_CTX)
            settings = {}
            for pname, (key, convert) in fields.items():
                value = kwargs.pop(pname)
                source = ctx.get_parameter_source(pname)
                if source is not None and source.name != "DEFAULT":  # given: on the command line, or a default map
                    settings[key] = convert(value)
            return command(**kwargs, **{into: settings})

        stacked = _CTX in sig.parameters  # typer hands the context to one parameter: share the inner one's
        ctx_param = inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [*own, *([] if stacked else [ctx_param]), *generated]
        run.__signature__ = inspect.Signature(params, return_annotation=sig.return_annotation)
        run.__annotations__ = {p.name: p.annotation for p in params}
        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(run, attr, getattr(command, attr))
        own_fields = frozenset((set(model.model_fields) & set(sig.parameters)) - set(skip))
        run.exposed_configs = [
            *getattr(command, "exposed_configs", []),
            ExposedConfig(model, into, exposed, own_fields, skip),
        ]
        return run

    return decorate


def _decls(p: inspect.Parameter) -> list[str]:
    """The flags of a command's own option (typer's default: ``--name-with-dashes``)."""
    decls = [d for decl in (p.default.param_decls or ()) for d in decl.split("/")]
    return [d for d in decls if d.startswith("-")] or ["--" + p.name.replace("_", "-")]


def _option(
    pname: str, name: str, field: FieldInfo, flag: Flag | None
) -> tuple[inspect.Parameter, list[str], Callable[[Any], Any]]:
    """The typer parameter of one field, its flag names, and the conversion of its value to the field's."""
    base, optional = _strip_optional(field.annotation)
    flag_name = flag.name if flag else "--" + (field.alias or name).replace("_", "-")
    help_ = field.description or ""
    if flag and flag.unit:
        help_ += f" (in {flag.unit})"
    scale = flag.scale if flag else 1
    default = ... if field.is_required() else field.get_default(call_default_factory=True)
    if default is not ... and default is not None and scale != 1:
        default = default // scale
    extra: dict[str, Any] = {}
    names = [flag_name]
    convert = (lambda v: v * scale) if scale != 1 else (lambda v: v)
    is_list = typing.get_origin(base) is list
    item = typing.get_args(base)[0] if is_list and typing.get_args(base) else str
    kind = item if is_list else base
    choices = _choices(kind)
    if choices is not None:
        extra["metavar"] = "[" + "|".join(map(str, choices)) + "]"
        kind = str
    elif kind is bool and not is_list:
        no = "--no-" + flag_name.removeprefix("--")
        names = [flag_name, no]
        flag_name = f"{flag_name}/{no}"
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
    param = inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
    return param, names, (lambda v: [convert(x) for x in v]) if is_list else convert


def _from_json(text: str) -> Any:
    """A JSON option's value; text that is not JSON is passed on as is, for the config to name the field."""
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
