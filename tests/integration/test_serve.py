"""Serving a trained checkpoint on real Ray Serve, through real HTTP on 127.0.0.1."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from shipyard.models.sampling import GenerationRequest
from shipyard.runtime.local import free_port
from shipyard.serve import deployment
from shipyard.serve.app import DEPLOYMENT_NAME
from shipyard.serve.deployment import Service, serve_status
from shipyard.serve.export import export_checkpoint, load_exported_model, load_generator
from shipyard.spec.job import ServeSpec
from shipyard.train.checkpoint import latest_checkpoint
from tests.integration.conftest import PP2_TP2, tiny_job, validation_loss, wait_for

pytestmark = pytest.mark.integration

APP = "served"
PROMPTS = [
    "def main():",
    "import os\n",
    "class A:",
    "for i in ",
    "return x",
    "# ",
    "while ",
    "(",
    "é",
]
# Greedy and seeded sampling, with different lengths, in one concurrent burst.
BODIES = [
    {"prompt": p, "max_tokens": 6 + 2 * i, "temperature": 0} for i, p in enumerate(PROMPTS)
] + [
    {"prompt": p, "max_tokens": 12, "temperature": 0.9, "top_k": 20, "seed": i}
    for i, p in enumerate(PROMPTS)
]


@pytest.mark.parametrize(
    ("name", "train"),
    [
        ("zero3", {"zero_stage": 3}),
        ("pipeline2", {"zero_stage": 1, "pipeline_stages": 2}),
        ("pp2tp2", PP2_TP2),
    ],
)
def test_export_is_the_trained_model(layouts, runs_dir, name, train):
    """ZeRO-3 shards, pipeline stages and tensor-parallel shards consolidate to the model the
    run evaluated."""
    result = layouts(name, **train)
    model = load_exported_model(export_checkpoint(latest_checkpoint(str(runs_dir), name)))
    measured = validation_loss(model, tiny_job(name, runs_dir, **train))
    assert measured == pytest.approx(result.final["val_loss"], rel=1e-4)


def test_zero0_and_zero3_exports_agree(layouts, runs_dir):
    """Same seed, same math: ZeRO-3's gathered fp32 masters equal ZeRO-0's whole weights."""
    exported = {}
    for name, stage in (("zero0", 0), ("zero3", 3)):
        layouts(name, zero_stage=stage)
        exported[name] = load_exported_model(
            export_checkpoint(latest_checkpoint(str(runs_dir), name))
        ).state_dict()
    for key, weight in exported["zero0"].items():
        torch.testing.assert_close(exported["zero3"][key], weight, atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def serving(ray_session, layouts, runs_dir):
    """Deploy an export (the ZeRO-3 GPT run's by default) with given serve settings; one HTTP
    port for the module. Tests asking for what is already deployed share that deployment (the
    bad-request cases then also show one server surviving all of them)."""
    from ray import serve

    layouts("zero3", zero_stage=3)
    gpt = export_checkpoint(latest_checkpoint(str(runs_dir), "zero3"))
    port = free_port()
    deployed = {}

    def deploy(export=gpt, **settings) -> str:
        spec = ServeSpec(port=port, cpus_per_replica=0.25, **settings)
        service = Service(APP, export, spec)
        if deployed.get("service") != (export.folder, spec):
            deployment.deploy(service)
            deployed["service"] = (export.folder, spec)
        return service.url

    deploy.export = gpt
    yield deploy
    serve.shutdown()


@pytest.fixture(scope="module")
def expected(serving) -> list[list[int]]:
    """Every body of BODIES generated alone, in-process, from the same export."""
    export = serving.export
    generator = load_generator(export)
    requests_alone = [
        GenerationRequest(
            tuple(body["prompt"].encode()),
            body["max_tokens"],
            body["temperature"],
            body.get("top_k"),
            body.get("seed", 0),
        )
        for body in BODIES
    ]
    return [generator.generate([request])[0] for request in requests_alone]


def text_of(tokens: list[int]) -> str:
    """What the byte tokenizer decodes `tokens` to."""
    return bytes(tokens).decode("utf-8", errors="replace")


def post_all(url: str, bodies: list[dict]) -> list[dict]:
    """POST every body at once to /v1/completions, from as many threads; the answers in order."""
    model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

    def post(body: dict) -> dict:
        response = requests.post(
            f"{url}/v1/completions", json={"model": model, **body}, timeout=120
        )
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def texts(answers: list[dict]) -> list[str]:
    return [answer["choices"][0]["text"] for answer in answers]


def batch_sizes(answers: list[dict]) -> list[int]:
    return [answer["shipyard"]["batch_size"] for answer in answers]


def test_http_answers_equal_direct_generation_and_are_batched(serving, expected):
    url = serving(num_replicas=1, max_batch_size=8, batch_wait_timeout_s=0.2)
    answers = post_all(url, BODIES)
    assert texts(answers) == [text_of(tokens) for tokens in expected]
    assert [a["usage"]["completion_tokens"] for a in answers] == [len(t) for t in expected]
    assert [a["usage"]["prompt_tokens"] for a in answers] == [
        len(body["prompt"].encode()) for body in BODIES
    ]
    assert max(batch_sizes(answers)) > 1, "requests were batched"
    model = requests.get(f"{url}/v1/models/{APP}", timeout=30).json()
    assert (model["id"], model["max_model_len"]) == (APP, 32)
    assert (model["shipyard"]["job"], model["shipyard"]["step"]) == ("zero3", 24)


def test_transformers_generates_from_the_gpt_export_what_serve_answers(serving, expected):
    """The built-in GPT's export opens as GPT-2: greedy `generate` gives the served tokens."""
    pairs = zip(BODIES, expected, strict=True)
    greedy = [(body, tokens) for body, tokens in pairs if body["temperature"] == 0]
    assert transformers_greedy(serving.export.folder, greedy) == [t for _, t in greedy]


def transformers_greedy(folder, bodies_and_tokens) -> list[list[int]]:
    """What transformers' own greedy `generate` continues each body's prompt with, among the
    byte tokenizer's 256 ids (as Shipyard's serving, whose model may have more)."""
    opened = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    beyond_bytes = list(range(256, opened.config.get_text_config().vocab_size)) or None
    answers = []
    for body, _ in bodies_and_tokens:
        prompt = torch.tensor([list(body["prompt"].encode())])
        with torch.no_grad():
            ids = opened.generate(
                prompt,
                do_sample=False,
                max_new_tokens=body["max_tokens"],
                min_new_tokens=body["max_tokens"],
                pad_token_id=0,
                suppress_tokens=beyond_bytes,
            )
        answers.append(ids[0, prompt.shape[1] :].tolist())
    return answers


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_huggingface_export_serves_what_transformers_generates(
    serving, model_runs, runs_dir, family
):
    """The tiny Llama's and the GPT-2's exports on Serve (their own KV cache, batched with
    other requests): greedy answers are transformers' greedy `generate` from the same folder;
    a seeded sampled answer repeats."""
    files = {"llama": "tiny-llama.yaml", "gpt2": "gpt2-pipeline.yaml"}
    model_runs(files[family], f"{family}-zero0", zero_stage=0, pipeline_stages=1)
    export = export_checkpoint(latest_checkpoint(str(runs_dir), f"{family}-zero0"))
    url = serving(export, num_replicas=1, max_batch_size=8, batch_wait_timeout_s=0.2)
    greedy = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in PROMPTS]
    sampled = {"prompt": "def ", "max_tokens": 8, "temperature": 0.8, "seed": 7}
    answers = post_all(url, [*greedy, sampled, sampled])
    transformers_tokens = transformers_greedy(export.folder, [(body, None) for body in greedy])
    assert texts(answers[: len(greedy)]) == [text_of(tokens) for tokens in transformers_tokens]
    assert answers[-1]["choices"] == answers[-2]["choices"]
    assert max(batch_sizes(answers)) > 1, "requests were batched"


