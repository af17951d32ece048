"""The infer job and `prompt-jax inspect`: serving prompts on one frozen model.

    prompt-jax infer [PROMPT.npy ...] --gin_file=runs/prompt_infer.gin ...

Inputs come from a task split (`MIXTURE_OR_TASK_NAME`, `INFER_SPLIT`) or from
`INPUT_FILE`: JSONL with an `inputs` string per line (optional `targets`, and
`task` to serve several tasks' prompts in mixed batches, with
`infer.prompt_files_by_task = {'task': 'file.npy', ...}`), or TSV whose first
column is the input (optional second column: the task). Several prompt files for
one task form an ensemble (paper §6): every prompt runs in the same batched pass
and the prediction is their majority vote. Predictions are written as JSONL, with
the summed log-probability of the decoded tokens as `score`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import build, decoding, partitioning, prompts, serving
from prompt_jax import model_dir as model_dir_lib
from prompt_jax.methods import multitask
from prompt_jax.pytree import flatten, unflatten


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecodingSpec:
    """Greedy (num_beams=1) or beam search with T5X's length penalty ((5+len)/6)**alpha."""

    num_beams: int = 1
    length_penalty: float = 0.6
    max_decode_length: int | None = None  # default: TASK_FEATURE_LENGTHS['targets']


@dataclasses.dataclass
class Example:
    inputs: str
    ids: list[int]
    targets: str | None = None
    task: str | None = None
    raw: dict[str, Any] | None = None  # the task example, for postprocessing


