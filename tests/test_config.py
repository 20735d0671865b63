import pytest

from mechlrmc.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, preset


def test_yaml_round_trip(tmp_path):
    for name in ("paper", "cpu", "tiny"):
        cfg = preset(name).override(["train.checkpoint_steps=[3, 5]", "data.distribution=laplace"])
        cfg.to_yaml(tmp_path / "c.yaml")
        assert RunConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_paper_preset_is_the_paper():
    cfg = preset("paper")
    assert (cfg.data.m, cfg.data.n, cfg.data.rank, cfg.data.p_mask) == (7, 7, 2, 0.3)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_mlp) == (768, 4, 8, 3072)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.steps) == (256, 1e-4, 50_000)
    assert cfg.data.vocab_size == 2002 and cfg.model.norm == "post" and cfg.model.mask_embedding_zero
    assert abs(cfg.data.plateau_mask_loss - 2 / 9) < 1e-12


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: DataConfig(m=3, n=4, rank=4), ["data.rank", "min(m, n) = 3"]),
        (lambda: DataConfig(p_mask=1.0), ["data.p_mask", "0 <= p_mask < 1"]),
        (lambda: DataConfig(p_mask=-0.1), ["data.p_mask"]),
        (lambda: DataConfig(distribution="cauchy"), ["data.distribution", "gaussian"]),
        (lambda: ModelConfig(d_model=100, n_heads=8), ["model.d_model", "multiple of model.n_heads=8"]),
        (lambda: ModelConfig(norm="sandwich"), ["model.norm", "post"]),
        (lambda: ModelConfig(n_layers="4"), ["model.n_layers", "wrong type", "int"]),
        (lambda: ModelConfig(n_layers=True), ["model.n_layers", "wrong type"]),
        (lambda: TrainConfig(lr=0), ["train.lr", "> 0"]),
        (lambda: TrainConfig(batch_size=0), ["train.batch_size", ">= 1"]),
        (lambda: TrainConfig(device="tpu"), ["train.device", "cuda"]),
        (lambda: TrainConfig(steps=10, checkpoint_steps=(20,)), ["train.checkpoint_steps", "[0, train.steps=10]"]),
        (lambda: RunConfig.from_dict({"model": {"width": 3}}), ["model.width", "unknown"]),
        (lambda: RunConfig.from_dict({"optim": {}}), ["optim", "unknown"]),
        (lambda: preset("cpu").override(["train.momentum=0.9"]), ["train.momentum", "unknown"]),
        (lambda: preset("gpu"), ["gpu", "paper"]),
        (lambda: RunConfig(data=DataConfig(m=4, n=4, rank=1), model=ModelConfig(n_ctx=10)), ["model.n_ctx", "16"]),
    ],
)
def test_validation_names_field_and_range(build, words):
    with pytest.raises(ConfigError) as err:
        build()
    for word in words:
        assert word in str(err.value)


def test_override_parses_yaml_scalars():
    cfg = preset("cpu").override(["train.lr=3e-4", "model.mask_embedding_zero=false", "data.m=5"])
    assert cfg.train.lr == 3e-4 and cfg.model.mask_embedding_zero is False and cfg.data.m == 5


def test_checkpoint_schedule_is_denser_early():
    tc = TrainConfig(steps=3000, checkpoint_every=1000, checkpoint_every_early=250,
                     checkpoint_early_until=500, checkpoint_steps=(1234,))
    assert [s for s in range(3001) if tc.is_checkpoint_step(s)] == [0, 250, 500, 1000, 1234, 2000, 3000]
