"""The transformers reference engine.

Slower than vLLM on real models but dependency-light and easy to audit, so it doubles as the numerical reference
the vLLM engine is tested against. Memory stays bounded by never building the [B, L, V] logits of a batch: the
decoder's hidden states are gathered at the answer positions first, and the lm_head runs on those rows only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusion_cache.capture.engines.base import SequenceRequest
from fusion_cache.capture.engines.base import TopKCapture
from fusion_cache.capture.engines.base import check_sample_keys
from fusion_cache.capture.engines.base import check_sampling
from fusion_cache.capture.sampling import compact
from fusion_cache.capture.sampling import draw
from fusion_cache.capture.sampling import uniforms
from fusion_cache.errors import ConfigError
from fusion_cache.errors import DataError
from fusion_cache.models.hardware import canonical_dtype
from fusion_cache.models.hardware import default_dtype
from fusion_cache.models.hardware import torch_dtype

# Rows of [rows, V] fp32 logits (plus the int64 sort keys) handled at once; 2^24 elements is 64 MiB of fp32.
_HEAD_CHUNK_ELEMENTS = 1 << 24


def ordered_topk(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K of each row in the contract order: descending value, ties by ascending index.

    ``torch.topk`` leaves the order of equal values unspecified and may pick any of several values tied at the
    K-th place; ties are common once logits come from bf16. So: one ``torch.topk`` of K+1 entries, whose extra
    entry reveals a tie at the boundary; a recomputation of only the rows that have one; then a reorder of the K
    selected entries by (value desc, id asc). All of it vectorized.

    Args:
        logprobs: float32 [N, V], no NaN.
        k: entries to keep, 1 <= k <= V.

    Returns:
        ``(values, ids)``: float32 [N, k] and int64 [N, k].
    """
    n_cols = logprobs.shape[-1]
    if k < n_cols:
        values, ids = torch.topk(logprobs, k + 1, dim=-1, sorted=True)
        # Entry K+1 is the best value left out: if it equals the K-th, the tie at the boundary must keep the
        # lowest ids, which torch.topk does not promise.
        boundary_tie = values[:, k] == values[:, k - 1]
        values, ids = values[:, :k].contiguous(), ids[:, :k].contiguous()
        if bool(boundary_tie.any()):
            rows = boundary_tie.nonzero()[:, 0]
            values[rows], ids[rows] = _resolve_boundary_ties(logprobs[rows], values[rows], ids[rows])
    else:
        values, ids = torch.topk(logprobs, k, dim=-1, sorted=True)
    # Reorder within the selection: sort by id, then a stable sort by value keeps ids ascending among equals.
    ids, by_id = torch.sort(ids, dim=-1)
    values = values.gather(-1, by_id)
    values, by_value = torch.sort(values, dim=-1, descending=True, stable=True)
    return values.float(), ids.gather(-1, by_value)


