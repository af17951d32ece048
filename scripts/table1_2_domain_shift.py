"""Tables 1-2: robustness to domain shift, prompt tuning vs model tuning.

Table 2 (QQP <-> MRPC): train on one paraphrase task, evaluate zero-shot on the other (and
in domain). Both methods are compared on their final weights (prompt: prompts/<steps>.npy;
model: hf_export, train.export_hf=True), evaluated with `prompt-jax eval`
(runs/prompt_eval.gin). Table 1 (SQuAD -> the MRQA 2019 out-of-domain sets) needs QA tasks
that prompt_jax.tasks does not register; it is reported as not run.

The GLUE files must be under the data directory (glue/{QQP,MRPC}/{train,dev}.tsv) or, with
no data directory at paper scale, come from TFDS; where they are absent the table says so.

    python scripts/table1_2_domain_shift.py --scale cpu
    python scripts/table1_2_domain_shift.py --scale paper
"""

from __future__ import annotations

from jobs import Job, gin_str, short_path
from report import output, plot_bars, plot_message, run_list, write_markdown
from scores import fmt, mean_std
from sweep import Sweep, parse, parser

from prompt_jax.model_dir import HF_EXPORT, final_eval, prompt_at

PAIRS = (("glue_qqp", "glue_mrpc"), ("glue_mrpc", "glue_qqp"))
METHODS = {"Model": "model", "Prompt": "prompt"}
NAMES = {"glue_qqp": "QQP", "glue_mrpc": "MRPC"}
TABLE1 = ("Table 1 (SQuAD -> MRQA out-of-domain: TextbookQA, BioASQ, RACE, RE, DuoRC, DROP) "
          "is not run: prompt_jax.tasks registers no SQuAD or MRQA task.")


def eval_job(sweep: Sweep, size: str, task: str, checkpoint: str, prompt_file: str | None,
             name: str) -> Job:
    prompt_length = 0
    if prompt_file:
        import numpy as np

        prompt_length = np.load(prompt_file, mmap_mode="r").shape[0]
    return sweep.job("eval", name, size, ["runs/prompt_eval.gin"], task, checkpoint, [
        f"--gin.PROMPT_FILE={gin_str(prompt_file)}",
        f"--gin.TASK_FEATURE_LENGTHS={sweep.lengths(task, prompt_length)}",
        f"--gin.BATCH_SIZE={sweep.batch_size}"], inputs=[prompt_file] if prompt_file else [])


def main(argv=None) -> None:
    sweep = parse(parser(__doc__, sizes="one"), argv)
    size = sweep.sizes[0]
    table, plot = output(sweep, "table1_2_domain_shift")
    title = "Tables 1-2: domain shift"
    missing = sorted({m for pair in PAIRS for t in pair for m in sweep.missing_data(t)})
    if missing:
        message = ("Table 2 not run: the official GLUE files are missing: "
                   + ", ".join(short_path(m) for m in missing)
                   + ". Put QQP and MRPC under the data directory (--data_dir or "
                     "PROMPT_JAX_DATA_DIR) as glue/{QQP,MRPC}/{train,dev,test}.tsv.")
        write_markdown(table, title, [TABLE1, message, *sweep.setup_lines()])
        plot_message(plot, title, message)
        return

    rows, dirs, groups = [], {}, {}
    for train_task, other in PAIRS:
        for label, tuning in METHODS.items():
            scores = {"in": [], "out": []}
            for seed in sweep.seeds:
                checkpoint = sweep.checkpoint(size)
                job = sweep.tuning_job(size, checkpoint, train_task, tuning=tuning, seed=seed,
                                       extra=(["--gin.train.export_hf=True"] if tuning == "model"
                                              else []))
                model_dir = sweep.train(job)
                dirs[f"{label} tuning on {NAMES[train_task]}, seed {seed}"] = model_dir
                if tuning == "model":
                    checkpoint, prompt = str(model_dir / HF_EXPORT), None
                else:
                    prompt = prompt_at(model_dir, sweep.steps)
                if sweep.dry_run:
                    continue
                scores["in"].append(final_eval(model_dir))
                name = f"{job.name}-on-{other.removeprefix('glue_')}"
                scores["out"].append(sweep.evaluate(eval_job(sweep, size, other, checkpoint,
                                                             prompt, name)))
            if sweep.dry_run:
                continue
            for where, task in (("in", train_task), ("out", other)):
                acc = [m["accuracy"] for m in scores[where]]
                f1 = [m["f1"] for m in scores[where]]
                rows.append([NAMES[train_task], NAMES[task],
                             "in-domain" if where == "in" else "out-of-domain", label,
                             fmt(acc), fmt(f1)])
                groups.setdefault(f"{NAMES[train_task]} -> {NAMES[task]}", {})[
                    f"{label} tuning"] = mean_std(f1)[0]
    if sweep.dry_run:
        return
    write_markdown(
        table, title,
        [TABLE1, f"Table 2: zero-shot transfer between QQP and MRPC on {size} (the paper: "
                 "T5-XXL), final weights of each run (prompt tuning: the prompt at the last "
                 "step; model tuning: all weights at the last step).", *sweep.setup_lines()],
        [(["Train", "Eval", "Domain", "Tuning", "Accuracy", "F1"], rows)], [run_list(dirs)])
    plot_bars(plot, "Table 2: QQP <-> MRPC (F1)", "F1", groups)


if __name__ == "__main__":
    main()
