"""Figure 3(a): prompt length (1, 5, 20, 100, 150) vs model size.

Prompt tuning with the class-label init, each length its own run; the encoder gets the input
text plus the P prompt positions, so every length sees the same text.

    python scripts/fig3a_prompt_length.py --scale cpu      # in-house tiny T5, RTE
    python scripts/fig3a_prompt_length.py --scale paper    # T5 1.1 lm100k, SuperGLUE
"""

from __future__ import annotations

from report import write_sweep
from sweep import csv, parse, parser, run_variants


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--lengths", default="1,5,20,100,150", help="prompt lengths P")
    sweep = parse(p, argv)
    sweep.require_data(sweep.tasks)
    variants = {
        str(length): (lambda size, task, seed, length=length: sweep.tuning_job(
            size, sweep.checkpoint(size), task, prompt_length=length, seed=seed))
        for length in csv(sweep.args.lengths, (), int)}
    results = run_variants(sweep, variants)
    if not sweep.dry_run:
        write_sweep(sweep, results, "fig3a_prompt_length", "Figure 3(a): prompt length",
                    "prompt length", ["Prompt tuning, class-label init."])


if __name__ == "__main__":
    main()
