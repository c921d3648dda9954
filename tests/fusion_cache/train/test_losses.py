"""The loss registry: names, auto, per-teacher checks, and each loss's per-row distances (gradcheck)."""

from __future__ import annotations

import pytest
import torch

from fusion_cache.errors import ConfigError
from fusion_cache.train import losses


def test_registry_names_and_auto():
    from fusion_cache.cache.codecs import make_codec
    from fusion_cache.errors import ConfigError

    assert losses.LOSS_CHOICES == ("uld", "kl", "kl_notail", "mapped_kl", "hybrid", "rs_kl", "auto")
    assert set(losses.LOSSES) == {"uld", "kl", "kl_notail", "mapped_kl", "hybrid", "rs_kl"}
    raw = make_codec("raw")
    same, other = losses.TeacherTraits("a", True, raw), losses.TeacherTraits("b", False, raw)
    assert losses.resolve_loss_names(["auto"], [same, other]) == ["kl", "mapped_kl"]
    assert losses.resolve_loss_names(["uld"], [same, other]) == ["uld", "uld"]
    with pytest.raises(ConfigError, match="one per cache"):
        losses.resolve_loss_names(["kl", "uld", "kl"], [same, other])
    valid = "uld, kl, kl_notail, mapped_kl, hybrid, rs_kl"
    with pytest.raises(ConfigError, match=f"kd_loss: unknown value 'mse'; valid values: {valid}"):
        losses.make_loss("mse")
    assert losses.make_loss("uld", k=7, tail=True, zscore=False) == losses.ULD(k=7, zscore=False, tail=True)
    assert losses.make_loss("kl", k=7) == losses.TopKKL()  # options it does not take are ignored
    with pytest.raises(ConfigError, match="kd_loss 'kl' for teacher b: it needs the teacher's token ids"):
        losses.TopKKL().check(other)


def test_shape_caches_refuse_losses_that_need_log_probs():
    from fusion_cache.cache.codecs import make_codec
    from fusion_cache.errors import ConfigError

    shape = losses.TeacherTraits("t", False, make_codec("shape"))
    values = losses.TeacherTraits("t", True, make_codec("values"))
    losses.ULD().check(shape)  # the z-scored ULD loss is fine
    for loss, flag in (
        (losses.ULD(zscore=False), "--no-zscore"),
        (losses.ULD(zscore=False, tail=True), "--tail"),
        (losses.TopKKL(), "--kd-loss kl"),
    ):
        with pytest.raises(ConfigError, match=f"{flag}.*'shape' cache stores only the standardized shape"):
            loss.check(shape if flag != "--kd-loss kl" else losses.TeacherTraits("t", True, make_codec("shape")))
        if flag != "--kd-loss kl":
            loss.check(values)  # true log-probs: allowed here


@pytest.mark.parametrize("name", ["uld", "kl", "kl_notail", "mapped_kl", "hybrid"])
def test_each_loss_rows_are_nonnegative_and_differentiable(name):
    torch.manual_seed(0)
    logits = torch.randn(5, 50, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(50)[:6] for _ in range(5)])
    values = torch.log_softmax(torch.randn(5, 50, dtype=torch.float64), -1).gather(1, ids)
    values, order = values.sort(dim=-1, descending=True)
    target = {"values": values, "ids": ids.gather(1, order)}
    loss = losses.make_loss(name, k=6)
    d = loss.rows(logits, target)
    assert d.shape == (5,) and (name == "hybrid" or bool((d >= -1e-9).all()))  # hybrid: KL on a partial support
    assert torch.autograd.gradcheck(lambda z: loss.rows(z, target), (logits,))


