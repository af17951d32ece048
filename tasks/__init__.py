"""seqio tasks of prompt_jax: SuperGLUE, GLUE, and the pretraining objectives.

Importing registers the tasks with seqio; it reads no file and touches no network.
Where the data comes from is decided when a dataset is read.

Tasks (seqio names):
  super_glue_{boolq,cb,copa,multirc,record,rte,wic,wsc}   T5's text-to-text formats
  super_glue_{axb,axg}          diagnostics cast as RTE; splits `validation` and `test`
                                both read the one labelled file (TFDS: `test`)
  glue_{sst2,mrpc,qqp}
  <each of the above>_sentinel  targets start with `<extra_id_0>`; its postprocessor
                                strips it before the task's own
  taskless_<each of the above>, taskless_<each>_sentinel
                                inputs without their first word, the task name ("rte
                                hypothesis: …" -> "hypothesis: …"), as the prompt-tuning
                                reference's `taskless_*` tasks; all else as the base task
  super_glue, super_glue_sentinel   mixtures of the eight tasks, T5's rates
  span_corruption, lm_adaptation    T5's span corruption, and the prefix LM
  bert_style                    T5's BERT-style denoising (targets: the whole text)

Every task has features `inputs` and `targets` (the vocabulary of `get_vocabulary()`,
EOS appended), a postprocessor as T5's and `metric_fns(targets, predictions)` on
postprocessed values (see `metrics` for the names, in percent).

Data (gin binding of `data_paths` first, then the environment variable):
  PROMPT_JAX_DATA_DIR / data_paths.data_dir: read official files laid out as
      super_glue/<BoolQ|CB|COPA|MultiRC|ReCoRD|RTE|WiC|WSC>/{train,val,test}.jsonl
      super_glue/<AX-b|AX-g>/<AX-b|AX-g>.jsonl
      glue/<SST-2|MRPC|QQP>/{train,dev,test}.tsv
    instead of TFDS (`super_glue/*:1.0.2`, `glue/*:2.0.0`). Files are read and
    checked when a dataset is built: a missing file or malformed line raises,
    naming the file and line.
  PROMPT_JAX_TEXT_FILES / data_paths.text_files: the text of span_corruption,
    lm_adaptation and bert_style; globs (comma-separated, one document per line), or
    `superglue_glue_train` for the text fields of the training files under the data
    directory. Unset: TFDS `c4/en`. About 1 in 20 local documents (by fingerprint)
    form the `validation` split.
  PROMPT_JAX_VOCAB / data_paths.vocab: the SentencePiece model. Unset: the package's
    own copy of T5's (`prompt_jax/demo_data/spiece.model`), read offline; `gs://…`
    and other paths are read only when set here. An unreadable one
    raises "cannot read the SentencePiece vocabulary <path>: <reason>".

Determinism: with a seed, a task's dataset (order and the random objectives) is
the same on every run.
"""

from prompt_jax.tasks import metrics, postprocessors
from prompt_jax.tasks.benchmarks import (
    DOWNSTREAM_TASKS,
    MIXTURE_NAMES,
    PRETRAINING_TASKS,
    SENTINEL_SUFFIX,
    TASK_NAMES,
    TASKLESS_PREFIX,
    TASKLESS_TASKS,
    class_labels,
    register,
)
from prompt_jax.tasks.config import data_paths, get_vocabulary
from prompt_jax.tasks.metrics import superglue_score

register()

__all__ = [
    "DOWNSTREAM_TASKS",
    "MIXTURE_NAMES",
    "PRETRAINING_TASKS",
    "SENTINEL_SUFFIX",
    "TASKLESS_PREFIX",
    "TASKLESS_TASKS",
    "TASK_NAMES",
    "class_labels",
    "data_paths",
    "get_vocabulary",
    "metrics",
    "postprocessors",
    "superglue_score",
]
