"""Recorded training jobs on two processes (tests/test_record_jobs.py runs this file under
`torchrun --standalone --nproc_per_node 2`, gloo on the CPU): a plain DDP loop, an FSDP2
(`fully_shard`) loop, a `transformers.Trainer` and a Lightning DDP fit, each recorded into one run
directory under OUT. Rank 0 keeps its own weights at every checkpoint step and writes, per job,
OUT/<job>.json: the checkpoint steps and whether each checkpoint equals those weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "mingpt_mws.py"
LIGHTNING = ROOT / "tests" / "lightning_mws.py"
STEPS = 6
KW = dict(length=6, max_value=6, d_model=16)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules.get(name) or importlib.util.module_from_spec(spec)
    if name not in sys.modules:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


example = _load(EXAMPLE, "mingpt_mws_example")


def _task():
    from mechlrmc.tasks.mws import MWSConfig

    return MWSConfig(length=6, max_value=6, modulus=7)


def _verdict(out: Path, job: str, kept: dict[int, dict[str, torch.Tensor]]) -> None:
    """Rank 0: does every checkpoint equal the weights rank 0 kept at its step?"""
    from mechlrmc.runs import Run

    if dist.get_rank() != 0:
        return
    run = Run(out / job)
    same = {str(step): all(torch.equal(run.state_dict(step)[k], v.cpu()) for k, v in kept[step].items())
            and set(run.state_dict(step)) == set(kept[step]) for step in run.steps}
    (out / f"{job}.json").write_text(json.dumps({"steps": run.steps, "same": same, "kept": sorted(kept)}))


def plain_loop(out: Path, job: str, wrap) -> None:
    """The worked example's minGPT, wrapped by `wrap`, Adam, batches from each rank's own stream."""
    from mechlrmc import Recorder

    torch.manual_seed(0)
    model = example.build(**KW)
    own = model
    model = wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1 + dist.get_rank())
    from mechlrmc.parallel import full_state_dict

    kept = {0: {k: v.detach().clone() for k, v in full_state_dict(own).items()}}
    with Recorder(out / job, model, model_factory=f"{EXAMPLE}:build", factory_kwargs=KW, task=_task(),
                  sites={"final": "ln_f", "attention": ["blocks.0.attn.pattern"]}, optimizer=opt, checkpoints=2,
                  eval_every=2, steps=STEPS) as rec:
        for step in range(1, STEPS + 1):
            seq = example.mws_batch(data, 8, 6, 6)
            loss = torch.nn.functional.cross_entropy(model(seq[:, :-1]).transpose(1, 2), seq[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rec.cfg.record.is_checkpoint_step(step) or step == STEPS:
                kept[step] = {k: v.detach().clone() for k, v in full_state_dict(own).items()}
            rec.step(step, loss=loss.item())
    _verdict(out, job, kept)


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def fsdp(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def hf_trainer(out: Path) -> None:
    import transformers

    from mechlrmc.integrations.hf import RecorderCallback
    from mechlrmc.tasks import get_task

    task = _task()
    sequences = get_task("mws").sample(task, 64, torch.Generator().manual_seed(1)).sequences[:, :-1]
    data = [{"input_ids": s, "labels": s} for s in sequences]
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=8, n_positions=16, n_embd=32, n_layer=1,
                                                                 n_head=2))
    kept = {}

    class Keep(transformers.TrainerCallback):  # rank 0's weights after each step, before the next update
        def on_step_end(self, args, state, control, model=None, **kwargs):
            kept[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    args = transformers.TrainingArguments(output_dir=str(out / "hf_out"), max_steps=STEPS, per_device_train_batch_size=8,
                                          logging_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, ddp_backend="gloo")
    callback = RecorderCallback(out / "hf", task=task, sites={"final": "transformer.ln_f"}, checkpoints=2)
    kept[0] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Keep()]).train()
    _verdict(out, "hf", {s: w for s, w in kept.items() if s in (0, 2, 4, 6)})


def lightning_fit(out: Path) -> None:
    import lightning

    from mechlrmc.integrations.lightning import RecorderCallback
    from mechlrmc.tasks import get_task

    lit = _load(LIGHTNING, "lightning_mws")
    data = torch.utils.data.TensorDataset(get_task("mws").sample(_task(), 64, torch.Generator().manual_seed(1)).sequences)
    torch.manual_seed(0)
    kept = {}

    class Keep(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            kept[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    module = lit.LitMWS()
    kept[0] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    callback = RecorderCallback(out / "pl", task=_task(), model_factory=f"{LIGHTNING}:LitMWS",
                                sites={"final": "gpt.ln_f", "attention": ["gpt.blocks.0.attn.pattern"]},
                                checkpoints=2, eval_every=2)
    trainer = lightning.Trainer(max_steps=STEPS, callbacks=[callback, Keep()], logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                                devices=2, strategy="ddp")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    _verdict(out, "pl", {s: w for s, w in kept.items() if s in (0, 2, 4, 6)})


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    jobs = sys.argv[2:] or ["ddp", "fsdp", "hf", "pl"]
    if "ddp" in jobs:
        plain_loop(out, "ddp", ddp)
    if "fsdp" in jobs:
        plain_loop(out, "fsdp", fsdp)
    if "hf" in jobs:
        hf_trainer(out)
    if "pl" in jobs:
        lightning_fit(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
