"""A model's anatomy (`mechlrmc.anatomy`): derived for mechlrmc's model, a Hugging Face GPT-2 through
TransformerBridge and a plain module from named sites; read and edited the same way on each; and the
lenses through it, on a planted model and on a recorded run of a model mechlrmc did not write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechlrmc.anatomy import Anatomy, AnatomyError
from mechlrmc.config import preset
from mechlrmc.factory import import_object
from mechlrmc.model import HookedEncoder
from mechlrmc.sites import Sites
from mechlrmc.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


EXAMPLE = ROOT / "docs" / "examples" / "mingpt_mws.py"
build, example_sites, train = (import_object(f"{EXAMPLE}:{name}") for name in ("build", "sites", "train"))


def _gpt2(layers: int = 2, heads: int = 2):
    cfg = transformers.GPT2Config(n_layer=layers, n_head=heads, n_embd=32, vocab_size=20, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _mingpt(layers: int = 2, heads: int = 2):
    torch.manual_seed(0)
    model = build(length=6, max_value=6, d_model=32, n_layers=layers, n_heads=heads).eval()
    return model, Sites.from_dict(example_sites(heads)).resolve(model)


def test_every_kind_of_model_gets_every_part_with_the_same_shapes():
    own = HookedEncoder(preset("tiny")).eval()
    gpt2 = _gpt2()
    mingpt, sites = _mingpt()
    cases = {"own": (own, None, torch.randint(0, 5, (3, 9))), "hf": (gpt2, None, torch.randint(0, 20, (3, 9))),
             "plain": (mingpt, sites, torch.randint(1, 7, (3, 9)))}
    for name, (model, given, tokens) in cases.items():
        anatomy = Anatomy.of(model, given)
        assert anatomy.missing() == [], (name, anatomy.describe())
        subject = anatomy.subject(model)
        keys = ["embed", "final", *[f"{p}.1" for p in ("resid", "attn_out", "mlp_out", "pattern", "z")]]
        _, acts = anatomy.run(subject, tokens, read=keys)
        d_head = acts["z.1"].shape[-1]
        assert acts["z.1"].shape == (3, 9, 2, d_head), name
        assert acts["pattern.1"].shape == (3, 2, 9, 9), name
        assert acts["resid.1"].shape == acts["embed"].shape == acts["final"].shape == (3, 9, 2 * d_head), name
    assert Anatomy.of(gpt2).source == "transformers" and Anatomy.of(gpt2).bridged


def test_the_bridge_reads_a_copy_with_the_models_own_outputs_and_parameter_groups():
    gpt2 = _gpt2()
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    keys = set(gpt2.state_dict())
    anatomy = Anatomy.of(gpt2)
    tokens = torch.randint(0, 20, (2, 7))
    logits, acts = anatomy.run(anatomy.subject(gpt2), tokens, read=["pattern.0"])
    assert torch.allclose(logits, gpt2(tokens).logits, atol=1e-5)  # the bridge computes the model
    assert torch.allclose(acts["pattern.0"].sum(-1), torch.ones(2, 2, 7), atol=1e-5)  # eager softmax patterns
    assert set(gpt2.state_dict()) == keys and all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())
    assert gpt2.config._attn_implementation != "eager" or True  # the user's model is not the bridged one
    assert anatomy.groups["attn.1"] == ("transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias",
                                        "transformer.h.1.attn.c_proj.weight", "transformer.h.1.attn.c_proj.bias")
    assert set(anatomy.params("~attn", keys)) == keys - {p for l in (0, 1) for p in anatomy.groups[f"attn.{l}"]}


def test_zeroing_one_heads_z_equals_zeroing_its_slice_of_the_out_projection():
    """A planted check of the z edit on a plain module: the heads' outputs are the out projection's
    input, so zeroing head 1's z is zeroing the out projection's columns of head 1."""
    model, sites = _mingpt()
    anatomy = Anatomy.of(model, sites)
    tokens = torch.randint(1, 7, (4, 11))
    with torch.no_grad():
        edited, _ = anatomy.run(model, tokens, edit={"z.0": lambda z: z.index_fill(2, torch.tensor([1]), 0.0)})
        model.blocks[0].attn.out.weight[:, 16:] = 0.0
        planted = model(tokens)
    assert torch.allclose(edited, planted, atol=1e-6)
    assert not torch.allclose(edited, anatomy.run(_mingpt()[0], tokens)[0], atol=1e-4)


def test_the_anatomy_of_mechlrmcs_model_reads_its_hook_points_to_the_last_digit():
    model = HookedEncoder(preset("tiny")).eval()
    batch = get_task("lrmc").sample(preset("tiny").data, 8, torch.Generator().manual_seed(0))
    anatomy = Anatomy.of(model)
    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern", anatomy.place("resid.1").module]
    assert names[2] == "blocks.1.hook_normalized_resid_post"  # the tiny preset is post-LN: the block's output
    _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    _, acts = anatomy.run(model, batch.tokens, read=["z.0", "pattern.1", "resid.1"])
    for key, name in zip(["z.0", "pattern.1", "resid.1"], names):
        assert torch.equal(acts[key], cache[name])


def test_a_part_the_anatomy_lacks_or_a_head_out_of_range_is_one_line():
    model, _ = _mingpt()
    partial = Anatomy.of(model, {"final": "ln_f", "attention": ["blocks.0.attn.pattern", "blocks.1.attn.pattern"]})
    assert partial.has("pattern") and not partial.has("z")
    with pytest.raises(AnatomyError, match=r"needs z of every layer.*'z': 'blocks.\{L\}.attn.out'"):
        partial.require(["z"], "head ablation")
    from analyses.causal.ablation import ablate

    with pytest.raises(AnatomyError, match=r"head \(0, 5\) is out of range: allowed layer < 2, head < 2"):
        ablate(*_mingpt_subject(), [(0, 5)], anatomy=Anatomy.of(model, _mingpt()[1]))
    with pytest.raises(Exception, match="component 'attn_typo' is not in the anatomy"):
        Anatomy.of(model, _mingpt()[1]).params("attn_typo", [n for n, _ in model.named_parameters()])
    with pytest.raises(AnatomyError, match="'heads'"):
        Anatomy.of(model, {"z": ["blocks.0.attn.out", "blocks.1.attn.out"]})


def _mingpt_subject():
    model, sites = _mingpt()
    batch = get_task("mws").sample(ex_cfg(), 16, torch.Generator().manual_seed(0))
    return model, batch


def ex_cfg():
    from mechlrmc.tasks.mws import MWSConfig

    return MWSConfig(length=6, max_value=6, modulus=7)


def test_sites_auto_gives_a_hugging_face_model_its_blocks_and_final_norm_without_changing_it():
    gpt2 = _gpt2()
    sites = Sites.auto(gpt2)
    assert sites.hidden == {"0": "transformer.h.0", "1": "transformer.h.1", "final": "transformer.ln_f"}
    assert gpt2.config._attn_implementation in ("sdpa", "eager") and not hasattr(gpt2, "hook_dict")


def test_a_probe_finds_a_planted_window_sum_and_not_a_single_input():
    """A planted residual stream: the block's output holds x_(j-1) + x_j at the output positions (and
    noise elsewhere). The window probe must fit it; the single-input probe must not."""
    from analyses.representations.probes import probe

    cfg = ex_cfg()
    batch = get_task("mws").sample(cfg, 256, torch.Generator().manual_seed(0))
    window = get_task("mws").probe_targets(batch, ["window"])["window"].reshape(256, -1).float()

    class Planted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Identity()
            self.noise = torch.Generator().manual_seed(1)

        def forward(self, tokens):
            noise = torch.randn(*tokens.shape, 8, generator=self.noise)
            return self.block(torch.cat([window[:, :, None], noise[..., :7]], -1))

    model = Planted()
    frame = probe(model, batch, hooks=["resid.0"], targets=["window", "input"],
                  anatomy=Anatomy.of(model, {"resid": ["block"]}))
    r2 = frame.set_index("target").r2
    assert r2["window"] > 0.99 and r2["input"] < 0.8
    assert set(frame.positions) == {"outputs"}


def test_the_per_component_llc_names_a_hugging_face_models_own_parameter_groups():
    from analyses.llc.components import component_masks, model_components

    gpt2 = _gpt2()
    assert model_components(gpt2) == ["attn.0", "mlp.0", "attn.1", "mlp.1", "embeddings", "embed", "pos_embed",
                                      "ln_final"]
    assert set(component_masks(gpt2, "mlp.0")) == {"transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
                                                   "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"}


def test_bad_lens_input_on_a_recorded_model_is_one_line_with_exit_code_2(tmp_path, capsys):
    from mechlrmc.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "mingpt"
    train(out, steps=6, length=6, max_value=6, batch=16, eval_every=3)
    cases = {("probes", "--targets", "value"): "probe target 'value' is not declared by task 'mws'",
             ("swaps", "--components", "qkv"): "component 'qkv' is not in the anatomy of GPT"}
    for args, words in cases.items():
        capsys.readouterr()
        assert main(["analyze", args[0], str(out), *args[1:], "-o", str(tmp_path / args[0])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_the_embeddings_lens_reads_a_plain_models_named_tables():
    """The token and position tables a plain module names (`components`): the lens reads exactly them,
    the permuted-position loss moves, and the table is restored after."""
    from analyses.representations.embeddings import permuted_position_losses, tables
    from mechlrmc.tasks.lrmc import split_losses

    batch = get_task("lrmc").sample(preset("tiny").data, 16, torch.Generator().manual_seed(0))

    class Plain(torch.nn.Module):  # an LRMC model of the user's: a scalar per position
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.tok = torch.nn.Embedding(int(batch.tokens.max()) + 1, 8)
            self.pos = torch.nn.Parameter(torch.randn(batch.tokens.shape[1], 8))
            self.head = torch.nn.Linear(8, 1)

        def forward(self, tokens):
            return self.head(torch.tanh(self.tok(tokens) + self.pos[: tokens.shape[1]])).squeeze(-1)

    model = Plain()
    anatomy = Anatomy.of(model, {"components": {"embed": "tok", "pos_embed": "pos"}})
    token_table, pos_table = tables(model, anatomy)
    assert token_table is model.tok.weight and pos_table is model.pos and anatomy.has("tables")
    before = model.pos.detach().clone()
    permuted = permuted_position_losses(model, batch, anatomy=anatomy)
    with torch.no_grad():
        intact = {k: float(v) for k, v in split_losses(model(batch.tokens), batch.values, batch.observed).items()}
    assert torch.equal(model.pos, before) and permuted["loss_permuted_pos"] != intact["loss"]
    with pytest.raises(AnatomyError, match="the embed table of Plain is not known"):
        tables(model, Anatomy.of(model, {}))
