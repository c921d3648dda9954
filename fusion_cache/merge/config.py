"""Settings of `fusion-cache merge`: inputs, output, the method and its options (with per-method defaults).

The method names and their options come from `fusion_cache.merge.registry`: ``method`` is one of its names, and
every option any method declares is one optional field here (None: the chosen method's default). An option that the
chosen method does not take is refused, so a typo like ``--method ta --density 0.5`` does not silently do nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic import create_model
from pydantic import model_validator

from fusion_cache.config import StrictConfig
from fusion_cache.merge.registry import METHODS
from fusion_cache.merge.registry import REGISTRY
from fusion_cache.merge.registry import Param
from fusion_cache.merge.registry import get_method
from fusion_cache.merge.registry import option_help
from fusion_cache.merge.registry import option_params


class _MergeSettings(StrictConfig):
    """The fields every method shares; `MergeConfig` adds one per method option."""

    base: str = Field(description="the original pivot all models were fine-tuned from (dir or preset)")
    models: list[str] = Field(min_length=1, description="fine-tuned pivots: model dirs or `train` run dirs")
    out: str = Field(description="directory of the merged model")
    max_shard_bytes: int = Field(2 * 1024**3, ge=1, description="largest output shard")
    overwrite: bool = Field(False, description="replace an existing out")
    threads: int = Field(
        0, ge=0, description="torch threads (0: torch's default, capped by the cores the load average leaves idle)"
    )
    method: Literal[METHODS] = Field("ta", description="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values()))

    @model_validator(mode="after")
    def _options_fit_method(self):
        method = get_method(self.method)
        for key in option_params():
            value = getattr(self, key)
            if value is not None and key not in method.defaults:
                raise ValueError(
                    f"{key}={value!r} does not apply to method {self.method!r} (it takes: {', '.join(method.defaults)})"
                )
        if method.check is not None:
            method.check(self.method_options())
        return self

    def method_options(self) -> dict[str, object]:
        """The chosen method's options: given values over its defaults."""
        defaults = get_method(self.method).defaults
        return {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in defaults.items()}


def _option_field(p: Param) -> tuple[object, object]:
    """A method option as an optional field: None takes the chosen method's default."""
    kind = Literal[p.choices] if p.choices else p.type
    return kind | None, Field(None, description=option_help(p), **p.bounds)


MergeConfig = create_model(
    "MergeConfig",
    __base__=_MergeSettings,
    __module__=__name__,
    __doc__="Settings of `fusion-cache merge`. Method options left as None take the method's default.",
    **{name: _option_field(p) for name, p in option_params().items()},
)
