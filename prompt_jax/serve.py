"""`prompt-jax serve`: one frozen T5, many named prompts, mixed-task batches over HTTP.

    prompt-jax serve --gin_file=runs/serve.gin --gin.INITIAL_CHECKPOINT="'...'" \
        --gin.PROMPT_DIR="'prompts/'" [--gin.PORT=8000] [--gin.HOST="'127.0.0.1'"]

Endpoints (FastAPI; schema at /openapi.json, docs at /docs): GET /v1/health, GET and
POST /v1/prompts, POST /v1/generate, /v1/rank, /v1/ensemble, GET /metrics (Prometheus).
Outputs carry the keys and meaning of `infer`'s JSONL records.

Batching: a request becomes rows (one per input; an ensemble one per input and prompt)
in one queue. A worker thread takes the oldest row and, within `max_wait_ms` of its
arrival, up to `max_batch_size` queued rows of the same program (`generate`: greedy and
sampled rows together; `beam`: per beam count, alpha and length; `rank`), whatever their
prompts. It pads them to bucketed shapes — rows to a size in `batch_buckets`, inputs to
a length in `length_buckets`, prompts (left-padded as `serving.pack_prompts`) to a
multiple of 8, decode lengths to a power of two — so a few programs are compiled, not one
per request (all prompts of one length: one prompt width). A deep prompt (P-tuning v2,
prefix tuning: `MODEL_DIR/best_deep_prompt.npz` or a `.npz`/PEFT PREFIX_TUNING file among the
prompts) is part of the served model, under every prompt, and is listed as a prompt of
length 0 (no soft prompt); its prefix keys see each row's positions from the row's first
real one, so left-padded prompts leave them where they are unpadded. Padding
is masked and each row has its own decode limit and random stream, so a row's result
does not depend on its batch-mates (up to float summation order). The answer's header
`x-batch-requests` says how many requests the fullest of its batches held.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import fastapi
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from prompt_jax import build, decoding, partitioning, serving
from prompt_jax import model_dir as model_dir_lib
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.model import T5

log = logging.getLogger(__name__)
EOS_ID = decoding.EOS_ID
PROMPT_ALIGN = 8  # a batch's prompt width is a multiple of this
DEEP_PROMPT_KIND = "deep_prompt"  # the registry entry of a served deep prompt (no soft prompt)


# ---------------------------------------------------------------- configuration


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BatchingSpec:
    """How concurrent requests share batches.

    max_batch_size: rows per batch at most (an input; an ensemble: an input x a prompt).
    max_wait_ms: how long the oldest queued row waits for batch-mates.
    batch_buckets: the sizes a batch is padded to (None: powers of two to max_batch_size).
    length_buckets: the input lengths (tokens) a batch is padded to; the input limit is
    always the last one.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batch_buckets: tuple[int, ...] | None = None
    length_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_wait_ms < 0:
            raise ValueError(f"BatchingSpec: max_batch_size={self.max_batch_size} must be >= 1 "
                             f"and max_wait_ms={self.max_wait_ms} >= 0")
        if self.batch_buckets and max(self.batch_buckets) < self.max_batch_size:
            raise ValueError(f"BatchingSpec.batch_buckets={self.batch_buckets} has no size for "
                             f"max_batch_size={self.max_batch_size}")

    def batch_sizes(self, data_parallel: int) -> tuple[int, ...]:
        """The padded batch sizes, each a multiple of the data-parallel size."""
        sizes = self.batch_buckets or [2**i for i in range(self.max_batch_size.bit_length() + 1)]
        up = lambda n: -(-n // data_parallel) * data_parallel
        return tuple(sorted({up(n) for n in sizes if n < self.max_batch_size}
                            | {up(self.max_batch_size)}))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask (inputs in tokens, EOS included; the prompt on top)."""

    max_input_length: int = 512
    max_decode_length: int = 128
    decode_length: int = 8  # when a request names none
    max_num_beams: int = 8
    max_inputs: int = 256  # inputs per request

    def __post_init__(self):
        if min(dataclasses.astuple(self)) < 1 or self.decode_length > self.max_decode_length:
            raise ValueError(f"serve: limits {dataclasses.asdict(self)} must be >= 1, with "
                             "decode_length <= max_decode_length")


def _bucket(n: int, sizes: Sequence[int]) -> int:
    return next(s for s in sizes if s >= n)


def _pow2(n: int, cap: int | None = None) -> int:
    p = 1 << max(n - 1, 0).bit_length()
    return min(p, cap) if cap else p


# ---------------------------------------------------------------- request schemas


class _Body(pydantic.BaseModel):
    # Strict: "8" is not 8, and a misspelt field is refused rather than ignored.
    model_config = pydantic.ConfigDict(strict=True, extra="forbid")


class Greedy(_Body):
    type: Literal["greedy"] = "greedy"


class Beam(_Body):
    """Beam search with T5X's length penalty ((5 + n) / 6) ** alpha, as `infer`."""

    type: Literal["beam"]
    num_beams: int = pydantic.Field(4, ge=1)
    alpha: float = 0.6


class Sample(_Body):
    """Temperature, then top-k (0: off), then top-p (1: off), as HF's warpers; one random
    stream per input from `seed` (drawn by the server when absent, and returned)."""

    type: Literal["sample"]
    temperature: float = pydantic.Field(1.0, gt=0)
    top_k: int = pydantic.Field(0, ge=0)
    top_p: float = pydantic.Field(1.0, gt=0, le=1)
    seed: int | None = pydantic.Field(None, ge=0, lt=2**32)


Decoding = Annotated[Greedy | Beam | Sample, pydantic.Field(discriminator="type")]


class GenerateRequest(_Body):
    prompt: str
    inputs: list[str] = pydantic.Field(min_length=1)
    max_decode_length: int | None = pydantic.Field(None, ge=1)
    decoding: Decoding = Greedy()
    truncate: bool = False  # cut over-long inputs to the limit (EOS kept) instead of 413


class EnsembleRequest(_Body):
    prompts: list[str] = pydantic.Field(min_length=1)
    inputs: list[str] = pydantic.Field(min_length=1)
    max_decode_length: int | None = pydantic.Field(None, ge=1)
    decoding: Decoding = Greedy()
    truncate: bool = False


class RankRequest(_Body):
    prompt: str
    inputs: list[str] = pydantic.Field(min_length=1)
    candidates: list[str] | None = pydantic.Field(None, min_length=1)  # default: task labels
    truncate: bool = False


class PromptRequest(_Body):
    name: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    path: str
    task: str | None = None  # its task: /v1/rank's default candidates


class GenerateOutput(pydantic.BaseModel):
    inputs: str
    prediction: str
    score: float  # summed log-probability of the decoded tokens (beam: length-penalised)
    seed: int | None = None  # sampling: the seed of the request's draws
    truncated: bool | None = None


class EnsembleOutput(pydantic.BaseModel):
    inputs: str
    prediction: str  # the majority vote (ties: the earliest prompt)
    predictions: dict[str, str]  # by prompt
    scores: dict[str, float]
    votes: int
    truncated: bool | None = None


class RankOutput(pydantic.BaseModel):
    inputs: str
    prediction: str  # the most likely candidate
    choice: int  # its index
    score: float  # its total log-likelihood
    scores: dict[str, float]  # every candidate's
    truncated: bool | None = None


class GenerateResponse(pydantic.BaseModel):
    outputs: list[GenerateOutput]


class EnsembleResponse(pydantic.BaseModel):
    outputs: list[EnsembleOutput]


class RankResponse(pydantic.BaseModel):
    outputs: list[RankOutput]


class PromptInfo(pydantic.BaseModel):
    name: str
    length: int
    kind: str
    source: str
    task: str | None


class ApiError(Exception):
    """A 4xx answer: `{"error": message, "field": field}`."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


# ---------------------------------------------------------------- the prompt registry


@dataclasses.dataclass(frozen=True)
class Prompt:
    name: str
    array: np.ndarray  # [P, E] float32
    source: str
    kind: str  # prompt_artifacts.artifact_kind
    task: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "length": int(self.array.shape[0]), "kind": self.kind,
                "source": self.source, "task": self.task}


def check_task(task: str | None) -> None:
    if task is not None:
        import seqio

        from prompt_jax import tasks  # noqa: F401 (registers the tasks)

        if task not in seqio.TaskRegistry.names():
            raise ValueError(f"task {task!r} is not a registered task")


def load_prompt(name: str, path: str, d_model: int, task: str | None = None) -> Prompt:
    """Any prompt artifact as a registry entry, or the loader's ValueError/FileNotFoundError."""
    from prompt_jax.checkpoints import prompt_artifacts
    from prompt_jax.methods import deep_prompts

    check_task(task)
    if deep_prompts.is_deep_prompt_artifact(path):
        raise ValueError(f"{path}: a deep prompt (key/value prefixes) is part of the served "
                         "model, not a per-request prompt; start `prompt-jax serve` with it "
                         "(serve.prompt_files, PROMPT_DIR or MODEL_DIR/best_deep_prompt.npz)")
    kind = prompt_artifacts.artifact_kind(path)
    return Prompt(name, prompt_artifacts.load_prompt_artifact(path, d_model), path, kind, task)


def prompt_dir_files(directory: str) -> dict[str, str]:
    """{stem: path} for every entry of `directory` that is a prompt artifact (a deep
    prompt included)."""
    from prompt_jax.checkpoints import prompt_artifacts
    from prompt_jax.methods import deep_prompts

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: PROMPT_DIR is not a directory")
    found: dict[str, str] = {}
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if not deep_prompts.is_deep_prompt_artifact(path):
            try:
                prompt_artifacts.artifact_kind(path)
            except (ValueError, FileNotFoundError):
                continue
        stem = entry.removesuffix(".npy").removesuffix(".npz")
        if stem in found:
            raise ValueError(f"{directory}: {found[stem]} and {path} both name prompt {stem!r}")
        found[stem] = path
    return found


class Registry:
    """Named prompts; replaced whole under a lock (in-flight rows keep the array they got)."""

    def __init__(self, prompts: Sequence[Prompt] = ()):
        self._lock = threading.Lock()
        self._prompts = {p.name: p for p in prompts}

    def put(self, prompt: Prompt) -> bool:
        """Add or replace; True if it replaced one."""
        with self._lock:
            replaced = prompt.name in self._prompts
            self._prompts = {**self._prompts, prompt.name: prompt}
        return replaced

    def get(self, name: str, field: str) -> Prompt:
        prompt = self._prompts.get(name)
        if prompt is None:
            raise ApiError(404, f"no prompt named {name!r} (GET /v1/prompts lists them)", field)
        return prompt

    def all(self) -> list[Prompt]:
        return list(self._prompts.values())


# ---------------------------------------------------------------- metrics (Prometheus text)


_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECOND_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, x: float) -> None:
        self.sum, self.count = self.sum + x, self.count + 1
        for i, b in enumerate(self.buckets):
            self.counts[i] += x <= b

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts,
                                                              strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6g}",
                      f"{name}_count {self.count}"]


