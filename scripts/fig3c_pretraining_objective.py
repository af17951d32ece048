"""Figure 3(c): the frozen model's pretraining objective vs model size.

  Span Corruption             a span-corruption model, the task as is
  Span Corruption + Sentinel  the same model, targets prefixed with `<extra_id_0>` (the
                              task's `_sentinel` variant), as in its pretraining
  LM Adaptation               the span-corruption model after LM adaptation

Paper scale: T5 1.1 (--span_checkpoint, default google/t5-v1_1-{size}) and T5 1.1 lm100k
(--checkpoint, default google/t5-{size}-lm-adapt). CPU scale: the two stages of the in-house
model (scripts/pretrain_tiny.py; runs/pretrain_tiny/{span_corruption,lm_adaptation}/hf_export,
float32), rebuilt when missing.

    python scripts/fig3c_pretraining_objective.py --scale cpu
    python scripts/fig3c_pretraining_objective.py --scale paper
"""

from __future__ import annotations

from report import write_sweep
from sweep import T5_1_1, parse, parser, run_variants


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--span_checkpoint", default=None,
                   help=f"span-corruption model per size (paper default {T5_1_1})")
    sweep = parse(p, argv)
    sweep.require_data(sweep.tasks)

    def span(size: str) -> str:
        if sweep.cpu and not sweep.args.span_checkpoint:
            return sweep.stage_export(size, "span_corruption")
        return (sweep.args.span_checkpoint or T5_1_1).format(size=size)

    def lm(size: str) -> str:
        if sweep.cpu and not sweep.args.checkpoint:
            return sweep.stage_export(size, "lm_adaptation")
        return sweep.checkpoint(size)

    variants = {
        "Span Corruption": lambda size, task, seed: sweep.tuning_job(
            size, span(size), task, seed=seed),
        "Span Corruption + Sentinel": lambda size, task, seed: sweep.tuning_job(
            size, span(size), task + "_sentinel", seed=seed),
        "LM Adaptation": lambda size, task, seed: sweep.tuning_job(
            size, lm(size), task, seed=seed),
    }
    results = run_variants(sweep, variants)
    if not sweep.dry_run:
        write_sweep(sweep, results, "fig3c_pretraining_objective",
                    "Figure 3(c): pretraining objective", "pretraining objective",
                    ["Prompt tuning, prompt length 100, class-label init, on frozen models "
                     "with different pretraining: "
                     + ("the in-house stages, span corruption then LM adaptation "
                        "(scripts/pretrain_tiny.py)." if sweep.cpu else
                        "T5 1.1 (span corruption) and T5 1.1 lm100k.")])


if __name__ == "__main__":
    main()
