"""Settings of `fusion-cache build` (`capture.build.run_build`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic import model_validator

from fusion_cache.cache.codecs import CODEC_NAMES
from fusion_cache.cache.codecs import codec_help
from fusion_cache.cache.codecs import value_bits_help
from fusion_cache.capture.engines import ENGINE_NAMES
from fusion_cache.config import StrictConfig


class BuildConfig(StrictConfig):
    """Settings of `fusion-cache build`."""

    teacher: str = Field(description="preset name (see `fusion-cache teachers`), local model directory, or HF id")
    data: str = Field(description="JSONL / Parquet with `messages` or `prompt`+`response`, or a datasets directory")
    out: str = Field(description="cache directory to create: a path or an fsspec URL (s3://, gs://, hf://...)")
    top_k: int = Field(64, ge=2, le=1024, description="K: teacher log-probs kept per answer token")
    engine: Literal[ENGINE_NAMES] = Field("vllm", description="teacher engine (fusion_cache/capture/engines)")
    # the names come from the codec registry (fusion_cache/cache/codecs/__init__.py)
    codec: Literal[CODEC_NAMES] = Field("raw", description=f"how the top-K block is stored: {codec_help()}")
    value_bits: int | None = Field(None, ge=2, le=16, description=f"bits per value code of the {value_bits_help()}")
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

    @model_validator(mode="after")
    def _shard_index_in_range(self):
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index: must be < num_shards={self.num_shards}, got {self.shard_index}")
        return self
