"""The merge methods as registered units: each declares its name, its options (defaults, bounds, help) and its kernel.

    get_method("ties").defaults            # {"density": 0.6, "sign_election": "sum", "alpha": 1.0}
    get_method("ties").merge_(tau, opts, base=b, name=n, work=w)   # the in-place kernel of `methods`

`MergeConfig` (one optional field per option, `method` checked against ``REGISTRY``), the CLI's ``--method`` choices
and flags, and `run_merge`'s dispatch all read this registry. To add a method: write its in-place kernel
``x_(tau, *, option=default, ...)`` in `fusion_cache.merge.methods`, declare it below, add it to ``REGISTRY``.

Nothing here imports torch (the config and the command line read this module): a method names its kernel, which is
looked up in `fusion_cache.merge.methods` when a merge runs. A kernel takes ``tau`` (contiguous [S, *shape] fp32, the
task vectors, overwritten), its options as keyword arguments, and any of the per-tensor inputs ``CONTEXT`` names;
it returns the merged task vector [*shape] as a view of tau[0]. Defaults come from docs/merge.md (FuseChat's configs
where the InfiFusion paper gives none).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace
from functools import cached_property
from typing import Any

from fusion_cache.config import lookup

# What `run_merge` can hand a kernel beside tau, by keyword; a kernel takes the ones its signature names.
CONTEXT = {
    "base": "the base tensor [*shape] fp32",
    "name": "the tensor's name (seeds DARE's masks)",
    "rate_refs": "per model, ||tau_s|| / ||theta_o|| over the whole model (run.model_stats; a pass of its own)",
    "stats": "this tensor's float64 sums from that pass (methods.TensorStats)",
    "work": "fp32 scratch of >= tau[0].numel() elements",
}


@dataclass(frozen=True)
class Param:
    """One option of a merge method: the `MergeConfig` field and ``--flag`` of that name.

    An option shared by several methods (``alpha``, ``density``, ``sign_election``) is one `Param` whose
    ``default`` each method sets with `at`; type, bounds and help are the same for all of them.
    """

    name: str
    type: type
    help: str
    default: Any = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None

    def at(self, default: Any) -> Param:
        """This option with a method's default."""
        return replace(self, default=default)

    @property
    def bounds(self) -> dict[str, float]:
        """The pydantic ``Field`` bounds that are set."""
        return {k: v for k in ("gt", "ge", "lt", "le") if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its name, a one-line summary, its options with their defaults, and its kernel.

    Attributes:
        name: the ``--method`` value.
        summary: what it does, in one line (the ``--method`` help).
        params: its options, with this method's defaults.
        kernel: name of its in-place function in `fusion_cache.merge.methods`.
        check: optional rule across its resolved options; raises ValueError naming them.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    kernel: str
    check: Callable[[dict[str, Any]], None] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Its options and their defaults, in declaration order."""
        return {p.name: p.default for p in self.params}

    @cached_property
    def kernel_fn(self) -> Callable[..., Any]:
        """The kernel, imported on first use (torch comes with it); its options' defaults must be the declared ones.

        Raises:
            ValueError: the kernel lacks an option or one of its defaults differs (a declaration out of step).
        """
        fn = getattr(importlib.import_module("fusion_cache.merge.methods"), self.kernel)
        sig = inspect.signature(fn).parameters
        for p in self.params:
            if p.name not in sig or sig[p.name].default != p.default:
                got = sig[p.name].default if p.name in sig else "no such argument"
                raise ValueError(
                    f"merge method {self.name!r}: kernel methods.{self.kernel} option {p.name!r} has default "
                    f"{got!r}, the registry declares {p.default!r}"
                )
        return fn

    @cached_property
    def context(self) -> frozenset[str]:
        """The ``CONTEXT`` inputs the kernel takes (e.g. "work": the run reserves scratch for it)."""
        return frozenset(CONTEXT) & set(inspect.signature(self.kernel_fn).parameters)

    def takes(self, arg: str) -> bool:
        """Whether the kernel takes ``arg``, one of ``CONTEXT``."""
        return arg in self.context

    def merge_(self, tau: Any, opts: dict[str, Any], **context: Any) -> Any:
        """Run the kernel on ``tau`` (overwritten) with ``opts`` and the ``context`` entries it takes.

        Args:
            tau: contiguous [S, *shape] fp32 task vectors.
            opts: its options (missing ones take the kernel's defaults, which are the declared ones).
            **context: per-tensor inputs, keys from ``CONTEXT``.

        Returns:
            The merged task vector [*shape], a view of tau[0].
        """
        return self.kernel_fn(tau, **opts, **{k: v for k, v in context.items() if k in self.context})


# ---------------------------------------------------------------- options shared by several methods
ALPHA = Param("alpha", float, "scale of the merged task vector")
DENSITY = Param("density", float, "fraction of each task vector kept, by magnitude", gt=0.0, le=1.0)
SIGN_ELECTION = Param(
    "sign_election", str, "TIES sign election: by summed mass (sum) or by majority (count)", choices=("sum", "count")
)


# ---------------------------------------------------------------- the methods
TA = MergeMethod(
    name="ta",
    summary="task arithmetic: alpha * the sum of the task vectors",
    params=(ALPHA.at(0.3),),
    kernel="task_arithmetic_",
)

TIES = MergeMethod(
    name="ties",
    summary="trim each task vector to its top density, elect signs, average the agreeing entries",
    params=(DENSITY.at(0.6), SIGN_ELECTION.at("sum"), ALPHA.at(1.0)),
    kernel="ties_",
)

DARE = MergeMethod(
    name="dare",
    summary="drop entries at random (drop_rate), rescale the rest, then task arithmetic",
    params=(
        Param("drop_rate", float, "drop probability p", default=0.9, ge=0.0, lt=1.0),
        ALPHA.at(0.3),
        Param("seed", int, "random seed of the drop masks (with the tensor name and the model index)", default=0),
    ),
    kernel="dare_",
)

SCE = MergeMethod(
    name="sce",
    summary="FuseChat 2.0: select by variance, weight by selected mass, erase minority signs",
    params=(Param("select_topk", float, "fraction of positions kept, by variance", default=0.1, gt=0.0, le=1.0),),
    kernel="sce_",
)


def _rsaf_check(opts: dict[str, Any]) -> None:
    if opts["min_density"] > opts["max_density"]:
        raise ValueError(f"min_density {opts['min_density']} > max_density {opts['max_density']}")


RSAF = MergeMethod(
    name="rsaf",
    summary="TIES with a per-tensor density from its change rate and skewness (docs/merge.md)",
    params=(
        DENSITY.at(0.6),
        Param("rate_power", float, "exponent of the relative change rate", default=0.5, ge=0.0),
        Param("skew_strength", float, "how strongly skewness lowers the ratio", default=0.5, ge=0.0),
        Param("min_density", float, "lowest ratio", default=0.1, gt=0.0, le=1.0),
        Param("max_density", float, "highest ratio", default=1.0, gt=0.0, le=1.0),
        SIGN_ELECTION.at("sum"),
        ALPHA.at(1.0),
    ),
    kernel="rsaf_",
    check=_rsaf_check,
)

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in (TA, TIES, DARE, SCE, RSAF)}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``.

    Raises:
        ConfigError: an unknown name; the message lists the valid ones.
    """
    return lookup(REGISTRY, name, "method")


def option_params() -> dict[str, Param]:
    """Every option any method takes, once each (first declaration order), with its default cleared.

    Raises:
        ValueError: two methods declare an option of the same name with different type, bounds or help.
    """
    out: dict[str, Param] = {}
    for m in REGISTRY.values():
        for p in m.params:
            p = p.at(None)
            if out.setdefault(p.name, p) != p:
                raise ValueError(f"merge option {p.name!r} is declared differently by method {m.name!r}: {p}")
    return out


def option_help(param: Param) -> str:
    """The option's help with the methods that take it and their defaults, e.g. "... (ta 0.3, ties 1.0)"."""
    users = ", ".join(f"{m.name} {m.defaults[param.name]}" for m in REGISTRY.values() if param.name in m.defaults)
    return f"{param.help} ({users})"