class Metrics:
    """Counters and histograms of the server, rendered in Prometheus' text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.batches: collections.Counter[str] = collections.Counter()
        self.batch_rows, self.batch_requests = _Histogram(_COUNT_BUCKETS), _Histogram(
            _COUNT_BUCKETS)
        self.queue_seconds = _Histogram(_SECOND_BUCKETS)
        self.batch_seconds = self.warm_seconds = 0.0
        self.tokens = self.warm_tokens = 0
        self.shapes: set[tuple] = set()

    def request(self, endpoint: str, method: str, code: int) -> None:
        with self._lock:
            self.requests[endpoint, method, code] += 1

    def batch(self, program: str, rows: Sequence[Row], started: float, seconds: float,
              tokens: int, shape: tuple) -> None:
        with self._lock:
            self.batches[program] += 1
            self.batch_rows.observe(len(rows))
            self.batch_requests.observe(len({r.request for r in rows}))
            for r in rows:
                self.queue_seconds.observe(started - r.arrival)
            self.batch_seconds += seconds
            self.tokens += tokens
            if program != "rank" and shape in self.shapes:  # a first run compiles: not a rate
                self.warm_seconds += seconds
                self.warm_tokens += tokens
            self.shapes.add(shape)

    def render(self, queued_rows: int, prompts: int) -> str:
        with self._lock:
            out = _family("requests_total", "counter", "HTTP requests by endpoint and status.",
                          [(f'{{endpoint="{e}",method="{m}",code="{c}"}}', n)
                           for (e, m, c), n in sorted(self.requests.items())])
            out += _family("batches_total", "counter", "Batches run, by program.",
                           [(f'{{program="{p}"}}', n) for p, n in sorted(self.batches.items())])
            for name, hist, what in (
                    ("batch_rows", self.batch_rows, "Rows (inputs) per batch."),
                    ("batch_requests", self.batch_requests, "Requests sharing one batch."),
                    ("queue_seconds", self.queue_seconds, "Time rows waited in the queue.")):
                out += [f"# HELP prompt_jax_{name} {what}", f"# TYPE prompt_jax_{name} histogram"]
                out += hist.lines(f"prompt_jax_{name}")
            rate = self.warm_tokens / self.warm_seconds if self.warm_seconds else 0.0
            for name, kind, what, value in (
                    ("batch_seconds_total", "counter", "Seconds spent running batches.",
                     self.batch_seconds),
                    ("generated_tokens_total", "counter", "Tokens decoded, EOS included.",
                     self.tokens),
                    ("tokens_per_second", "gauge",
                     "Tokens decoded per second of decoding (batches of compiled shapes).", rate),
                    ("compiled_shapes", "gauge", "Distinct padded batch shapes run.",
                     len(self.shapes)),
                    ("queued_rows", "gauge", "Rows waiting for a batch.", queued_rows),
                    ("prompts", "gauge", "Prompts served.", prompts)):
                out += _family(name, kind, what, [("", value)])
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, what: str, samples: Sequence[tuple[str, float]]
            ) -> list[str]:
    return ([f"# HELP prompt_jax_{name} {what}", f"# TYPE prompt_jax_{name} {kind}"]
            + [f"prompt_jax_{name}{labels} {value:.6g}" for labels, value in samples])


# ---------------------------------------------------------------- rows and the programs


@dataclasses.dataclass(eq=False)
class Row:
    """One input under one prompt, waiting for a batch; `future` gets its result:
    generate/beam (tokens [limit], score), rank (log-likelihoods [C])."""

    program: tuple  # ("generate",) | ("beam", num_beams, alpha, length) | ("rank",)
    ids: list[int]
    prompt: np.ndarray
    request: int
    limit: int = 1
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    position: int = 0  # the input's index in its request: its random stream
    candidates: list[list[int]] | None = None
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _generate(model, params, max_len, tokens, prefix, prefix_mask, limits, temperature, top_k,
              top_p, seeds, positions):
    """Greedy rows (temperature 0) and sampled rows in one loop, each stopping at EOS or at
    its own limit -> (tokens [B, max_len], summed log-probs of the chosen tokens [B]).

    Greedy rows are `decoding.greedy_decode`'s computation; a sampled row's draws come from
    its own key (seed, position), so no row depends on the others.
    """
    encoded, mask = model.apply({"params": params}, tokens, prefix, prefix_mask,
                                method=T5.encode)
    batch = tokens.shape[0]
    cache = decoding.init_cache(model, params, encoded, mask, max_len)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, positions)
    sampled = temperature > 0

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_len) & ~jnp.all(done)

    def body(carry):
        step, cache, previous, done, score, out = carry
        log_probs, cache = decoding.decode_step(model, params, cache, encoded, mask, previous)
        greedy = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        draw = lambda: decoding.draw_tokens(  # greedy rows (temperature 0) take the argmax
            log_probs, jax.vmap(jax.random.fold_in, (0, None))(keys, step), temperature,
            top_k, top_p)
        token = jax.lax.cond(jnp.any(sampled & ~done), draw, lambda: greedy)
        score = score + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, token[:, None],
                                                                  axis=-1)[:, 0])
        token = jnp.where(done, 0, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        done = done | (token == EOS_ID) | (step + 1 >= limits)
        return step + 1, cache, token, done, score, out

    start = (jnp.array(0, jnp.int32), cache, jnp.zeros((batch,), jnp.int32),
             jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32),
             jnp.zeros((batch, max_len), jnp.int32))
    *_, score, out = jax.lax.while_loop(cond, body, start)
    return out, score


class Engine:
    """The frozen model on its mesh; runs one batch of rows of one program."""

    def __init__(self, config: Any, params: Any, mesh: Any, batching: BatchingSpec,
                 limits: Limits, deep_prompt_spec: Any = None,
                 deep_prompt_source: str | None = None):
        self.config, self.params, self.mesh, self.limits = config, params, mesh, limits
        # A deep prompt (P-tuning v2, prefix tuning) is part of the model: every row runs it.
        self.model = T5(config, deep_prompt_spec=deep_prompt_spec)
        self.deep_prompt_source = deep_prompt_source
        self.batch_sizes = batching.batch_sizes(mesh.shape["data"])
        self.length_sizes = tuple(sorted({n for n in batching.length_buckets
                                          if n < limits.max_input_length}
                                         | {limits.max_input_length}))

    def run(self, rows: Sequence[Row]) -> tuple[list[Any], int, tuple]:
        """-> (a result per row, tokens decoded, the padded shape run)."""
        batch = _bucket(len(rows), self.batch_sizes)
        pad = [rows[0]] * (batch - len(rows))  # copies of a real row; their results dropped
        tokens = np.zeros((batch, _bucket(max(len(r.ids) for r in rows), self.length_sizes)),
                          np.int32)
        for i, r in enumerate(list(rows) + pad):
            tokens[i, :len(r.ids)] = r.ids
        # Per-row prompts, left-padded to the longest, then to a multiple of 8.
        prefix, prefix_mask = serving.pack_prompts([r.prompt for r in list(rows) + pad])
        width = -prefix.shape[1] % PROMPT_ALIGN
        arrays = {"tokens": tokens, "prefix": np.pad(prefix, ((0, 0), (width, 0), (0, 0))),
                  "prefix_mask": np.pad(prefix_mask, ((0, 0), (width, 0)))}
        kind = rows[0].program[0]
        if kind == "rank":
            return self._rank(rows, pad, arrays)
        if kind == "beam":
            return self._beam(rows, arrays)
        return self._generate(rows, pad, arrays)

    def _place(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return partitioning.whole_batch(arrays, self.mesh)

    def _generate(self, rows, pad, arrays):
        real = list(rows) + pad
        length = _pow2(max(r.limit for r in rows), self.limits.max_decode_length)
        arrays.update(
            limits=np.array([r.limit if i < len(rows) else 1 for i, r in enumerate(real)],
                            np.int32),
            temperature=np.array([r.temperature for r in real], np.float32),
            top_k=np.array([r.top_k for r in real], np.int32),
            top_p=np.array([r.top_p for r in real], np.float32),
            seeds=np.array([r.seed for r in real], np.uint32),
            positions=np.array([r.position for r in real], np.int32))
        x = self._place(arrays)
        out, score = _generate(self.model, self.params, length, x["tokens"], x["prefix"],
                               x["prefix_mask"], x["limits"], x["temperature"], x["top_k"],
                               x["top_p"], x["seeds"], x["positions"])
        out, score = np.asarray(out), np.asarray(score)
        results = [(out[i, :r.limit], float(score[i])) for i, r in enumerate(rows)]
        return results, _count(results), ("generate", *arrays["prefix"].shape[:2],
                                          arrays["tokens"].shape[1], length)

    def _beam(self, rows, arrays):
        _, num_beams, alpha, length = rows[0].program
        x = self._place(arrays)
        out, score = decoding.beam_search(self.model, self.params, x["tokens"], length,
                                          num_beams, alpha, x["prefix"], x["prefix_mask"])
        out, score = np.asarray(out)[:, 0], np.asarray(score)[:, 0]
        results = [(out[i], float(score[i])) for i in range(len(rows))]
        return results, _count(results), ("beam", num_beams, *arrays["prefix"].shape[:2],
                                          arrays["tokens"].shape[1], length)

    def _rank(self, rows, pad, arrays):
        num = _pow2(max(len(r.candidates) for r in rows))
        length = _pow2(max(len(c) for r in rows for c in r.candidates))
        targets = np.zeros((len(arrays["tokens"]), num, length), np.int32)
        for i, r in enumerate(list(rows) + pad):
            targets[i, :len(r.candidates)] = serving.pad_candidates([r.candidates], length)[0]
        arrays["targets"] = targets
        x = self._place(arrays)
        _, scores = serving.rank_classify(self.model, self.params, x["tokens"], x["targets"],
                                          x["prefix"], x["prefix_mask"])
        scores = np.asarray(scores)
        results = [scores[i, :len(r.candidates)] for i, r in enumerate(rows)]
        return results, 0, ("rank", *arrays["prefix"].shape[:2], arrays["tokens"].shape[1],
                            num, length)


def _count(results: Sequence[tuple[np.ndarray, float]]) -> int:
    """Decoded tokens, EOS included (padding after EOS is 0)."""
    return int(sum(np.count_nonzero(tokens) for tokens, _ in results))


# ---------------------------------------------------------------- the batcher


class Batcher:
    """The queue of rows and the one thread that runs them in batches."""

    def __init__(self, engine: Engine, batching: BatchingSpec, metrics: Metrics):
        self.engine, self.batching, self.metrics = engine, batching, metrics
        self._rows: collections.deque[Row] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="prompt-jax-batcher",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join()
        for r in self._rows:
            r.future.set_exception(RuntimeError("the server is shutting down"))

    def submit(self, rows: Sequence[Row]) -> None:
        with self._cv:
            self._rows.extend(rows)
            self._cv.notify_all()

    @property
    def queued(self) -> int:
        return len(self._rows)

    def _next_batch(self) -> list[Row] | None:
        """The oldest row and up to max_batch_size - 1 queued rows of its program, once
        that many are queued or the oldest has waited max_wait_ms; None when stopping."""
        limit, wait = self.batching.max_batch_size, self.batching.max_wait_ms / 1000
        with self._cv:
            while not self._stopping:
                if not self._rows:
                    self._cv.wait()
                    continue
                head = self._rows[0]
                same = [r for r in self._rows if r.program == head.program][:limit]
                left = head.arrival + wait - time.monotonic()
                if len(same) < limit and left > 0:
                    self._cv.wait(left)
                    continue
                taken = {id(r) for r in same}
                self._rows = collections.deque(r for r in self._rows if id(r) not in taken)
                return same
        return None

    def _loop(self) -> None:
        while (rows := self._next_batch()) is not None:
            started = time.monotonic()
            try:
                results, tokens, shape = self.engine.run(rows)
            except Exception as e:  # the rows fail; the server goes on
                log.exception("batch of %d %s rows failed", len(rows), rows[0].program[0])
                for r in rows:
                    r.future.set_exception(e)
                continue
            seconds = time.monotonic() - started
            self.metrics.batch(rows[0].program[0], rows, started, seconds, tokens, shape)
            requests = len({r.request for r in rows})
            for r, result in zip(rows, results, strict=True):
                r.future.set_result((result, requests))


# ---------------------------------------------------------------- the service


class Service:
    """The frozen model, its prompts, the batcher: what the HTTP app runs on."""

    def __init__(self, engine: Engine, registry: Registry, vocab: Any, batching: BatchingSpec):
        self.engine, self.registry, self.vocab = engine, registry, vocab
        self.limits = engine.limits
        self.metrics = Metrics()
        self.batcher = Batcher(engine, batching, self.metrics)
        self._requests = 0

    def new_request(self) -> int:
        self._requests += 1
        return self._requests

    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[tuple[list[int], bool]]:
        """Each input's ids + EOS, and whether it was truncated; 413 if over the limit."""
        limit = self.limits.max_input_length
        if len(texts) > self.limits.max_inputs:
            raise ApiError(413, f"{len(texts)} inputs, more than the limit of "
                                f"{self.limits.max_inputs} per request", "inputs")
        out = []
        for i, text in enumerate(texts):
            ids = list(self.vocab.encode(text)) + [EOS_ID]
            if len(ids) > limit and not truncate:
                raise ApiError(413, f"inputs[{i}] has {len(ids)} tokens (EOS included), more "
                                    f"than the limit of {limit}; shorten it or send "
                                    '"truncate": true', f"inputs.{i}")
            out.append((ids if len(ids) <= limit else ids[:limit - 1] + [EOS_ID],
                        len(ids) > limit))
        return out

    def decode_limit(self, asked: int | None) -> int:
        length = asked or self.limits.decode_length
        if length > self.limits.max_decode_length:
            raise ApiError(422, f"max_decode_length={length} is more than the limit of "
                                f"{self.limits.max_decode_length}", "max_decode_length")
        return length

    def row_for(self, spec: Greedy | Beam | Sample, length: int, ids: list[int], prompt: Prompt,
                request: int, position: int, seed: int) -> Row:
        """The row of one input under `prompt`; `position` (its place in the request) and
        `seed` make its random stream."""
        if isinstance(spec, Beam):
            if spec.num_beams > self.limits.max_num_beams:
                raise ApiError(422, f"num_beams={spec.num_beams} is more than the limit of "
                                    f"{self.limits.max_num_beams}", "decoding.num_beams")
            return Row(("beam", spec.num_beams, float(spec.alpha), length), ids, prompt.array,
                       request, length)
        if isinstance(spec, Sample):
            return Row(("generate",), ids, prompt.array, request, length, spec.temperature,
                       spec.top_k, spec.top_p, seed, position)
        return Row(("generate",), ids, prompt.array, request, length)

    def candidates(self, prompt: Prompt, given: list[str] | None) -> tuple[list[str],
                                                                           list[list[int]]]:
        """The candidate strings and their target ids (EOS included)."""
        from prompt_jax import rank_classification

        if given is None:
            found = (rank_classification.candidates(prompt.task, self.limits.decode_length)
                     if prompt.task else None)
            if found is None:
                raise ApiError(422, f"prompt {prompt.name!r} has no task with fixed labels "
                                    f"(task={prompt.task!r}); give candidates", "candidates")
            return list(found.labels), [[int(t) for t in row if t] for row in found.tokens]
        if len(set(given)) != len(given):
            raise ApiError(422, "candidates repeat a string", "candidates")
        limit = self.limits.max_decode_length
        ids = [list(self.vocab.encode(c)) + [EOS_ID] for c in given]
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise ApiError(413, f"candidates[{i}] has {len(row)} tokens (EOS included), "
                                    f"more than the limit of {limit}", f"candidates.{i}")
        return given, ids

    async def run(self, rows: Sequence[Row]) -> tuple[list[Any], int]:
        """-> (each row's result, the most requests one of its batches held)."""
        self.batcher.submit(rows)
        done = await asyncio.gather(*(asyncio.wrap_future(r.future) for r in rows))
        return [result for result, _ in done], max(n for _, n in done)

    def text(self, tokens: np.ndarray) -> str:
        from prompt_jax.evaluation import trim_at_eos

        return self.vocab.decode(trim_at_eos(tokens))


