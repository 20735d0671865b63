"""Caching only named hooks, and chunked pattern averages equal to the whole-batch average."""

from __future__ import annotations

import pytest
import torch

from analyses.base.cache import cache_hooks, chunked_cache, mean_patterns, pattern_names
from mechlrmc.config import preset
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import sample


@pytest.fixture(scope="module")
def setup():
    cfg = preset("tiny")
    model = HookedEncoder(cfg, seed=1).eval()
    with torch.no_grad():
        for block in model.blocks:  # non-trivial patterns
            block.attn.W_Q.mul_(40)
    return model, sample(cfg.data, 100, torch.Generator().manual_seed(0))


def test_caches_only_named_hooks(setup):
    model, batch = setup
    names = ["blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post"]
    out, cache = cache_hooks(model, batch.tokens, names)
    assert sorted(cache.keys()) == sorted(names)
    assert torch.allclose(out, model(batch.tokens))
    with pytest.raises(KeyError, match="blocks.9.attn.hook_pattern"):
        cache_hooks(model, batch.tokens, "blocks.9.attn.hook_pattern")


def test_chunked_mean_equals_whole_batch_mean(setup):
    model, batch = setup
    _, cache = cache_hooks(model, batch.tokens, pattern_names(model))
    whole = torch.stack([cache[n].mean(0) for n in pattern_names(model)])  # [layer, head, q, k]
    chunked = mean_patterns(model, batch.tokens, chunk_size=7)
    assert chunked.shape == whole.shape
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert torch.allclose(chunked.sum(-1), torch.ones(chunked.shape[:-1]), atol=1e-5)
    assert whole.std() > 0.01  # the patterns are not all uniform, so the test can tell
    assert torch.allclose(mean_patterns(model, batch.tokens, layers=[1]), whole[1:], atol=1e-6)


def test_chunks_cover_the_batch_once(setup):
    model, batch = setup
    chunks = [(rows, out) for rows, out, _ in chunked_cache(model, batch.tokens, "hook_embed", chunk_size=30)]
    assert [r.stop - r.start for r, _ in chunks] == [30, 30, 30, 10]
    assert torch.allclose(torch.cat([o for _, o in chunks]), model(batch.tokens), atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size=0"):
        next(chunked_cache(model, batch.tokens, "hook_embed", chunk_size=0))
    with pytest.raises(ValueError, match=r"layers \[2\]"):
        pattern_names(model, [2])
