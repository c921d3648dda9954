"""Answer-only prompt logprobs inside vLLM's model runner: logits, top-K and log-normalizer at answer positions only.

vLLM 0.32 scores EVERY prompt position of a ``prompt_logprobs`` request (``GPUModelRunner._get_prompt_logprobs_dict``:
lm_head over all prompt hidden states of the step, a full fp32 ``log_softmax`` [n, V], ``torch.topk``, a gather and
a rank count over [n, V]). fusion-cache keeps only the answer positions (about 40% of the tokens of chat data), and
on SmolLM2-135M that per-position head is a quarter of plain prefill: the lm_head alone is ~20% of the model's
FLOPs per token (tied 49152 x 576 embedding).

While `answer_only_prompt_logprobs` is active, that runner method is swapped for `_answer_only_prompt_logprobs_dict`,
which for requests that carry ``SamplingParams.extra_args[ANSWER_START_KEY]`` (the first answer position a):

- runs the lm_head only on the rows whose NEXT token is an answer token (rows a-1 .. L-2 of the [L-1, K+1] prompt
  tensors, intersected with the rows of the current prefill chunk);
- takes the top-K and ``logsumexp`` of those logits directly (``logprob = logit - logsumexp``), so no [n, V]
  log-softmax tensor is built, and computes no vocabulary rank (fusion-cache never reads it);
- fills the other rows with placeholders: token id 0, logprob NaN, rank 0 (also rank 0 at answer rows: "not
  computed"; vLLM's ranks are >= 1).

A request that also carries ``extra_args[SAMPLES_KEY]`` (a sampled capture, `fusion_cache.capture.sampling`) gets N
draws per answer row from those same full logits rows (`capture.sampling.draw`); they leave through
`AnswerOnlyHook.samples` (this process's memory), not through vLLM's outputs, whose per-token dicts would merge
repeated draws. A sampled capture therefore needs this hook (the engine refuses one without it).

Everything else is exactly vLLM's bookkeeping (the same tensors, the same chunk arithmetic, the same clean-up), so
the output processor sees the usual ``LogprobsTensors`` of shape [L-1, K+1]. A step with any prompt-logprob request
that lacks the key, or a logprobs mode other than (raw|processed)_logprobs, runs vLLM's own method unchanged.

The swap is only installed when the method exists with the expected signature and its code reads the attributes this
copy relies on (a different vLLM gets its own path and a logged reason). It only reaches a runner in this process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set by `configure_vllm_env`) and vLLM's V1 ``GPUModelRunner`` (which the CPU
runner inherits). Where it is not reached, vLLM's full path computes the same answer rows, only slower.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any

log = logging.getLogger(__name__)

# SamplingParams.extra_args key holding the request's first answer position (int >= 1)
ANSWER_START_KEY = "fusion_cache_answer_start"
# SamplingParams.extra_args key of a sampled capture: [N draws per answer position, the sample's key, a tag unique
# in the capture call] (`fusion_cache.capture.sampling`); the draws are left in `AnswerOnlyHook.samples[tag]`
SAMPLES_KEY = "fusion_cache_samples"

_METHOD = "_get_prompt_logprobs_dict"
_SIGNATURE = ("self", "hidden_states", "num_scheduled_tokens")
# Names vLLM's own method reads; the copy below reads the same ones, so a vLLM whose method no longer reads one of
# them has changed its bookkeeping and keeps its own path.
_NAMES = frozenset(
    {
        "num_prompt_logprobs",
        "requests",
        "prompt_token_ids",
        "in_progress_prompt_logprobs_cpu",
        "empty_cpu",
        "num_computed_tokens",
        "req_id_to_index",
        "query_start_loc",
        "compute_logits",
        "logprob_token_ids",
        "selected_token_ranks",
        "_sync_device",
    }
)
_LOCK = threading.Lock()
_WARNED: set[str] = set()
# rows per block of the normalizer's exp(x - max) buffer (256 x V fp32: 50 MB for a 49152-token vocabulary)
_NORM_BLOCK_ROWS = 256


@dataclass
class AnswerOnlyHook:
    """State of one `answer_only_prompt_logprobs` block.

    Attributes:
        installed: whether the runner method was swapped.
        reason: why not, when it was not.
        scored_rows: prompt rows whose logits the swapped method computed (answer rows).
        skipped_rows: prompt rows it left as placeholders (non-answer rows vLLM would have scored).
        fallback_steps: steps it handed to vLLM's own method (a request without the key, another logprobs mode).
        samples: tag -> (ids int64 [L-1, N], logprobs float32 [L-1, N]) of each sampled request's rows (row j
            predicts token j+1; only the answer rows are filled, the others hold id -1).
    """

    installed: bool = False
    reason: str | None = None
    scored_rows: int = 0
    skipped_rows: int = 0
    fallback_steps: int = 0
    samples: dict = field(default_factory=dict)


def _incompatibility(method: Any) -> str | None:
    """Why ``method`` is not the vLLM 0.32 method this module replaces (None when it is)."""
    if method is None:
        return f"GPUModelRunner has no {_METHOD}"
    try:
        params = tuple(inspect.signature(method).parameters)
    except (TypeError, ValueError) as exc:
        return f"{_METHOD} has no readable signature ({exc})"
    if params != _SIGNATURE:
        return f"{_METHOD} takes {params}, expected {_SIGNATURE}"
    missing = _NAMES - set(getattr(getattr(method, "__code__", None), "co_names", ()))
    if missing:
        return f"{_METHOD} no longer reads {sorted(missing)}"
    return None


@contextlib.contextmanager
def answer_only_prompt_logprobs() -> Iterator[AnswerOnlyHook]:
    """While active, vLLM's runner scores only the answer rows of requests that carry `ANSWER_START_KEY`.

    Yields:
        An `AnswerOnlyHook`; ``installed`` False (with ``reason``) when this vLLM keeps its own method.
    """
    hook = AnswerOnlyHook()
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError as exc:
        hook.reason = f"vllm.v1.worker.gpu_model_runner not importable ({exc})"
        yield hook
        return
    original = GPUModelRunner.__dict__.get(_METHOD)
    hook.reason = _incompatibility(original)
    if hook.reason is not None:
        if hook.reason not in _WARNED:  # once per reason, not once per engine batch
            _WARNED.add(hook.reason)
            log.warning("answer-only prompt logprobs off, vLLM computes every position: %s", hook.reason)
        yield hook
        return

    def swapped(self, hidden_states, num_scheduled_tokens):
        return _answer_only_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens, original, hook)

    with _LOCK:
        GPUModelRunner._get_prompt_logprobs_dict = swapped
        hook.installed = True
        try:
            yield hook
        finally:
            GPUModelRunner._get_prompt_logprobs_dict = original


def _answer_start(runner: Any, req_id: str) -> int | None:
    """The request's `ANSWER_START_KEY` (None when it has none)."""
    state = runner.requests.get(req_id)
    extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
    start = extra.get(ANSWER_START_KEY)
    return start if isinstance(start, int) and start >= 1 else None


