"""`prompt-jax serve` over real HTTP on a free loopback port: outputs equal `infer`'s, 64
concurrent mixed-prompt clients get what each would get alone, bad requests get 4xx, and
prompts are added (or refused) at run time.

One server for the module: a random tiny T5 with T5's vocabulary (its outputs differ
from input to input and prompt to prompt, so a mix-up shows) and three prompts (two .npy,
one PEFT adapter); batching buckets chosen so that a handful of programs is compiled.
"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import post_all, save_random_backbone

httpx = pytest.importorskip("httpx")

from prompt_jax import build, infer, prompts, rank_classification, serve, serving  # noqa: E402
from prompt_jax.checkpoints.peft import save_peft  # noqa: E402
from prompt_jax.t5.model import T5  # noqa: E402

E = 32
LIMITS = serve.Limits(max_input_length=24, max_decode_length=8, decode_length=8)
BATCHING = serve.BatchingSpec(max_batch_size=16, max_wait_ms=30, batch_buckets=(1, 4, 16),
                              length_buckets=(24,))
TEXTS = ["rte hypothesis: a cat sat. premise: cats sit.", "hello world",
         "The weather is nice today.", "cb hypothesis: it rains premise: it pours",
         "Paris is the capital of France.", "boolq question: is the sky blue?",
         "A man plays a guitar.", "sst2 sentence: a delightful film"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The backbone (an HF directory), prompts of lengths 4 and 7 (.npy) and 5 (a PEFT
    adapter, for super_glue_rte), and a prompt of the wrong width."""
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    save_random_backbone(root / "backbone", rng, d_model=E)
    arrays = {name: rng.normal(size=(n, E)).astype(np.float32)
              for name, n in (("short", 4), ("long", 7), ("rte", 5))}
    (root / "served").mkdir()
    prompts.save_prompt(str(root / "served" / "short.npy"), arrays["short"])
    prompts.save_prompt(str(root / "served" / "long.npy"), arrays["long"])
    save_peft(arrays["rte"], str(root / "served" / "rte"))
    (root / "served" / "notes.txt").write_text("not a prompt: skipped")
    prompts.save_prompt(str(root / "wide.npy"), np.ones((3, E + 1), np.float32))
    return root, arrays


@pytest.fixture(scope="module")
def server(files):
    root, _ = files
    service = serve.load_service(initial_checkpoint=str(root / "backbone"),
                                 prompt_dir=str(root / "served"),
                                 prompt_tasks={"rte": "super_glue_rte"}, limits=LIMITS,
                                 batching=BATCHING)
    running = serve.run_in_thread(serve.create_app(service))
    with httpx.Client(base_url=running.url, timeout=300) as client:
        yield client
    running.stop()


def assert_same(ours: dict, theirs: dict, keys=("inputs", "prediction", "votes")) -> None:
    for key in keys:
        assert ours.get(key) == theirs.get(key), (key, ours, theirs)
    for key in ("score",):
        if key in theirs:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-4)


def histogram(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^prompt_jax_{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)}


