"""PyTorch reference of InfiFusion's top-K, z-scored, sorted-logit ULD loss (its definition below), and of the
identity-aware top-K KL for students that share the teacher's vocabulary (`topk_kl_loss_reference`).

This is the single source of truth: the trainer's CPU path, the tests of every kernel and the benchmarks all call
these functions. Per aligned answer position (one row):

    l_o = topk(z_o, K).values                 # student logits, differentiable, sorted descending
    l_s = teacher's cached top-K values       # log-probs or logits: the z-score removes the constant between them
    l^  = (l - mean(l)) / (std(l) + eps)      # over the K values; unbiased std, as in logit-standardization KD
    p   = softmax(l^ / tau)
    d   = sum_i |p_o(i) - p_s(i)|             # both sorted, so this is ULD's closed form; d in [0, 2]

When the student's K and the teacher's Kt differ, both sides are truncated to the common ``min(K, Kt)`` largest
values (padding with zeros would change the z-score statistics). Rows whose mask is False contribute nothing and
receive zero gradient; they are never even computed, so garbage (NaN) in a masked row cannot leak into the loss.

Ties: torch.topk picks an arbitrary entry among equal values, so the selection is made canonical (`topk_canonical`):
among equal values the lower vocabulary index wins, both at the K-th boundary and for the rank order inside the
top-K. The values (and so the loss) are those of torch.topk; only which entry receives the gradient is pinned, so
that a kernel can reproduce it exactly.
"""

from __future__ import annotations

