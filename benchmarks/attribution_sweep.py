"""Full head x position `z` sweep: attribution and integrated-gradients patching vs the stock exact sweep.

All three take the same clean / corrupted (-X, same mask) batch on the same checkpoint and give the
recovery of every (layer, position, head) patch of `z`. "stock" is
`transformer_lens.patching.get_act_patch_attn_head_out_by_pos` through `analyses.causal.patching.stock_sweep`
(one forward per patch); "attribution" is `analyses.causal.attribution.attribution_sweep` (one clean
forward, one corrupted forward and one backward for all patches); "integrated gradients" is
`analyses.causal.integrated_gradients.integrated_gradients_sweep` (`--steps` points along each layer's
path, its position groups stacked along the batch); "joint integrated gradients" is
`joint_integrated_gradients_sweep` (`--steps` points along one path for all layers at once), timed
with the masked metric only (the target) and with both metrics. The script prints each estimator's
time and its agreement with the stock sweep, then the masked-position Pearson of the
better-agreeing one, and, last, that estimator's speed-up over the stock sweep.

    python benchmarks/attribution_sweep.py --run checkpoints/cpu --batch-size 64 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="checkpoints/cpu")
    parser.add_argument("--step", type=int, help="checkpoint (default: the last)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="integration points of integrated gradients")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings of each estimator")
    args = parser.parse_args()
    for name in ("batch_size", "threads", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: allowed an integer >= 1")
    torch.set_num_threads(args.threads)

    import transformer_lens.patching as tl_patching
    from scipy import stats

    from analyses.base.walk import analysis_batch
    from analyses.causal.attribution import attribution_sweep
    from analyses.causal.integrated_gradients import integrated_gradients_sweep, joint_integrated_gradients_sweep
    from analyses.causal.patching import corrupt, stock_sweep
    from mechlrmc.runs import Run

    tl_patching.tqdm = lambda it, *a, **k: it  # silence its per-patch progress bar
    run = Run(args.run)
    step = run.nearest_step(args.step if args.step is not None else run.steps[-1])
    model = run.load_model(step)
    clean = analysis_batch(run, args.batch_size)
    corrupted = corrupt(clean, "negate", run.config.data)
    cfg, sites = model.cfg, {"z": ("layer_pos_head",)}
    print(f"run {run.path} step {step}: {cfg.n_layers} layers x {cfg.n_heads} heads, {clean.tokens.shape[1]} "
          f"positions; batch {args.batch_size}; threads {args.threads}")
    estimators = {
        "attribution": lambda: attribution_sweep(model, clean, corrupted, sites),
        f"integrated gradients ({args.steps} steps)":
            lambda: integrated_gradients_sweep(model, clean, corrupted, sites, steps=args.steps),
        f"joint integrated gradients ({args.steps} steps, masked metric)": lambda: joint_integrated_gradients_sweep(
            model, clean, corrupted, sites, steps=args.steps, metrics=("recovery_mask",)),
        f"joint integrated gradients ({args.steps} steps, both metrics)":
            lambda: joint_integrated_gradients_sweep(model, clean, corrupted, sites, steps=args.steps),
    }
    timed = {name: best_time(fn, args.repeats) for name, fn in estimators.items()}
    t_stock, stock = best_time(lambda: stock_sweep(model, clean, corrupted, "z", "layer_pos_head"), 1)
    print(f"stock exact sweep {t_stock:.2f} s")
    pearson_mask = {}
    for name, (seconds, frame) in timed.items():
        parts = []
        for metric in ("recovery_mask", "recovery_obs"):
            x, y = stock[metric].to_numpy(), frame[metric].to_numpy()
            if frame[metric].isna().all():
                parts.append(f"{metric} not computed")
                continue
            pearson = stats.pearsonr(x, y)[0]
            pearson_mask.setdefault(name, pearson)
            parts.append(f"{metric} Pearson {pearson:.3f} Spearman {stats.spearmanr(x, y)[0]:.3f}")
        print(f"{name}: {seconds * 1000:.1f} ms, speed-up {t_stock / seconds:.1f}x; {len(stock)} patches, "
              + "; ".join(parts))
    best = max(pearson_mask, key=pearson_mask.get)
    print(f"better-agreeing estimator: {best}, masked-position Pearson {pearson_mask[best]:.3f}")
    print(f"speed-up of {best} over the stock exact sweep: {t_stock / timed[best][0]:.1f}x")


if __name__ == "__main__":
    main()
