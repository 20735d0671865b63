"""The exact finite-n value of the LLC on the deep linear network of `llc_known.py`, against Aoyagi's coefficient.

    python benchmarks/dln_exact.py                  # 300-200-200-5, rank 3: ~10 minutes on one idle core
    python benchmarks/dln_exact.py --sizes 1000 2000 --sweeps 200   # a quick look

An SGLD estimator of the LLC converges, at best, to nbeta E[L(w) - L(w*)] under the localized
tempered posterior of the data it is given; Aoyagi's learning coefficient is that value's limit as
n -> infinity. `analyses.llc.known.dln_posterior_llc` computes the finite-n value exactly (block
Gibbs, no step size), so a known-answer benchmark can tell the estimator's error from the data's.

- Against the localization (`--localizations`, in units of the sharpest curvature of nbeta L at w*,
  the calibration's units), at the smallest n: whether the value depends on it.
- Against n (`--sizes`), at localization 0.005: how close the finite-n value is to the truth.

Writes `--out` (a PNG of both) and prints a table; the last line is the exact value's ratio to
Aoyagi's coefficient at the largest n, e.g. `0.93x`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[300, 200, 200, 5])
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 10000])
    parser.add_argument("--localizations", type=float, nargs="+", default=[0.04, 0.01, 0.0025, 0.000625, 0.0001])
    parser.add_argument("--sweeps", type=int, default=300)
    parser.add_argument("--burnin", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the data seed")
    parser.add_argument("--out", type=Path, default=Path("docs/llc_dln_exact.png"))
    args = parser.parse_args()

    from plotly.subplots import make_subplots

    from analyses.llc.known import dln_learning_coefficient
    from llc_known import deep_linear, exact_value  # beside this script

    torch.set_num_threads(1)
    truth = dln_learning_coefficient(args.widths, args.rank)

    def exact(n: int, localization: float) -> dict:
        model, data = deep_linear(args.widths, args.rank, n=n, seed=args.seed)
        start = time.perf_counter()
        result = exact_value(model, data, localization, sweeps=args.sweeps, burnin=args.burnin)
        row = {"n": n, "localization": localization, "llc": result["llc"], "se": result["se"],
               "seconds": time.perf_counter() - start}
        print(f"| {n:,} | {localization:g} | {row['llc']:,.1f} +- {row['se']:.1f} | {row['llc'] / truth:.3f} "
              f"| {row['seconds']:.0f} |", flush=True)
        return row

    print(f"deep linear {'-'.join(map(str, args.widths))}, rank {args.rank}, data seed {args.seed}: "
          f"Aoyagi's coefficient {truth:,.1f}; block Gibbs, {args.sweeps} sweeps ({args.burnin} dropped)")
    print("| n | localization | exact +- se | / Aoyagi | seconds |\n|---|---|---|---|---|")
    against_localization = [exact(min(args.sizes), g) for g in args.localizations]
    against_n = [exact(n, 0.005) for n in args.sizes]

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"against the localization (n = {min(args.sizes):,})", "against n (localization 0.005)"))
    for col, part, key in ((1, against_localization, "localization"), (2, against_n, "n")):
        fig.add_scatter(x=[r[key] for r in part], y=[r["llc"] / truth for r in part], mode="lines+markers",
                        error_y=dict(type="data", array=[2 * r["se"] / truth for r in part]),
                        name="exact finite-n value (block Gibbs)", showlegend=col == 1, row=1, col=col,
                        line=dict(color="#636efa"))
        fig.add_hline(y=1.0, line_dash="dash", line_color="black", row=1, col=col)
        fig.add_hrect(y0=0.9, y1=1.1, fillcolor="green", opacity=0.08, line_width=0, row=1, col=col)
        fig.update_xaxes(type="log", dtick=1, exponentformat="power", row=1, col=col)
    fig.update_xaxes(title_text="localization (x the sharpest curvature of nbeta L)", row=1, col=1)
    fig.update_xaxes(title_text="examples n", row=1, col=2)
    fig.update_yaxes(range=[0.6, 1.15]).update_yaxes(title_text="nbeta E[L - L(w*)] / Aoyagi's coefficient", col=1)
    fig.update_layout(title=f"The LLC's finite-n target on a {'-'.join(map(str, args.widths))} deep linear network "
                            f"(rank {args.rank}): Aoyagi's coefficient dashed, within 10 % shaded",
                      template="plotly_white", height=440, width=1100,
                      legend=dict(orientation="h", y=-0.25))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.write_image(args.out)
    print(f"wrote {args.out}")
    print(f"exact finite-n value / Aoyagi's coefficient at n = {max(args.sizes):,}: {against_n[-1]['llc'] / truth:.2f}x")


if __name__ == "__main__":
    main()