# ---------------------------------------------------------------- the HTTP app


_ENDPOINTS = ("/v1/health", "/v1/prompts", "/v1/generate", "/v1/rank", "/v1/ensemble",
              "/metrics", "/openapi.json", "/docs")


def _error(status: int, message: str, field: str | None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "field": field, **extra}, status_code=status)


def _field(loc: Sequence[Any]) -> str:
    """pydantic's location as a dotted field name, without "body" and union tags."""
    loc = [x for x in loc if x != "body"]
    if len(loc) > 2 and loc[0] == "decoding":
        del loc[1]  # the decoding type's tag: "decoding.beam.num_beams" -> "decoding.num_beams"
    return ".".join(str(x) for x in loc) or "body"


def create_app(service: Service) -> fastapi.FastAPI:
    """The FastAPI app; its lifespan starts and stops the batcher thread."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = fastapi.FastAPI(title="prompt_jax", version="0.1.0", lifespan=lifespan,
                          description="One frozen T5, many prompts, mixed-task batches.")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e.status, e.message, e.field)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = [{k: v for k, v in err.items() if k in ("type", "loc", "msg")}
                  for err in e.errors()]
        first = errors[0]
        if first["type"] == "json_invalid":
            return _error(400, f"malformed JSON: {e.errors()[0].get('ctx', {}).get('error')}",
                          "body")
        if first["type"] == "model_attributes_type" and isinstance(e.errors()[0].get("input"),
                                                                   bytes):
            return _error(415, "send the body as JSON (Content-Type: application/json)", "body")
        where = _field(first["loc"])
        return _error(422, f"{where}: {first['msg']}", where, detail=errors)

    @app.exception_handler(Exception)
    async def failed(request, e: Exception):
        log.exception("request failed")
        return _error(500, f"{type(e).__name__}: {e}", None)

    @app.middleware("http")
    async def count(request, call_next):
        path = request.url.path if request.url.path in _ENDPOINTS else "other"
        try:
            response = await call_next(request)
        except Exception:
            service.metrics.request(path, request.method, 500)
            raise
        service.metrics.request(path, request.method, response.status_code)
        return response

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        cfg = service.engine.config
        return {"status": "ok", "prompts": len(service.registry.all()),
                "queued_rows": service.batcher.queued,
                "model": {"d_model": cfg.d_model, "vocab_size": cfg.vocab_size,
                          "encoder_layers": cfg.num_encoder_layers,
                          "decoder_layers": cfg.num_decoder_layers,
                          "param_dtype": str(cfg.param_dtype),
                          "deep_prompt": service.engine.deep_prompt_source},
                "limits": dataclasses.asdict(service.limits)}

    @app.get("/v1/prompts")
    async def list_prompts() -> dict[str, list[PromptInfo]]:
        return {"prompts": [p.describe() for p in service.registry.all()]}

    @app.post("/v1/prompts")
    async def add_prompt(body: PromptRequest, response: fastapi.Response) -> PromptInfo:
        from starlette.concurrency import run_in_threadpool

        try:
            check_task(body.task)
        except ValueError as e:
            raise ApiError(422, str(e), "task") from None
        try:
            prompt = await run_in_threadpool(load_prompt, body.name, body.path,
                                             service.engine.config.d_model, body.task)
        except (FileNotFoundError, ValueError) as e:  # the loader's message, naming the file
            raise ApiError(422, str(e), "path") from None
        response.status_code = 200 if service.registry.put(prompt) else 201
        return PromptInfo(**prompt.describe())

    @app.post("/v1/generate", response_model=GenerateResponse,
              response_model_exclude_none=True)
    async def generate(body: GenerateRequest, response: fastapi.Response) -> dict[str, Any]:
        prompt = service.registry.get(body.prompt, "prompt")
        length = service.decode_limit(body.max_decode_length)
        request = service.new_request()
        inputs = service.tokenize(body.inputs, body.truncate)
        seed = _seed(body.decoding)
        rows = [service.row_for(body.decoding, length, ids, prompt, request, i, seed)
                for i, (ids, _) in enumerate(inputs)]
        results, mates = await service.run(rows)
        response.headers["x-batch-requests"] = str(mates)
        outputs = []
        for text, (_, truncated), (tokens, score) in zip(body.inputs, inputs, results,
                                                         strict=True):
            record = {"inputs": text, "prediction": service.text(tokens), "score": score}
            if isinstance(body.decoding, Sample):
                record["seed"] = seed
            if truncated:
                record["truncated"] = True
            outputs.append(record)
        return {"outputs": outputs}

    @app.post("/v1/ensemble", response_model=EnsembleResponse,
              response_model_exclude_none=True)
    async def ensemble(body: EnsembleRequest, response: fastapi.Response) -> dict[str, Any]:
        prompts = [service.registry.get(name, f"prompts.{i}")
                   for i, name in enumerate(body.prompts)]
        if len(set(body.prompts)) != len(body.prompts):
            raise ApiError(422, "prompts repeat a name", "prompts")
        length = service.decode_limit(body.max_decode_length)
        request = service.new_request()
        inputs = service.tokenize(body.inputs, body.truncate)
        seed = _seed(body.decoding)
        num = len(prompts)
        rows = [service.row_for(body.decoding, length, ids, p, request, b * num + n, seed)
                for b, (ids, _) in enumerate(inputs) for n, p in enumerate(prompts)]
        results, mates = await service.run(rows)
        response.headers["x-batch-requests"] = str(mates)
        tokens = np.zeros((len(inputs), num, length), np.int32)
        for k, (out, _) in enumerate(results):
            tokens[k // num, k % num, :len(out)] = out
        voted, votes = serving.majority_vote(tokens)
        outputs = []
        for b, text in enumerate(body.inputs):
            record = {"inputs": text, "prediction": service.text(voted[b]),
                      "predictions": {p.name: service.text(tokens[b, n])
                                      for n, p in enumerate(prompts)},
                      "scores": {p.name: results[b * num + n][1] for n, p in enumerate(prompts)},
                      "votes": int(votes[b])}
            if inputs[b][1]:
                record["truncated"] = True
            outputs.append(record)
        return {"outputs": outputs}

    @app.post("/v1/rank", response_model=RankResponse,
              response_model_exclude_none=True)
    async def rank(body: RankRequest, response: fastapi.Response) -> dict[str, Any]:
        prompt = service.registry.get(body.prompt, "prompt")
        labels, ids = service.candidates(prompt, body.candidates)
        request = service.new_request()
        inputs = service.tokenize(body.inputs, body.truncate)
        rows = [Row(("rank",), x, prompt.array, request, candidates=ids) for x, _ in inputs]
        results, mates = await service.run(rows)
        response.headers["x-batch-requests"] = str(mates)
        outputs = []
        for text, (_, truncated), scores in zip(body.inputs, inputs, results, strict=True):
            choice = int(np.argmax(scores))
            record = {"inputs": text, "prediction": labels[choice], "choice": choice,
                      "score": float(scores[choice]),
                      "scores": {c: float(s) for c, s in zip(labels, scores, strict=True)}}
            if truncated:
                record["truncated"] = True
            outputs.append(record)
        return {"outputs": outputs}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return service.metrics.render(service.batcher.queued, len(service.registry.all()))

    return app


def _seed(spec: Greedy | Beam | Sample) -> int:
    if isinstance(spec, Sample):
        return spec.seed if spec.seed is not None else secrets.randbits(32)
    return 0


# ---------------------------------------------------------------- building and running


def load_service(*, initial_checkpoint: str | None, model: build.ModelSpec = build.ModelSpec(),
                 model_dir: str | None = None, prompt_dir: str | None = None,
                 prompt_files: Mapping[str, str] | None = None,
                 prompt_tasks: Mapping[str, str] | None = None,
                 mixture_or_task_name: str | None = None, limits: Limits = Limits(),
                 batching: BatchingSpec | None = None, mesh_shape: Sequence[int] = (-1, 1),
                 seed: int = 0) -> Service:
    """The frozen model placed on the mesh, and the prompts: every artifact in `prompt_dir`
    (named by its stem), then `prompt_files` ({name: path}); with neither, the job's
    default prompt (`build.default_prompt_file`), if any. Each prompt's task (for
    /v1/rank's default candidates) is `prompt_tasks[name]`, else `mixture_or_task_name`."""
    from prompt_jax import tasks
    from prompt_jax.methods import deep_prompts, multitask

    if jax.process_count() > 1:
        raise ValueError("serve: runs in one process (its devices may be several)")
    batching = batching or BatchingSpec()
    files = dict(prompt_dir_files(prompt_dir)) if prompt_dir else {}
    files.update(prompt_files or {})
    tasks_of = dict(prompt_tasks or {})
    if not files:  # the run's own: a multi-task run's per-task prompts, else its best
        files = multitask.default_prompt_files(model_dir, mixture_or_task_name)
        tasks_of = {**{task: task for task in files}, **tasks_of}
        if not files and (default := build.default_prompt_file(initial_checkpoint, model_dir)):
            files[os.path.basename(os.path.normpath(default)).removesuffix(".npy")] = default
        if best_deep := build.default_deep_prompt_file(model_dir):
            files[model_dir_lib.BEST_DEEP_PROMPT.removesuffix(".npz")] = best_deep
    deep = build.deep_prompt_files(files)
    config, frozen = build.load_frozen(model, initial_checkpoint, model_dir, seed)
    deep_prompt = deep_source = None
    host = dict(frozen)
    if deep:
        (deep_name, deep_source), = deep.items()
        deep_prompt = deep_prompts.load_deep_prompt_artifact(deep_source, config)
        if deep_prompt[2] is not None:
            raise ValueError(f"{deep_source}: a P-tuning v2 deep prompt with a classification "
                             "head; serve's endpoints generate and rank the decoder's words, "
                             "which the head replaces. Classify with `prompt-jax eval` or "
                             "`prompt-jax infer` (MIXTURE_OR_TASK_NAME, PROMPT_FILE)")
        host = unflatten(deep_prompts.with_matrix(dict(flatten(frozen)), deep_prompt[1]))
    mesh = partitioning.make_mesh(mesh_shape)
    deep_spec = deep_prompt[0] if deep_prompt else None
    params = build.place_params(config, host, mesh, model=T5(config,
                                                             deep_prompt_spec=deep_spec))
    unknown = sorted(set(tasks_of) - set(files))
    if unknown:
        raise ValueError(f"serve.prompt_tasks names prompts {unknown} that are not served "
                         f"(served: {sorted(files)})")
    prompts = [load_prompt(name, path, config.d_model, tasks_of.get(name, mixture_or_task_name))
               for name, path in files.items() if name not in deep]
    from prompt_jax.methods import templates

    for p in prompts:
        if p.task and templates.soft_count(p.task):
            raise ValueError(f"serve: prompt {p.name!r} ({p.source}) is for {p.task}, whose "
                             "template places the prompt inside the input (soft tokens, "
                             "task_templates.templates); the server puts prompts before raw "
                             "inputs, so a templated prompt is not served")
    if deep:  # its own entry: no soft prompt, the deep prompt only (under every prompt)
        check_task(task := tasks_of.get(deep_name, mixture_or_task_name))
        prompts.append(Prompt(deep_name, np.zeros((0, config.d_model), np.float32),
                              deep_source, DEEP_PROMPT_KIND, task))
    engine = Engine(config, params, mesh, batching, limits, deep_spec, deep_source)
    return Service(engine, Registry(prompts), tasks.get_vocabulary(), batching)