@gin.configurable(denylist=["prompt_files"])
def infer(*, initial_checkpoint: str | None = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          model: build.ModelSpec = build.ModelSpec(), model_dir: str | None = None,
          mixture_or_task_name: str | None = None, split: str = "validation",
          prompt_file: str | None = None, prompt_files: Sequence[str] | None = None,
          prompt_files_by_task: Mapping[str, str] | None = None,
          input_file: str | None = None, output_file: str | None = None,
          batch_size: int = 32, max_examples: int | None = None,
          decoding_spec: DecodingSpec = DecodingSpec(), truncate_inputs: bool = False,
          mesh_shape: Sequence[int] = (-1, 1), seed: int = 0) -> list[dict[str, Any]]:
    """Write predictions (see the module docstring); returns the records written.

    Inputs are read whole (as the eval job and the reference's infer-eval do) unless
    `truncate_inputs`, which cuts them to TASK_FEATURE_LENGTHS['inputs'] and says how many.
    """
    from prompt_jax import data, tasks

    output_file = output_file or (model_dir_lib.path(model_dir, model_dir_lib.PREDICTIONS)
                                  if model_dir else None)
    if not output_file:
        raise ValueError("infer: set OUTPUT_FILE (or MODEL_DIR) for the predictions")
    budget = data.check_lengths(task_feature_lengths)["inputs"]
    mesh = partitioning.make_mesh(mesh_shape)
    partitioning.check_batch_size(batch_size, mesh.shape["data"])
    by_task = dict(prompt_files_by_task or {})
    if not (by_task or prompt_files or prompt_file):  # a multi-task run: each task's prompt
        by_task = multitask.default_prompt_files(model_dir, mixture_or_task_name)
    served = build.load_served(
        model, initial_checkpoint, model_dir,
        by_task or list(prompt_files or ([prompt_file] if prompt_file else [])), seed)
    from prompt_jax.methods import templates

    # A task's template with soft tokens: the prompts' rows go there (methods/templates.py).
    if input_file and templates.soft_count(mixture_or_task_name or ""):
        raise ValueError(f"{input_file}: {mixture_or_task_name}'s template places the prompt "
                         "inside the input (task_templates.templates, soft tokens), but "
                         "INPUT_FILE holds raw inputs, before which the prompt would be put: "
                         "infer the task's split (no INPUT_FILE) instead")
    model = served.model().clone(soft_token_id=None if input_file else
                                 templates.model_soft_token_id(mixture_or_task_name))
    if model.soft_token_id is not None and truncate_inputs:
        raise ValueError(f"infer.truncate_inputs would cut the end of {mixture_or_task_name}'s "
                         "template (its soft tokens with it); run without it")
    for name, prompt in served.prompts.items():
        if model.soft_token_id is not None:
            templates.check_prompt_length(mixture_or_task_name, prompt.shape[0],
                                          served.sources[name])
    params = build.place_params(served.config, unflatten(served.with_deep_prompt(
        dict(flatten(served.frozen)))), mesh, model=model)
    vocab = tasks.get_vocabulary()

    examples = _read_examples(input_file, mixture_or_task_name, split, vocab, max_examples)
    if not truncate_inputs:
        budget = max(len(e.ids) for e in examples)
    truncated = sum(len(e.ids) > budget for e in examples)
    if truncated:
        print(f"{truncated} of {len(examples)} inputs truncated to {budget} tokens "
              "(TASK_FEATURE_LENGTHS['inputs'], infer.truncate_inputs)", flush=True)
    if by_task:
        unknown = sorted({e.task for e in examples} - set(by_task))
        if unknown:
            raise ValueError(f"{input_file}: examples of task(s) {unknown} have no prompt in "
                             f"infer.prompt_files_by_task (has {sorted(by_task)})")
    predict = _predictor(served, model, by_task, mixture_or_task_name, examples, input_file)
    max_len = decoding_spec.max_decode_length or task_feature_lengths["targets"]
    # The prompts, left-padded into one array once: (names, prompts [N, P, E], mask [N, P]).
    packed = (list(served.prompts), *serving.pack_prompts(list(served.prompts.values()))) \
        if served.prompts else None
    records = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        tokens = partitioning.whole_batch({"x": _pad_ids([e.ids for e in chunk], budget,
                                                        batch_size)}, mesh)["x"]
        records += predict(model, params, tokens, chunk, packed, max_len, decoding_spec, vocab)
    _write_records(output_file, records)
    if mixture_or_task_name and not input_file:
        metrics = task_metrics(mixture_or_task_name, examples, records)
        if metrics:
            print(f"{mixture_or_task_name} {split}: "
                  + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    return records


def _read_examples(input_file, task_name, split, vocab, max_examples) -> list[Example]:
    if input_file:
        examples = list(read_inputs(input_file, vocab))
    elif task_name:
        from prompt_jax import data

        data.check_name(task_name)
        examples = list(task_examples(task_name, split))
    else:
        raise ValueError("infer: set INPUT_FILE or MIXTURE_OR_TASK_NAME")
    examples = examples[:max_examples] if max_examples else examples
    if not examples:
        raise ValueError(f"infer: no examples in {input_file or task_name}")
    return examples


def _predictions(model, params, tokens, chunk, packed, max_len, spec, vocab):
    """One prompt for every row, or each row the prompt of its task (a mixed-task batch)."""
    prefix = mask = None
    if packed:
        names, prompts, prompts_mask = packed
        index = np.zeros(tokens.shape[0], np.int32)
        if len(names) > 1:  # by task
            index[:len(chunk)] = [names.index(e.task) for e in chunk]
        prefix, mask = serving.mixed_batch_prefix(prompts, prompts_mask, index)
    out, scores = _decode(model, params, tokens, max_len, prefix, mask, spec)
    return [_record(e, vocab, out[i], float(scores[i])) for i, e in enumerate(chunk)]


def _predictor(served: build.Served, model: Any, by_task: Mapping[str, str],
               task_name: str | None, examples: Sequence[Example], input_file: str | None):
    """How each batch is predicted: by P-tuning v2's classification head when the deep
    prompt has one, by the majority vote of several prompts for one task, else decoded with
    one prompt per row (each row its task's with `by_task`)."""
    if served.head_task(task_name):
        return _head_predictor(served, model, task_name, examples, input_file)
    return _ensemble_predictions if len(served.prompts) > 1 and not by_task else _predictions


def _head_predictor(served: build.Served, model: Any, task_name: str,
                    examples: Sequence[Example], input_file: str | None):
    """Predictions of a deep prompt's classification head: each row's class (the task's
    label string, as the decoder would write it) from the head's logits, its log-probability
    as `score` and every class's as `class_log_probs`; the decoder takes no part."""
    from prompt_jax import tasks

    source = served.deep_prompt_source
    if served.prompts:
        raise ValueError(f"{source}: a classification head classifies with its deep prompt "
                         f"alone; infer it without soft prompts (got "
                         f"{', '.join(served.sources.values())})")
    other = sorted({e.task for e in examples if e.task and e.task != task_name})
    if other:
        raise ValueError(f"{input_file}: rows of task(s) {other}; {source}'s classification "
                         f"head labels {task_name} rows only")
    labels = tasks.class_labels(task_name)
    classify = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens,
                                                          method=model.classify))

    def predict(model, params, tokens, chunk, packed, max_len, spec, vocab):
        logits = np.asarray(jax.device_get(classify(params, tokens)), np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        choices = logp.argmax(-1)
        return [_row(e, labels[choices[i]], float(logp[i, choices[i]]), {
            "class_log_probs": dict(zip(labels, map(float, logp[i]), strict=True))})
            for i, e in enumerate(chunk)]

    return predict


def _ensemble_predictions(model, params, tokens, chunk, packed, max_len, spec, vocab):
    """Every prompt on every row in one pass; the prediction is their majority vote."""
    names, prompts, prompts_mask = packed
    out, scores = serving.ensemble_greedy_decode(model, params, tokens, jnp.asarray(prompts),
                                                 max_len, jnp.asarray(prompts_mask))
    out, scores = np.asarray(out), np.asarray(scores)
    voted, votes = serving.majority_vote(out)
    return [_record(e, vocab, voted[i], None, {
        "predictions": {n: _text(vocab, out[i, j]) for j, n in enumerate(names)},
        "scores": {n: float(scores[i, j]) for j, n in enumerate(names)},
        "votes": int(votes[i])}) for i, e in enumerate(chunk)]


def _write_records(output_file: str, records: list[dict[str, Any]]) -> None:
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        with open(output_file, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    print(f"wrote {len(records)} predictions to {output_file}", flush=True)


def _decode(model, params, tokens, max_len, prefix, mask, spec: DecodingSpec):
    if spec.num_beams > 1:
        out, scores = decoding.beam_search(model, params, tokens, max_len, spec.num_beams,
                                           spec.length_penalty, prefix, mask)
        return np.asarray(out)[:, 0], np.asarray(scores)[:, 0]
    out, scores = decoding.greedy_decode(model, params, tokens, max_len, prefix, mask)
    return np.asarray(out), np.asarray(scores)


def _pad_ids(rows: list[list[int]], length: int, batch: int) -> np.ndarray:
    """Rows truncated to `length` (EOS kept last) and padded to a full batch."""
    out = np.zeros((batch, length), np.int32)
    for i, ids in enumerate(rows):
        ids = ids if len(ids) <= length else ids[:length - 1] + [decoding.EOS_ID]
        out[i, :len(ids)] = ids
    return out


def _text(vocab, tokens) -> str:
    from prompt_jax.evaluation import trim_at_eos

    return vocab.decode(trim_at_eos(np.asarray(tokens)))


def _record(e: Example, vocab, tokens, score, extra=None) -> dict[str, Any]:
    return _row(e, _text(vocab, tokens), score, extra)


def _row(e: Example, prediction: str, score, extra=None) -> dict[str, Any]:
    r = {"inputs": e.inputs, "prediction": prediction}
    if score is not None:
        r["score"] = score
    if e.task:
        r["task"] = e.task
    if e.targets is not None:
        r["targets"] = e.targets
    r.update(extra or {})
    return r


def read_inputs(path: str, vocab) -> Iterator[Example]:
    """Examples from a JSONL (`inputs`, optional `targets`, `task`) or TSV file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: input file does not exist")
    eos = [decoding.EOS_ID]
    with open(path, newline="") as f:
        if path.endswith((".tsv", ".txt")):
            for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if not row or not row[0].strip():
                    raise ValueError(f"{path}:{n}: empty input")
                task = row[1] if len(row) > 1 and row[1] else None
                yield Example(row[0], list(vocab.encode(row[0])) + eos, task=task)
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), str):
                raise ValueError(f"{path}:{n}: expected an object with an 'inputs' string")
            yield Example(obj["inputs"], list(vocab.encode(obj["inputs"])) + eos,
                          obj.get("targets"), obj.get("task"))


def task_examples(name: str, split: str) -> Iterator[Example]:
    """A task split's examples (preprocessed as the task does), in order."""
    import seqio

    provider = seqio.get_mixture_or_task(name)
    for task in getattr(provider, "tasks", [provider]):
        ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                              trim_output_features=False)
        for ex in ds.as_numpy_iterator():
            yield Example(_str(ex.get("inputs_pretokenized")), list(ex["inputs"]),
                          _str(ex.get("targets_pretokenized")), task.name, ex)


def _str(x) -> str | None:
    return x.decode() if isinstance(x, bytes) else x


def task_metrics(name: str, examples: Sequence[Example], records: Sequence[dict]
                 ) -> dict[str, float]:
    """The task's metrics on the predictions (postprocessed as the task does)."""
    import seqio

    from prompt_jax.evaluation import flat_metrics

    results = {}
    for task_name in sorted({e.task for e in examples}):
        task = seqio.get_mixture_or_task(task_name)
        rows = [(e, r) for e, r in zip(examples, records, strict=True) if e.task == task_name]
        post = task.postprocess_fn
        targets = [post(e.targets, example=e.raw, is_target=True) for e, _ in rows]
        preds = [post(r["prediction"], example=e.raw, is_target=False) for e, r in rows]
        metrics = {}
        for fn in task.predict_metric_fns:
            metrics.update({k: float(getattr(v, "value", v))
                            for k, v in fn(targets, preds).items()})
        results[task_name] = metrics
    return flat_metrics(results) if results else {}


def inspect_prompt(prompt_file: str, checkpoint: str | None, vocab_path: str | None,
                   k: int = 5) -> str:
    """The nearest vocabulary tokens (cosine) of each prompt position, as a table."""
    import seqio

    from prompt_jax.checkpoints import load_checkpoint

    prompt = prompts.load_prompt(prompt_file)
    if checkpoint is None:
        raise ValueError("inspect: pass --checkpoint (the frozen model the prompt was trained "
                         "with; its embedding table defines the neighbours)")
    _, params = load_checkpoint(checkpoint)
    embedding = build.embedding_table(params)
    if prompt.shape[1] != embedding.shape[1]:
        raise ValueError(f"{prompt_file}: prompt has shape {prompt.shape}, expected "
                         f"[P, {embedding.shape[1]}] to match {checkpoint}")
    vocab = seqio.SentencePieceVocabulary(vocab_path or build.demo_path("spiece.model"),
                                          extra_ids=100)
    ids, sims = serving.nearest_neighbours(prompt, embedding, k)
    return serving.format_neighbours(ids, sims, vocab)
