"""The merge-method registry: each method's declared options match its kernel, unknown names are refused with
the valid ones, `MergeConfig` has one field per option, and dispatch through the registry is the kernel itself."""

from __future__ import annotations

import inspect

import pytest
import torch

from fusion_cache.errors import ConfigError
from fusion_cache.merge import methods
from fusion_cache.merge.config import MergeConfig
from fusion_cache.merge.registry import CONTEXT
from fusion_cache.merge.registry import METHODS
from fusion_cache.merge.registry import REGISTRY
from fusion_cache.merge.registry import MergeMethod
from fusion_cache.merge.registry import Param
from fusion_cache.merge.registry import get_method
from fusion_cache.merge.registry import option_params
from fusion_cache.merge.run import merge_tensor_


@pytest.mark.parametrize("name", METHODS)
def test_each_kernel_takes_exactly_the_declared_options_and_context(name):
    method = REGISTRY[name]
    params = inspect.signature(method.kernel_fn).parameters
    keywords = list(params)[1:]  # after tau
    assert set(keywords) == set(method.defaults) | method.context
    assert method.context <= set(CONTEXT)
    assert {k: params[k].default for k in method.defaults} == method.defaults


def test_a_kernel_out_of_step_with_its_declaration_is_refused():
    stale = MergeMethod("stale", "TIES with another default", (Param("density", float, "d").at(0.5),), "ties_")
    with pytest.raises(ValueError, match=r"'stale': kernel methods.ties_ option 'density' has default 0.6, .* 0.5"):
        stale.takes("work")  # the first use resolves the kernel


def test_unknown_method_names_list_the_valid_ones():
    assert get_method("ties") is REGISTRY["ties"]
    with pytest.raises(ConfigError, match=r"method: unknown value 'linear'; valid values: ta, ties, dare, sce, rsaf"):
        get_method("linear")
    with pytest.raises(ConfigError, match="valid values: ta, ties"):
        merge_tensor_("linear", torch.zeros(2, 3), torch.zeros(3), "w", {}, None)


def test_config_has_one_field_per_option_and_resolves_each_methods_defaults():
    options = option_params()
    assert set(options) <= set(MergeConfig.model_fields)
    assert {"alpha", "density", "sign_election", "drop_rate", "seed", "select_topk"} <= set(options)
    for name, method in REGISTRY.items():
        cfg = MergeConfig.create(base="b", models=["m"], out="o", method=name)
        assert cfg.method_options() == method.defaults
    assert MergeConfig.model_fields["density"].description.endswith("(ties 0.6, rsaf 0.6)")


def test_options_another_method_does_not_take_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"density=0.5 does not apply to method 'ta' \(it takes: alpha\)"):
        MergeConfig.create(base="b", models=["m"], out="o", method="ta", density=0.5)


@pytest.mark.parametrize("name", METHODS)
def test_dispatch_runs_the_kernel(name):
    g = torch.Generator().manual_seed(0)
    tau, base = torch.randn(3, 40, 7, generator=g), torch.randn(40, 7, generator=g)
    opts = REGISTRY[name].defaults
    got = merge_tensor_(name, tau.clone(), base, "w", opts, [0.01, 0.02, 0.03], torch.empty(280))
    direct = {
        "ta": lambda: methods.task_arithmetic(tau, **opts),
        "ties": lambda: methods.ties(tau, **opts),
        "dare": lambda: methods.dare(tau, name="w", **opts),
        "sce": lambda: methods.sce(tau, **opts),
        "rsaf": lambda: methods.rsaf(tau, base, rate_refs=[0.01, 0.02, 0.03], **opts),
    }[name]()
    assert torch.equal(got, direct)