def _sampling(runner: Any, req_id: str) -> tuple[int, int, int] | None:
    """The request's `SAMPLES_KEY` as (N, key, tag), or None when it is not a sampled capture."""
    state = runner.requests.get(req_id)
    extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
    value = extra.get(SAMPLES_KEY)
    return None if value is None else (int(value[0]), int(value[1]), int(value[2]))


def _sample_rows(hook: AnswerOnlyHook, sampling: tuple, logits: Any, rows: range, first: int, total: int):
    """Draw N tokens at prompt rows ``rows`` (``first``: the sample's first answer row; ``total``: L-1) into
    ``hook.samples``."""
    import numpy as np
    import torch

    from fusion_cache.capture.sampling import draw
    from fusion_cache.capture.sampling import uniforms

    n, key, tag = sampling
    if tag not in hook.samples:
        hook.samples[tag] = (np.full((total, n), -1, np.int64), np.full((total, n), -np.inf, np.float32))
    u = torch.from_numpy(uniforms(key, np.arange(rows.start - first, rows.stop - first), n))
    ids, logprobs = draw(logits, u)
    held_ids, held_lp = hook.samples[tag]
    held_ids[rows.start : rows.stop] = ids.cpu().numpy()
    held_lp[rows.start : rows.stop] = logprobs.cpu().numpy()


