"""Figure 1: prompt tuning vs model tuning as the frozen model grows.

Prompt tuning (prompt length 100, class-label init, runs/prompt_finetune.gin) and model
tuning (every weight, runs/model_finetune.gin: Adafactor, lr 1e-3) of the same model per
size, beside P-tuning v2's deep prompts without and with its classification head
(methods/p_tuning_v2.gin, methods/p_tuning_v2_head.gin; the head only where the task has
class labels). Paper scale: T5 1.1 lm100k small..xxl on SuperGLUE. CPU scale: in-house
models of several sizes (scripts/pretrain_tiny.py --size ..., the same recipe for each), on
RTE.

    python scripts/fig1_scale.py --scale cpu        # sizes inhouse_mini, inhouse_tiny
    python scripts/fig1_scale.py --scale cpu --sizes inhouse_tiny --tasks glue_sst2 \
        --out docs/reproduction/sst2              # the bundled backbone on SST-2
    python scripts/fig1_scale.py --scale paper
"""

from __future__ import annotations

from jobs import size_gin
from pretrain_tiny import HELDOUT_SUMMARY
from report import write_sweep
from sweep import CPU_SIZES, Sweep, class_labels, parse, parser, run_variants

from prompt_jax.model_dir import read_json


def heldout_losses(sweep: Sweep) -> list[str]:
    """CPU scale: each in-house model's held-out losses (pretrain_tiny.py's summary)."""
    cells = []
    for size in sweep.sizes:
        summary = read_json(sweep.pretrain_dir(size) / HELDOUT_SUMMARY)
        if summary:
            final = summary["losses"]["+ LM adaptation"]
            cells.append(f"{size} {final['span_corruption']:.3f} / {final['lm_adaptation']:.3f}"
                         " (inputs/targets " + ", ".join(
                             f"{n['inputs']}/{n['targets']}" for n in summary["lengths"].values())
                         + ")")
    if not cells:
        return []
    return ["Held-out span-corruption / LM-adaptation loss of each in-house model (cross-entropy "
            "per target token, at the lengths given; see REPORT.md beside each model): "
            + ", ".join(cells) + "."]


def main(argv=None) -> None:
    sweep = parse(parser(__doc__), argv)
    if sweep.cpu and not sweep.args.sizes:
        sweep.sizes = CPU_SIZES
    sweep.require_data(sweep.tasks)
    for size in sweep.sizes:
        size_gin(size)
    variants = {
        "Model Tuning": lambda size, task, seed: sweep.tuning_job(
            size, sweep.checkpoint(size), task, tuning="model", seed=seed),
        "Prompt Tuning": lambda size, task, seed: sweep.tuning_job(
            size, sweep.checkpoint(size), task, seed=seed),
        # P-tuning v2's claim: deep prompts close the gap to model tuning at small scale.
        "P-tuning v2": lambda size, task, seed: sweep.tuning_job(
            size, sweep.checkpoint(size), task, tuning="p_tuning_v2", seed=seed),
        "P-tuning v2 + head": lambda size, task, seed: sweep.tuning_job(
            size, sweep.checkpoint(size), task, tuning="p_tuning_v2_head", seed=seed)
        if class_labels(task) else f"{task} has free-text targets (no classes for a head)",
    }
    results = run_variants(sweep, variants)
    if not sweep.dry_run:
        write_sweep(sweep, results, "fig1_scale",
                    "Figure 1: prompt tuning vs model tuning across model sizes", "method",
                    ["Model tuning trains every weight (runs/model_finetune.gin); prompt "
                     "tuning trains a 100-token prompt (runs/prompt_finetune.gin) on the same "
                     "frozen model; P-tuning v2 trains 20-token key/value prefixes in every "
                     "encoder layer (methods/p_tuning_v2.gin, scored by the decoder like "
                     "prompt tuning), and P-tuning v2 + head the same prefixes with a linear "
                     "classification head on the mean-pooled encoder outputs "
                     "(methods/p_tuning_v2_head.gin, AdamW; its score is the head's accuracy "
                     "and its loss is per example, so the token-loss column shows —). The "
                     "paper's other lines (multi-task model tuning, GPT-3 prompt design) are "
                     "not reproduced."]
                    + (heldout_losses(sweep) if sweep.cpu else []))


if __name__ == "__main__":
    main()