def _resolve_boundary_ties(
    logprobs: torch.Tensor, values: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Redo the top-K of rows whose K-th value is tied with a value left out, keeping the lowest tied ids.

    Args:
        logprobs: float32 [N, V], the full rows.
        values: float32 [N, K], their ``torch.topk`` values (sorted descending).
        ids: int64 [N, K], the matching ids.

    Returns:
        ``(values, ids)`` [N, K]: the entries above the boundary value, then the lowest ids tied at it.
    """
    k = values.shape[1]
    boundary = values[:, -1:]
    # The values strictly above the boundary are all in the top-K and come first (sorted); the rest of the K
    # slots go to the lowest columns equal to the boundary value.
    n_above = (values > boundary).sum(dim=-1, keepdim=True)  # [N, 1]
    need = k - n_above
    # Float keys -column are exact for vocabularies below 2^24; topk on them lists tied columns lowest first.
    neg_columns = -torch.arange(logprobs.shape[-1], dtype=torch.float32, device=logprobs.device)
    tie_keys = torch.where(logprobs == boundary, neg_columns, float("-inf"))
    tied = torch.topk(tie_keys, int(need.max()), dim=-1, sorted=True).indices  # [N, max need]
    slot = torch.arange(k, device=logprobs.device)[None]
    tie_slot = (slot - n_above).clamp(min=0, max=tied.shape[1] - 1)
    new_ids = torch.where(slot < n_above, ids, tied.gather(-1, tie_slot))
    return logprobs.gather(-1, new_ids).float(), new_ids


def _token_budget_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Group request indices, longest first, so that each padded batch holds at most ``max_batch_tokens`` tokens.

    Sorting by length keeps padding small. A single request longer than the budget forms a batch of its own.

    Args:
        lengths: int [R] sequence lengths.
        max_batch_tokens: budget for ``batch_size * longest_length``.

    Returns:
        Index arrays into ``lengths``, one per batch.
    """
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])  # sorted descending: the first request sets the padded width
        size = max(1, max_batch_tokens // max(longest, 1))
        batches.append(order[start : start + size])
        start += size
    return batches


class HFEngine:
    """Teacher engine on a transformers causal LM (`fusion_cache.capture.engines.base.TeacherEngine`).

    Args:
        model_path: local directory (or hub id when online) of a causal LM.
        dtype: "float32"/"bfloat16"/"float16" (or fp32/bf16/fp16); None picks `hardware.default_dtype`.
        device: "cpu" or "cuda[:N]"; None picks CUDA when available.
        max_batch_tokens: padded tokens (batch size x longest sequence) per forward pass.
        trust_remote_code: passed to transformers; keep False unless the model needs custom code.
        revision: the hub commit, branch or tag to load (a hub id's ``@rev``); None for a local directory.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str | None = None,
        device: str | None = None,
        max_batch_tokens: int = 8192,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ):
        from transformers import AutoModelForCausalLM

        if max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens: must be >= 1, got {max_batch_tokens}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = canonical_dtype(dtype) if dtype else default_dtype(self.device)
        self.max_batch_tokens = max_batch_tokens
        self.model_path = str(model_path)
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=torch_dtype(self.dtype), trust_remote_code=trust_remote_code, revision=revision
        )
        self.model = model.to(self.device).eval()
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.pad_id = self._pad_token_id()
        self._check_head_matches_forward()

    # ------------------------------------------------------------------ capture

    def capture(self, requests: Sequence[SequenceRequest], k: int, samples: int | None = None) -> list[TopKCapture]:
        """Top-K log-probabilities at the answer positions of every request, in request order.

        Args:
            requests: sequences with ``1 <= answer_start <= len(input_ids)``.
            k: entries per position, ``1 <= k <= vocab size`` (ignored with ``samples``).
            samples: N: draw N tokens per position from the full softmax instead (`capture.sampling`, seeded by each
                request's ``sample_key``).

        Returns:
            One `TopKCapture` per request: ids int32 [n, k], logprobs float32 [n, k], target_logprobs float32 [n],
            with ``n = len(input_ids) - answer_start``; with ``samples``, ids, logprobs and counts [n, N].
        """
        check_sample_keys(requests, samples)
        k = samples if samples is not None else k
        if not 1 <= k <= self.vocab_size:
            raise ConfigError(f"k: must be in [1, {self.vocab_size}] (the vocabulary size), got {k}")
        lengths = np.array([len(r.input_ids) for r in requests], dtype=np.int64)
        for i, r in enumerate(requests):
            if not 1 <= r.answer_start <= lengths[i]:
                raise DataError(
                    f"requests[{i}]", None, f"answer_start={r.answer_start} outside [1, {lengths[i]}] (sequence length)"
                )
        results: list[TopKCapture | None] = [None] * len(requests)
        for batch in _token_budget_batches(lengths, self.max_batch_tokens):
            caps = self._capture_batch([requests[i] for i in batch], k, sampled=samples is not None)
            for i, cap in zip(batch, caps, strict=True):
                results[i] = cap
        return results  # type: ignore[return-value]  # every slot was filled above

    @torch.inference_mode()
    def _capture_batch(self, requests: Sequence[SequenceRequest], k: int, sampled: bool = False) -> list[TopKCapture]:
        """Capture one padded batch; see `capture` (``sampled``: ``k`` draws per position)."""
        lengths = torch.tensor([len(r.input_ids) for r in requests], dtype=torch.int64)
        starts = torch.tensor([r.answer_start for r in requests], dtype=torch.int64)
        input_ids, attention_mask = self._right_pad([r.input_ids for r in requests])

        # Flat (row, position) pairs of every answer position: position answer_start+t-1 predicts token
        # answer_start+t. Built with repeat_interleave so no Python loop runs per token.
        n_answer = lengths - starts
        total = int(n_answer.sum())
        row = torch.repeat_interleave(torch.arange(len(requests)), n_answer)
        first_flat = torch.cumsum(n_answer, 0) - n_answer  # flat index of each request's first answer row
        pos = torch.arange(total) - first_flat[row] + starts[row] - 1
        targets = input_ids[row, pos + 1]

        ids = torch.empty((total, k), dtype=torch.int32)
        values = torch.empty((total, k), dtype=torch.float32)
        target_lp = torch.empty((total,), dtype=torch.float32)
        if sampled:  # each position's uniforms: from its sample's key and its answer position only
            parts = [uniforms(r.sample_key, np.arange(int(n)), k) for r, n in zip(requests, n_answer, strict=True)]
            u = np.concatenate(parts) if parts else np.zeros((0, k))
        if total:
            hidden = self._final_hidden(input_ids.to(self.device), attention_mask.to(self.device))  # [B, L, H]
            picked = hidden[row.to(self.device), pos.to(self.device)]  # [total, H]
            del hidden
            chunk = max(1, _HEAD_CHUNK_ELEMENTS // self.vocab_size)
            for lo in range(0, total, chunk):
                if sampled:
                    logits = self._logits(picked[lo : lo + chunk])  # [c, V] fp32
                    top_ids, top_values = draw(logits, torch.from_numpy(u[lo : lo + chunk]))
                    logprobs = torch.log_softmax(logits, dim=-1)
                else:
                    logprobs = self._logprobs(picked[lo : lo + chunk])  # [c, V] fp32
                    top_values, top_ids = ordered_topk(logprobs, k)
                values[lo : lo + chunk] = top_values.cpu()
                ids[lo : lo + chunk] = top_ids.to(torch.int32).cpu()
                chunk_targets = targets[lo : lo + chunk].to(self.device)
                target_lp[lo : lo + chunk] = logprobs.gather(-1, chunk_targets[:, None])[:, 0].cpu()

        bounds = torch.cumsum(n_answer, 0).tolist()
        ids_np, values_np, target_np = ids.numpy(), values.numpy(), target_lp.numpy()
        if sampled:
            ids_np, values_np, counts_np = compact(ids_np, values_np, k)
            return [
                TopKCapture(ids_np[lo:hi], values_np[lo:hi], target_np[lo:hi], counts_np[lo:hi])
                for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True)
            ]
        return [
            TopKCapture(ids=ids_np[lo:hi], logprobs=values_np[lo:hi], target_logprobs=target_np[lo:hi])
            for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True)
        ]

    def _final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the decoder's final norm, float [B, L, H] in the model dtype (no lm_head)."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the lm_head (and the config's final-logit soft-capping) to hidden rows: [N, H] -> fp32 [N, V]."""
        logits = self.model.get_output_embeddings()(hidden).float()
        if self.softcap:
            # Gemma-2 style: logits = cap * tanh(logits / cap), as the model's own forward does.
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary log-softmax in fp32 of hidden rows: [N, H] -> [N, V]."""
        return torch.log_softmax(self._logits(hidden), dim=-1)

    def _check_head_matches_forward(self) -> None:
        """Fail early if the model post-processes logits in a way `_logits` does not reproduce.

        The engine splits the forward into decoder + lm_head; a model with an extra step (a logit scale, say)
        would silently produce wrong caches. One 8-token forward compares both paths.
        """
        probe = torch.arange(8, dtype=torch.int64, device=self.device)[None] % self.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=probe, use_cache=False).logits[0].float()
            split = self._logits(self._final_hidden(probe, torch.ones_like(probe))[0])
        tol = 1e-3 if self.dtype == "float32" else 5e-2
        scale = max(1.0, float(full.abs().max()))
        if not torch.allclose(full, split, rtol=0, atol=tol * scale):
            raise ConfigError(
                f"model {self.model_path!r}: lm_head(final hidden) differs from the model's own logits "
                f"(max |diff| {float((full - split).abs().max()):.3g}); its logit post-processing is not supported "
                "by the hf engine"
            )

    # ------------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float, seed: int,
        progress: bool = False,
    ) -> list[list[int]]:  # fmt: skip
        """Continue each prompt; greedy when ``temperature == 0``, else plain sampling (no top-k/top-p).

        Args:
            prompts: token ids per prompt (non-empty).
            max_tokens: new tokens per prompt, at most.
            temperature: 0 for greedy decoding, > 0 for sampling.
            seed: torch seed of the sampling; the global RNG state is left untouched.
            progress: show a progress bar over the prompts.

        Returns:
            The new token ids of each prompt, without the stop (eos) token and what follows it, without padding.
        """
        from tqdm.auto import tqdm

        check_sampling(prompts, max_tokens=max_tokens, temperature=temperature)
        stop_ids = self._stop_token_ids()
        # top_k=0 / top_p=1 switch off the filters transformers applies by default (top_k=50).
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        decoding = sampling if temperature > 0 else {"do_sample": False}
        lengths = np.array([len(p) + max_tokens for p in prompts], dtype=np.int64)
        results: list[list[int]] = [[] for _ in prompts]
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, dynamic_ncols=True)
        with bar, torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
            torch.manual_seed(seed)
            for batch in _token_budget_batches(lengths, self.max_batch_tokens):
                # Decoder-only generation appends on the right, so the prompts are padded on the left.
                input_ids, attention_mask = self._left_pad([prompts[i] for i in batch])
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    max_new_tokens=max_tokens,
                    pad_token_id=self.pad_id,
                    eos_token_id=sorted(stop_ids) or None,
                    **decoding,
                )
                new = out[:, input_ids.shape[1] :].cpu().numpy()
                # Everything from the first stop token on is the stop token itself or padding.
                is_stop = np.isin(new, list(stop_ids))
                ends = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1), new.shape[1])
                for i, row, end in zip(batch, new, ends, strict=True):
                    results[i] = row[:end].tolist()
                bar.update(len(batch))
        return results

    def sample_n(
        self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float, seed: int,
        progress: bool = False,
    ) -> list[list[list[int]]]:  # fmt: skip
        """``n`` continuations of each prompt: sample j is `generate` with seed ``seed + j`` (``progress``: a bar per
        sample).

        Returns:
            ``[prompt][sample]`` new token ids, without the stop (eos) token.
        """
        check_sampling(prompts, n=n, max_tokens=max_tokens, temperature=temperature)
        runs = [
            self.generate(prompts, max_tokens=max_tokens, temperature=temperature, seed=seed + j, progress=progress)
            for j in range(n)
        ]
        return [[runs[j][i] for j in range(n)] for i in range(len(prompts))]

    def _stop_token_ids(self) -> set[int]:
        """The eos ids of the generation config (an int or a list there), empty if the model has none."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    # ------------------------------------------------------------------ helpers

    def _pad_token_id(self) -> int:
        """Padding id: the config's pad token, else an eos, else 0 (masked out, so any valid id does)."""
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None)
        if pad is None:
            eos = self._stop_token_ids()
            pad = min(eos) if eos else 0
        return int(pad)

    def _right_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to int64 ``input_ids`` [B, L] and ``attention_mask`` [B, L] (1 = real token)."""
        return self._pad(seqs, left=False)

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad to int64 ``input_ids`` [B, L] and ``attention_mask`` [B, L] (1 = real token)."""
        return self._pad(seqs, left=True)

    def _pad(self, seqs: Sequence[Sequence[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        input_ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for b, s in enumerate(seqs):  # one copy per sequence, not per token
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            input_ids[b, cols] = np.asarray(s, dtype=np.int64)
            mask[b, cols] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(mask)

    def close(self) -> None:
        """Drop the model so its memory can be reclaimed."""
        import gc

        self.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
