import torch

from analyses.base.walk import analysis_batch
from analyses.representations.embeddings import embedding_geometry, position_silhouettes, token_embedding_geometry
from mechlrmc.model import HookedEncoder


def test_planted_symmetric_embedding_is_scored_symmetric_and_sign_separable():
    values = torch.linspace(-1, 1, 201).numpy()
    g = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(201, 8, generator=g).numpy()
    emb = noise.copy()
    emb[:, 0] += abs(values)  # norm depends on |x|
    emb[:, 1] += (values > 0) * 1.0 - 0.5  # sign in its own direction
    scores = token_embedding_geometry(emb, values, 0.01)
    assert scores["norm_symmetry"] > 0.95 and scores["pc_sign_accuracy"] > 0.98
    assert scores["pc_magnitude_r2"] > 0.9
    asymmetric = noise.copy()
    asymmetric[:, 0] += values + 1  # norm grows with x
    assert token_embedding_geometry(asymmetric, values, 0.01)["norm_symmetry"] < 0


def test_position_embeddings_clustered_by_column():
    m, n = 3, 4
    g = torch.Generator().manual_seed(0)
    columns = torch.randn(n, 16, generator=g)
    w_pos = columns.repeat(m, 1) + 0.05 * torch.randn(m * n, 16, generator=g)  # row-major: column = pos % n
    scores = position_silhouettes(w_pos.numpy(), m, n)
    assert scores["pos_silhouette_col"] > 0.8 and scores["pos_silhouette_row"] < 0


def test_permuting_identical_positions_changes_nothing(tiny_run):
    model = HookedEncoder(tiny_run.config, seed=0).eval()
    with torch.no_grad():
        model.W_pos[:] = model.W_pos[0]
    before = model.W_pos.detach().clone()
    row = embedding_geometry(model, analysis_batch(tiny_run, size=64)).iloc[0]
    assert abs(row.loss_mask_permuted_pos - row.loss_mask) < 1e-6
    assert torch.equal(model.W_pos, before)  # the table is restored


def test_permuting_a_real_position_table_changes_the_loss(tiny_run):
    row = embedding_geometry(tiny_run.load_model(40), analysis_batch(tiny_run, size=64)).iloc[0]
    assert abs(row.loss_permuted_pos - row.loss) > 1e-4
