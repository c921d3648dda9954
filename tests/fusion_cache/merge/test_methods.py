"""Each merge method against its formula, written out directly on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_cache.merge import methods


def _topk_ref(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = round(density * n) largest magnitudes (argsort; inputs have distinct magnitudes)."""
    k = max(1, round(density * t.numel()))
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().argsort(descending=True)[:k]] = True
    return torch.where(keep.view_as(t), t, 0.0)


def _ties_ref(tau: torch.Tensor, density: float, election: str) -> torch.Tensor:
    trimmed = [_topk_ref(t, density) for t in tau]
    out = torch.zeros_like(tau[0]).reshape(-1)
    for i in range(out.numel()):
        vals = [float(t.reshape(-1)[i]) for t in trimmed]
        votes = sum(vals) if election == "sum" else sum(math.copysign(1, v) for v in vals if v != 0)
        sign = 1.0 if votes >= 0 else -1.0
        agree = [v for v in vals if v != 0 and math.copysign(1, v) == sign]
        out[i] = sum(agree) / len(agree) if agree else 0.0
    return out.view_as(tau[0])


def _distinct(shape, seed) -> torch.Tensor:
    """Random values with distinct magnitudes (no ties at the top-k threshold)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mags = (torch.randperm(n, generator=g).float() + 1) / n
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (mags * signs).view(shape)


def test_task_arithmetic_is_alpha_times_sum():
    tau = torch.randn(3, 4, 5)
    torch.testing.assert_close(methods.task_arithmetic(tau, alpha=0.3), 0.3 * (tau[0] + tau[1] + tau[2]))


def test_magnitude_mask_keeps_top_fraction():
    t = _distinct((7, 9), 0)
    for density in (0.1, 0.5, 0.6, 1.0):
        torch.testing.assert_close(torch.where(methods.magnitude_mask(t, density), t, 0.0), _topk_ref(t, density))


@pytest.mark.parametrize("election", ["sum", "count"])
@pytest.mark.parametrize("density", [0.3, 0.6, 1.0])
def test_ties_matches_formula(election, density):
    tau = torch.stack([_distinct((6, 5), s) for s in range(3)])
    torch.testing.assert_close(
        methods.ties(tau, density=density, sign_election=election), _ties_ref(tau, density, election)
    )


def test_ties_sign_election_by_hand():
    # entry 0: +0.9 vs -0.2 -0.3 -> sum elects +, count elects -; entry 1: all agree; entry 2: all zero
    tau = torch.tensor([[0.9, 0.1, 0.0], [-0.2, 0.3, 0.0], [-0.3, 0.2, 0.0]])
    torch.testing.assert_close(methods.ties(tau, density=1.0, sign_election="sum"), torch.tensor([0.9, 0.2, 0.0]))
    torch.testing.assert_close(methods.ties(tau, density=1.0, sign_election="count"), torch.tensor([-0.25, 0.2, 0.0]))
    torch.testing.assert_close(methods.ties(tau, density=1.0, alpha=0.5), torch.tensor([0.45, 0.1, 0.0]))


@pytest.mark.parametrize("method", ["ties", "dare", "sce", "task_arithmetic"])
def test_all_zero_task_vectors_give_zero(method):
    tau = torch.zeros(2, 4, 3)
    out = getattr(methods, method)(tau)
    assert out.shape == (4, 3) and torch.count_nonzero(out) == 0
    out = methods.rsaf(tau, torch.randn(4, 3), rate_refs=[0.0, 0.0])
    assert torch.count_nonzero(out) == 0


def test_dare_is_deterministic_under_a_seed_and_name():
    tau = torch.randn(2, 50, 40)
    a = methods.dare(tau, drop_rate=0.5, seed=3, name="w")
    torch.testing.assert_close(a, methods.dare(tau, drop_rate=0.5, seed=3, name="w"), rtol=0, atol=0)
    assert not torch.equal(a, methods.dare(tau, drop_rate=0.5, seed=4, name="w"))
    assert not torch.equal(a, methods.dare(tau, drop_rate=0.5, seed=3, name="v"))


def test_dare_drop_formula_and_expectation():
    t = torch.randn(200, 100)
    g = torch.Generator().manual_seed(0)
    d = methods.dare_drop(t, 0.9, g)
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01  # drop probability p
    torch.testing.assert_close(d[kept], t[kept] / 0.1)  # survivors rescaled by 1/(1-p)
    # E[drop(tau)] = tau: the mean over many seeds converges (std of the mean ~ |t| * sqrt(p/(1-p)/n))
    tau = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    mean = torch.stack([methods.dare(tau, drop_rate=0.5, alpha=1.0, seed=s, name="x") for s in range(2000)]).mean(0)
    torch.testing.assert_close(mean, tau[0], atol=0.25, rtol=0)  # ~3.7 sigma for the largest entry
    torch.testing.assert_close(methods.dare(tau, drop_rate=0.0, alpha=0.3), methods.task_arithmetic(tau, alpha=0.3))


def _sce_ref(tau: torch.Tensor, select_topk: float) -> torch.Tensor:
    s = tau.shape[0]
    var = tau.var(0, unbiased=False).reshape(-1)
    k = int(int((var != 0).sum()) * select_topk)
    mask = torch.zeros_like(var, dtype=torch.bool)
    if k:
        mask[var.argsort(descending=True)[:k]] = True
    d = tau.reshape(s, -1) * mask
    w = (d**2).sum(1) / d.shape[1]
    w = w / w.sum() if w.sum() > 0 else torch.full((s,), 1.0 / s)
    out = torch.zeros(d.shape[1])
    for i in range(d.shape[1]):
        total = float(d[:, i].sum())
        sign = 1.0 if total >= 0 else -1.0
        num = den = 0.0
        for j in range(s):
            if d[j, i] != 0 and math.copysign(1, float(d[j, i])) == sign:
                num += float(w[j] * d[j, i])
                den += float(w[j])
        out[i] = num / den if den else 0.0
    return out.view_as(tau[0])


@pytest.mark.parametrize("select_topk", [0.1, 0.5, 1.0])
def test_sce_matches_formula(select_topk):
    tau = torch.stack([_distinct((8, 5), s) * (s + 1) for s in range(3)])
    torch.testing.assert_close(methods.sce(tau, select_topk=select_topk), _sce_ref(tau, select_topk))


def test_sce_of_identical_task_vectors_is_that_vector():
    t = _distinct((4, 4), 1)
    torch.testing.assert_close(methods.sce(torch.stack([t, t]), select_topk=1.0), t)


def test_skewness_formula():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    mu, sd = x.mean(), x.std(unbiased=False)
    assert methods.skewness(x) == pytest.approx(float((((x - mu) / sd) ** 3).mean()), rel=1e-6)
    assert methods.skewness(torch.ones(5)) == 0.0
    # |N(0,1)| is half-normal: its skewness is the neutral point of RSAF
    assert methods.skewness(torch.randn(2_000_000).abs()) == pytest.approx(methods.HALF_NORMAL_SKEW, abs=0.02)


def test_rsaf_density_formula():
    f = methods.rsaf_density
    assert f(0.01, methods.HALF_NORMAL_SKEW, rate_ref=0.01, density=0.6) == pytest.approx(0.6)
    expected = 0.6 * 4**0.5 * math.exp(-0.5 * (2.0 - methods.HALF_NORMAL_SKEW))
    assert f(0.04, 2.0, rate_ref=0.01) == pytest.approx(min(expected, 1.0))
    assert f(0.02, 1.0, rate_ref=0.01) > f(0.01, 1.0, rate_ref=0.01)  # moved more -> keep more
    assert f(0.01, 3.0, rate_ref=0.01) < f(0.01, 1.0, rate_ref=0.01)  # heavier tail -> keep fewer
    assert f(1.0, 0.0, rate_ref=0.001) == 1.0 and f(1e-9, 9.0, rate_ref=1.0) == 0.1  # clipped
    assert f(0.0, 1.0, rate_ref=0.01) == 0.1


def test_rsaf_without_adaptation_is_ties():
    tau = torch.stack([_distinct((6, 5), s) for s in range(2)])
    base = torch.randn(6, 5)
    got = methods.rsaf(tau, base, rate_refs=[0.3, 0.7], density=0.4, rate_power=0.0, skew_strength=0.0)
    torch.testing.assert_close(got, methods.ties(tau, density=0.4))


def test_rsaf_uses_per_source_density():
    base = torch.ones(10, 10)
    tau = torch.stack([_distinct((10, 10), 0) * 0.1, _distinct((10, 10), 1) * 0.1])
    rate = float(tau[0].norm() / base.norm())
    # source 0 at the model rate keeps 40%; source 1 at 1/4 of its model rate keeps 20% (0.4 * sqrt(1/4))
    got = methods.rsaf(tau, base, rate_refs=[rate, 4 * rate], density=0.4, skew_strength=0.0)
    trimmed = torch.stack([_topk_ref(tau[0], 0.4), _topk_ref(tau[1], 0.2)])
    torch.testing.assert_close(got, methods.disjoint_mean(trimmed, methods.elect_sign(trimmed)))


@pytest.mark.parametrize("case", ["randn", "ties", "sorted", "constant"])
def test_kth_largest_is_exact_on_large_tensors(case):
    g = torch.Generator().manual_seed(0)
    n = (1 << 20) + 12345
    x = {
        "randn": lambda: torch.randn(n, generator=g),
        "ties": lambda: torch.randint(0, 7, (n,), generator=g).float(),
        "sorted": lambda: torch.arange(n, dtype=torch.float32),
        "constant": lambda: torch.full((n,), 2.5),
    }[case]()
    for k in (1, 17, n // 10, n // 2, n - 1, n):
        assert methods.kth_largest(x, k) == torch.kthvalue(x, n - k + 1).values, (case, k)


# ---------------------------------------------------------------- the fast building blocks, against torch.sort
def _kth_ref(x: torch.Tensor, k: int) -> float:
    return float(x.reshape(-1).sort(descending=True).values[k - 1])


def _inputs(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "randn": torch.randn(n, generator=g),
        "ties": torch.randint(-3, 4, (n,), generator=g).float(),
        "sorted": torch.arange(n, dtype=torch.float32),
        "constant": torch.full((n,), -2.5),
        "fp64": torch.randn(n, generator=g, dtype=torch.float64) * 1e-3,
    }


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_kth_largest_on_tiny_tensors(n):
    for name, x in _inputs(n).items():
        for k in sorted({1, (n + 1) // 2, n}):
            want = _kth_ref(x, k)
            assert float(methods.kth_largest(x, k)) == want, (name, n, k)
            y = x.clone()
            assert float(methods.kth_largest_(y, k)) == want, (name, n, k)
            assert torch.equal(y.sort().values, x.sort().values)  # reordered, same values


@pytest.mark.parametrize("name", ["randn", "ties", "sorted", "constant", "fp64"])
def test_kth_largest_on_large_tensors(name):
    n = methods.SMALL + 12345  # above SMALL: the sampled-bracket path
    x = _inputs(n, seed=1)[name]
    ref = x.sort(descending=True).values
    before = x.clone()
    for k in (1, 2, 17, n // 10, n // 2, n - 1, n):
        assert float(methods.kth_largest(x, k)) == float(ref[k - 1]), (name, k)
    assert torch.equal(x, before)  # not modified
    y = x.clone()
    assert float(methods.kth_largest_(y, n // 3)) == float(ref[n // 3 - 1])


def test_kth_largest_falls_back_when_the_sample_misleads():
    # every sampled position holds a huge value, so the sample's bracket lies far above the true answer
    n = methods.SMALL * 2 + 3
    x = torch.arange(n, dtype=torch.float32)
    x[:: n // (1 << 16)] = 1e9
    ref = x.sort(descending=True).values
    for k in (n // 2, n - 5):
        assert float(methods.kth_largest(x, k)) == float(ref[k - 1])
        assert float(methods.kth_largest_(x.clone(), k)) == float(ref[k - 1])


def test_kth_largest_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k must be in"):
        methods.kth_largest(torch.ones(5), 0)
    with pytest.raises(ValueError, match="k must be in"):
        methods.kth_largest_(torch.ones(5), 6)


@pytest.mark.parametrize("s_count", [1, 2, 3, 5])
def test_population_var_is_torch_var_bit_for_bit(s_count):
    g = torch.Generator().manual_seed(s_count)
    n = methods.CHUNK + 999  # two chunks
    tau = torch.randn(s_count, n, generator=g) * torch.rand(n, generator=g) * 1e-3
    tau[:, :50] = 0.0
    tau[0, 50:60] = 1e-30
    tau[:, 60:70] = tau[0, 60:70].clone()  # equal across sources: variance exactly 0
    got = methods._population_var_(tau, torch.empty(n))
    assert torch.equal(got, tau.var(0, unbiased=False))


# Direct transcriptions of the formulas on whole tensors (torch.where, bool masks, tau.sum(0)): the chunked in-place
# kernels must give the same floats, so these compare with torch.equal, on tensors spanning several chunks.
def _ties_direct(tau, density, election, alpha):
    trimmed = torch.stack([torch.where(methods.magnitude_mask(t, density), t, 0.0) for t in tau])
    return alpha * methods.disjoint_mean(trimmed, methods.elect_sign(trimmed, election))


def _sce_direct(tau, select_topk):
    if select_topk >= 1.0:
        mask = torch.ones_like(tau[0], dtype=torch.bool)
    else:
        var = tau.var(0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        mask = var >= float(var.reshape(-1).sort(descending=True).values[k - 1]) if k else torch.zeros_like(var) > 0
    d = tau * mask
    w = (d.double().pow(2).reshape(d.shape[0], -1).sum(1) / d[0].numel()).float()  # summed in float64
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))
    sign = methods.elect_sign(d, "sum")
    we = w.view(-1, *([1] * (d.dim() - 1))) * (torch.sign(d) == sign)
    return (we * d).sum(0) / torch.where(we.sum(0) == 0, 1.0, we.sum(0))


def _big_tau(seed, s_count=3, tied=False):
    g = torch.Generator().manual_seed(seed)
    shape = (s_count, 301, 251)  # 75551 entries per source: more than one CHUNK, not a multiple of it
    if tied:  # few distinct magnitudes: many entries equal the threshold
        return torch.randint(-4, 5, shape, generator=g).float() * 1e-3
    return torch.randn(shape, generator=g) * 1e-3


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("density", "election", "alpha"), [(0.6, "sum", 1.0), (0.2, "count", 0.7), (1.0, "sum", 1.0)])
def test_ties_kernel_equals_the_direct_formula_bit_for_bit(density, election, alpha, tied):
    tau = _big_tau(0, tied=tied)
    before = tau.clone()
    got = methods.ties(tau, density=density, sign_election=election, alpha=alpha)
    assert torch.equal(tau, before)  # the formula function leaves its input alone
    assert torch.equal(got, _ties_direct(tau, density, election, alpha))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("select_topk", [0.1, 0.5, 1.0])
def test_sce_kernel_equals_the_direct_formula_bit_for_bit(select_topk, tied):
    tau = _big_tau(1, tied=tied)
    tau[1] *= 2.0
    assert torch.equal(methods.sce(tau, select_topk=select_topk), _sce_direct(tau, select_topk))


def test_dare_kernel_draws_the_same_masks_as_torch_rand():
    tau = _big_tau(2)
    name, seed, p = "model.layers.0.mlp.up_proj.weight", 7, 0.9
    want = torch.zeros_like(tau[0])
    for s, t in enumerate(tau):  # the formula: one torch.rand(shape) per source, from its own generator
        want += methods.dare_drop(t, p, torch.Generator().manual_seed(methods.tensor_seed(seed, name, s)))
    assert torch.equal(methods.dare(tau, drop_rate=p, alpha=0.3, seed=seed, name=name), 0.3 * want)


def test_ta_kernel_equals_sum_bit_for_bit():
    tau = _big_tau(3, s_count=4)
    assert torch.equal(methods.task_arithmetic(tau, alpha=0.3), 0.3 * tau.sum(0))


def test_rsaf_kernel_equals_the_direct_formula_bit_for_bit():
    tau = _big_tau(4)
    tau[2] = tau[2] ** 3 * 1e6  # heavier-tailed: another density
    base = torch.randn(tau.shape[1:], generator=torch.Generator().manual_seed(5))
    refs = [0.001, 0.002, 0.0005]
    trimmed = []
    for s, t in enumerate(tau):
        rate = float(t.double().norm() / base.double().norm())  # ||tau_s|| / ||theta_o||, in float64
        k = methods.rsaf_density(rate, methods.skewness(t.abs()), rate_ref=refs[s])
        trimmed.append(torch.where(methods.magnitude_mask(t, k), t, 0.0))
    trimmed = torch.stack(trimmed)
    want = methods.disjoint_mean(trimmed, methods.elect_sign(trimmed))
    assert torch.equal(methods.rsaf(tau, base, rate_refs=refs), want)


def test_power_sums_are_the_float64_sums_of_the_powers():
    x = torch.rand(methods.SKEW_CHUNK + 3 * methods.REDUCE_CHUNK + 77, generator=torch.Generator().manual_seed(14))
    got = methods.power_sums(x)
    want = [float((x.double() ** p).sum()) for p in (1, 2, 3)]
    assert got == pytest.approx(want, rel=1e-13)
    assert got[1] == methods.sum_sq(x)  # the same blocks and grouping as sum_sq
    assert methods.power_sums(x.view(-1, 5)) == got  # any shape
    assert methods.power_sums(torch.zeros(0)) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("case", ["half-normal", "large mean", "constant", "empty"])
def test_skewness_from_power_sums_or_two_passes_matches_the_formula(case):
    g = torch.Generator().manual_seed(15)
    x = {
        "half-normal": torch.randn(methods.SKEW_CHUNK + 1001, generator=g).abs() * 1e-3,
        "large mean": 1000.0 + torch.randn(5000, generator=g) ** 2,  # mean^2 >> variance: the power sums cancel
        "constant": torch.full((300,), 0.25),
        "empty": torch.zeros(0),
    }[case]
    n = x.numel()
    direct = 0.0
    if n and float(x.double().std(unbiased=False)) > 0:
        mu, sd = x.double().mean(), x.double().std(unbiased=False)
        direct = float((((x.double() - mu) / sd) ** 3).mean())
    conditioned = methods.skew_from_sums(n, *methods.power_sums(x)) is not None
    assert conditioned == (case in ("half-normal", "empty"))  # else the two-pass definition answers
    assert methods.skewness(x) == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_rsaf_kernel_with_given_stats_equals_it_without():
    tau = _big_tau(16)
    base = torch.randn(tau.shape[1:], generator=torch.Generator().manual_seed(17))
    refs = [0.001, 0.002, 0.0005]
    stats = methods.TensorStats(methods.sum_sq(base), [methods.power_sums(t.abs()) for t in tau])
    want = methods.rsaf(tau, base, rate_refs=refs)
    assert torch.equal(methods.rsaf_(tau.clone(), base, rate_refs=refs, stats=stats), want)
    bumped = methods.TensorStats(stats.base_sq / 4, stats.sums)  # the kernel does use the given sums: rates x 2
    assert not torch.equal(methods.rsaf_(tau.clone(), base, rate_refs=refs, stats=bumped), want)


def test_skewness_in_chunks_matches_the_whole_tensor_formula():
    x = (torch.randn(methods.CHUNK * 2 + 77, generator=torch.Generator().manual_seed(6)) ** 2).double()
    mu, sd = x.mean(), x.std(unbiased=False)
    assert methods.skewness(x.float()) == pytest.approx(float((((x - mu) / sd) ** 3).mean()), rel=1e-9)


@pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom")  # the reference's torch.var on an empty tensor
@pytest.mark.parametrize("shape", [(3, 0, 4), (3,)])
def test_empty_and_scalar_tensors(shape):
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    assert torch.equal(methods.ties(tau), _ties_direct(tau, 0.6, "sum", 1.0))
    assert torch.equal(methods.sce(tau), _sce_direct(tau, 0.1))
    assert torch.equal(methods.task_arithmetic(tau), 0.3 * tau.sum(0))
    assert methods.dare(tau, name="x").shape == tau.shape[1:]
    assert methods.rsaf(tau, torch.ones(shape[1:]), rate_refs=[1.0] * 3).shape == tau.shape[1:]


def test_ordered_sum_is_blockwise_and_thread_count_independent():
    v = torch.randn(methods.REDUCE_CHUNK * 5 + 123, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    v = v**3
    blocks = 0.0
    for i in range(0, v.numel(), methods.REDUCE_CHUNK):  # the definition: in-order sum of per-block 1-D sums
        blocks += float(v[i : i + methods.REDUCE_CHUNK].sum())
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append(methods.ordered_sum(v))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1] == blocks
    assert methods.sum_sq(v.float()) == pytest.approx(float((v.float().double() ** 2).sum()), rel=1e-12)


# ---------------------------------------------------------------- helpers of the fused passes
def _rows_spanning_groups(s_count=3, seed=10):
    """[S, n] with n over three STAT_CHUNK groups and not a multiple of REDUCE_CHUNK (a short last block)."""
    n = 3 * methods.STAT_CHUNK + 12345
    return torch.randn(s_count, n, generator=torch.Generator().manual_seed(seed)) * 1e-3


def test_block_sums_grouped_give_sum_sq_at_any_chunk_size():
    tau = _rows_spanning_groups()
    want = [methods.sum_sq(r) for r in tau]
    for chunk in (methods.REDUCE_CHUNK, methods.CHUNK, 3 * methods.STAT_CHUNK):  # multiples of REDUCE_CHUNK
        blocks = [[] for _ in tau]
        for i in range(0, tau.shape[1], chunk):
            sq = tau[:, i : i + chunk].double().square()
            sums = methods.block_sums(sq)  # all rows in one call when the chunk is whole blocks
            per = len(sums) // len(tau)
            for s in range(len(tau)):
                blocks[s] += sums[s * per : (s + 1) * per]
        assert [methods.grouped_total(b) for b in blocks] == want, chunk
    assert methods.grouped_total(methods.block_sums(tau[0].double().square())) == want[0]  # 1-D input
    assert methods.block_sums(torch.zeros(0, dtype=torch.float64)) == []


def test_mask_and_weigh_is_the_mask_then_sum_sq():
    tau = _rows_spanning_groups(seed=11)
    keep = torch.rand(tau.shape[1], generator=torch.Generator().manual_seed(12))
    want_rows = tau * (keep >= 0.7)
    got = methods._mask_and_weigh_(tau, keep, 0.7)
    assert torch.equal(tau, want_rows)  # masked in place
    assert got == [methods.sum_sq(r) for r in want_rows]  # exact: the same float64 sums
    assert methods._mask_and_weigh_(tau.clone(), None, 0.0) == [methods.sum_sq(r) for r in want_rows]


@pytest.mark.parametrize("election", ["sum", "count"])
def test_agreeing_elects_and_marks_the_agreeing_sources(election):
    tau = _big_tau(13)
    tau[:, :100] = 0.0  # all zero: +1 elected, nobody agrees
    lambdas = [5e-4, None, 1e-3]
    trimmed = torch.stack(
        [torch.where(t.abs() > lam, t, 0.0) if lam else t for t, lam in zip(tau, lambdas, strict=True)]
    )
    sign = methods.elect_sign(trimmed, election).reshape(-1)
    flat = tau.clone().reshape(3, -1)
    es, agrees = [], []
    for _blk, e, agree in methods._agreeing(flat, election, lambdas):
        es.append(e.clone())
        agrees.append(agree.clone())
    assert torch.equal(flat, trimmed.reshape(3, -1))  # trimmed in place
    assert torch.equal(torch.cat(es), sign)
    want = ((torch.sign(trimmed.reshape(3, -1)) == sign) & (trimmed.reshape(3, -1) != 0)).float()
    assert torch.equal(torch.cat(agrees, 1), want)
