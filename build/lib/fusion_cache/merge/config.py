"""Settings of `fusion-cache merge`: the method, its options (with per-method defaults), inputs and output.

An option that the chosen method does not take is refused, so a typo like ``--method ta --density 0.5`` does not
silently do nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic import model_validator

from fusion_cache.config import StrictConfig

METHODS = ("ta", "ties", "dare", "sce", "rsaf")

# Per method: the options it takes and their defaults (docs/merge.md says where each comes from).
DEFAULTS: dict[str, dict[str, object]] = {
    "ta": {"alpha": 0.3},
    "ties": {"density": 0.6, "sign_election": "sum", "alpha": 1.0},
    "dare": {"drop_rate": 0.9, "alpha": 0.3, "seed": 0},
    "sce": {"select_topk": 0.1},
    "rsaf": {
        "density": 0.6,
        "rate_power": 0.5,
        "skew_strength": 0.5,
        "min_density": 0.1,
        "max_density": 1.0,
        "sign_election": "sum",
        "alpha": 1.0,
    },
}


class MergeConfig(StrictConfig):
    """Settings of `fusion-cache merge`. Method options left as None take the method's default."""

    base: str = Field(description="the original pivot every model was fine-tuned from")
    models: list[str] = Field(min_length=1, description="fine-tuned pivots: model dirs or `train` run dirs")
    out: str = Field(description="directory of the merged model")
    method: Literal["ta", "ties", "dare", "sce", "rsaf"] = "ta"
    alpha: float | None = Field(None, description="scale of the merged task vector (ta, ties, dare, rsaf)")
    density: float | None = Field(None, gt=0.0, le=1.0, description="fraction of each task vector kept (ties, rsaf)")
    sign_election: Literal["sum", "count"] | None = Field(None, description="TIES sign election (ties, rsaf)")
    drop_rate: float | None = Field(None, ge=0.0, lt=1.0, description="DARE drop probability p")
    seed: int | None = Field(None, description="DARE's random seed")
    select_topk: float | None = Field(None, gt=0.0, le=1.0, description="SCE: fraction of positions kept by variance")
    rate_power: float | None = Field(None, ge=0.0, description="RSAF: exponent of the relative change rate")
    skew_strength: float | None = Field(None, ge=0.0, description="RSAF: how strongly skewness lowers the ratio")
    min_density: float | None = Field(None, gt=0.0, le=1.0, description="RSAF: lowest ratio")
    max_density: float | None = Field(None, gt=0.0, le=1.0, description="RSAF: highest ratio")
    max_shard_bytes: int = Field(2 * 1024**3, ge=1, description="largest output shard")
    overwrite: bool = False
    threads: int = Field(0, ge=0, description="torch threads for the merge (0: automatic, see run.auto_threads)")

    @model_validator(mode="after")
    def _options_fit_method(self):
        allowed = DEFAULTS[self.method]
        for key in ("alpha", "density", "sign_election", "drop_rate", "seed", "select_topk") + (
            "rate_power",
            "skew_strength",
            "min_density",
            "max_density",
        ):
            if getattr(self, key) is not None and key not in allowed:
                raise ValueError(
                    f"{key}={getattr(self, key)!r} does not apply to method {self.method!r} "
                    f"(it takes: {', '.join(allowed)})"
                )
        opts = self.method_options()
        if self.method == "rsaf" and opts["min_density"] > opts["max_density"]:
            raise ValueError(f"min_density {opts['min_density']} > max_density {opts['max_density']}")
        return self

    def method_options(self) -> dict[str, object]:
        """The chosen method's options: given values over its defaults."""
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in DEFAULTS[self.method].items()}