def test_mapped_kl_with_padding_equals_the_kl_over_the_carried_support():
    """kl rows with -1 padding: sum over the present ids of p (log p - log q) plus the tail bucket, by hand."""
    from fusion_cache.kernels.reference import topk_kl_rows_reference

    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    q = torch.softmax(logits, -1)[0]
    ids = torch.tensor([[4, 0, -1, -1]])
    p = torch.tensor([0.5, 0.3])
    values = torch.tensor([[0.5, 0.3, 0.0, 0.0]], dtype=torch.float64).log()  # -inf at padding
    got = topk_kl_rows_reference(logits, ids, values, tail=True)
    p_tail, q_tail = 1 - p.sum(), 1 - q[[4, 0]].sum()
    want = (p * (p.log() - q[[4, 0]].log())).sum() + p_tail * (p_tail.log() - q_tail.log())
    torch.testing.assert_close(got, want[None].to(got.dtype))
    assert torch.autograd.gradcheck(lambda z: topk_kl_rows_reference(z, ids, values), (logits.requires_grad_(),))
    with pytest.raises(ValueError, match="or be -1"):
        topk_kl_rows_reference(logits, torch.tensor([[4, -2, 0, 1]]), values)


def test_hybrid_is_kl_on_matched_plus_sorted_l1_on_the_rest():
    from fusion_cache.kernels.reference import hybrid_rows_reference

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 0.2]], dtype=torch.float64)
    q = torch.softmax(logits, -1)[0]
    ids = torch.tensor([[1, -1, 3, -1]])  # the teacher's 1st and 3rd candidates exist in the student's vocabulary
    p = torch.tensor([0.4, 0.3, 0.2, 0.05], dtype=torch.float64)
    got = hybrid_rows_reference(logits, ids, p.log()[None])
    kl = 0.4 * (0.4 / q[1]).log() + 0.2 * (0.2 / q[3]).log()
    rest_q = torch.sort(q[[0, 2, 4, 5]], descending=True).values[:2]  # the student's largest outside ids 1, 3
    want = kl + (torch.tensor([0.3, 0.05], dtype=torch.float64) - rest_q).abs().sum()
    torch.testing.assert_close(got, want[None])
    assert torch.autograd.gradcheck(lambda z: hybrid_rows_reference(z, ids, p.log()[None]), (logits.requires_grad_(),))
    # every candidate matched: plain KL on them; none matched: sorted L1 only (ULD without the z-score)
    all_ids = torch.tensor([[0, 1, 2, 3]])
    torch.testing.assert_close(hybrid_rows_reference(logits, all_ids, p.log()[None]),
                               (p * (p.log() - q[:4].log())).sum()[None])  # fmt: skip
    none = hybrid_rows_reference(logits, torch.full((1, 4), -1), p.log()[None])
    torch.testing.assert_close(none, (p - torch.sort(q, descending=True).values[:4]).abs().sum()[None])


def test_auto_and_checks_for_the_cross_tokenizer_losses():
    from fusion_cache.cache.codecs import make_codec
    from fusion_cache.errors import ConfigError

    raw, values = make_codec("raw"), make_codec("values")
    other = losses.TeacherTraits("b", False, raw)
    assert losses.resolve_loss_names(["auto"], [other, losses.TeacherTraits("v", False, values)]) == [
        "mapped_kl",
        "uld",
    ]
    losses.make_loss("mapped_kl").check(other)
    losses.make_loss("hybrid").check(other)
    for name in ("mapped_kl", "hybrid"):
        with pytest.raises(ConfigError, match=f"kd_loss '{name}' for teacher v: a 'values' cache stores no token ids"):
            losses.make_loss(name).check(losses.TeacherTraits("v", False, values))
    assert [losses.LOSSES[n].target for n in ("uld", "kl", "mapped_kl", "hybrid")] == [
        "values", "values", "carried", "exact"]  # fmt: skip


# ---- KD temperature