def answer_topk(logits: Any, k: int, targets: Any) -> tuple[Any, Any]:
    """Prompt-logprob rows from logits, without a [n, V] log-softmax.

    Args:
        logits: [n, V] (any float dtype; scored in fp32).
        k: top entries per row.
        targets: int64 [n], the actual next token of each row.

    Returns:
        ids int64 [n, k+1] and fp32 logprobs [n, k+1]: column 0 the target, then ``torch.topk`` (descending; ties
        unordered, as in vLLM; the engine re-sorts them).
    """
    import torch

    scores = logits.float()  # a no-op for fp32 logits; vLLM's log_softmax also scores in fp32
    top_values, top_ids = torch.topk(scores, k, dim=-1)
    target_values = scores.gather(-1, targets[:, None])
    # log_softmax's own order of operations, (x - max) - log(sum(exp(x - max))), so values round as vLLM's do and
    # two logits one ulp apart mostly collapse into the same tie there and here (the engine orders ties by id).
    # exp(x - max) goes through one reused block buffer: a fresh [n, V] tensor costs more in page faults (~0.3 s
    # per 1800 x 49152 on this CPU) than the arithmetic, and the logits stay untouched (they are vLLM's tensor).
    row_max = top_values[:, :1]
    sums = scores.new_empty((scores.shape[0], 1))
    buffer = scores.new_empty((min(_NORM_BLOCK_ROWS, scores.shape[0]), scores.shape[1]))
    for lo in range(0, scores.shape[0], _NORM_BLOCK_ROWS):
        hi = min(lo + _NORM_BLOCK_ROWS, scores.shape[0])
        block = torch.sub(scores[lo:hi], row_max[lo:hi], out=buffer[: hi - lo]).exp_()
        torch.sum(block, dim=-1, keepdim=True, out=sums[lo:hi])
    log_norm = sums.log_()
    ids = torch.cat([targets[:, None], top_ids], dim=1)
    values = (torch.cat([target_values, top_values], dim=1) - row_max) - log_norm
    return ids, values


def _answer_only_prompt_logprobs_dict(runner, hidden_states, num_scheduled_tokens, original, hook: AnswerOnlyHook):
    """`GPUModelRunner._get_prompt_logprobs_dict` scoring answer rows only (see the module docstring).

    Args:
        runner: the model runner (``self`` of the method).
        hidden_states: [num scheduled tokens, hidden] of this step.
        num_scheduled_tokens: request id -> tokens scheduled for it in this step.
        original: vLLM's method, run instead for steps this copy does not handle.
        hook: counters.

    Returns:
        request id -> ``LogprobsTensors`` [L-1, K+1] for requests whose prefill completed in this step.
    """
    import torch
    from vllm.v1.outputs import LogprobsTensors

    table = runner.num_prompt_logprobs
    if not table:
        return {}
    starts = {}
    for req_id in table:
        if num_scheduled_tokens.get(req_id) is None:
            continue  # not scheduled this step (e.g. preempted); vLLM's loop skips it too
        starts[req_id] = _answer_start(runner, req_id)
    if None in starts.values() or runner.model_config.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
        hook.fallback_steps += 1
        return original(runner, hidden_states, num_scheduled_tokens)

    out: dict[str, Any] = {}
    completed = []
    for req_id, k in table.items():
        if req_id not in starts:
            continue
        num_tokens = num_scheduled_tokens[req_id]
        request = runner.requests[req_id]
        if request.prompt_token_ids is None:
            continue  # prompt embeddings: no prompt logprobs (as vLLM)
        num_prompt_tokens = len(request.prompt_token_ids)
        tensors = request.in_progress_prompt_logprobs_cpu
        if tensors is None:
            # Row j: position j predicting token j+1. Rows never scored keep these placeholders.
            tensors = LogprobsTensors.empty_cpu(num_prompt_tokens - 1, k + 1)
            tensors.logprob_token_ids.zero_()
            tensors.logprobs.fill_(float("nan"))
            tensors.selected_token_ranks.zero_()
            request.in_progress_prompt_logprobs_cpu = tensors
        # vLLM's chunk arithmetic: this step scores rows [start_idx, start_idx + num_logits)
        start_idx = request.num_computed_tokens
        num_remaining = num_prompt_tokens - (start_idx + 1)
        if num_tokens <= num_remaining:
            num_logits = num_tokens
        else:
            num_logits = num_remaining
            completed.append(req_id)
            out[req_id] = tensors
        if num_logits <= 0:
            continue
        # Answer tokens are positions >= a, predicted by rows >= a-1; intersect with the chunk's rows.
        lo, hi = max(start_idx, starts[req_id] - 1), start_idx + num_logits
        hook.skipped_rows += min(num_logits, max(0, lo - start_idx))
        if lo >= hi:
            continue
        hook.scored_rows += hi - lo
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        logits = runner.model.compute_logits(hidden_states[offset + lo - start_idx : offset + hi - start_idx])
        targets = torch.as_tensor(request.prompt_token_ids[lo + 1 : hi + 1], dtype=torch.int64, device=logits.device)
        ids, values = answer_topk(logits, k, targets)
        sampling = _sampling(runner, req_id)
        if sampling is not None:
            _sample_rows(hook, sampling, logits, range(lo, hi), starts[req_id] - 1, num_prompt_tokens - 1)
        tensors.logprob_token_ids[lo:hi].copy_(ids, non_blocking=True)
        tensors.logprobs[lo:hi].copy_(values, non_blocking=True)

    for req_id in completed:
        del table[req_id]
        runner.requests[req_id].in_progress_prompt_logprobs_cpu = None
    if out:
        runner._sync_device()  # the non-blocking device->host copies above
    return out