def test_outputs_equal_infer_records(server, files, tmp_path):
    """Greedy (a mixed-task infer batch), beam and ensemble outputs are infer's records."""
    root, _ = files
    served = root / "served"
    paths = {"short": str(served / "short.npy"), "long": str(served / "long.npy"),
             "rte": str(served / "rte")}
    lengths = {"inputs": LIMITS.max_input_length, "targets": 8}
    by_task = tmp_path / "by_task.jsonl"
    by_task.write_text("".join(json.dumps({"inputs": t, "task": ("short", "long")[i % 2]}) + "\n"
                               for i, t in enumerate(TEXTS[:6])))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in TEXTS[:3]))
    run = dict(initial_checkpoint=str(root / "backbone"), task_feature_lengths=lengths,
               batch_size=8, output_file=str(tmp_path / "out.jsonl"))

    mixed = infer.infer(**run, input_file=str(by_task), prompt_files_by_task=paths)
    answers = post_all(str(server.base_url), [
        ("/v1/generate", {"prompt": name, "inputs": TEXTS[i:6:2]})
        for i, name in enumerate(("short", "long"))])
    ours = [a.json()["outputs"] for a in answers]
    for i, record in enumerate(mixed):
        assert_same(ours[i % 2][i // 2], record)

    beam = infer.infer(**run, input_file=str(plain), prompt_file=paths["long"],
                       decoding_spec=infer.DecodingSpec(num_beams=3, length_penalty=0.6))
    answer = server.post("/v1/generate", json={
        "prompt": "long", "inputs": TEXTS[:3],
        "decoding": {"type": "beam", "num_beams": 3, "alpha": 0.6}})
    for ours, record in zip(answer.json()["outputs"], beam, strict=True):
        assert_same(ours, record)

    names = ["short", "long", "rte"]
    ensemble = infer.infer(**run, input_file=str(plain),
                           prompt_files=[paths[n] for n in names])
    answer = server.post("/v1/ensemble", json={"prompts": names, "inputs": TEXTS[:3]})
    for ours, record in zip(answer.json()["outputs"], ensemble, strict=True):
        assert_same(ours, record)
        assert list(ours["predictions"].values()) == list(record["predictions"].values())
        np.testing.assert_allclose(list(ours["scores"].values()),
                                   list(record["scores"].values()), atol=1e-4)
    assert len({r["prediction"] for r in mixed}) > 1  # the outputs are not all alike


def test_rank_scores_each_candidate(server, files):
    """/v1/rank: the task's labels by default (a prompt registered for super_glue_rte) or
    the request's candidates, scored as `serving.rank_classify` scores them."""
    root, arrays = files
    config, frozen = build.load_frozen(build.ModelSpec(), str(root / "backbone"), None, 0)
    vocab = serve_vocab()
    tokens = np.asarray(infer._pad_ids([list(vocab.encode(t)) + [1] for t in TEXTS[:4]], 24, 4))
    labels = rank_classification.candidates("super_glue_rte", LIMITS.decode_length)
    _, want = serving.rank_classify(T5(config), frozen, jnp.asarray(tokens),
                                    jnp.asarray(labels.tokens), arrays["rte"])
    answer = server.post("/v1/rank", json={"prompt": "rte", "inputs": TEXTS[:4]}).json()
    for row, out in zip(np.asarray(want), answer["outputs"], strict=True):
        assert list(out["scores"]) == list(labels.labels)
        np.testing.assert_allclose(list(out["scores"].values()), row, atol=1e-4)
        assert out["choice"] == int(row.argmax()) and out["prediction"] == labels.labels[
            out["choice"]]
        assert out["score"] == pytest.approx(float(row.max()), abs=1e-4)
    given = server.post("/v1/rank", json={"prompt": "short", "inputs": TEXTS[:1],
                                          "candidates": ["yes", "no", "maybe"]}).json()
    assert list(given["outputs"][0]["scores"]) == ["yes", "no", "maybe"]


def serve_vocab():
    from prompt_jax import tasks

    return tasks.get_vocabulary()


def test_64_concurrent_clients_get_what_each_gets_alone(server):
    """64 concurrent requests (mixed prompts; greedy, sampled and rank) share batches and
    each gets what it gets alone; few shapes are compiled; seeds make draws reproducible."""
    rng = np.random.default_rng(1)
    bodies = []
    for i in range(64):
        prompt = ("short", "long", "rte")[i % 3]
        inputs = [TEXTS[j] for j in rng.choice(len(TEXTS), 1 + i % 2, replace=False)]
        if i % 8 == 7:
            bodies.append(("/v1/rank", {"prompt": prompt, "inputs": inputs,
                                        "candidates": ["yes", "no"]}))
        elif i % 4 == 1:
            bodies.append(("/v1/generate", {"prompt": prompt, "inputs": inputs, "decoding": {
                "type": "sample", "temperature": 1.5, "top_k": 50, "top_p": 0.9,
                "seed": i}}))
        else:
            bodies.append(("/v1/generate", {"prompt": prompt, "inputs": inputs,
                                            "max_decode_length": 5 + i % 4}))
    alone = [server.post(path, json=body) for path, body in bodies]
    assert {a.headers["x-batch-requests"] for a in alone} == {"1"}
    before = histogram(server.get("/metrics").text, "batch_requests")
    crowd = post_all(str(server.base_url), bodies)
    assert all(c.status_code == 200 for c in crowd), [c.text for c in crowd if c.is_error]
    for a, c in zip(alone, crowd, strict=True):
        for ours, theirs in zip(c.json()["outputs"], a.json()["outputs"], strict=True):
            assert_same(ours, theirs, ("inputs", "prediction", "choice", "seed"))
    assert max(int(c.headers["x-batch-requests"]) for c in crowd) > 1
    metrics = server.get("/metrics").text
    after = histogram(metrics, "batch_requests")
    shared = (after["+Inf"] - before["+Inf"]) - (after["1"] - before["1"])
    assert shared > 0, metrics  # batches of more than one request
    compiled = float(re.search(r"^prompt_jax_compiled_shapes (\S+)$", metrics, re.M).group(1))
    assert compiled <= 12, metrics
    assert float(re.search(r"^prompt_jax_tokens_per_second (\S+)$", metrics, re.M).group(1)) > 0

    # Sampling: top_k=1 is greedy; other seeds give other draws.
    greedy = server.post("/v1/generate", json={"prompt": "long", "inputs": TEXTS[:4]}).json()
    top1 = server.post("/v1/generate", json={"prompt": "long", "inputs": TEXTS[:4], "decoding": {
        "type": "sample", "top_k": 1, "seed": 5}}).json()
    assert [o["prediction"] for o in top1["outputs"]] == [o["prediction"]
                                                         for o in greedy["outputs"]]
    draws = {server.post("/v1/generate", json={"prompt": "long", "inputs": TEXTS[:1],
                                               "decoding": {"type": "sample", "seed": s,
                                                            "temperature": 2.0}}
                         ).json()["outputs"][0]["prediction"] for s in range(4)}
    assert len(draws) > 1


BAD = [
    ("/v1/generate", {"prompt": "nope", "inputs": ["x"]}, 404, "prompt"),
    ("/v1/ensemble", {"prompts": ["short", "nope"], "inputs": ["x"]}, 404, "prompts.1"),
    ("/v1/rank", {"prompt": "nope", "inputs": ["x"]}, 404, "prompt"),
    ("/v1/generate", {"prompt": "short"}, 422, "inputs"),
    ("/v1/generate", {"prompt": "short", "inputs": [1]}, 422, "inputs.0"),
    ("/v1/generate", {"prompt": "short", "inputs": []}, 422, "inputs"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x"], "max_decode_length": "8"}, 422,
     "max_decode_length"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x"], "max_decode_length": 9}, 422,
     "max_decode_length"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x"], "max_len": 8}, 422, "max_len"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x"], "decoding": {"type": "bem"}}, 422,
     "decoding"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x"],
                      "decoding": {"type": "beam", "num_beams": 0}}, 422,
     "decoding.num_beams"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x"],
                      "decoding": {"type": "sample", "temperature": 0}}, 422,
     "decoding.temperature"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x"],
                      "decoding": {"type": "beam", "num_beams": 9}}, 422, "decoding.num_beams"),
    ("/v1/generate", {"prompt": "short", "inputs": ["x", "word " * 30]}, 413, "inputs.1"),
    ("/v1/rank", {"prompt": "short", "inputs": ["x"]}, 422, "candidates"),
    ("/v1/rank", {"prompt": "short", "inputs": ["x"], "candidates": ["a", "a"]}, 422,
     "candidates"),
    ("/v1/prompts", {"name": "../up", "path": "x.npy"}, 422, "name"),
]


