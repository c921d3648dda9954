"""The backend switch of fusion_cache.train.losses: choice rules, errors, and that both backends give the same loss."""

from __future__ import annotations

import warnings

import pytest
import torch

from fusion_cache.errors import ConfigError
from fusion_cache.kernels.reference import uld_loss_reference
from fusion_cache.train import functional as losses


@pytest.fixture(autouse=True)
def _reset_backend():
    losses.set_backend(None)
    losses._env_backend.cache_clear()
    yield
    losses.set_backend(None)
    losses._env_backend.cache_clear()


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FUSION_CACHE_KERNEL", raising=False)
    assert losses.resolve_backend("cpu") == "torch"
    assert losses.resolve_backend("cuda") == ("triton" if losses._triton_installed() else "torch")


def test_env_var_is_read_once_and_validated(monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_KERNEL", "torch")
    assert losses.resolve_backend("cuda") == "torch"
    monkeypatch.setenv("FUSION_CACHE_KERNEL", "auto")
    assert losses.resolve_backend("cuda") == "torch"  # cached: the choice is made once per process
    losses._env_backend.cache_clear()
    monkeypatch.setenv("FUSION_CACHE_KERNEL", "cuda-magic")
    with pytest.raises(ConfigError, match="cuda-magic"):
        losses.resolve_backend("cpu")
    with pytest.raises(ConfigError, match="one of"):
        losses.set_backend("numpy")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    losses.set_backend("triton")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        losses.uld_loss(torch.randn(2, 20), torch.randn(2, 5))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backends_agree_through_uld_loss_and_module(triton_uld, device, reduction):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(11, 90, generator=g).to(device)
    teacher = torch.randn(11, 7, generator=g).sort(dim=-1, descending=True).values.to(device)
    mask = (torch.rand(11, generator=g) > 0.3).to(device)
    w = torch.rand(11, generator=g).to(device)
    results = {}
    for backend in ("torch", "triton"):
        losses.set_backend(backend)
        x = logits.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = losses.ULDLoss(k=7)(x, teacher, mask, w, reduction=reduction)
            (out.sum() * 2.5).backward()
        results[backend] = (out.detach(), x.grad)
    torch.testing.assert_close(results["torch"][0], results["triton"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results["torch"][1], results["triton"][1], atol=1e-6, rtol=1e-4)
    want = uld_loss_reference(logits, teacher, mask, w, k=7, reduction=reduction)
    torch.testing.assert_close(results["triton"][0], want, atol=1e-6, rtol=1e-5)


def test_all_masked_mean_has_zero_gradient_on_both_backends(triton_uld, device):
    for backend in ("torch", "triton"):
        losses.set_backend(backend)
        x = torch.randn(3, 20, device=device, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = torch.zeros(3, dtype=torch.bool, device=device)
            loss = losses.uld_loss(x, torch.randn(3, 6, device=device), mask, k=6)
            loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all()


def test_fused_linear_module_matches_dense():
    lm_head = torch.nn.Linear(8, 64, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)
    teacher = torch.randn(10, 6).sort(dim=-1, descending=True).values
    labels = torch.randint(0, 64, (10,))
    loss, ce, uld, _ = losses.FusedLinearULDLoss(k=6)(
        hidden, lm_head, teacher, labels=labels, ce_weight=0.5, uld_weight=0.5
    )
    logits = lm_head(hidden)
    want_uld = uld_loss_reference(logits, teacher, k=6)
    want_ce = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(uld, want_uld.detach())
    torch.testing.assert_close(loss, 0.5 * (want_ce + want_uld).detach())
