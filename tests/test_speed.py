"""The training speed switches (`train.adam`, `train.compile`) and the unhooked fast paths keep
the trajectory: the default is bitwise the per-tensor Adam loop, and compiled training resumes
exactly."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mechlrmc.config import ConfigError, TrainConfig, preset
from mechlrmc.model import HookedEncoder
from mechlrmc.runs import Run
from mechlrmc.tasks.lrmc import sample, split_losses
from mechlrmc.train import make_optimizer, train


def _train_weights(optimizer_factory, steps=25):
    cfg = preset("tiny")
    model = HookedEncoder(cfg, seed=3)
    opt = optimizer_factory(model, cfg)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        b = sample(cfg.data, cfg.train.batch_size, gen)
        loss = split_losses(model(b.tokens), b.values, b.observed)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _loop_adam(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, foreach=False, fused=False)


def test_default_adam_is_bitwise_the_per_tensor_loop():
    """The default kernel must not move the trajectory: runs stay reproducible across versions."""
    assert preset("cpu").train.adam == "foreach"
    loop, default = _train_weights(_loop_adam), _train_weights(make_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(loop, default))


def test_fused_adam_is_the_same_update_to_float_tolerance():
    fused = _train_weights(lambda m, c: make_optimizer(m, c.override({"train.adam": "fused"})))
    loop = _train_weights(_loop_adam)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(loop, fused))


def test_bad_adam_kernel_names_field_and_choices():
    with pytest.raises(ConfigError, match=r"train.adam.*foreach.*fused"):
        TrainConfig(adam="lamb")


def test_unhooked_position_embedding_matches_the_hooked_path():
    cfg = preset("tiny")
    model = HookedEncoder(cfg, seed=0)
    tokens = sample(cfg.data, 8, torch.Generator().manual_seed(0)).tokens
    plain = model(tokens)
    seen = []
    hooked = model.run_with_hooks(tokens, fwd_hooks=[("hook_pos_embed", lambda t, hook: seen.append(t.shape))])
    assert seen == [torch.Size([8, cfg.n_ctx, cfg.model.d_model])]
    assert torch.equal(plain, hooked)
    # an in-place edit of the hooked position embedding reaches the output
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("hook_pos_embed", lambda t, hook: t.zero_())])
    assert not torch.allclose(plain, zeroed)


def test_compiled_fused_training_resumes_exactly(tmp_path):
    """torch.compile + fused Adam: stopping at a checkpoint and resuming gives bitwise the metrics
    and checkpoints of an uninterrupted run; the compiled model agrees with the eager one."""
    cfg = preset("tiny").override({"train.compile": True, "train.adam": "fused", "train.steps": 30,
                                   "train.checkpoint_every": 10})
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(cfg.override({"train.steps": 10}), tmp_path / "parts", progress=False)
    parts = train(cfg, tmp_path / "parts", resume=True, progress=False)
    assert whole.steps == parts.steps == [0, 10, 20, 30]
    pd.testing.assert_frame_equal(whole.metrics.drop(columns="wall_time"), parts.metrics.drop(columns="wall_time"))
    for step in whole.steps:
        a, b = whole.state_dict(step), parts.state_dict(step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model = HookedEncoder(cfg, seed=None)
    model.load_state_dict(Run(whole.path).state_dict(30))
    tokens = sample(cfg.data, 16, torch.Generator().manual_seed(1)).tokens
    assert torch.allclose(torch.compile(model)(tokens), model(tokens), atol=1e-5)
