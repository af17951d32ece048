"""Table 3: prompt ensembling. N prompts (5 in the paper) trained on one task and one
frozen model, differing only in their seed (init and data order), served together by
`prompt-jax infer a.npy b.npy ...` (one batched pass, majority vote of the decoded outputs)
on the validation split: the mean and the best of the single prompts vs their ensemble.

    python scripts/table3_ensembling.py --scale cpu      # inhouse_tiny, RTE
    python scripts/table3_ensembling.py --scale paper    # T5-XXL lm100k, SuperGLUE
"""

from __future__ import annotations

import common

ROWS = {"Average": "prompt_mean", "Best": "prompt_best", "Ensemble": "majority_vote"}


def infer_job(sweep: common.Sweep, size: str, checkpoint: str, task: str,
              prompt_files: list[str]) -> common.Job:
    bindings = (f"--gin.MIXTURE_OR_TASK_NAME={common.gin_str(task)}",
                f"--gin.INITIAL_CHECKPOINT={common.gin_str(checkpoint)}",
                f"--gin.TASK_FEATURE_LENGTHS={sweep.lengths(task, 100)}",
                f"--gin.BATCH_SIZE={sweep.batch_size}", "--gin.INFER_SPLIT='validation'",
                *sweep.data_bindings, *sweep.extra)
    files = ("models/t5_1_1_prompt.gin", sweep.size_gin(size), "runs/prompt_infer.gin")
    name = f"ensemble-{size}-{task.removeprefix('super_glue_')}-{len(prompt_files)}prompts"
    return common.Job("infer", name, files, bindings, tuple(prompt_files),
                      inputs=(checkpoint, *prompt_files))


def ensemble_metrics(sweep: common.Sweep, task: str, records: list[dict]
                     ) -> dict[str, dict[str, float]]:
    """serving.ensemble_report on the infer job's records: every prompt's metrics, their
    mean and best, and the majority vote's, postprocessed as the task does."""
    from prompt_jax import serving

    examples, post, metric_fn = sweep.task_eval(task)
    examples = examples[:len(records)]  # infer.max_examples may cut the split
    names = list(records[0]["predictions"])
    targets = [post(e.targets, example=e.raw, is_target=True) for e in examples]
    per_prompt = [[post(r["predictions"][n], example=e.raw, is_target=False) for n in names]
                  for e, r in zip(examples, records, strict=True)]
    voted = [post(r["prediction"], example=e.raw, is_target=False)
             for e, r in zip(examples, records, strict=True)]
    return serving.ensemble_report(metric_fn, targets, per_prompt, {"majority_vote": voted})


def main(argv=None) -> None:
    p = common.parser(__doc__, sizes="one")
    p.add_argument("--num_prompts", type=int, default=5)
    sweep = common.parse(p, argv)
    sweep.require_data(sweep.tasks)
    size = sweep.sizes[0]
    checkpoint = sweep.checkpoint(size)
    seeds = sweep.seeds = tuple(range(sweep.args.num_prompts))

    rows, prompt_rows, dirs, groups, reports = [], [], {}, {}, {}
    for task in sweep.tasks:
        prompts = []
        for seed in seeds:
            model_dir = sweep.train(sweep.tuning_job(size, checkpoint, task, seed=seed))
            dirs[f"{task}, seed {seed}"] = model_dir
            prompts.append(str(model_dir / "best_prompt.npy"))
        if sweep.dry_run:
            sweep.infer(infer_job(sweep, size, checkpoint, task, prompts))
            continue
        records = sweep.infer(infer_job(sweep, size, checkpoint, task, prompts))
        report = reports[task] = ensemble_metrics(sweep, task, records)
        short = task.removeprefix("super_glue_").upper()
        for metric in report["prompt_0"]:
            rows.append([short, metric] + [f"{report[k][metric]:.1f}" for k in ROWS.values()])
            prompt_rows.append([short, metric] + [f"{report[f'prompt_{i}'][metric]:.1f}"
                                                  for i in seeds])
        groups[short] = {label: common.task_score(report[k]) for label, k in ROWS.items()}
    if sweep.dry_run:
        return
    if len(sweep.tasks) > 1:
        groups["Score"] = {label: common.aggregate({t: r[k] for t, r in reports.items()})
                           for label, k in ROWS.items()}
    table, plot = common.output(sweep, "table3_ensembling")
    common.write_markdown(
        table, "Table 3: prompt ensembling",
        [f"{len(seeds)} prompts (prompt length 100, class-label init, seeds "
         f"{', '.join(map(str, seeds))}) on {size}; each prompt is its run's best_prompt.npy. "
         "Average and Best are over the single prompts; Ensemble is their majority vote "
         "(`prompt-jax infer` with every prompt file, greedy decoding), all on the validation "
         f"split. Predicting the majority class scores {sweep.majority_baseline():.1f}.",
         *sweep.setup_lines()],
        [(["Task", "Metric", *ROWS], rows),
         (["Task", "Metric", *(f"prompt {i}" for i in seeds)], prompt_rows)],
        [common.run_list(dirs)])
    common.plot_bars(plot, "Table 3: prompt ensembling", "score", groups)


if __name__ == "__main__":
    main()
