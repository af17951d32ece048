"""Section 7: interpreting a learned prompt by the nearest vocabulary tokens (cosine
similarity in the frozen model's embedding table) of each prompt position.

The prompt is the best_prompt.npy of the default run (prompt length 100, class-label init,
seed 0), trained or reused; the table is what `prompt-jax inspect PROMPT --checkpoint
MODEL` prints. The summary counts the positions whose neighbours include a class-label
token (the paper: class labels persist through training, and appear as neighbours of other
positions too).

    python scripts/sec7_nearest_neighbours.py --scale cpu      # inhouse_tiny, RTE
    python scripts/sec7_nearest_neighbours.py --scale paper    # T5-XXL lm100k, BoolQ
"""

from __future__ import annotations

from jobs import short_path
from report import output, pyplot, save_figure, write_markdown
from scores import tasks_module
from sweep import parse, parser

from prompt_jax.model_dir import BEST_PROMPT, read_best

TASK = {"paper": "super_glue_boolq", "cpu": "super_glue_rte"}


def main(argv=None) -> None:
    p = parser(__doc__, sizes="one")
    p.add_argument("--k", type=int, default=5, help="neighbours per position")
    sweep = parse(p, argv)
    task = sweep.args.tasks.split(",")[0] if sweep.args.tasks else TASK[sweep.scale_name]
    sweep.require_data([task])
    size = sweep.sizes[0]
    checkpoint = sweep.checkpoint(size)
    model_dir = sweep.train(sweep.tuning_job(size, checkpoint, task))
    if sweep.dry_run:
        return

    from prompt_jax import build, prompts, serving
    from prompt_jax.checkpoints import load_checkpoint

    prompt_file = model_dir / BEST_PROMPT
    prompt = prompts.load_prompt(str(prompt_file))
    _, params = load_checkpoint(checkpoint)
    embedding = build.embedding_table(params)
    ids, sims = serving.nearest_neighbours(prompt, embedding, sweep.args.k)
    tasks = tasks_module()
    vocab = tasks.get_vocabulary(sweep.vocab)
    labels = tasks.class_labels(task) or ()
    label_ids = {i for label in labels for i in vocab.encode(label)}
    with_label = [pos for pos in range(len(ids)) if label_ids & set(ids[pos].tolist())]
    piece = vocab.tokenizer.id_to_piece
    top1 = [piece(int(i)) if i < vocab.tokenizer.get_piece_size() else f"<id {i}>"
            for i in ids[:, 0]]

    best = read_best(model_dir)
    table, plot = output(sweep, "sec7_nearest_neighbours")
    summary = [
        f"Prompt: `{short_path(prompt_file)}` ({prompt.shape[0]} x {prompt.shape[1]}), "
        f"trained on {task} with {size} (best validation {best['metric']} "
        f"{best['value']:.1f} at step {best['step']}); neighbours in the embedding table of "
        f"`{short_path(checkpoint)}`. The same table: `prompt-jax inspect "
        f"{short_path(prompt_file)} --checkpoint {short_path(checkpoint)} "
        f"--k {sweep.args.k}`.",
        f"Class labels {', '.join(labels) or '(none)'} (tokens "
        f"{', '.join(piece(i) for i in sorted(label_ids)) or '-'}) initialised positions "
        f"0-{len(labels) - 1}; positions whose {sweep.args.k} nearest tokens include a "
        f"class-label token: {len(with_label)} of {len(ids)} ({', '.join(map(str, with_label))})."
        if labels else "The task has no class labels.",
        f"Cosine similarity of each position's nearest token: mean {sims[:, 0].mean():.3f}, "
        f"min {sims[:, 0].min():.3f}, max {sims[:, 0].max():.3f}.",
        *sweep.setup_lines(),
        "```\n" + serving.format_neighbours(ids, sims, vocab) + "\n```",
    ]
    write_markdown(table, "Section 7: nearest neighbours of the learned prompt tokens", summary)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.14 * len(ids) + 2), 3.8))
    colors = ["C1" if pos in with_label else "C0" for pos in range(len(ids))]
    ax.bar(range(len(ids)), sims[:, 0], color=colors)
    ax.set_xticks(range(len(ids)), top1, rotation=90, fontsize=6)
    ax.set_xlabel("prompt position: its nearest token (orange: a class-label token among the "
                  f"{sweep.args.k} nearest)")
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"Section 7: nearest tokens of a learned prompt ({task}, {size})")
    save_figure(fig, plot)


if __name__ == "__main__":
    main()
