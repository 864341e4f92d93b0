"""The OpenAI-compatible API on real Ray Serve, spoken to by the official `openai` client.

The model is the shipped tiny Llama, trained briefly with a BPE learned from its corpus, so
prompts, usage and stop strings go through a real tokenizer. Two deployments: an open one
with a chat template, and a strict one (API keys, a small body limit, one sequence at a time
with no queue, and an idle wait longer than the request timeout) where every refusal shows.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from transformers import AutoTokenizer

from shipyard.models.sampling import GenerationRequest
from shipyard.runtime.local import free_port
from shipyard.serve import deployment
from shipyard.serve.chat import ChatTemplate
from shipyard.serve.deployment import Service
from shipyard.serve.export import export_checkpoint, load_generator
from shipyard.spec.job import ServeSpec
from shipyard.train.checkpoint import latest_checkpoint
from tests.integration.conftest import shipped_job, wait_for

pytestmark = pytest.mark.integration

NAME = "chat-llama"
KEY = "sk-test-0123456789"
TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["def main():", "import os\n", "class Parser:", "for key, value in ", "return self."]


@pytest.fixture(scope="module")
def export(ray_session, runs_dir):
    from shipyard.train.trainer import run_training

    job = shipped_job(
        "tiny-llama.yaml", NAME, runs_dir, {"train": {"vocab_size": 512}}, zero_stage=0
    )
    run_training(job)
    return export_checkpoint(latest_checkpoint(str(runs_dir), NAME))


@pytest.fixture(scope="module")
def deploy(export):
    """Deploy the export with serve settings (redeploying only when they change)."""
    from ray import serve

    port = free_port()
    deployed = {}

    def run(**settings) -> str:
        spec = ServeSpec(port=port, cpus_per_replica=0.25, num_replicas=1, **settings)
        if deployed.get("spec") != spec:
            deployment.deploy(Service(NAME, export, spec))
            deployed["spec"] = spec
        return f"http://127.0.0.1:{port}"

    yield run
    serve.shutdown()


@pytest.fixture
def client(deploy) -> openai.OpenAI:
    url = deploy(max_batch_size=16, chat_template=TEMPLATE)
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture(scope="module")
def reference(export):
    """What the same export generates in-process, and its tokenizer as transformers opens it."""
    generator = load_generator(export)
    tokenizer = AutoTokenizer.from_pretrained(export.folder, local_files_only=True)

    def generate(prompt: str, max_tokens: int, **sampling) -> tuple[list[int], str]:
        ids = tuple(tokenizer(prompt)["input_ids"])
        tokens = generator.generate([GenerationRequest(ids, max_tokens, **sampling)])[0]
        return tokens, tokenizer.decode(tokens)

    generate.tokenizer = tokenizer
    return generate


def test_completions_and_chat_with_the_openai_client(client, reference):
    assert [model.id for model in client.models.list()] == [NAME]
    answer = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    tokens, text = reference(PROMPTS[0], 12)
    assert answer.choices[0].text == text
    assert answer.choices[0].finish_reason == ("length" if len(tokens) == 12 else "stop")
    assert answer.usage.prompt_tokens == len(reference.tokenizer(PROMPTS[0])["input_ids"])
    assert answer.usage.completion_tokens == 12

    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPTS[0],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.model_dump() == answer.usage.model_dump()

    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "hi"}]
    rendered = ChatTemplate(TEMPLATE, eos_token="<|endoftext|>").render(messages)
    chat = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0.8, seed=3
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(reference.tokenizer(rendered)["input_ids"])
    _, sampled = reference(rendered, 10, temperature=0.8, seed=3)
    assert chat.choices[0].message.content == sampled, "the same seed, in-process and served"
    streamed = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0.8, seed=3, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in streamed]
    assert "".join(pieces) == chat.choices[0].message.content


def test_n_choices_stop_strings_and_seeds(client, reference):
    _, text = reference(PROMPTS[2], 24)
    stop = text[8:11]
    answer = client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "never seen"]
    )
    assert answer.choices[0].text == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == answer.choices[0].text

    many = client.completions.create(
        model=NAME, prompt=PROMPTS[:2], n=2, max_tokens=8, temperature=1.0, top_p=0.9, seed=5
    )
    again = client.completions.create(
        model=NAME, prompt=PROMPTS[:2], n=2, max_tokens=8, temperature=1.0, top_p=0.9, seed=5
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    assert many.choices[0].text == reference(PROMPTS[0], 8, temperature=1.0, top_p=0.9, seed=5)[1]
    assert many.choices[1].text == reference(PROMPTS[0], 8, temperature=1.0, top_p=0.9, seed=6)[1]
    tiny = client.completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=1e-40, seed=1
    )
    assert tiny.choices[0].text == reference(PROMPTS[1], 8)[1], "a tiny temperature is greedy"


def test_sixteen_streams_equal_their_solo_answers_while_a_client_hangs_up(client, deploy):
    url = deploy(max_batch_size=16, chat_template=TEMPLATE)
    bodies = [
        {
            "model": NAME,
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": 40 + i,
            "temperature": 0.7,
            "seed": i,
        }
        for i in range(16)
    ]
    solo = [client.completions.create(**body).choices[0].text for body in bodies]

    def stream(body: dict) -> str:
        chunks = client.completions.create(**body, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks)

    leaver = long_answer(client, {**bodies[0], "prompt": PROMPTS[3], "max_tokens": 120})
    left = threading.Event()

    def leave() -> int:
        """Read two events of a long answer, then hang up."""
        events = 0
        body = {**leaver, "stream": True}
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=60) as r:
            for line in r.iter_lines():
                events += line.startswith(b"data: ")
                if events == 2:
                    break
        left.set()
        return events

    abandoned = requests.get(f"{url}/v1/health").json()["abandoned"]
    with ThreadPoolExecutor(16) as pool:
        streams = [pool.submit(stream, body) for body in bodies]
        # The leaver joins a full batch, where its 120 tokens take many seconds.
        busy = lambda: requests.get(f"{url}/v1/health").json()["running"] >= 8  # noqa: E731
        wait_for(busy, 60, "the streams to fill the batch")
        assert leave() == 2 and left.is_set()
        streamed = [future.result() for future in streams]
    assert streamed == solo, "each stream is its solo answer, whoever shared its steps"

    def settled() -> bool:
        health = requests.get(f"{url}/v1/health").json()
        return health["running"] == 0 and health["waiting"] == 0

    # The leaver's sequence left the batch before its end: counted as abandoned, once.
    wait_for(settled, 60, "the batch to empty")
    assert requests.get(f"{url}/v1/health").json()["abandoned"] == abandoned + 1


def long_answer(client: openai.OpenAI, body: dict) -> dict:
    """`body` with a seed whose answer runs to max_tokens (no end token on the way), so a
    client that leaves early leaves a sequence that still had most of its tokens to go."""
    for seed in range(100, 140):
        answer = client.completions.create(**{**body, "seed": seed})
        if answer.choices[0].finish_reason == "length":
            return {**body, "seed": seed}
    raise AssertionError("no seed gave an answer as long as max_tokens")


def test_errors_come_in_openai_shape(client, deploy):
    url = deploy(max_batch_size=16, chat_template=TEMPLATE)

    def post(body, path="/v1/completions") -> requests.Response:
        content = body if isinstance(body, str) else json.dumps(body)
        headers = {"content-type": "application/json"}
        return requests.post(f"{url}{path}", data=content, headers=headers, timeout=60)

    cases = [
        ("{not json", 400, None, "not valid JSON"),
        ('{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", 400, None, "nested too deeply"),
        (f'{{"model": "{NAME}", "prompt": "\\ud800"}}', 400, None, "lone UTF-16 surrogate"),
        ({"model": NAME}, 400, "prompt", "prompt: Field required"),
        ({"model": NAME, "prompt": 42}, 400, "prompt", "prompt: Input should be"),
        ({"model": NAME, "prompt": "x", "max_tokenz": 3}, 400, "max_tokenz", "not a field"),
        ({"model": NAME, "prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
        ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "less than"),
        ({"model": NAME, "prompt": "x", "max_tokens": 600}, 400, "max_tokens", "at most"),
        ({"model": NAME, "prompt": "é" * 2000}, 400, "prompt", "over this server's limit"),
        ({"model": NAME, "prompt": "x", "n": 17}, 400, "n", "serve.max_batch_size 16"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model", "not served here"),
    ]
    for body, status, param, message in cases:
        response = post(body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and message in error["message"], (body, error)
    assert post({"model": NAME, "prompt": "x" * 1_100_000}).status_code == 413
    assert requests.get(f"{url}/v1/nowhere").json()["error"]["message"] == "Not Found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], presence_penalty=0.5
        )
    # The OpenAPI document describes these bodies as the server validates them.
    document = requests.get(f"{url}/openapi.json").json()
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionBody")
    schema = document["components"]["schemas"]["CompletionBody"]
    assert schema["additionalProperties"] is False and "prompt" in schema["required"]
    assert schema["properties"]["temperature"]["maximum"] == 2


def test_keys_limits_queue_and_timeouts_of_a_strict_deployment(deploy, monkeypatch):
    """One sequence at a time and no queue; the idle wait (4 s) outlasts the request timeout
    (2 s), so every answer times out, and a second request meanwhile finds the queue full (the
    2 s it waits leave a slow machine's health probes time to see it queued)."""
    monkeypatch.setenv("SHIPYARD_TEST_KEYS", f"other-key,{KEY}")
    url = deploy(
        api_keys_env="SHIPYARD_TEST_KEYS",
        max_request_bytes=2048,
        max_batch_size=1,
        max_queued_requests=0,
        batch_wait_timeout_s=4.0,
        request_timeout_s=2.0,
    )
    keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    assert [model.id for model in keyed.models.list()] == [NAME]
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    unkeyed = requests.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x"})
    assert unkeyed.status_code == 401 and unkeyed.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{url}/v1/health").status_code == 200, "probes need no key"

    headers = {"authorization": f"Bearer {KEY}"}
    too_big = requests.post(
        f"{url}/v1/completions", json={"model": NAME, "prompt": "x" * 3000}, headers=headers
    )
    assert too_big.status_code == 413 and "max_request_bytes" in too_big.text
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        keyed.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}])

    body = {"model": NAME, "prompt": "def ", "max_tokens": 4}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(requests.post, f"{url}/v1/completions", json=body, headers=headers)
        wait_for(
            lambda: requests.get(f"{url}/v1/health").json()["waiting"] == 1, 10, "a queued one"
        )
        second = requests.post(f"{url}/v1/completions", json=body, headers=headers)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["type"] == "rate_limit_error"
        timed_out = first.result()
    assert timed_out.status_code == 504 and "request_timeout_s" in timed_out.text
    # A stream that starts the next decode loop waits its 4 s too, and times out streaming.
    wait_for(lambda: requests.get(f"{url}/v1/health").json()["idle"], 10, "an idle replica")
    with pytest.raises(openai.APIError, match="request_timeout_s"):
        list(keyed.completions.create(model=NAME, prompt="def ", max_tokens=4, stream=True))
