"""Table 3: prompt ensembling. N prompts (5 in the paper) trained on one task and one
frozen model, differing only in their seed (init and data order), served together by
`prompt-jax infer a.npy b.npy ...` (one batched pass, majority vote of the decoded outputs)
on the validation split: the mean and the best of the single prompts vs their ensemble.

    python scripts/table3_ensembling.py --scale cpu      # inhouse_tiny, RTE
    python scripts/table3_ensembling.py --scale paper    # T5-XXL lm100k, SuperGLUE
"""

from __future__ import annotations

from jobs import Job
from report import output, plot_bars, run_list, write_markdown
from scores import aggregate, task_score
from sweep import Sweep, parse, parser

from prompt_jax.model_dir import BEST_PROMPT

ROWS = {"Average": "prompt_mean", "Best": "prompt_best", "Ensemble": "majority_vote"}


def infer_job(sweep: Sweep, size: str, checkpoint: str, task: str,
              prompt_files: list[str]) -> Job:
    name = f"ensemble-{size}-{task.removeprefix('super_glue_')}-{len(prompt_files)}prompts"
    return sweep.job("infer", name, size, ["runs/prompt_infer.gin"], task, checkpoint, [
        f"--gin.TASK_FEATURE_LENGTHS={sweep.lengths(task, 100)}",
        f"--gin.BATCH_SIZE={sweep.batch_size}", "--gin.INFER_SPLIT='validation'"],
        positional=prompt_files, inputs=prompt_files)


def ensemble_metrics(sweep: Sweep, task: str, records: list[dict]
                     ) -> dict[str, dict[str, float]]:
    """serving.ensemble_report on the infer job's records: every prompt's metrics, their
    mean and best, and the majority vote's, as the task measures them (infer.task_metrics)."""
    from prompt_jax import infer, serving

    examples = sweep.validation_examples(task)[:len(records)]  # infer.max_examples may cut
    names = list(records[0]["predictions"])

    def metrics(examples, predictions):
        return infer.task_metrics(task, examples, [{"prediction": p} for p in predictions])

    per_prompt = [[r["predictions"][n] for n in names] for r in records]
    voted = [r["prediction"] for r in records]
    return serving.ensemble_report(metrics, examples, per_prompt, {"majority_vote": voted})


def main(argv=None) -> None:
    p = parser(__doc__, sizes="one")
    p.add_argument("--num_prompts", type=int, default=5)
    sweep = parse(p, argv)
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
            prompts.append(str(model_dir / BEST_PROMPT))
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
        groups[short] = {label: task_score(report[k]) for label, k in ROWS.items()}
    if sweep.dry_run:
        return
    if len(sweep.tasks) > 1:
        groups["Score"] = {label: aggregate({t: r[k] for t, r in reports.items()})
                           for label, k in ROWS.items()}
    table, plot = output(sweep, "table3_ensembling")
    write_markdown(
        table, "Table 3: prompt ensembling",
        [f"{len(seeds)} prompts (prompt length 100, class-label init, seeds "
         f"{', '.join(map(str, seeds))}) on {size}; each prompt is its run's {BEST_PROMPT}. "
         "Average and Best are over the single prompts; Ensemble is their majority vote "
         "(`prompt-jax infer` with every prompt file, greedy decoding), all on the validation "
         f"split. Predicting the majority class scores {sweep.majority_baseline():.1f}.",
         *sweep.setup_lines()],
        [(["Task", "Metric", *ROWS], rows),
         (["Task", "Metric", *(f"prompt {i}" for i in seeds)], prompt_rows)],
        [run_list(dirs)])
    plot_bars(plot, "Table 3: prompt ensembling", "score", groups)


if __name__ == "__main__":
    main()