def test_bad_requests_get_4xx_naming_the_field(server):
    for path, body, status, field in BAD:
        answer = server.post(path, json=body)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["field"] == field and answer.json()["error"], (body, answer.text)
    malformed = server.post("/v1/generate", content=b'{"prompt": "short", "inputs": [',
                            headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
    not_json = server.post("/v1/generate", content=b"prompt=short")
    assert not_json.status_code == 415 and not_json.json()["field"] == "body"
    # Over the limit with "truncate": cut to 24 tokens (EOS kept), and said so.
    cut = server.post("/v1/generate", json={"prompt": "short", "inputs": ["word " * 30],
                                            "truncate": True})
    assert cut.status_code == 200 and cut.json()["outputs"][0]["truncated"] is True
    health = server.get("/v1/health").json()
    assert health["status"] == "ok" and health["prompts"] == 3
    schema = server.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/rank", "/v1/ensemble", "/v1/prompts", "/v1/health",
            "/metrics"} <= set(schema["paths"])


def test_prompts_are_added_at_run_time_and_broken_ones_refused(server, files, tmp_path):
    root, arrays = files
    listed = server.get("/v1/prompts").json()["prompts"]
    assert sorted(p["name"] for p in listed) == ["long", "rte", "short"]
    assert {p["name"]: p["kind"] for p in listed} == {"long": "npy", "rte": "peft",
                                                      "short": "npy"}
    broken = [({"name": "wide", "path": str(root / "wide.npy")}, "expected [P, 32]"),
              ({"name": "gone", "path": str(tmp_path / "gone.npy")}, "does not exist"),
              ({"name": "model", "path": str(root / "backbone")},
               "Hugging Face model directory"),
              ({"name": "short", "path": str(root / "wide.npy")}, "expected [P, 32]"),
              ({"name": "task", "path": str(root / "served" / "short.npy"), "task": "rtee"},
               "not a registered task")]
    for body, message in broken:
        answer = server.post("/v1/prompts", json=body)
        assert answer.status_code == 422 and message in answer.json()["error"], answer.text
        assert server.get("/v1/prompts").json()["prompts"] == listed

    save_peft(arrays["short"], str(tmp_path / "added"))
    added = server.post("/v1/prompts", json={"name": "added", "path": str(tmp_path / "added")})
    assert added.status_code == 201 and added.json()["kind"] == "peft"
    assert "added" in [p["name"] for p in server.get("/v1/prompts").json()["prompts"]]
    body = {"inputs": TEXTS[:3]}
    outputs = lambda name: server.post("/v1/generate", json={"prompt": name, **body}).json()
    assert outputs("added") == outputs("short")
    replaced = server.post("/v1/prompts", json={"name": "added",
                                                "path": str(root / "served" / "long.npy")})
    assert replaced.status_code == 200 and replaced.json()["length"] == 7
    assert outputs("added") == outputs("long")