def test_a_factory_export_serves_what_its_module_generates(serving, mixer_run, runs_dir):
    export = export_checkpoint(latest_checkpoint(str(runs_dir), "mixer"))
    url = serving(export, num_replicas=1, max_batch_size=4)
    bodies = [{"prompt": p, "max_tokens": 6, "temperature": 0} for p in PROMPTS[:4]]
    generator = load_generator(export)
    alone = [
        generator.generate([GenerationRequest(tuple(b["prompt"].encode()), 6)])[0] for b in bodies
    ]
    assert texts(post_all(url, bodies)) == [text_of(tokens) for tokens in alone]


def test_batching_off_gives_the_same_answers(serving, expected):
    url = serving(num_replicas=1, max_batch_size=1)
    answers = post_all(url, BODIES)
    assert texts(answers) == [text_of(tokens) for tokens in expected]
    assert set(batch_sizes(answers)) == {1}


def test_unhealthy_replica_is_replaced(serving, expected):
    from ray import serve

    url = serving(num_replicas=1, health_check_period_s=1, health_check_timeout_s=10)
    healthy = requests.get(f"{url}/v1/health", timeout=30).json()["replica"]
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP)
    assert handle.corrupt_weights_for_drill.remote().result() == healthy

    body = {"model": APP, **BODIES[0]}
    broken = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert broken.status_code == 503, broken.text
    assert "non-finite" in broken.json()["error"]["message"]
    assert broken.json()["error"]["code"] == "model_unavailable"

    def replaced() -> bool:
        response = requests.get(f"{url}/v1/health", timeout=30)
        return response.status_code == 200 and response.json()["replica"] != healthy

    wait_for(replaced, 120, "Serve to replace the unhealthy replica")
    assert texts(post_all(url, BODIES[:1])) == [text_of(expected[0])]


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(serving):
    url = serving(
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=3,
        look_back_period_s=2,
        metrics_interval_s=0.5,
        max_batch_size=2,
    )

    def running() -> int:
        return serve_status(APP)["replicas"].get("RUNNING", 0)

    wait_for(lambda: running() == 1, 60, "one replica at rest")
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            body = {"model": APP, "prompt": "x", "max_tokens": 31}
            requests.post(f"{url}/v1/completions", json=body, timeout=120)

    workers = [threading.Thread(target=load) for _ in range(6)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: running() == 2, 120, "a second replica under load")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    wait_for(lambda: running() == 1, 120, "the extra replica to go when idle")
