"""Settings of `fusion-cache build` (`capture.build.run_build`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from typing import Literal

from pydantic import Field
from pydantic import model_validator

from fusion_cache.cache.codecs import CODEC_NAMES
from fusion_cache.cache.codecs import codec_help
from fusion_cache.cache.codecs import value_bits_help
from fusion_cache.cache.manifest import check_meta
from fusion_cache.capture.engines import ENGINE_NAMES
from fusion_cache.capture.engines import VLLM
from fusion_cache.capture.inputs import ROW_FIELDS
from fusion_cache.capture.inputs import RowFormat
from fusion_cache.capture.sampling import DEFAULT_SAMPLES
from fusion_cache.capture.sampling import RS
from fusion_cache.capture.sampling import SAMPLES_RANGE
from fusion_cache.capture.sampling import SAMPLINGS
from fusion_cache.capture.sampling import TOPK
from fusion_cache.config import StrictConfig


class BuildConfig(StrictConfig):
    """Settings of `fusion-cache build`."""

    teacher: str = Field(description="preset name (see `fusion-cache teachers`), local model directory, or HF id")
    data: str = Field(
        description="rows with `messages`, `prompt`+`response` or `text`: JSONL / Parquet, a datasets directory, a "
        "directory of data files, or a Hub dataset id org/name"
    )
    data_split: str | None = Field(None, description="split of a Hub dataset or datasets directory (default: train)")
    data_fields: dict[str, str] = Field(
        default_factory=dict,
        description=f"the rows' own names of the fields {', '.join(ROW_FIELDS)} (role and content: of each message), "
        'e.g. {"messages": "conversations", "role": "from", "content": "value"}',
    )
    data_roles: dict[str, str] = Field(
        default_factory=dict, description='the rows\' own role names, e.g. {"human": "user", "gpt": "assistant"}'
    )
    out: str = Field(description="cache directory to create: a path or an fsspec URL (s3://, gs://, hf://...)")
    top_k: int = Field(64, ge=2, le=1024, description="K: teacher log-probs kept per answer token")
    engine: Literal[ENGINE_NAMES] = Field("vllm", description="teacher engine (fusion_cache/capture/engines)")
    # the names come from the codec registry (fusion_cache/cache/codecs/__init__.py)
    codec: Literal[CODEC_NAMES] = Field("raw", description=f"how the top-K block is stored: {codec_help()}")
    value_bits: int | None = Field(None, ge=2, le=16, description=f"bits per value code of the {value_bits_help()}")
    # ---- sampled capture (capture/sampling.py): RS-KD's N draws per position instead of a top-K
    sampling: Literal[SAMPLINGS] = Field(
        TOPK, description=f"{TOPK}: the teacher's top-K; {RS}: N tokens drawn from its full softmax per answer "
        f"position (RS-KD; stored with --codec sampled, the default then; train with --kd-loss rs_kl)"
    )  # fmt: skip
    samples: int | None = Field(
        None, description=f"N, draws per answer position with --sampling {RS} (default {DEFAULT_SAMPLES}; "
        f"{SAMPLES_RANGE[0]}..{SAMPLES_RANGE[1]})"
    )  # fmt: skip
    seed: int = Field(
        0, ge=0, le=(1 << 63) - 1, description=f"the draws' seed with --sampling {RS} (with each sample id and "
        "position: the same build draws the same tokens on any engine or worker)"
    )  # fmt: skip
    max_length: int = Field(2048, ge=2, description="longest rendered sequence, in teacher tokens")
    overlong: Literal["truncate", "skip"] = Field("truncate", description="what to do with longer sequences")
    dtype: str | None = Field(None, description="teacher dtype; default chosen from the hardware")
    batch_tokens: int = Field(8192, ge=64, description="token budget of one engine call")
    shard_rows: int = Field(1000, ge=1, description="rows per shard")
    overwrite: bool = Field(False, description="replace a different cache (or an interrupted build) in out")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    resume: bool = Field(False, description="continue an interrupted build in <out>.incomplete/")
    num_shards: int = Field(1, ge=1, description="split the input into this many parts built independently")
    shard_index: int = Field(0, ge=0, description="which part this build captures (0-based)")
    # ---- the dataset card (cache/card.py) and the manifest's meta block
    license: str | None = Field(
        None, description="the teacher's license or terms (SPDX id or name + URL); default: its preset's"
    )
    meta: list[str] = Field(
        default_factory=list, description="a team's own manifest field, key=value (fingerprinted), e.g. team=nlp"
    )
    meta_file: str | None = Field(None, description="a JSON object of a team's own manifest fields (fingerprinted)")
    # ---- the vLLM engine, for teachers bigger than one GPU (fusion_cache/capture/engines/vllm.py)
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM: GPUs one teacher is split over (above 1: vLLM's multiprocess executor)"
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0, description="vLLM: share of each GPU's memory it may use (default: vLLM's, 0.9)"
    )
    max_model_len: int | None = Field(
        None, ge=2, description="vLLM: context length (default: the longest row + 1); longer rows are cut or skipped "
        "as --overlong says"
    )  # fmt: skip
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description='vLLM: more LLM(...) engine arguments, e.g. {"enforce_eager": true}'
    )

    @model_validator(mode="before")
    @classmethod
    def _sampled_defaults(cls, data: Any) -> Any:
        """With sampling rs: N defaults to 12, the codec to ``sampled`` and K to N (a sampled block is N wide)."""
        if isinstance(data, dict) and data.get("sampling") == RS:
            data = dict(data)
            if data.get("samples") is None:
                data["samples"] = DEFAULT_SAMPLES
            data.setdefault("codec", "sampled")
            lo, hi = SAMPLES_RANGE
            if isinstance(data["samples"], int) and lo <= data["samples"] <= hi and data.get("top_k") is None:
                data["top_k"] = data["samples"]
        return data

    @model_validator(mode="after")
    def _sampling_options(self):
        if self.sampling == TOPK:
            if self.samples is not None:
                raise ValueError(f"samples={self.samples} needs sampling='{RS}' (a top-K build keeps --top-k tokens)")
            if self.seed != 0:
                raise ValueError(f"seed={self.seed} needs sampling='{RS}' (a top-K build draws nothing)")
            if self.codec == "sampled":
                raise ValueError(f"codec='sampled' stores a sampled capture; add --sampling {RS}")
            return self
        lo, hi = SAMPLES_RANGE
        if not lo <= self.samples <= hi:
            raise ValueError(f"samples: must be in [{lo}, {hi}] (a count is one byte), got {self.samples}")
        if self.codec != "sampled":
            raise ValueError(f"codec={self.codec!r} with sampling='{RS}': a sampled capture is stored with codec "
                             "'sampled'")  # fmt: skip
        if self.top_k != self.samples:
            raise ValueError(f"top_k={self.top_k} with sampling='{RS}': a sampled cache keeps samples={self.samples} "
                             "draws per position, not a top-K; leave top_k out")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _vllm_options_need_vllm(self):
        given = {
            "tensor_parallel_size": self.tensor_parallel_size != 1,
            "gpu_memory_utilization": self.gpu_memory_utilization is not None,
            "max_model_len": self.max_model_len is not None,
            "engine_args": bool(self.engine_args),
        }
        if self.engine != VLLM and any(given.values()):
            raise ValueError(
                f"engine={self.engine!r} takes no vLLM options, got {[k for k, v in given.items() if v]}; "
                f"use engine={VLLM!r}"
            )
        return self

    @model_validator(mode="after")
    def _known_row_format(self):
        _ = self.row_format  # RowFormat refuses unknown fields and roles
        return self

    @model_validator(mode="after")
    def _meta_parses(self):
        _ = self.meta_block  # key=value pairs, a readable JSON object, within the size bound
        return self

    @property
    def meta_block(self) -> dict | None:
        """The manifest's ``meta``: ``meta_file``'s object, then each ``key=value`` of ``meta``; None when neither."""
        if not self.meta and self.meta_file is None:
            return None
        block: dict = {}
        if self.meta_file is not None:
            try:
                block = json.loads(Path(self.meta_file).read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"meta_file: cannot read a JSON object from {self.meta_file!r}: {e}") from None
            if not isinstance(block, dict):
                raise ValueError(f"meta_file: {self.meta_file!r} must hold a JSON object, got {type(block).__name__}")
        for item in self.meta:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"meta: expected key=value, got {item!r}")
            block[key.strip()] = value
        return check_meta(block)

    @property
    def row_format(self) -> RowFormat:
        """How the input rows are read (`fusion_cache.capture.inputs.RowFormat`)."""
        return RowFormat(split=self.data_split, fields=dict(self.data_fields), roles=dict(self.data_roles))

    @model_validator(mode="after")
    def _shard_index_in_range(self):
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index: must be < num_shards={self.num_shards}, got {self.shard_index}")
        return self
