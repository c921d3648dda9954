"""Settings of `fusion-cache train` (`train.trainer.run_train`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic import field_validator
from pydantic import model_validator

from fusion_cache.config import StrictConfig
from fusion_cache.train.align import ALIGN_MODES
from fusion_cache.train.losses import LOSS_CHOICES
from fusion_cache.train.losses import loss_help
from fusion_cache.train.trackers import TRACKER_NAMES
from fusion_cache.train.weights import COMBINE_MODES
from fusion_cache.train.weights import KD_GATES


class TrainConfig(StrictConfig):
    """Settings of `fusion-cache train`."""

    student: str = Field(description="student (pivot) model: preset, local directory or HF id")
    # `cache` on the command line and in config files, as every command names a cache; `shards` in Python
    shards: list[str] = Field(
        min_length=1, alias="cache", description="teacher cache: a directory or fsspec URL, one per teacher"
    )
    combine: Literal[COMBINE_MODES] = Field(
        "mean", description="how the teachers' distillation terms combine (fusion_cache/train/weights.py)"
    )
    align: Literal[ALIGN_MODES] = Field(
        "bytes", description="how answer rows pair with a teacher of another tokenizer (fusion_cache/train/align.py)"
    )
    uncertainty_temperature: float = Field(1.0, gt=0.0, description="T in softmax_s(-H_s,t / T) (combine=uncertainty)")
    kd_gate: Literal[KD_GATES] = Field(
        "none", description="student: a teacher distills a sample only while its CE on the gold answer (nats per "
        "byte, from its cache) is below the student's own at that step (docs/fusion.md)"
    )  # fmt: skip
    join_window: int = Field(1024, ge=1, description="reads a sample may wait for its partners in other caches")
    out: str = Field(description="run directory (metrics.jsonl, model/)")
    lambda_: float = Field(0.5, ge=0.0, le=1.0, alias="lambda", description="L = (1-lambda)*CE + lambda*KD")
    # `loss_k` outside Python: the K a loss reads, not the K a cache holds (`build --top-k`)
    top_k: int = Field(
        10, ge=2, alias="loss_k", description="K of the ULD loss (the paper uses 10); kl uses every cached entry"
    )
    zscore: bool = Field(True, description="ULD: standardize each row's top-K values first (InfiFusion)")
    softmax: bool = Field(True, description="ULD: compare softmax(values / temperature), else the values themselves")
    temperature: float = Field(1.0, gt=0.0, description="ULD: temperature of the softmax over the top-K values")
    kd_loss: list[Literal[LOSS_CHOICES]] = Field(
        ["uld"],
        min_length=1,
        description="distillation loss, one for every teacher or one per cache in --cache order: " + loss_help(),
    )
    kd_temperature: float = Field(
        1.0, gt=0.0, description="KD temperature T of kl/mapped_kl: teacher p^(1/T) renormalised over its cached top-K "
        "+ tail, student logits / T, loss x T^2 (uld: use temperature)"
    )  # fmt: skip
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
    overwrite: bool = Field(False, description="replace the run in a non-empty out (else refused)")
    report_to: Literal[TRACKER_NAMES] = Field(
        "none", description="experiment tracker for the metrics (tensorboard, wandb: optional extras)"
    )
    # ---- LoRA (pip install 'fusion-cache[lora]'; fusion_cache/models/lora.py)
    lora_r: int | None = Field(None, ge=1, description="train LoRA adapters of this rank instead of every weight")
    lora_alpha: float = Field(16.0, gt=0.0, description="LoRA scale numerator (the update is alpha / r * B A)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA inputs")
    lora_targets: list[str] = Field(
        ["all-linear"], min_length=1, description="modules that get adapters (names or all-linear: every linear "
        "layer but the lm_head)"
    )  # fmt: skip
    merge_adapter: bool = Field(True, description="save <out>/model with the adapter merged in (else the adapter)")
    # ---- robustness and scale (fusion_cache/train/checkpoint.py, fusion_cache/train/distributed.py)
    checkpoint_every: int | None = Field(None, ge=1, description="write a checkpoint every N optimizer steps")
    keep_checkpoints: int | None = Field(3, ge=1, description="newest checkpoints kept (None: all)")
    resume: bool = Field(False, description="continue from the newest checkpoint in <out>/checkpoints")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: this rank's GPU if any, else CPU")
    autocast: Literal["none", "bf16"] = Field("none", description="bf16 autocast of the forward pass")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    fsdp: bool = Field(False, description="shard the student with FSDP2 (torchrun, WORLD_SIZE > 1) instead of DDP")
    # ---- caches from elsewhere (fusion_cache/cache/signature.py)
    require_signature: bool = Field(
        False, description="train only on caches signed (fusion-cache sign) by one of the --trusted-key keys"
    )
    trusted_key: list[str] = Field(
        [], description="public key (OpenSSH .pub or PEM) whose signature a cache needs with --require-signature"
    )

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
    def _lora_without_fsdp(self):
        if self.lora_r is not None and self.fsdp:
            raise ValueError(f"lora_r={self.lora_r} with fsdp=True is not supported: LoRA trains with DDP or alone")
        return self

    @model_validator(mode="after")
    def _keys_with_signatures(self):
        if self.require_signature and not self.trusted_key:
            raise ValueError("require_signature=True needs at least one trusted_key (a public key file)")
        if self.trusted_key and not self.require_signature:
            raise ValueError(
                f"trusted_key={self.trusted_key} is checked only with require_signature=True (--require-signature)"
            )
        return self

    @field_validator("kd_loss", mode="before")
    @classmethod
    def _one_or_many_losses(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known_losses_one_per_cache(self):
        if len(self.kd_loss) not in (1, len(self.shards)):
            raise ValueError(
                f"kd_loss: give one loss for every teacher or one per cache ({len(self.shards)}), "
                f"got {len(self.kd_loss)}: {self.kd_loss}"
            )
        if len(set(self.shards)) != len(self.shards):
            raise ValueError(f"shards: a cache is given twice: {self.shards}")
        return self
