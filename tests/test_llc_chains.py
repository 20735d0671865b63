"""The fast SGLD chains (`analyses.llc.chains`): devinterp's step, the known answer of a regular model,
the noise's control variate, the burn-in read off a trace, and the same chains in one process or two."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from analyses.llc.chains import (estimate, fast_traces, fixed_minibatches, langevin_step, mser_burnin,
    sample_many)
from analyses.llc.data import SGLDConfig
from analyses.llc.sampler import llc_from_traces


def _regression(d_in: int = 8, n: int = 1000, seed: int = 0):
    """A least-squares fit of nn.Linear(d_in, 1) (LLC = (d_in + 1) / 2) and its data."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, d_in, generator=generator)
    targets = inputs @ torch.randn(d_in, 1, generator=generator) + 0.5 * torch.randn(n, 1, generator=generator)
    model = torch.nn.Linear(d_in, 1)
    solution = torch.linalg.lstsq(torch.cat([inputs, torch.ones(n, 1)], 1), targets).solution
    with torch.no_grad():
        model.weight.copy_(solution[:d_in].T)
        model.bias.copy_(solution[d_in])
    return model, (inputs, targets)


@pytest.mark.filterwarnings("ignore:noise_level")
def test_the_step_is_devinterps_sgld_step():
    """Without noise, one flat step moves the weights exactly as devinterp's SGMCMC.sgld (its
    Gaussian prior at w*) moves them from the same point and gradient."""
    from devinterp.optim import SGMCMC

    torch.manual_seed(0)
    star, start = torch.randn(50), torch.randn(50)
    p = torch.nn.Parameter(start.clone())
    p.grad = torch.randn(50)
    grad = p.grad.clone()
    # devinterp's prior is centred at the weights it starts from: build it at w*, then move to the start
    q = torch.nn.Parameter(star.clone())
    optimizer = SGMCMC.sgld([q], lr=0.01, localization=3.0, nbeta=20.0, noise_level=0.0)
    q.data.copy_(start)
    q.grad = grad.clone()
    optimizer.step()
    u = start - star
    lr, localization = torch.full_like(u, 0.01), torch.full_like(u, 3.0)
    ours = star + langevin_step(u, grad.clone(), lr, localization, 20.0, torch.zeros_like(u))
    torch.testing.assert_close(ours, q.detach(), rtol=1e-6, atol=1e-7)


def test_a_regular_model_has_llc_half_its_dimension_with_less_error_from_the_control_variate():
    model, data = _regression()
    config = SGLDConfig(num_chains=4, num_burnin=200, num_draws=800, lr=0.05, localization=0.01, batch_size=100,
                        nbeta=1000 / math.log(1000), paired=True)
    from analyses.llc.calibrate import curvature_scales

    scales = curvature_scales(model, data, config.inverse_temperature)
    frame = fast_traces(model, data, config, scales=scales)
    with_control, without = estimate(frame), estimate(frame, control=False)
    assert with_control["llc"] == pytest.approx(4.5, rel=0.1), with_control
    assert abs(with_control["llc"] - without["llc"]) < 3 * math.hypot(with_control["se"], without["se"])
    assert with_control["se"] < without["se"], (with_control, without)  # less variance, same mean
    per_chain = llc_from_traces(frame)  # the report's reading: the same corrected mean
    assert per_chain.llc.mean() == pytest.approx(np.mean(with_control["chains"]), rel=0.05)


def test_chains_stop_at_the_asked_error_and_read_their_burn_in():
    model, data = _regression(d_in=4, n=500)
    from analyses.llc.calibrate import curvature_scales

    config = SGLDConfig(num_chains=2, num_burnin=50, num_draws=50, lr=0.05, localization=0.01, batch_size=50,
                        nbeta=500 / math.log(500), paired=True)
    scales = curvature_scales(model, data, config.inverse_temperature)
    loose = fast_traces(model, data, config, scales=scales, target_error=0.2, round_steps=50)
    tight = fast_traces(model, data, config, scales=scales, target_error=0.05, round_steps=50, max_steps=5000)
    assert len(tight) > len(loose) and len(tight) < 2 * 5000  # stopped by its error, before the cap
    result = estimate(tight)
    assert result["se"] <= 0.05 * result["llc"] and result["llc"] == pytest.approx(2.5, rel=0.15)


def test_mser_cuts_a_planted_transient():
    rng = np.random.default_rng(0)
    trace = 5 * np.exp(-np.arange(2000) / 60) + rng.normal(0, 1, 2000)
    cut = mser_burnin(trace)
    assert 100 <= cut <= 600, cut
    assert mser_burnin(rng.normal(0, 1, 2000)) < 200  # a stationary trace keeps nearly all of itself


def test_two_processes_give_the_chains_of_one():
    model, data = _regression(d_in=3, n=200)
    config = SGLDConfig(num_chains=2, num_burnin=20, num_draws=20, lr=0.05, localization=0.01, batch_size=50,
                        nbeta=50.0, paired=True)
    here = sample_many([{"model": model, "data": data, "config": config}], workers=1)[0]
    there = sample_many([{"model": model, "data": data, "config": config}], workers=2)[0]
    pd.testing.assert_frame_equal(here, there)
    assert len(fixed_minibatches(data, 50)) == 4 and here.burnin.sum() == 2 * 20


FACTORY = """
import torch


class Model(torch.nn.Module):
    def __init__(self, d_in):
        super().__init__()
        self.linear = torch.nn.Linear(d_in, 1)

    def forward(self, x):
        return self.linear(x)


def build(d_in=3):
    return Model(d_in)
"""


def test_a_model_from_a_factory_file_is_sampled_in_the_second_process_too(tmp_path):
    """A recorded run's model comes from its factory's file, loaded by path under a module name that
    a spawned process cannot import: its chains still run there (the class travels by value), and
    give the chains of one process."""
    from mechlrmc.factory import import_object

    (tmp_path / "user_model.py").write_text(FACTORY)
    model = import_object(f"{tmp_path / 'user_model.py'}:build")()
    reference, data = _regression(d_in=3, n=200)
    model.load_state_dict({"linear.weight": reference.weight.detach(), "linear.bias": reference.bias.detach()})
    config = SGLDConfig(num_chains=2, num_burnin=20, num_draws=20, lr=0.05, localization=0.01, batch_size=50,
                        nbeta=50.0, paired=True)
    here = sample_many([{"model": model, "data": data, "config": config}], workers=1)[0]
    there = sample_many([{"model": model, "data": data, "config": config}], workers=2)[0]
    pd.testing.assert_frame_equal(here, there)
