from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from analyses.plateau.figures import plot_lm_dynamics
from analyses.plateau.lm_checkpoints import (across_lm_checkpoints, checkpoint_series, lm_dynamics_summary,
    lm_repetition_collapse)
from mechlrmc.errors import OptionError
from mechlrmc.measures import consecutive_repetition, mean_pairwise_cosine

VOCAB, SAVE_AT, N_NEW = 64, (0, 20, 150), 8


def _tiny_neox() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64))


def _successor(starts: torch.Tensor, length: int) -> torch.Tensor:
    """The synthetic task: each token is the previous one plus 1 (mod VOCAB) [batch, length]."""
    return (starts[:, None] + torch.arange(length)) % VOCAB


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    """A tiny GPT-NeoX trained on the successor task, saved at steps 0, 20 and 150 (step150/ sorts
    before step20/ by name) next to a folder that is no checkpoint."""
    root = tmp_path_factory.mktemp("lm")
    (root / "notes").mkdir()
    model, gen = _tiny_neox(), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(SAVE_AT[-1] + 1):
        if step in SAVE_AT:
            model.save_pretrained(root / f"step{step}")
        tokens = _successor(torch.randint(VOCAB, (32,), generator=gen), 16)
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return root


def _prompts(n: int = 6, length: int = 5) -> list[torch.Tensor]:
    return list(torch.randint(VOCAB, (n, length), generator=torch.Generator().manual_seed(1)))


def test_series_sorted_by_step_and_measures_in_range(series_dir):
    assert [step for step, _ in checkpoint_series(series_dir)] == list(SAVE_AT)
    prompts = _prompts()
    refs = [_successor(p[-1:] + 1, N_NEW)[0] for p in prompts]
    frame = across_lm_checkpoints(series_dir, prompts, n_new=N_NEW, progress=False, references=refs)
    assert frame.step.unique().tolist() == list(SAVE_AT)
    assert len(frame) == len(SAVE_AT) * len(prompts) * 3  # embeddings + 2 layers
    assert frame.repetition.between(0, 1).all()
    assert frame.collapse.between(-1 - 1e-6, 1 + 1e-6).all()
    assert (frame.reference_repetition == 0).all()  # a successor continuation never repeats
    # the trained model writes the successor continuation: no repetition at all
    final = frame[(frame.step == SAVE_AT[-1]) & (frame.layer == frame.n_layers)]
    expected = [" ".join(map(str, r.tolist())) for r in refs]
    assert final.generated.tolist() == expected
    assert (final.repetition == 0).all()
    summary = lm_dynamics_summary(frame)
    assert len(summary) == len(SAVE_AT) * 3
    assert len(plot_lm_dynamics(frame).data) == 2 + 3  # repetition, reference, 3 collapse layers
    assert torch.isnan(torch.tensor(lm_repetition_collapse(_tiny_neox(), None, prompts[:1])
                                    .reference_repetition.to_numpy())).all()


def test_greedy_loop_matches_generate():
    model, prompt = _tiny_neox(), _prompts(1)[0]
    frame = lm_repetition_collapse(model, None, [prompt], n_new=N_NEW)
    out = model.generate(prompt[None], do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert frame.generated.iloc[0] == " ".join(map(str, out[0, len(prompt):].tolist()))


def test_planted_constant_output_repeats_and_collapses():
    """Final LayerNorm planted to output one vector b, the head planted so b picks token 7: every
    generated token is 7 (repetition 1) and the last layer's states are all b (collapse 1)."""
    model = _tiny_neox()
    b = torch.randn(32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.copy_(b)
        head = model.get_output_embeddings().weight  # [vocab, d_model]
        head.zero_()
        head[7] = b
    frame = lm_repetition_collapse(model, None, _prompts(), n_new=N_NEW)
    last = frame[frame.layer == frame.n_layers]
    assert (last.generated == " ".join(["7"] * N_NEW)).all()
    assert (frame.repetition == 1.0).all()
    assert last.collapse.to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert (frame[frame.layer < frame.n_layers].collapse < 0.99).all()  # earlier layers are not planted


def test_collapse_and_repetition_helpers_on_planted_inputs():
    direction = torch.randn(16)
    parallel = torch.tensor([0.5, 1.0, 3.0, 10.0])[:, None] * direction  # [pos, d_model]
    assert mean_pairwise_cosine(parallel) == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_cosine(torch.stack([direction, -direction])) == pytest.approx(-1.0, abs=1e-6)
    assert mean_pairwise_cosine(torch.eye(5)) == pytest.approx(0.0, abs=1e-6)
    assert consecutive_repetition([3, 3, 3, 3]) == 1.0
    assert consecutive_repetition([1, 2, 3, 4]) == 0.0
    assert consecutive_repetition([1, 1, 2, 2, 3]) == 0.5


def test_empty_folder_and_bad_prompts_give_one_line_errors(tmp_path):
    with pytest.raises(OptionError, match="no checkpoint folders") as err:
        checkpoint_series(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(OptionError, match="no tokenizer"):
        lm_repetition_collapse(_tiny_neox(), None, ["a string"])


def test_step_read_from_folder_names(tmp_path):
    for name in ("checkpoint-1000", "stage1-step150-tokens1B", "step2000", "run-3-of-5", "logs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert [(step, folder.name) for step, folder in checkpoint_series(tmp_path)] == [
        (150, "stage1-step150-tokens1B"), (1000, "checkpoint-1000"), (2000, "step2000")]
    (tmp_path / "step1000").mkdir()
    (tmp_path / "step1000" / "config.json").write_text("{}")
    with pytest.raises(OptionError, match="both step 1000"):
        checkpoint_series(tmp_path)


def _as_hub_cache(series_dir, cache, model_id: str, ref_name) -> None:
    """The folder series laid out as the Hugging Face hub caches revisions: refs/<revision> holds a
    commit hash, snapshots/<hash>/ the files (blobs linked in, as the hub does)."""
    import hashlib
    import os

    repo = cache / ("models--" + model_id.replace("/", "--"))
    for step in SAVE_AT:
        commit = hashlib.sha1(f"{model_id}{step}".encode()).hexdigest()
        ref = repo / "refs" / ref_name(step)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in (series_dir / f"step{step}").iterdir():
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(file.read_bytes())
            os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs" / "main").write_text("0" * 40)  # a ref without a step (and no snapshot): left out


def test_hub_cache_layouts_of_pythia_and_olmo_give_the_same_series(series_dir, tmp_path):
    cache = tmp_path / "hub"
    _as_hub_cache(series_dir, cache, "EleutherAI/pythia-tiny", lambda s: f"step{s}")
    _as_hub_cache(series_dir, cache, "allenai/OLMo-tiny", lambda s: f"stage1-step{s}-tokens{s * 2}B")
    folder = across_lm_checkpoints(series_dir, _prompts(3), n_new=N_NEW, progress=False)
    for model_id in ("EleutherAI/pythia-tiny", "allenai/OLMo-tiny"):
        assert [s for s, _ in checkpoint_series(cache, model_id)] == list(SAVE_AT)
        cached = across_lm_checkpoints(cache, _prompts(3), n_new=N_NEW, progress=False, model_id=model_id)
        assert cached.equals(folder)
    repo = cache / "models--allenai--OLMo-tiny"
    assert [s for s, _ in checkpoint_series(repo)] == list(SAVE_AT)  # the model's own cache folder
    with pytest.raises(OptionError, match=r"allowed model_id one of \['EleutherAI/pythia-tiny', 'allenai/OLMo-tiny'\]"):
        checkpoint_series(cache)
