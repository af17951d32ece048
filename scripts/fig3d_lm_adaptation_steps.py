"""Figure 3(d): the number of LM-adaptation steps of the frozen model vs model size.

Paper scale: T5 1.1 adapted for 10K-1M steps; only the 100K checkpoints are public
(google/t5-{size}-lm-adapt), the others are given with --lm_checkpoint (a template with
{size} and {steps}); a point without a checkpoint is reported as not run.
CPU scale: the in-house span-corruption model (runs/pretrain_tiny/span_corruption) adapted
for each step count through runs/pretrain_lm_adaptation.gin, as scripts/pretrain_tiny.py
does (0 steps: the span-corruption model itself).

    python scripts/fig3d_lm_adaptation_steps.py --scale cpu
    python scripts/fig3d_lm_adaptation_steps.py --scale paper --lm_checkpoint 'gs://.../t5_1_1_{size}_lm{steps}'
"""

from __future__ import annotations

from jobs import short_path
from report import write_sweep
from sweep import T5_1_1, Sweep, Variant, csv, parse, parser, run_variants

from prompt_jax.model_dir import HF_EXPORT, last_step

STEPS = {"paper": "10000,50000,100000,500000,1000000", "cpu": "0,50,200,500"}


def cpu_checkpoint(sweep: Sweep, size: str, steps: int) -> str:
    """The in-house model of a size after `steps` of LM adaptation (0: span corruption)."""
    import pretrain_tiny

    span = sweep.stage_export(size, "span_corruption")
    if steps == 0:
        return span
    # The recipe's own LM-adaptation stage, when it has that many steps.
    recipe_steps = (last_step(sweep.pretrain_dir(size) / "lm_adaptation")
                    or sweep.args.pretrain_steps or pretrain_tiny.LM_STEPS)
    if recipe_steps == steps:
        return sweep.stage_export(size, "lm_adaptation")
    model_dir = sweep.pretrain_dir(size) / f"lm_adaptation_{steps}steps"
    export = model_dir / HF_EXPORT
    if sweep.dry_run and not (export / "config.json").is_file():
        print(f"would run LM adaptation for {steps} steps into {short_path(model_dir)}")
        return str(export)
    return pretrain_tiny.stage(
        f"LM adaptation ({steps} steps)", "runs/pretrain_lm_adaptation.gin", str(model_dir),
        steps, pretrain_tiny.BATCH_SIZE, [f"--gin.INITIAL_CHECKPOINT='{span}'"],
        pretrain_tiny.data_bindings(sweep.data_dir, sweep.vocab), size)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--lm_steps", help="comma-separated LM-adaptation step counts (default: "
                                      + "; ".join(f"{k}: {v}" for k, v in STEPS.items()) + ")")
    p.add_argument("--lm_checkpoint", help="paper scale: checkpoint template with {size} and "
                                           "{steps}")
    sweep = parse(p, argv)
    sweep.require_data(sweep.tasks)
    counts = csv(sweep.args.lm_steps, STEPS[sweep.scale_name].split(","), int)

    def checkpoint(size: str, steps: int) -> str | None:
        if sweep.cpu and not sweep.args.lm_checkpoint:
            return cpu_checkpoint(sweep, size, steps)
        if sweep.args.lm_checkpoint:
            return sweep.args.lm_checkpoint.format(size=size, steps=steps)
        if steps == 100_000:
            return sweep.checkpoint(size)
        if steps == 0:
            return T5_1_1.format(size=size)
        return None

    def variant(steps: int) -> Variant:
        def make(size: str, task: str, seed: int):
            ckpt = checkpoint(size, steps)
            if ckpt is None:
                return "no public checkpoint (give --lm_checkpoint)"
            return sweep.tuning_job(size, ckpt, task, seed=seed)

        return make

    variants = {f"{n:,}": variant(n) for n in counts}
    results = run_variants(sweep, variants)
    if not sweep.dry_run:
        write_sweep(sweep, results, "fig3d_lm_adaptation_steps",
                    "Figure 3(d): LM adaptation steps", "LM adaptation steps",
                    ["Prompt tuning, prompt length 100, class-label init, on the "
                     "span-corruption model after N steps of LM adaptation"
                     + (" (in-house: runs/pretrain_lm_adaptation.gin, as "
                        "scripts/pretrain_tiny.py runs it)." if sweep.cpu else ".")])


if __name__ == "__main__":
    main()
