"""Settings of `fusion-cache train` (`train.trainer.run_train`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic import model_validator

from fusion_cache.config import StrictConfig
from fusion_cache.train.align import ALIGN_MODES
from fusion_cache.train.weights import COMBINE_MODES


class TrainConfig(StrictConfig):
    """Settings of `fusion-cache train`."""

    student: str = Field(description="student (pivot) model: preset, local directory or HF id")
    shards: list[str] = Field(min_length=1, description="teacher cache: a directory or fsspec URL, one per teacher")
    mode: Literal["single", "unified"] = Field(
        "single", description="single: one cache; unified: one run against every cache (joined on sample_id)"
    )
    combine: Literal[COMBINE_MODES] = Field(
        "mean", description="unified: how the teachers' ULD terms combine (fusion_cache/train/weights.py)"
    )
    align: Literal[ALIGN_MODES] = Field(
        "bytes", description="unified: how answer rows pair across tokenizers (fusion_cache/train/align.py)"
    )
    uncertainty_temperature: float = Field(1.0, gt=0.0, description="T in softmax_s(-H_s,t / T) (combine=uncertainty)")
    join_window: int = Field(1024, ge=1, description="unified: reads a sample may wait for its partners")
    out: str = Field(description="run directory (metrics.jsonl, model/)")
    lambda_: float = Field(0.5, ge=0.0, le=1.0, alias="lambda", description="L = (1-lambda)*CE + lambda*ULD")
    top_k: int = Field(10, ge=2, description="K of the ULD loss (the paper uses 10)")
    zscore: bool = True
    softmax: bool = True
    temperature: float = Field(1.0, gt=0.0)
    kd_loss: Literal["uld", "kl"] = Field(
        "uld", description="distillation term: uld (InfiFusion, any tokenizer) or kl (top-K KL, same vocabulary)"
    )
    tail: bool = Field(False, description="ULD over true probabilities + the teacher's tail-mass bucket (zscore off)")
    lr: float = Field(5e-5, gt=0.0, description="peak learning rate (AdamW, warmup + cosine)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="fraction of the steps the learning rate warms up")
    batch_size: int = Field(4, ge=1, description="samples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; default: epochs over the cache")
    epochs: float = Field(1.0, gt=0.0, description="passes over the cache when max_steps is not given")
    max_length: int = Field(1024, ge=2, description="longest student sequence; longer ones are truncated")
    shuffle_buffer: int = Field(256, ge=1, description="rows held for shuffling; memory does not grow with the cache")
    seed: int = Field(0, description="training seed (shuffle; the same for every run)")
    dtype: str | None = Field(None, description="student weights' dtype (default: float32)")
    grad_clip: float = Field(1.0, gt=0.0, description="largest gradient norm (clipped above it)")
    log_every: int = Field(10, ge=1, description="flush metrics.jsonl every N optimizer steps")
    save: bool = Field(True, description="save the trained model in <out>/model")
    # ---- robustness and scale (fusion_cache/train/checkpoint.py, fusion_cache/train/distributed.py)
    checkpoint_every: int | None = Field(None, ge=1, description="write a checkpoint every N optimizer steps")
    keep_checkpoints: int | None = Field(3, ge=1, description="newest checkpoints kept (None: all)")
    resume: bool = Field(False, description="continue from the newest checkpoint in <out>/checkpoints")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: this rank's GPU if any, else CPU")
    autocast: Literal["none", "bf16"] = Field("none", description="bf16 autocast of the forward pass")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    fsdp: bool = Field(False, description="shard the student with FSDP2 (torchrun, WORLD_SIZE > 1) instead of DDP")

    @model_validator(mode="after")
    def _tail_compares_probabilities(self):
        if self.tail and (self.zscore or not self.softmax or self.temperature != 1.0):
            raise ValueError(
                "tail=True compares the teacher's true top-K probabilities and tail mass: it needs zscore=False, "
                f"softmax=True, temperature=1 (got zscore={self.zscore}, softmax={self.softmax}, "
                f"temperature={self.temperature})"
            )
        return self

    @model_validator(mode="after")
    def _caches_fit_the_mode(self):
        if self.mode == "single" and len(self.shards) > 1:
            raise ValueError(
                f"{len(self.shards)} caches given with mode 'single'; use mode 'unified' (one run against all of "
                "them) or 'pairwise' (one run per cache, then merge)"
            )
        if self.mode == "single" and "align" in self.model_fields_set and self.align == "bytes":
            raise ValueError(
                "align 'bytes': mode 'single' pairs a re-rendered student's rows with the teacher's by index (ULD); "
                "use mode 'unified' (with one or more caches) for byte-span alignment"
            )
        if len(set(self.shards)) != len(self.shards):
            raise ValueError(f"shards: a cache is given twice: {self.shards}")
        if self.mode == "unified":
            # not wired into the joined stream yet: refuse rather than silently ignore
            unsupported = {
                "kd_loss": self.kd_loss != "uld",
                "tail": self.tail,
            }
            bad = [k for k, v in unsupported.items() if v]
            if bad:
                raise ValueError(
                    f"mode 'unified' does not support {', '.join(bad)} yet (got "
                    + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                    + "); use mode 'single' or 'pairwise' for them"
                )
        return self
