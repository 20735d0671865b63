import pytest
import torch

from analyses.weights.swaps import swap_grid, swapped_model
from mechlrmc.components import component_params, model_component_params
from mechlrmc.model import HookedEncoder


def test_components_select_the_right_parameters(tiny_run):
    model = HookedEncoder(tiny_run.config)
    assert model_component_params(model, "embed") == ["W_E"]
    assert set(model_component_params(model, "qk.1")) == {
        "blocks.1.attn.W_Q", "blocks.1.attn.W_K", "blocks.1.attn.b_Q", "blocks.1.attn.b_K"}
    everything = [n for n, _ in model.named_parameters()]
    attn = model_component_params(model, "attn")
    rest = model_component_params(model, "~attn")
    assert sorted(attn + rest) == sorted(everything) and not set(attn) & set(rest)
    assert model_component_params(model, "all") == everything
    assert all(".ln" in n or n.startswith("ln_") for n in model_component_params(model, "ln"))
    with pytest.raises(ValueError, match="out of range"):
        component_params("mlp.7", everything, 2)
    with pytest.raises(ValueError, match="unknown"):
        component_params("mlps", everything, 2)


def test_swapping_everything_gives_model_a_and_nothing_gives_b(tiny_run):
    a, b = tiny_run.load_model(10), tiny_run.load_model(40)
    tokens = torch.randint(0, tiny_run.config.data.vocab_size, (8, 9))
    all_from_a = swapped_model(tiny_run, 10, 40, "all")
    assert torch.equal(all_from_a(tokens), a(tokens))
    embed_from_a = swapped_model(tiny_run, 10, 40, "embed")
    state = embed_from_a.state_dict()
    assert torch.equal(state["W_E"], a.W_E) and torch.equal(state["W_pos"], b.W_pos)
    assert not torch.equal(embed_from_a(tokens), b(tokens))


def test_swap_grid_baselines_match_the_checkpoints(tiny_run):
    from analyses.base.walk import analysis_batch
    from mechlrmc.tasks.lrmc import evaluate

    batch = analysis_batch(tiny_run, size=64)
    grid = swap_grid(tiny_run, 10, 40, components=["attn", "all"], batch=batch, progress=False)
    assert len(grid) == 6
    row = grid.set_index(["direction", "components"])
    post = evaluate(tiny_run.load_model(40), batch)["loss"]
    pre = evaluate(tiny_run.load_model(10), batch)["loss"]
    assert row.loc[("pre->post", "none"), "loss"] == pytest.approx(post)
    assert row.loc[("pre->post", "all"), "loss"] == pytest.approx(pre)
    assert row.loc[("post->pre", "all"), "loss"] == pytest.approx(post)
