"""The loss registry: names, auto, per-teacher checks, and each loss's per-row distances (gradcheck)."""

from __future__ import annotations

import pytest
import torch

from fusion_cache.train import losses


def test_registry_names_and_auto():
    from fusion_cache.cache.codecs import make_codec
    from fusion_cache.errors import ConfigError

    assert losses.LOSS_CHOICES == ("uld", "kl", "auto") and set(losses.LOSSES) == {"uld", "kl"}
    raw = make_codec("raw")
    same, other = losses.TeacherTraits("a", True, raw), losses.TeacherTraits("b", False, raw)
    assert losses.resolve_loss_names(["auto"], [same, other]) == ["kl", "uld"]
    assert losses.resolve_loss_names(["uld"], [same, other]) == ["uld", "uld"]
    with pytest.raises(ConfigError, match="one per cache"):
        losses.resolve_loss_names(["kl", "uld", "kl"], [same, other])
    with pytest.raises(ConfigError, match="kd_loss: unknown value 'mse'; valid values: uld, kl, auto"):
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


@pytest.mark.parametrize("name", ["uld", "kl"])
def test_each_loss_rows_are_nonnegative_and_differentiable(name):
    torch.manual_seed(0)
    logits = torch.randn(5, 50, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(50)[:6] for _ in range(5)])
    values = torch.log_softmax(torch.randn(5, 50, dtype=torch.float64), -1).gather(1, ids)
    values, order = values.sort(dim=-1, descending=True)
    target = {"values": values, "ids": ids.gather(1, order)}
    loss = losses.make_loss(name, k=6)
    d = loss.rows(logits, target)
    assert d.shape == (5,) and bool((d >= -1e-9).all())
    assert torch.autograd.gradcheck(lambda z: loss.rows(z, target), (logits,))