def _dense_kl_at(teacher_logits, student_logits, t):
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per row, on full logits [N, V]."""
    log_p = torch.log_softmax(teacher_logits / t, -1)
    return t**2 * (log_p.exp() * (log_p - torch.log_softmax(student_logits / t, -1))).sum(-1)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_kl_at_temperature_with_the_whole_vocabulary_cached_is_the_dense_kl(t):
    torch.manual_seed(0)
    zt, zs = torch.randn(5, 11) * 3, torch.randn(5, 11, requires_grad=True)
    log_p1 = torch.log_softmax(zt, -1)  # what the cache holds: log-probs at T=1, every token
    lp, ids = log_p1.sort(-1, descending=True)
    got = losses.make_loss("kl", kd_temperature=t).rows(zs, {"ids": ids, "values": lp})
    want = _dense_kl_at(zt, zs, t)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    (g_want,) = torch.autograd.grad(_dense_kl_at(zt, zs, t).sum(), zs)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_kl_at_temperature_on_a_top_k_cut_is_the_tempered_partition_kl(t):
    torch.manual_seed(1)
    k = 4
    zt, zs = torch.randn(6, 13) * 2, torch.randn(6, 13, requires_grad=True)
    lp, ids = torch.log_softmax(zt, -1).topk(k, -1)
    got = losses.make_loss("kl", kd_temperature=t).rows(zs, {"ids": ids, "values": lp})
    # by hand: the K cached probabilities and the tail total, each raised to 1/T and renormalised
    p1 = lp.exp()
    parts = torch.cat([p1, 1 - p1.sum(-1, keepdim=True)], -1) ** (1 / t)
    p = parts / parts.sum(-1, keepdim=True)
    q_k = torch.softmax(zs / t, -1).gather(1, ids)
    q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    want = t**2 * (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    (g_want,) = torch.autograd.grad(want.sum(), zs)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_kd_temperature_is_refused_by_losses_without_a_tempered_form():
    from fusion_cache.cache.codecs import make_codec

    teacher = losses.TeacherTraits("t0", True, make_codec("raw"), 8)
    for name in ("uld", "hybrid"):
        with pytest.raises(ConfigError, match="kd_temperature=2.0"):
            losses.make_loss(name, kd_temperature=2.0).check(teacher)


@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
def test_kl_notail_at_temperature_is_the_kl_of_the_renormalised_tempered_top_k(t):
    torch.manual_seed(2)
    k = 4
    zt, zs = torch.randn(6, 13) * 2, torch.randn(6, 13, requires_grad=True)
    lp, ids = torch.log_softmax(zt, -1).topk(k, -1)
    got = losses.make_loss("kl_notail", kd_temperature=t).rows(zs, {"ids": ids, "values": lp})
    # by hand: p^(1/T) over the K cached ids, renormalised; the student's log-probs at T on those ids
    p = torch.softmax(lp / t, -1)
    want = t**2 * (p * (p.log() - torch.log_softmax(zs / t, -1).gather(1, ids))).sum(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    (g_want,) = torch.autograd.grad(want.sum(), zs)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def _carried(p_teacher: torch.Tensor, to_student: list[int]):
    """(ids, log-probs) [N, Kt] of the teacher's distribution [N, Vt] carried through ``to_student`` (teacher id ->
    student id, -1: unmapped) by `train.vocab.carry` at token boundaries: the mapped mass summed per student id."""
    import numpy as np

    from fusion_cache.train.vocab import VocabMap
    from fusion_cache.train.vocab import carry

    n, vt = p_teacher.shape
    vmap = VocabMap(np.array(to_student, np.int32), np.zeros(vt, np.uint8), [b"t"] * vt, [b"s"])
    ends = np.arange(n)  # one teacher row per student row, each at a boundary
    ids = np.tile(np.arange(vt), (n, 1))
    c = carry(vmap, ends, ends, ids, np.log(p_teacher.double().numpy()), b"x" * n)
    assert c.student_rows.tolist() == list(range(n))
    return torch.as_tensor(c.ids.astype(np.int64)), torch.as_tensor(c.logprobs)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_mapped_kl_at_temperature_with_every_teacher_token_mapped_is_the_dense_kl_of_the_carried_distribution(t):
    """Every teacher token maps (many to one): the carried distribution is dense, p_c[j] = sum_{i -> j} p[i]; at T the
    loss is T^2 KL(p_c^(1/T) / Z || softmax(z_s / T)), the same formula as `kl` on full logits."""
    torch.manual_seed(3)
    vs, to_student = 5, [0, 1, 2, 3, 4, 0, 1, 2, 4]  # 9 teacher tokens onto 5 student tokens
    zt, zs = torch.randn(4, len(to_student)) * 2, torch.randn(4, vs, requires_grad=True)
    ids, lp = _carried(torch.softmax(zt, -1), to_student)
    got = losses.make_loss("mapped_kl", kd_temperature=t).rows(zs, {"ids": ids, "values": lp})
    p_c = torch.zeros(4, vs).index_add_(1, torch.tensor(to_student), torch.softmax(zt, -1))
    want = _dense_kl_at(p_c.log(), zs, t)  # log p_c as "logits": softmax(log p_c / T) = p_c^(1/T) / Z
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    (g_want,) = torch.autograd.grad(_dense_kl_at(p_c.log(), zs, t).sum(), zs)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_mapped_kl_at_temperature_with_unmapped_tokens_is_the_tempered_kl_over_carried_ids_and_tail(t):
    """Unmapped teacher tokens go to the tail: at T the carried ids and the tail total are each raised to 1/T and
    renormalised, against the student's softmax at T on the same partition."""
    torch.manual_seed(4)
    vs, to_student = 6, [0, 1, 2, 0, -1, -1, 3]  # tokens 4 and 5 map nowhere; student ids 4, 5 receive nothing
    zt, zs = torch.randn(3, len(to_student)) * 2, torch.randn(3, vs, requires_grad=True)
    ids, lp = _carried(torch.softmax(zt, -1), to_student)
    got = losses.make_loss("mapped_kl", kd_temperature=t).rows(zs, {"ids": ids, "values": lp})
    p_c = torch.zeros(3, vs).index_add_(1, torch.tensor([j if j >= 0 else 4 for j in to_student]),
                                        torch.softmax(zt, -1))[:, :5]  # fmt: skip  # column 4: the tail
    parts = p_c ** (1 / t)
    p = parts / parts.sum(-1, keepdim=True)
    q_all = torch.softmax(zs / t, -1)
    q = torch.cat([q_all[:, :4], 1 - q_all[:, :4].sum(-1, keepdim=True)], -1)
    want = t**2 * (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    (g_want,) = torch.autograd.grad(want.sum(), zs)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


# ---- rs_kl: the importance-weighted KL of a sampled cache (RS-KD)
def test_rs_kl_is_the_only_loss_of_a_sampled_cache_and_needs_one():
    from fusion_cache.cache.codecs import make_codec

    sampled, topk = make_codec("sampled", vocab_size=50, samples=6), make_codec("full", vocab_size=50)
    same, other = losses.TeacherTraits("s", True, sampled), losses.TeacherTraits("o", False, sampled)
    assert losses.resolve_loss_names(["auto"], [same, other]) == ["rs_kl", "rs_kl"]
    losses.SampledKL().check(same)
    losses.SampledKL().check(other)
    for name in ("uld", "kl", "kl_notail", "mapped_kl", "hybrid"):
        with pytest.raises(ConfigError, match=f"kd_loss '{name}' for teacher s: its cache holds tokens sampled"):
            losses.make_loss(name).check(same)
    with pytest.raises(ConfigError, match="kd_loss 'rs_kl' for teacher t: .* holds a top-K, not sampled tokens"):
        losses.SampledKL().check(losses.TeacherTraits("t", True, topk))


def test_rs_kl_same_tokenizer_rows_by_hand():
    """Draws 0, 0, 2 (N=3) of a 4-token vocabulary: at T=1 the estimate is sum_i (c_i / N)(log p_i - log s_i)."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    log_p = torch.tensor([[-0.3, -1.9, -9.0]], dtype=torch.float64)  # slot 2 is padding: any value
    target = {"ids": torch.tensor([[0, 2, -1]]), "values": log_p, "counts": torch.tensor([[2.0, 1.0, 0.0]])}
    log_s = torch.log_softmax(logits.detach(), -1)[0]
    want = 2 / 3 * (-0.3 - log_s[0]) + 1 / 3 * (-1.9 - log_s[2])
    d = losses.SampledKL().rows(logits, target)
    torch.testing.assert_close(d, want.reshape(1))
    d.sum().backward()  # the gradient is s - c / N, the empirical distribution's
    torch.testing.assert_close(logits.grad[0], log_s.exp() - torch.tensor([2 / 3, 0, 1 / 3, 0], dtype=torch.float64))
    t = 2.0  # tempered: the self-normalised weights c p^(1/T - 1), times T^2
    w = torch.tensor([2.0, 1.0], dtype=torch.float64) * torch.exp(torch.tensor([-0.3, -1.9], dtype=torch.float64)
                                                                  * (1 / t - 1))  # fmt: skip
    log_z = torch.log(w.sum() / 3)
    w = w / w.sum()
    log_st = torch.log_softmax(logits.detach() / t, -1)[0]
    want_t = t**2 * (w[0] * (-0.3 / t - log_z - log_st[0]) + w[1] * (-1.9 / t - log_z - log_st[2]))
    torch.testing.assert_close(losses.SampledKL(kd_temperature=t).rows(logits, target), want_t.reshape(1))


class _Map:
    """The one thing `SampledKL.with_map` reads of a `train.vocab.VocabMap`: the student tokens outside its image."""

    def __init__(self, outside):
        self._outside = outside

    def outside(self):
        import numpy as np

        return np.asarray(self._outside, dtype=bool)


def test_rs_kl_carried_rows_by_hand_and_gradcheck():
    """Carried weights 0.5 and 0.3 on student ids 1 and 3; the missing 0.2 (draws with no student token) goes to the
    student's mass on the tokens outside the map's image (id 4), not to 'every id but 1 and 3'."""
    loss = losses.SampledKL().with_map(_Map([False, False, False, False, True]))
    logits = torch.tensor([[0.2, 1.0, -0.5, 0.3, -1.0]], dtype=torch.float64, requires_grad=True)
    target = {"ids": torch.tensor([[1, 3, -1]]), "values": torch.tensor([[0.5, 0.3, 1.0]]).log()}
    target["values"][0, 2] = -torch.inf
    s = torch.softmax(logits.detach(), -1)[0]
    want = 0.5 * torch.log(0.5 / s[1]) + 0.3 * torch.log(0.3 / s[3]) + 0.2 * torch.log(0.2 / s[4])
    torch.testing.assert_close(loss.rows(logits, target), want.reshape(1).double())
    assert torch.autograd.gradcheck(lambda z: loss.rows(z, target), (logits,))
    without = losses.SampledKL()  # no map: mapped_kl's row-wise tail (every id but 1 and 3)
    rest = s[0] + s[2] + s[4]
    want_tail = 0.5 * torch.log(0.5 / s[1]) + 0.3 * torch.log(0.3 / s[3]) + 0.2 * torch.log(0.2 / rest)
    torch.testing.assert_close(without.rows(logits, target).double(), want_tail.reshape(1), rtol=1e-5, atol=1e-6)


def test_auto_picks_uld_for_a_foreign_teacher_whose_tokenizer_was_not_found():
    from fusion_cache.cache.codecs import make_codec

    full = make_codec("full", vocab_size=50)
    found, lost = losses.TeacherTraits("f", False, full), losses.TeacherTraits("l", False, full, tokenizer_found=False)
    assert losses.resolve_loss_names(["auto"], [found, lost]) == ["mapped_kl", "uld"]
    same = losses.TeacherTraits("s", True, full, tokenizer_found=False)  # its ids are the student's: no map needed
    assert losses.resolve_loss_names(["auto"], [same]) == ["kl"]
