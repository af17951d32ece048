"""Figure 1: prompt tuning vs model tuning as the frozen model grows.

Prompt tuning (prompt length 100, class-label init, runs/prompt_finetune.gin) and model
tuning (every weight, runs/model_finetune.gin: Adafactor, lr 1e-3) of the same model per
size. Paper scale: T5 1.1 lm100k small..xxl on SuperGLUE. CPU scale: in-house models of
several sizes (scripts/pretrain_tiny.py --size ..., the same recipe for each), on RTE.

    python scripts/fig1_scale.py --scale cpu        # sizes inhouse_mini, inhouse_tiny
    python scripts/fig1_scale.py --scale paper
"""

from __future__ import annotations

import json

import common


def heldout_losses(sweep: common.Sweep) -> list[str]:
    """CPU scale: each in-house model's held-out span-corruption loss (pretrain_tiny.py)."""
    cells = []
    for size in sweep.sizes:
        path = sweep.pretrain_dir(size) / "eval_lm" / "eval_validation.json"
        if path.exists():
            with open(path) as f:
                cells.append(f"{size} {json.load(f)['metrics']['loss']:.3f}")
    if not cells:
        return []
    return ["Held-out span-corruption loss of each in-house model (cross-entropy per target "
            "token; see REPORT.md beside each model): " + ", ".join(cells) + "."]


def main(argv=None) -> None:
    p = common.parser(__doc__)
    sweep = common.parse(p, argv)
    if sweep.cpu and not sweep.args.sizes:
        sweep.sizes = common.CPU_SIZES
    sweep.require_data(sweep.tasks)
    for size in sweep.sizes:
        sweep.size_gin(size)
    variants = {
        "Model Tuning": lambda size, task, seed: sweep.tuning_job(
            size, sweep.checkpoint(size), task, tuning="model", seed=seed),
        "Prompt Tuning": lambda size, task, seed: sweep.tuning_job(
            size, sweep.checkpoint(size), task, seed=seed),
    }
    results = common.run_variants(sweep, variants)
    if not sweep.dry_run:
        common.write_sweep(sweep, results, "fig1_scale",
                           "Figure 1: prompt tuning vs model tuning across model sizes",
                           "method",
                           ["Model tuning trains every weight (runs/model_finetune.gin); "
                            "prompt tuning trains a 100-token prompt (runs/prompt_finetune.gin) "
                            "on the same frozen model. The paper's other lines (multi-task "
                            "model tuning, GPT-3 prompt design) are not reproduced."]
                           + (heldout_losses(sweep) if sweep.cpu else []))


if __name__ == "__main__":
    main()
