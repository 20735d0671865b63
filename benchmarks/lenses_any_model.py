"""Every lens on a model mechlrmc did not write: the worked minGPT example over seeds, and a Hugging Face
GPT-2 under `transformers.Trainer`, both on MWS at 8 inputs.

For each run it prints the registry entries that apply (against a run `mechlrmc train` made on the
same task: the baseline), the drop, the solving head (largest share of attention on the optimal map at
the end) and when it crossed half, exact patching through that head's z (its recovery summed over the
output positions, at the drop's checkpoint) and the probes of the window sum and of a single input at
the last layer. Last line: sections of the recorded runs over those of the trained run (target 1.00x).

    python benchmarks/lenses_any_model.py --seeds 0 1 2 --steps 300 --hf-steps 1500 --out runs/lenses
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def lens_facts(path: Path) -> dict:
    """The applicable entries and the solving-head, patching and probe statements of one run."""
    from analyses.attention.heads import map_onsets
    from analyses.base.context import Context
    from analyses.base.registry import applicable, get
    from mechlrmc.runs import Run

    ctx = Context(Run(path), progress=False)
    names = [a.name for a in applicable(ctx)]
    phases = ctx.phases
    onsets = map_onsets(ctx.taxonomy, phases.drop_step)
    best = onsets.iloc[0]
    patching = get("sequence_patching").compute(ctx)["sequence_patching"]
    z = patching[(patching.step == ctx.key.get("drop", ctx.final)) & (patching.site == "z") & (patching.method == "exact")
                 & (patching.layer == int(best["layer"])) & (patching["head"] == int(best["head"]))
                 & (patching.pos >= ctx.batch.length)]  # the positions that predict outputs
    probes = get("probes").compute(ctx)["probes"]
    last = probes[(probes.step == ctx.final) & (probes.layer == probes.layer.max())].set_index("target").r2
    return {"sections": names, "drop": phases.drop_step if phases.dropped else None,
            "head": f"L{int(best['layer'])}H{int(best['head'])}", "share_end": best.share_at_end,
            "half_at": best.since_step, "half_after_drop": best.since_drop, "patch_z": float(z.recovery.sum()),
            "probe_window": float(last["window"]), "probe_input": float(last["input"]), "evals": ctx.run.evals}


def hf_run(out: Path, steps: int, seed: int = 0) -> Path:
    """GPT-2 (2 layers, 2 heads, width 128, softmax attention, no dropout), batch 64, Adam 1e-3 constant,
    cross-entropy on the outputs only, MWS at 8 inputs, recorded by the Trainer callback with `sites="auto"` (no attention site named)."""
    import transformers

    from mechlrmc.integrations.hf import RecorderCallback
    from mechlrmc.tasks import get_task
    from mechlrmc.tasks.mws import MWSConfig

    task = MWSConfig(length=8, max_value=16, modulus=17)
    data = get_task("mws").sample(task, 64 * steps, torch.Generator().manual_seed(seed + 1)).sequences[:, :-1]
    config = transformers.GPT2Config(vocab_size=task.vocab_size, n_positions=32, n_embd=128, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(output_dir=str(out / "hf_trainer"), max_steps=steps, per_device_train_batch_size=64,
                                          learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
                                          logging_steps=10, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, seed=seed, dataloader_drop_last=True)
    callback = RecorderCallback(out / "hf", task=task, sites="auto", checkpoints=25, eval_every=25)
    labels = data.clone()
    labels[:, :task.length] = -100  # the loss on the outputs only (the separator predicts y_1)
    transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": s, "labels": y} for s, y in zip(data, labels)],
                         callbacks=[callback]).train()
    return out / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hf-steps", type=int, default=700)
    parser.add_argument("--out", default="runs/lenses")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    from mechlrmc.factory import import_object

    train_example = import_object(f"{ROOT / 'docs' / 'examples' / 'mingpt_mws.py'}:train")  # the worked example's loop
    from analyses.base.context import Context
    from analyses.base.registry import applicable
    from mechlrmc.config import preset
    from mechlrmc.runs import Run
    from mechlrmc.train import train

    trained = out / "trained_mws"
    if not (trained / "config.yaml").is_file():
        cfg = preset("mws_tiny")
        train(cfg, trained, progress=False)
    baseline = [a.name for a in applicable(Context(Run(trained), progress=False))]
    print(f"baseline: a `mechlrmc train` run on MWS (mws_tiny): {len(baseline)} entries: {', '.join(baseline)}")
    counts = []
    for seed in args.seeds:
        path = out / f"mingpt8_seed{seed}"
        start = time.time()
        if not (path / "config.yaml").is_file():
            train_example(path, steps=args.steps, seed=seed, length=8, eval_every=10)
        facts = lens_facts(path)
        counts.append(len(facts["sections"]))
        print(f"minGPT seed {seed}: {len(facts['sections'])} entries; drop {facts['drop']}; solving head {facts['head']} "
              f"share {facts['share_end']:.2f}, over half from step {facts['half_at']} ({facts['half_after_drop']:+} "
              f"from the drop); patching its z at the drop's checkpoint, summed over the output positions, recovers "
              f"{facts['patch_z']:.2f} of the answer; probes at the last "
              f"layer R^2 window {facts['probe_window']:.2f}, single input {facts['probe_input']:.2f} "
              f"({time.time() - start:.0f} s)")
    if args.hf_steps:
        start = time.time()
        path = out / "hf"
        if not (path / "config.yaml").is_file():
            hf_run(out, args.hf_steps)
        facts = lens_facts(path)
        counts.append(len(facts["sections"]))
        evals = facts["evals"].set_index("step")
        plateau = evals.loc[(evals.index >= 50) & (evals.index <= 400)]
        print(f"HF GPT-2 (Trainer, sites='auto'): {len(facts['sections'])} entries; drop {facts['drop']}; plateau greedy "
              f"accuracy {plateau.eval_greedy_acc.mean():.2f}, repetition {plateau.eval_rep.mean():.2f} (truth "
              f"{plateau.eval_rep_true.mean():.2f}); final greedy accuracy {evals.eval_greedy_acc.iloc[-1]:.2f}; solving "
              f"head {facts['head']} share {facts['share_end']:.2f}, over half from step {facts['half_at']} "
              f"({facts['half_after_drop']:+} from the drop); patching its z at the drop recovers {facts['patch_z']:.2f}; "
              f"probes window {facts['probe_window']:.2f}, single input {facts['probe_input']:.2f} "
              f"({time.time() - start:.0f} s)")
    print(f"entries of the recorded runs over the trained run's ({min(counts)} of {len(baseline)} at least): "
          f"{min(counts) / len(baseline):.2f}x")


if __name__ == "__main__":
    main()
