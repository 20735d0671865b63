"""Render the README's figures (PNG, kaleido) from the shipped run and, if given, its seed family.

    python docs/figures.py                              # docs/loss_curves.png from checkpoints/cpu
    python docs/figures.py --family runs/cpu_seeds      # also docs/family_curves.png, docs/family_drops.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analyses.family.figures import plot_drop_steps, plot_family_curves
from analyses.family.summary import family_summary
from analyses.plateau.figures import plot_phases
from analyses.plateau.phases import detect_phases
from mechlrmc.runs import Run

DOCS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(DOCS.parent / "checkpoints" / "cpu"))
    parser.add_argument("--family", help="a sweep directory of the same recipe (its run directories)")
    args = parser.parse_args()

    run = Run(args.run)
    plot_phases(run, detect_phases(run)).write_image(DOCS / "loss_curves.png", width=1000, height=520)
    written = ["loss_curves.png"]
    if args.family:
        summary = family_summary(args.family)
        plot_family_curves(args.family, summary).write_image(DOCS / "family_curves.png", width=1100, height=430)
        plot_drop_steps(summary).write_image(DOCS / "family_drops.png", width=700, height=380)
        written += ["family_curves.png", "family_drops.png"]
    print("wrote " + ", ".join(str(DOCS / name) for name in written))


if __name__ == "__main__":
    main()
