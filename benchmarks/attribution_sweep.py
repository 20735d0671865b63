"""Full head x position `z` sweep: attribution patching vs the stock TransformerLens exact sweep.

Both take the same clean / corrupted (-X, same mask) batch on the same checkpoint and give the
recovery of every (layer, position, head) patch of `z`. "stock" is
`transformer_lens.patching.get_act_patch_attn_head_out_by_pos` through `analyses.patching.stock_sweep`
(one forward per patch); "attribution" is `analyses.attribution.attribution_sweep` (one clean
forward, one corrupted forward and one backward for all patches). The script prints the time of
each, their agreement, and, last, the speed-up.

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
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings of attribution")
    args = parser.parse_args()
    for name in ("batch_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: allowed an integer >= 1")
    torch.set_num_threads(args.threads)

    import transformer_lens.patching as tl_patching
    from scipy import stats

    from analyses.attribution import attribution_sweep
    from analyses.patching import corrupt, stock_sweep
    from analyses.walk import analysis_batch
    from mechlrmc.runs import Run

    tl_patching.tqdm = lambda it, *a, **k: it  # silence its per-patch progress bar
    run = Run(args.run)
    step = run.nearest_step(args.step if args.step is not None else run.steps[-1])
    model = run.load_model(step)
    clean = analysis_batch(run, args.batch_size)
    corrupted = corrupt(clean, "negate", run.config.data)
    cfg = model.cfg
    print(f"run {run.path} step {step}: {cfg.n_layers} layers x {cfg.n_heads} heads, {clean.tokens.shape[1]} "
          f"positions; batch {args.batch_size}; threads {args.threads}")
    t_attr, attr = best_time(lambda: attribution_sweep(model, clean, corrupted, {"z": ("layer_pos_head",)}),
                             args.repeats)
    t_stock, stock = best_time(lambda: stock_sweep(model, clean, corrupted, "z", "layer_pos_head"), 1)
    for metric in ("recovery_mask", "recovery_obs"):
        x, y = stock[metric].to_numpy(), attr[metric].to_numpy()
        print(f"{metric}: {len(x)} patches, Pearson {stats.pearsonr(x, y)[0]:.3f}, "
              f"Spearman {stats.spearmanr(x, y)[0]:.3f} (attribution vs exact)")
    print(f"stock exact sweep {t_stock:.2f} s; attribution {t_attr * 1000:.1f} ms; "
          f"speed-up {t_stock / t_attr:.1f}x")


if __name__ == "__main__":
    main()
