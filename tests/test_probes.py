import torch

from analyses.base.walk import analysis_batch
from analyses.representations.probes import fit_probe, probe, probe_scores, probe_targets
from mechlrmc.model import HookedEncoder
from mechlrmc.tasks.lrmc import decode_tokens


def test_fit_probe_recovers_a_planted_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 12, generator=g)
    w = torch.randn(12, 3, generator=g)
    target = feats @ w + 0.01 * torch.randn(2000, 3, generator=g)
    train = torch.arange(2000) < 1500
    good = probe_scores(fit_probe(feats, target, train)[~train], target[~train].double())
    assert good["r2"] > 0.99 and good["cos"] > 0.99
    noise = torch.randn(2000, 3, generator=g)
    bad = probe_scores(fit_probe(feats, noise, train)[~train], noise[~train].double())
    assert bad["r2"] < 0.05


def test_targets_are_rows_columns_and_singular_vectors(tiny_run):
    batch = analysis_batch(tiny_run, size=4)
    t = probe_targets(batch, ["row", "col", "u", "v", "sigma"])
    x_in = (batch.values * batch.observed).view(4, 3, 3).double()
    assert torch.equal(t["row"].view(4, 9, 3)[:, 5], x_in[:, 1])  # position 5 = (1, 2): row 1
    assert torch.equal(t["col"].view(4, 9, 3)[:, 5], x_in[:, :, 2])  # column 2
    u, s, v = t["u"].view(4, 9, 3)[:, 0], t["sigma"].view(4, 9)[:, 0], t["v"].view(4, 9, 3)[:, 0]
    recon = s[:, None, None] * u[:, :, None] * v[:, None, :]  # rank 1: X = s u v^T
    torch.testing.assert_close(recon, batch.matrices.double(), atol=0.02, rtol=0)  # X is rounded to 0.01


def test_probe_finds_a_value_planted_in_the_token_embedding(tiny_run):
    cfg = tiny_run.config
    model = HookedEncoder(cfg, seed=0).eval()
    values = decode_tokens(torch.arange(cfg.data.vocab_size)).nan_to_num(0.0)
    with torch.no_grad():
        model.W_E[:, 0] = values  # the value, linearly, in dimension 0; MASK row stays 0
    batch = analysis_batch(tiny_run, size=400)
    frame = probe(model, batch, hooks=["hook_embed", "blocks.1.hook_normalized_resid_post"], targets=["value"])
    r2 = frame.set_index(["hook", "positions"]).r2
    assert r2["hook_embed", "observed"] > 0.99  # planted: recovered
    assert r2["hook_embed", "masked"] < 0.05  # MASK carries no value
    assert r2["blocks.1.hook_normalized_resid_post", "observed"] < 0.9  # the random rest scrambles it
