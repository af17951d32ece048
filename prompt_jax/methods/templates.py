"""Templates (P-tuning v1, PET, NeMo's virtual tokens): a task's input as its text fields,
fixed words, soft tokens and the sentinel in any order, e.g. for RTE

    "{soft:4} {premise} {soft:4} ? <extra_id_0> , {hypothesis}"

Syntax: `{name}` is a text field of the task (the names its T5 format shows, e.g.
`premise`, `hypothesis`; AX-b's are RTE's), `{soft}` one soft token, `{soft:N}` N of them;
everything else is fixed text, the sentinel `<extra_id_0>` included (the vocabulary has it
as one piece). A template needs at least one field; an unknown field, an unbalanced brace,
a bad soft count or the placeholder piece itself is a one-line ValueError naming the task
and the template.

Binding (gin; read when a dataset is built, so eval and infer of a run read it from
MODEL_DIR/config.gin): `task_templates.templates = {'super_glue_rte': '...'}`, keyed by
task name; a key without `taskless_`/`_sentinel` also applies to those variants (the
template replaces the whole input, so `taskless_` changes nothing; `_sentinel` targets
still start with `<extra_id_0>`). Templates cover the classification tasks (text fields
and a label: BoolQ, CB, COPA, MultiRC, RTE, WiC, AX-b, AX-g, SST-2, MRPC, QQP); ReCoRD and
WSC have their own formats and are refused, as are mixtures.

Without a binding a task's input is its T5 format (`default_template`, e.g. "rte
hypothesis: {hypothesis} premise: {premise}") with the prompt prepended: today's
prompt tuning, unchanged. A template without soft tokens is a hard pattern (PET) and the
prompt is still prepended. A template with soft tokens places the prompt there instead:

- Rendering: `inputs_pretokenized` is the template with the field values filled in and
  each soft token written as the placeholder piece `<extra_id_99>` (SOFT_PIECE).
- Tokens: each field value and each piece of fixed text is tokenized on its own (as PET
  and P-tuning do; text written against a field without a space tokenizes as if a space
  separated them); each soft token is the placeholder id (`soft_token_id`, 32000 in T5's
  vocabulary), then EOS.
- Lengths: TASK_FEATURE_LENGTHS['inputs'] stays the text's budget (EOS included) and the
  soft tokens come on top, as for a prepended prompt: the encoder sees inputs + P
  positions either way (`feature_lengths`). Text over budget is cut from the fields only,
  one token at a time from the end of the currently longest field (the first of equals),
  so the fixed words, the sentinel and every soft token survive.
- The model (`T5(soft_token_id=...)`, `Encoder.place_soft_tokens`): the k-th placeholder
  of a row takes prompt row k (P-tuning v1: row k of the encoder's output); the positions
  are ordinary tokens for the mask and the relative positions. PROMPT_LENGTH must be the
  template's soft count.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import gin
import seqio
import tensorflow as tf

SOFT_PIECE = "<extra_id_99>"  # what a soft token is in text: a sentinel no task uses
_SOFT_EXTRA_ID = 99
_SOFT = re.compile(r"soft(?::(\d+))?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def soft_token_id(vocab_size: int) -> int:
    """The placeholder id of a vocabulary of `vocab_size` (its `<extra_id_99>`)."""
    return vocab_size - 1 - _SOFT_EXTRA_ID


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str  # "text" (fixed), "field" (a field name) or "soft" (a count)
    value: str | int


@dataclasses.dataclass(frozen=True)
class Template:
    """A parsed template of one task."""

    task: str
    source: str
    segments: tuple[Segment, ...]

    @property
    def soft_count(self) -> int:
        return sum(s.value for s in self.segments if s.kind == "soft")

    def render(self, values: Mapping[str, str]) -> str:
        """The input text for field `values` (soft tokens as SOFT_PIECE)."""
        return "".join(_piece(s, values) for s in self.segments)

    def error(self, what: str) -> ValueError:
        return ValueError(f"task {self.task}: template {self.source!r}: {what}")


def _piece(segment: Segment, values: Mapping[str, Any]) -> Any:
    if segment.kind == "soft":
        return SOFT_PIECE * segment.value
    return values[segment.value] if segment.kind == "field" else segment.value


def parse(task: str, source: str, fields: tuple[str, ...]) -> Template:
    """`source` as a Template of `task`, whose text fields are `fields`; a ValueError
    naming the task and the template if it is malformed."""
    bad = Template(task, source, ())
    if not isinstance(source, str):
        raise bad.error(f"expected a string, found {type(source).__name__}")
    segments = []
    for i, part in enumerate(re.split(r"(\{[^{}]*\})", source)):
        if i % 2 == 0:  # fixed text
            if "{" in part or "}" in part:
                raise bad.error("unbalanced braces")
            if SOFT_PIECE in part:
                raise bad.error(f"{SOFT_PIECE} is the soft tokens' placeholder; write {{soft}}")
            if part:
                segments.append(Segment("text", part))
            continue
        name = part[1:-1].strip()
        if soft := _SOFT.fullmatch(name):
            count = int(soft.group(1) or 1)
            if count < 1:
                raise bad.error(f"{part}: a soft count must be positive")
            segments.append(Segment("soft", count))
        elif name in fields:
            segments.append(Segment("field", name))
        else:
            kind = "unknown field" if _NAME.fullmatch(name) else "not a field or {soft:N}"
            raise bad.error(f"{kind} {part} (the task's fields: {', '.join(fields)}; soft "
                            "tokens: {soft} or {soft:N})")
    if not any(s.kind == "field" for s in segments):
        raise bad.error(f"no input field (the task's fields: {', '.join(fields)})")
    return Template(task, source, tuple(segments))


# ------------------------------------------------------------------------ the binding


@gin.configurable(module="prompt_jax.methods.templates")
def task_templates(templates: Mapping[str, str] | None = None) -> dict[str, str]:
    """The gin-bound templates, {task name: template}; empty where unbound."""
    return dict(templates or {})


def _spec(task_name: str):
    """The `benchmarks.Spec` a task name (or one of its variants) is registered from."""
    from prompt_jax.tasks import benchmarks

    base = task_name.removeprefix(benchmarks.TASKLESS_PREFIX).removesuffix(
        benchmarks.SENTINEL_SUFFIX)
    return next((s for s in benchmarks.SPECS if s.name == base), None)


def _templatable(task_name: str):
    spec = _spec(task_name)
    if spec is None or not spec.fields:
        from prompt_jax.tasks import benchmarks

        ok = [s.name for s in benchmarks.SPECS if s.fields]
        why = "has its own format" if spec is not None else "is not a task templates cover"
        raise ValueError(f"task_templates: {task_name!r} {why}; templates cover "
                         f"{', '.join(ok)} (and their taskless_/_sentinel variants)")
    return spec


def template_for(task_name: str) -> Template | None:
    """The bound template of a task (an exact key first, then its base task's), parsed;
    None without one. Every bound template is checked on each call."""
    bound = task_templates()
    parsed = {k: parse(k, v, tuple(n for n, _ in _templatable(k).fields))
              for k, v in bound.items()}
    if task_name in parsed:
        return parsed[task_name]
    spec = _spec(task_name)
    if spec is not None and spec.name in parsed:
        return parsed[spec.name]
    if task_name in seqio.MixtureRegistry.names():
        mixed = [t.name for t in seqio.get_mixture_or_task(task_name).tasks
                 if template_for(t.name) is not None]
        if mixed:
            raise ValueError(f"task_templates: {', '.join(mixed)} of the mixture {task_name} "
                             "have templates; templates apply to single tasks")
    return None


def soft_count(task_name: str) -> int:
    """The soft tokens of a task's template (0 without one)."""
    template = template_for(task_name)
    return template.soft_count if template else 0


def model_soft_token_id(task_name: str | None) -> int | None:
    """What `T5(soft_token_id=...)` takes for a run of `task_name`: the placeholder id when
    its template has soft tokens, else None (the prompt is prepended)."""
    if not task_name or not soft_count(task_name):
        return None
    from prompt_jax.tasks import get_vocabulary

    return soft_token_id(get_vocabulary().vocab_size)


def check_prompt_length(task_name: str, prompt_length: int, what: str) -> None:
    """A ValueError unless a template's soft count equals the prompt's P."""
    template = template_for(task_name)
    if template and template.soft_count and template.soft_count != prompt_length:
        raise template.error(f"{template.soft_count} soft tokens, but {what} has "
                             f"{prompt_length} prompt positions; they must be equal")


def feature_lengths(task_name: str, lengths: Mapping[str, int]) -> dict[str, int]:
    """The lengths a task's examples are built with: the text budget plus the template's
    soft tokens on the inputs."""
    return {**lengths, "inputs": lengths["inputs"] + soft_count(task_name)}


def default_template(task_name: str) -> str:
    """A task's T5 format as a template, e.g. "rte hypothesis: {hypothesis} premise:
    {premise}" (what its input is without a binding; the prompt is prepended)."""
    spec = _templatable(task_name)
    return " ".join([spec.benchmark] + [f"{n}: {{{n}}}" for n, _ in spec.fields])


# --------------------------------------------------------------------- the preprocessor


def preprocessor(spec: Any, task_name: str, taskless: bool):
    """The text step of a registered task: its T5 format (then `remove_first_word` for
    `taskless`), tokenized — or, with a template bound for `task_name`, the template's
    tokens (see the module docstring). The binding is read when the dataset is built."""
    from prompt_jax.tasks import formats

    def fn(dataset: tf.data.Dataset, sequence_length, output_features) -> tf.data.Dataset:
        template = template_for(task_name) if spec.fields else None
        if template is None:
            dataset = spec.format(dataset)
            if taskless:
                dataset = formats.remove_first_word(dataset)
            return seqio.preprocessors.tokenize(dataset, output_features)
        return _templated(template, spec, dataset, sequence_length, output_features)

    fn.spec, fn.task_name, fn.taskless = spec, task_name, taskless  # what it was built for
    return fn


def _fit(lengths: tf.Tensor, room: int) -> tf.Tensor:
    """Field lengths [F] cut, a token at a time from the longest, to sum to <= room."""
    def cond(n):
        return tf.logical_and(tf.reduce_sum(n) > room, tf.reduce_max(n) > 0)

    def body(n):
        return (n - tf.one_hot(tf.argmax(n, output_type=tf.int32), tf.size(n), dtype=tf.int32),)

    return tf.while_loop(cond, body, (lengths,))[0]


def _templated(template: Template, spec: Any, dataset: tf.data.Dataset, sequence_length,
               output_features) -> tf.data.Dataset:
    vocab = output_features["inputs"].vocabulary
    target_vocab = output_features["targets"].vocabulary
    placeholder = soft_token_id(vocab.vocab_size)
    fixed = {i: list(vocab.encode(s.value)) for i, s in enumerate(template.segments)
             if s.kind == "text"}
    fixed_length = sum(map(len, fixed.values())) + template.soft_count
    budget = (sequence_length or {}).get("inputs")
    room = None if budget is None else budget - 1 - fixed_length  # 1: EOS
    if room is not None and room < 0:
        raise template.error(f"its fixed text and soft tokens take {fixed_length} tokens, "
                             f"more than TASK_FEATURE_LENGTHS['inputs'] leaves ({budget - 1} "
                             "before EOS)")
    keys = dict(spec.fields)
    fmt = spec.format.__wrapped__  # the T5 format of one example (targets, idx)

    def clean(text):
        if spec.benchmark == "multirc":  # as the T5 format: HTML removed
            text = tf.strings.regex_replace(tf.strings.regex_replace(text, "<br>", " "),
                                            "<(/)?b>", "")
        return text

    def fn(x):
        out = dict(fmt(x))
        values = {name: clean(x[key]) for name, key in keys.items()}
        out["inputs_pretokenized"] = tf.strings.join(
            [_piece(s, values) for s in template.segments])
        pieces, fields = [], []
        for i, s in enumerate(template.segments):
            if s.kind == "text":
                pieces.append(tf.constant(fixed[i], tf.int32, [len(fixed[i])]))
            elif s.kind == "soft":
                pieces.append(tf.fill([s.value], tf.constant(placeholder, tf.int32)))
            else:
                fields.append(len(pieces))
                pieces.append(tf.cast(vocab.encode_tf(values[s.value]), tf.int32))
        if room is not None:
            keep = _fit(tf.stack([tf.size(pieces[j]) for j in fields]), room)
            for k, j in enumerate(fields):
                pieces[j] = pieces[j][:keep[k]]
        out["inputs"] = tf.concat(pieces, 0)
        out["targets_pretokenized"] = out["targets"]
        out["targets"] = tf.cast(target_vocab.encode_tf(out["targets"]), tf.int32)
        return out

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