import torch


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 are computed in fp32; fp64 stays fp64 (gradcheck)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def topk_canonical(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, value descending, ties broken by the lower index.

    Args:
        x: [N, V] values (not differentiated here).
        k: how many per row, k <= V.

    Returns:
        [N, k] int64 indices. O(V) per row like torch.topk: the full-vocabulary work is one topk and one comparison
        with the k-th value; only rows with more tied candidates than slots at the boundary pay a cumsum.
    """
    with torch.no_grad():
        vals, idx = torch.topk(x, k, dim=-1, sorted=True)
        thr = vals[:, -1:]
        slots = (vals == thr).sum(-1)  # boundary slots torch filled
        candidates = (x == thr).sum(-1)  # entries that could fill them
        ambiguous = (candidates > slots).nonzero(as_tuple=True)[0]
        if ambiguous.numel():
            xa, ta = x[ambiguous], thr[ambiguous]
            eq = xa == ta
            need = k - (xa > ta).sum(-1, keepdim=True)
            sel = (xa > ta) | (eq & (eq.cumsum(-1) <= need))
            idx = idx.clone()
            idx[ambiguous] = sel.nonzero(as_tuple=True)[1].view(-1, k)
        # rank order: value descending, lower index first among equal values
        idx = idx.sort(dim=-1).values
        order = torch.sort(x.gather(1, idx), dim=-1, descending=True, stable=True).indices
        return idx.gather(1, order)


def standardized_probs(
    values: torch.Tensor, *, zscore: bool = True, softmax: bool = True, temperature: float = 1.0, eps: float = 1e-7
) -> torch.Tensor:
    """Turn sorted top-K values into the vectors that ULD compares.

    Args:
        values: [N, K] top-K values per row, sorted descending (any float dtype; computed in fp32).
        zscore: standardize each row over its K values first (InfiFusion's "logit standardization").
        softmax: compare softmax(l^ / tau) (default); if False, compare the standardized values l^ themselves.
        temperature: tau, divides the (standardized) values before the softmax.
        eps: added to the standard deviation, as in the paper.

    Returns:
        [N, K] tensor in fp32 (fp64 inputs stay fp64).
    """
    x = _at_least_fp32(values)
    if zscore:
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + eps)
    if softmax:
        x = torch.softmax(x / temperature, dim=-1)
    return x


def uld_rows_reference(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    k: int = 10,
    zscore: bool = True,
    softmax: bool = True,
    temperature: float = 1.0,
    eps: float = 1e-7,
    tail: bool = False,
) -> torch.Tensor:
    """Per-row ULD distance d for rows that are all valid.

    Args:
        student_logits: [N, V] student logits at the aligned answer positions (fp32 or bf16).
        teacher_values: [N, Kt] teacher top-K values, sorted descending (log-probs or logits; log-probs with tail).
        k: the student's K; the effective K is min(k, Kt, V).
        tail: the tail-mass bucket variant: compare true probabilities instead of a softmax over the K values, plus
            one bucket for the mass outside the top-K. Student: ``p_i = exp(l_i - logsumexp(z))`` over the whole
            vocabulary, tail ``1 - sum p_i``; teacher: ``exp(l_s)`` of its cached log-probs, tail ``1 - sum``.
            ``d = sum_i |p_o(i) - p_s(i)| + |tail_o - tail_s|``. Needs zscore=False, softmax=True, temperature=1
            and log-prob teacher values; the gradient then reaches every logit of the row (through logsumexp).

    Returns:
        [N] fp32 distances, differentiable with respect to ``student_logits`` (the gradient is nonzero only at the
        K selected entries of each row; among tied values the lower vocabulary index is selected, see `topk_canonical`).
    """
    assert student_logits.dim() == 2 and teacher_values.dim() == 2, "expected [N, V] logits and [N, Kt] values"
    assert student_logits.shape[0] == teacher_values.shape[0], (
        f"row count differs: logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_values.shape)}"
    )
    k_eff = min(k, teacher_values.shape[1], student_logits.shape[1])
    if tail and (zscore or not softmax or temperature != 1.0):
        raise ValueError(
            f"the tail-mass bucket compares true probabilities: it needs zscore=False, softmax=True, temperature=1, "
            f"got zscore={zscore}, softmax={softmax}, temperature={temperature}"
        )
    if zscore and k_eff < 2:
        raise ValueError(f"z-score needs at least 2 values per row, got k={k_eff}")
    logits = _at_least_fp32(student_logits)
    student_top = logits.gather(1, topk_canonical(logits.detach(), k_eff))
    teacher_top = teacher_values[:, :k_eff].to(student_top.dtype)
    if tail:
        p_student = torch.exp(student_top - torch.logsumexp(logits, dim=-1, keepdim=True))
        p_teacher = torch.exp(teacher_top)
        tail_gap = (1.0 - p_student.sum(-1)) - (1.0 - p_teacher.sum(-1))
        return (p_student - p_teacher).abs().sum(dim=-1) + tail_gap.abs()
    opts = dict(zscore=zscore, softmax=softmax, temperature=temperature, eps=eps)
    p_student = standardized_probs(student_top, **opts)
    p_teacher = standardized_probs(teacher_top, **opts)
    return (p_student - p_teacher).abs().sum(dim=-1)


def uld_loss_reference(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    *,
    k: int = 10,
    zscore: bool = True,
    softmax: bool = True,
    temperature: float = 1.0,
    eps: float = 1e-7,
    tail: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """ULD loss over rows, with a mask for ignored rows and optional per-row weights.

    Args:
        student_logits: [N, V] student logits (fp32 or bf16).
        teacher_values: [N, Kt] teacher top-K values sorted descending.
        tail: the tail-mass bucket variant, see `uld_rows_reference`.
        row_mask: [N] bool, False rows are ignored (zero loss, zero gradient). None = all rows valid.
        row_weights: [N] float weights. With weights, ``reduction="sum"`` gives ``sum_i w_i d_i``; this is how the
            trainer takes "mean over a sample's positions, then mean over the batch" (w = 1 / (n_b * B)), and how
            several teachers are combined.
        reduction: "mean" (over valid rows, weights ignored unless given: then weighted mean), "sum", or "none"
            ([N], zeros at masked rows).

    Returns:
        A scalar (fp32) for "mean"/"sum", or [N] for "none".
    """
    n = student_logits.shape[0]
    if row_mask is None:
        row_mask = torch.ones(n, dtype=torch.bool, device=student_logits.device)
    idx = row_mask.nonzero(as_tuple=True)[0]
    rows = _valid_rows(idx, n)
    d_valid = uld_rows_reference(
        rows(student_logits),
        rows(teacher_values),
        k=k,
        zscore=zscore,
        softmax=softmax,
        temperature=temperature,
        eps=eps,
        tail=tail,
    )
    return reduce_rows(_scatter_rows(d_valid, idx, n), row_mask, row_weights, reduction)


def reduce_rows(
    dist: torch.Tensor, row_mask: torch.Tensor, row_weights: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """Reduce per-row distances [N] (zeros at masked rows) as every loss here documents: "none" -> [N], "sum"
    (weighted when ``row_weights`` [N] is given), "mean" (over valid rows; weighted mean with weights). The
    kernels' wrappers (fusion_cache/train/losses.py) reduce with this same function."""
    if reduction == "none":
        return dist
    w = None if row_weights is None else torch.where(row_mask, row_weights.to(dist.dtype), torch.zeros_like(dist))
    if reduction == "sum":
        return dist.sum() if w is None else (w * dist).sum()
    if reduction == "mean":
        n_valid = int(row_mask.sum())
        if n_valid == 0:
            return dist.sum() * 0.0  # keeps the graph: backward() gives zero gradients instead of failing
        return dist.sum() / n_valid if w is None else (w * dist).sum() / w.sum().clamp_min(1e-12)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _valid_rows(idx: torch.Tensor, n: int):
    """Row selection for the valid rows ``idx`` of an [N, ...] tensor: the tensor itself when every row is valid.

    Why: indexing copies the [N, V] logits in the forward and adds a dense [N, V] scatter in the backward (2.5 GB
    each at N=4096, V=151936); the gradient is the same either way."""
    if idx.numel() == n:
        return lambda t: t
    return lambda t: t[idx]


def _scatter_rows(d_valid: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """[N] distances: ``d_valid`` at rows ``idx``, zeros elsewhere (masked rows are never computed)."""
    return torch.zeros(n, dtype=d_valid.dtype, device=d_valid.device).index_put((idx,), d_valid)


def topk_kl_rows_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    k: int | None = None,
    tail: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row forward KL(teacher || student) over the teacher's top-K tokens, for students that share the
    teacher's vocabulary (the identity-aware counterpart of ULD; DistillKit's and Megatron's sparse KD loss).

    With ``tail`` the K tokens plus one "everything else" bucket form a proper distribution on both sides, so the
    result is a true KL (>= 0, 0 iff the student matches the teacher on that partition):

        p_i = exp(teacher_logprobs_i),  q_i = softmax(student_logits)[teacher_ids_i]   for i < K
        p_tail = 1 - sum_i p_i,          q_tail = 1 - sum_i q_i
        d = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

    Without ``tail`` the teacher's top-K is renormalized (p^) and compared with the student's log-probs at those ids:
    ``sum_i p^_i (log p^_i - log q_i) = KL(p^ || q^) - log(sum_i q_i)`` (q^: the student renormalized on the same ids),
    minimized by a student that puts all its mass on the teacher's top-K in the teacher's proportions.

    Args:
        student_logits: [N, V] (fp32/bf16; computed in fp32).
        teacher_ids: [N, Kt] int64 token ids of the teacher's top-K, in the student's vocabulary.
        teacher_logprobs: [N, Kt] the teacher's log-probs of those tokens (true log-probs: full-vocabulary softmax).
        k: use the teacher's first k entries (None: all Kt).
        temperature: KD temperature T. The cached log-probs are at T=1 (vLLM), so the teacher side is rescaled:
            p_T proportional to p^(1/T) over the cached ids plus, with ``tail``, the tail bucket taken as one
            outcome (p_tail^(1/T): the cache keeps only the tail's total, not its split); the student's logits are
            divided by T. The T^2 gradient factor is not applied here (the caller's choice, `train.losses.TopKKL`).

    Returns:
        [N] per-row divergences.
    """
    if temperature != 1.0:
        student_logits, teacher_logprobs = _tempered(
            student_logits, teacher_ids, teacher_logprobs, k, tail, temperature
        )
    kt = teacher_ids.shape[1]
    k_eff = kt if k is None else min(k, kt)
    logits = _at_least_fp32(student_logits)
    log_q_all = torch.log_softmax(logits, dim=-1)
    ids = teacher_ids[:, :k_eff].long()
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= logits.shape[1]):
        raise ValueError(
            f"teacher_ids must lie in the student's vocabulary [0, {logits.shape[1]}) or be -1 (padding), got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    present = ids >= 0  # -1: a padding slot (a carried target with fewer distinct student ids than K)
    log_q = torch.where(present, log_q_all.gather(1, ids.clamp_min(0)), torch.zeros((), dtype=log_q_all.dtype))
    log_p = torch.where(present, teacher_logprobs[:, :k_eff].to(log_q.dtype), -torch.inf)
    p = log_p.exp()  # 0 at padding
    if not tail:
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        return torch.where(present, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    kl = torch.where(present, p * (log_p - log_q), 0.0).sum(-1)
    tiny = torch.finfo(log_q.dtype).tiny
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - torch.where(present, log_q.exp(), 0.0).sum(-1)).clamp_min(tiny)
    return kl + torch.xlogy(p_tail, p_tail) - p_tail * torch.log(q_tail)


def _tempered(student_logits, teacher_ids, teacher_logprobs, k, tail, temperature):
    """(student_logits / T, the teacher's log-probs at T) for `topk_kl_rows_reference` (see its docstring)."""
    k_eff = teacher_ids.shape[1] if k is None else min(k, teacher_ids.shape[1])
    log_p = _at_least_fp32(teacher_logprobs[:, :k_eff])
    log_p = torch.where(teacher_ids[:, :k_eff] >= 0, log_p, -torch.inf) / temperature  # padding stays at p = 0
    if tail:  # the tail bucket is one more outcome of the tempered distribution
        p_tail = 1.0 - (log_p * temperature).exp().sum(-1, keepdim=True)
        # rounding residue of 1 - sum (about K ulps) is no tail: raised to 1/T > 1 it would become real mass
        p_tail = torch.where(p_tail > k_eff * torch.finfo(log_p.dtype).eps, p_tail, 0.0)
        log_p = torch.cat([log_p, torch.log(p_tail) / temperature], dim=-1)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    log_p = log_p[:, :k_eff]  # the tail is recomputed from the renormalized top-K as 1 - sum
    return _at_least_fp32(student_logits) / temperature, log_p


def hybrid_rows_reference(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-row GOLD-style hybrid across vocabularies: KL on the teacher tokens that exist in the student's
    vocabulary plus sorted L1 on the rest.

    For one row, with the teacher's cached top-K split into the tokens matched to a student id (``teacher_ids >=
    0``, each id at most once) and the unmatched ones (-1):

        d = sum_{i matched} p_i (log p_i - log q_{id_i})                      (identity kept where it exists)
          + sum_j | sort_desc(p_unmatched)_j - sort_desc(q without the matched ids)_j |   (ULD on the rest)

    with p the teacher's probabilities and q = softmax(student_logits); the sorted part compares as many entries
    as the teacher has unmatched (padded with zeros), the student's largest probabilities outside the matched ids.

    Args:
        student_logits: [N, V]; teacher_ids: [N, K] student ids of exact matches, -1 where unmatched;
        teacher_logprobs: [N, K] the teacher's log-probs (true log-probs of the full softmax).

    Returns:
        [N] distances (>= 0 up to the KL's sign on a partial support).
    """
    logits = _at_least_fp32(student_logits)
    log_q_all = torch.log_softmax(logits, dim=-1)
    ids = teacher_ids.long()
    matched = ids >= 0
    log_p = teacher_logprobs.to(log_q_all.dtype)
    p = log_p.exp()
    log_q = log_q_all.gather(1, ids.clamp_min(0))
    kl = torch.where(matched, p * (log_p - log_q), 0.0).sum(-1)
    k = ids.shape[1]
    q = log_q_all.exp()
    # the student's mass outside the matched ids: those ids are removed before its largest entries are taken
    removed = torch.zeros_like(q, dtype=torch.bool).scatter(1, ids.clamp_min(0), matched)
    q_rest = torch.where(removed, torch.zeros((), dtype=q.dtype), q)
    q_top = q_rest.gather(1, topk_canonical(q_rest.detach(), min(k, q.shape[1])))
    p_rest = torch.sort(torch.where(matched, 0.0, p), dim=-1, descending=True).values
    n_rest = (~matched).sum(-1, keepdim=True)
    slot = torch.arange(q_top.shape[1], device=q.device)[None, :] < n_rest
    l1 = torch.where(slot, (p_rest[:, : q_top.shape[1]] - q_top).abs(), 0.0).sum(-1)
    return kl + l1


def topk_kl_loss_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    *,
    k: int | None = None,
    tail: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """`topk_kl_rows_reference` over rows, with the same mask, weights and reductions as `uld_loss_reference`."""
    n = student_logits.shape[0]
    if row_mask is None:
        row_mask = torch.ones(n, dtype=torch.bool, device=student_logits.device)
    idx = row_mask.nonzero(as_tuple=True)[0]
    rows = _valid_rows(idx, n)
    d_valid = topk_kl_rows_reference(rows(student_logits), rows(teacher_ids), rows(teacher_logprobs), k=k, tail=tail)
    return reduce_rows(_scatter_rows(d_valid, idx, n), row_mask, row_weights, reduction)


def sampled_kl_rows_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    counts: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row importance-weighted forward KL(teacher_T || student_T) from N tokens drawn from the teacher (RS-KD,
    Anshumann et al., ACL 2025), for students that share the teacher's vocabulary.

    A row holds the U <= N distinct draws x_i of the proposal q = p (the teacher at T=1), with counts c_i summing to
    N and the teacher's log-probs log p_i. The target p_T is proportional to p^(1/T); its self-normalised importance
    weights over the drawn support and the estimate of its normaliser Z_T = sum_v p_v^(1/T) = E_p[p^(1/T - 1)] are

        w_i = c_i p_i^(1/T - 1) / sum_j c_j p_j^(1/T - 1),      Z^ = (1/N) sum_j c_j p_j^(1/T - 1)
        d   = sum_i w_i (log p_i / T - log Z^ - log s_T(x_i)),   s_T = softmax(student_logits / T)

    At T = 1 the weights are c_i / N and Z^ = 1 exactly: d is an unbiased estimate of KL(p || s) and its gradient,
    (s - c / N) with respect to the logits, an unbiased estimate of the full-vocabulary KL gradient (s - p): the
    expectation of the empirical distribution c / N is p. At T != 1 the self-normalisation makes both consistent
    with an O(1/N) bias (the ratio of two unbiased estimates). The T^2 gradient factor is the caller's
    (`train.losses.SampledKL`).

    Args:
        student_logits: [N, V] (fp32/bf16; computed in fp32, fp64 stays fp64).
        teacher_ids: [N, U] int64 drawn ids in the student's vocabulary; -1 in padding slots (count 0).
        teacher_logprobs: [N, U] the teacher's T=1 log-probs of those ids (any value in padding slots).
        counts: [N, U] draws of each id (0 in padding slots); every row has at least one draw.
        temperature: KD temperature T.

    Returns:
        [N] per-row estimates (not necessarily >= 0: an estimate of a KL, not a KL).
    """
    logits = _at_least_fp32(student_logits)
    ids = teacher_ids.long()
    c = counts.to(logits.dtype)
    present = c > 0
    if ids.numel() and (bool((present & (ids < 0)).any()) or int(ids.max()) >= logits.shape[1]):
        raise ValueError(
            f"teacher_ids of drawn tokens must lie in the student's vocabulary [0, {logits.shape[1]}), got range "
            f"[{int(ids[present].min())}, {int(ids[present].max())}] (a draw with no student id: use the carried form)"
        )
    t = temperature
    log_s = torch.log_softmax(logits / t, dim=-1).gather(1, ids.clamp_min(0))  # [N, U]
    log_p = torch.where(present, teacher_logprobs.to(logits.dtype), 0.0)
    log_w = torch.where(present, torch.log(c) + (1.0 / t - 1.0) * log_p, -torch.inf)
    lse = torch.logsumexp(log_w, dim=-1, keepdim=True)
    w = (log_w - lse).exp()  # 0 at padding
    log_z = lse - torch.log(c.sum(-1, keepdim=True))
    return torch.where(present, w * (log_p / t - log_z - log_s), 0.0).sum(-1)


def sampled_weights_reference(teacher_logprobs: torch.Tensor, counts: torch.Tensor, temperature: float = 1.0):
    """log of the self-normalised importance weights w_i of `sampled_kl_rows_reference` ([N, U]; -inf in padding
    slots): the mass each drawn teacher token carries onto a student of another tokenizer (`train.vocab.carry`)."""
    c = counts.double()
    present = c > 0
    log_p = torch.where(present, teacher_logprobs.double(), 0.0)
    log_w = torch.where(present, torch.log(c) + (1.0 / temperature - 1.0) * log_p, -torch.inf)
    return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)


def carried_sampled_kl_rows_reference(
    student_logits: torch.Tensor,
    student_ids: torch.Tensor,
    log_mass: torch.Tensor,
    outside: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row `sampled_kl_rows_reference` for a student of another tokenizer: the draws' importance weights
    carried onto student ids (`train.vocab.carry` of `sampled_weights_reference`), the weight of draws that map to
    no student token in a remainder bucket.

        d = sum_j m_j (log m_j - log s_T(j)) + m_rem (log m_rem - log s_T(R)),   m_rem = 1 - sum_j m_j

    where R is the student tokens that no teacher token maps to (``outside``), less the row's own ids: the student
    side of "a token the map cannot name". With R fixed by the map (not by the row's draws, as a top-K tail bucket
    would be), the gradient is linear in the carried weights, so at T=1 its expectation over the draws is the
    gradient against the teacher's full distribution carried the same way (rows on a shared token boundary). A
    row whose R is empty (every student token is some teacher token's image) drops the remainder term: no student
    token stands for those draws.

    Args:
        student_logits: [N, V]. student_ids: [N, K] int64 carried student ids, -1 in empty slots.
        log_mass: [N, K] log carried weights (-inf in empty slots), summing to at most 1 per row.
        outside: bool [V'] (V' <= V; ids V'..V-1 count as outside), True for student tokens outside the map's image.
        temperature: KD temperature T: the weights are already tempered, so only the student's logits are divided.

    Returns:
        [N] per-row values (the T^2 factor is the caller's).
    """
    logits = _at_least_fp32(student_logits) / temperature
    n, v = logits.shape
    if outside.numel() < v:
        outside = torch.cat([outside.bool(), outside.new_ones(v - outside.numel(), dtype=torch.bool)])
    log_s_all = torch.log_softmax(logits, dim=-1)
    ids = student_ids.long()
    present = (ids >= 0) & (log_mass > -torch.inf)  # a slot of zero weight is an empty one
    log_s = log_s_all.gather(1, ids.clamp_min(0))
    log_m = torch.where(present, log_mass.to(logits.dtype), -torch.inf)
    m = log_m.exp()
    kl = torch.where(present, m * (log_m - log_s), 0.0).sum(-1)
    taken = torch.zeros(n, v, dtype=torch.int32, device=logits.device).scatter_add(
        1, ids.clamp_min(0), present.to(torch.int32)
    )
    rem_mask = outside[None, :].to(logits.device) & (taken == 0)
    log_rem = torch.logsumexp(torch.where(rem_mask, log_s_all, -torch.inf), dim=-1)
    m_rem = (1.0 - m.sum(-1)).clamp_min(0.0)
    use = (m_rem > 0) & torch.isfinite(log_rem)
    rem = torch.where(use, torch.xlogy(m_rem, m_rem) - m_rem * torch.where(use, log_rem, 0.0), 0.0)
    return kl + rem
