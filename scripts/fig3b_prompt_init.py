"""Figure 3(b): prompt initialization (random uniform, sampled vocab, class label) vs model size.

Prompt length 100; the three inits are the gin files prompts/random_uniform.gin (uniform in
[-0.5, 0.5]), prompts/sampled_vocab.gin (embeddings of tokens among the 5,000 most frequent)
and prompts/class_labels.gin (the task's label strings, the rest sampled vocab).

    python scripts/fig3b_prompt_init.py --scale cpu
    python scripts/fig3b_prompt_init.py --scale paper
"""

from __future__ import annotations

from report import write_sweep
from sweep import parse, parser, run_variants

INITS = {"Random Uniform": "random_uniform", "Sampled Vocab": "sampled_vocab",
         "Class Label": "class_labels"}


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--prompt_length", type=int, default=100)
    sweep = parse(p, argv)
    sweep.require_data(sweep.tasks)
    length = sweep.args.prompt_length
    variants = {
        label: (lambda size, task, seed, init=init: sweep.tuning_job(
            size, sweep.checkpoint(size), task, prompt_length=length, init=init, seed=seed))
        for label, init in INITS.items()}
    results = run_variants(sweep, variants)
    if not sweep.dry_run:
        write_sweep(sweep, results, "fig3b_prompt_init", "Figure 3(b): prompt initialization",
                    "init", [f"Prompt tuning, prompt length {length}."])


if __name__ == "__main__":
    main()
