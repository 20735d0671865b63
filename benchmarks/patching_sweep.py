"""Full head x position activation-patching sweep: batched path vs the stock TransformerLens sweep.

Both run the same clean / corrupted (-X, same mask) inputs on the same checkpoint, patch `z` of
every (layer, position, head) and compute the same recovery metrics; the script checks they agree
and prints the time of each and their ratio per batch size.

At large batches both paths are compute-bound, and the batched one can only save the layers it
skips: a patch at layer l recomputes layers l+1.. in full and one position of layer l, where the
stock sweep recomputes every layer. Averaged over the patches that bounds the speed-up at
n_layers / mean(n_layers - 1 - l + 1 / positions), 2.6x for 4 layers and 16 positions; the ratio
is reported against that bound (the last line: the largest batch).

    python benchmarks/patching_sweep.py --run checkpoints/cpu --batch-sizes 4 16 64 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="checkpoints/cpu")
    parser.add_argument("--step", type=int, help="checkpoint (default: the last)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformer_lens.patching as tl_patching

    from analyses.base.walk import analysis_batch
    from analyses.causal.patching import batched_sweep, corrupt, stock_sweep
    from mechlrmc.runs import Run

    tl_patching.tqdm = lambda it, *a, **k: it  # silence its per-patch progress bar (negligible time)
    run = Run(args.run)
    step = args.step if args.step is not None else run.steps[-1]
    model = run.load_model(run.nearest_step(step))
    cfg = model.cfg
    print(f"run {run.path} step {step}: {cfg.n_layers} layers x {cfg.n_heads} heads, "
          f"{run.config.data.seq_len} positions, d_model {cfg.d_model}; threads {args.threads}")
    positions = run.config.data.seq_len
    bound = cfg.n_layers / (sum(cfg.n_layers - 1 - l + 1 / positions for l in range(cfg.n_layers)) / cfg.n_layers)
    print(f"compute bound on the ratio at large batch: {bound:.2f}x")
    print(f"{'batch':>6} {'patches':>8} {'stock s':>9} {'batched s':>10} {'ratio':>7} {'of bound':>9} {'max |diff|':>11}")
    for size in args.batch_sizes:
        clean = analysis_batch(run, size)
        corrupted = corrupt(clean, "negate", run.config.data)
        timings = {}
        for name, fn in (("stock", stock_sweep), ("batched", batched_sweep)):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                frame = fn(model, clean, corrupted, "z", "layer_pos_head")
                best = min(best, time.perf_counter() - start)
            timings[name] = (best, frame)
        (t_stock, stock), (t_batched, batched) = timings["stock"], timings["batched"]
        diff = (stock[["recovery_mask", "recovery_obs"]] - batched[["recovery_mask", "recovery_obs"]]).abs().max().max()
        ratio = t_stock / t_batched
        print(f"{size:>6} {len(stock):>8} {t_stock:>9.2f} {t_batched:>10.2f} {ratio:>6.1f}x {ratio / bound:>8.0%} {diff:>11.1e}")
    print(f"batch {size}: {ratio / bound:.0%} of the {bound:.2f}x compute bound; ratio {ratio:.1f}x")


if __name__ == "__main__":
    main()