@gin.configurable
def serve(*, initial_checkpoint: str | None = gin.REQUIRED,
          model: build.ModelSpec = build.ModelSpec(), model_dir: str | None = None,
          prompt_dir: str | None = None, prompt_files: Mapping[str, str] | None = None,
          prompt_tasks: Mapping[str, str] | None = None, mixture_or_task_name: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, max_input_length: int = 512,
          max_decode_length: int = 128, decode_length: int = 8, max_num_beams: int = 8,
          max_inputs: int = 256, batching: BatchingSpec | None = None,
          mesh_shape: Sequence[int] = (-1, 1), seed: int = 0) -> None:
    """Serve until interrupted (see the module docstring)."""
    import uvicorn

    limits = Limits(max_input_length=max_input_length, max_decode_length=max_decode_length,
                    decode_length=decode_length, max_num_beams=max_num_beams,
                    max_inputs=max_inputs)
    service = load_service(initial_checkpoint=initial_checkpoint, model=model,
                           model_dir=model_dir, prompt_dir=prompt_dir, prompt_files=prompt_files,
                           prompt_tasks=prompt_tasks, mixture_or_task_name=mixture_or_task_name,
                           limits=limits, batching=batching, mesh_shape=mesh_shape, seed=seed)
    names = [p.name for p in service.registry.all()]
    print(f"serving {len(names)} prompt(s) {names} on http://{host}:{port} (docs: /docs)"
          + ("" if names else "; POST /v1/prompts to add one"), flush=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")


@dataclasses.dataclass
class Running:
    """A server on a thread of this process (tests, the bench)."""

    url: str
    stop: Callable[[], None]


def run_in_thread(app: fastapi.FastAPI, host: str = "127.0.0.1", port: int = 0,
                  timeout: float = 60.0) -> Running:
    """Serve `app` on (host, port) — port 0: a free one — until `stop()`."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="prompt-jax-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join()
        sock.close()

    return Running(f"http://{host}:{sock.getsockname()[1]}", stop)
