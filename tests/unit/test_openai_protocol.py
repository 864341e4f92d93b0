"""The pieces of the OpenAI-compatible API that need no server: request bodies, the text of a
streamed answer, chat templates, and numerically safe sampling."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from shipyard.data.tokenizer import BYTES, from_folder, train_bpe
from shipyard.models.sampling import GenerationRequest, choose, nucleus
from shipyard.serve.chat import ChatTemplate, TemplateError
from shipyard.serve.protocol import ChatBody, CompletionBody
from shipyard.serve.text import TextAssembler

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def assembled(tokenizer, tokens: list[int], stop=(), per_step: int = 1) -> tuple[str, bool]:
    """The text an answer streams, `per_step` tokens at a time, and whether a stop hit."""
    text = TextAssembler(tokenizer, stop)
    pieces = [text.add(tokens[i : i + per_step]) for i in range(0, len(tokens), per_step)]
    return "".join(pieces) + text.finish(), text.hit_stop


def test_streamed_text_is_the_whole_text_even_inside_a_character():
    tokens = list("naïve café ✓".encode())
    for per_step in (1, 2, 3):
        assert assembled(BYTES, tokens, per_step=per_step) == ("naïve café ✓", False)
    text = TextAssembler(BYTES)
    assert text.add(list("é".encode())[:1]) == "", "half a character waits"
    assert text.add(list("é".encode())[1:]) == "é"


def test_a_stop_string_ends_the_text_and_a_possible_one_waits():
    tokens = list(b"print(x)\nreturn y")
    assert assembled(BYTES, tokens, stop=["\nret"]) == ("print(x)", True)
    assert assembled(BYTES, tokens, stop=["\nreturn z"]) == ("print(x)\nreturn y", False)
    text = TextAssembler(BYTES, ["ab"])
    assert text.add(list(b"xa")) == "x", "'a' may begin 'ab'"
    assert text.add(list(b"c")) == "ac"
    assert text.add(list(b"ab")) == "" and text.hit_stop
    assert text.add(list(b"more")) == "" and text.finish() == ""


def test_a_bpe_answer_streams_to_the_text_it_decodes_to():
    corpus = ["def parse(line):\n    return line.split(',')\n" * 20, "naïve café ✓ " * 20]
    bpe = train_bpe(corpus, 300, 2)
    tokens = bpe.encode(["def parse(café):\n    return ✓"])[0].tolist()
    whole = bpe.decode(tokens)
    assert assembled(bpe, tokens) == (whole, False)
    assert assembled(bpe, tokens, stop=["return"])[0] == whole[: whole.index("return")]


def test_request_bodies_follow_openai_and_refuse_what_would_be_ignored():
    body = CompletionBody.model_validate({"model": "m", "prompt": ["a", "b"], "stop": "x"})
    assert body.prompts() == ["a", "b"] and body.stop_strings == ["x"]
    assert CompletionBody.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert body.temperature == 1.0 and body.problems() is None, "OpenAI's default"
    neutral = {"presence_penalty": 0, "logit_bias": {}, "user": "u", "best_of": 1}
    assert (
        CompletionBody.model_validate({"model": "m", "prompt": "a", **neutral}).problems() is None
    )
    for field, value in [
        ("logprobs", 1),
        ("echo", True),
        ("presence_penalty", 0.5),
        ("logit_bias", {"1": 5}),
        ("best_of", 3),
    ]:
        problem = CompletionBody.model_validate(
            {"model": "m", "prompt": "a", field: value}
        ).problems()
        assert (problem.status, problem.param) == (400, field), field
    with pytest.raises(ValidationError, match="Extra inputs"):
        CompletionBody.model_validate({"model": "m", "prompt": "a", "max_tokenz": 3})
    streamless = CompletionBody.model_validate(
        {"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}
    )
    assert streamless.problems().param == "stream_options"


def test_chat_bodies_take_text_parts_and_the_newer_token_limit():
    body = ChatBody.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 7,
        }
    )
    assert body.token_limit == 7
    assert body.messages[0].as_template_input() == {"role": "user", "content": "hi"}
    tools = ChatBody.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}
    )
    assert tools.problems().param == "tools"
    with pytest.raises(ValidationError):
        ChatBody.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        ChatBody.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
        )


def test_chat_templates_render_refuse_and_stay_in_their_sandbox():
    template = ChatTemplate(TEMPLATE, eos_token="</s>")
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages) == "[user]hi</s>[assistant]"
    with pytest.raises(TemplateError, match="refused the conversation: no"):
        ChatTemplate("{{ raise_exception('no') }}").render(messages)
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(messages)


def test_a_tokenizer_folders_chat_template_travels_into_its_saves(tmp_path):
    bpe = train_bpe(["hello world " * 50], 300, 2)
    source = tmp_path / "source"
    bpe.save(source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = from_folder(source, "source")
    assert loaded.chat_template == TEMPLATE
    assert loaded.fingerprint == bpe.fingerprint, "a template changes no ids"
    loaded.save(tmp_path / "export")
    assert from_folder(tmp_path / "export", "export").chat_template == TEMPLATE
    from transformers import AutoTokenizer

    opened = AutoTokenizer.from_pretrained(tmp_path / "export", local_files_only=True)
    assert opened.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ) == ChatTemplate(TEMPLATE, eos_token="<|endoftext|>").render(
        [{"role": "user", "content": "hi"}]
    )


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-300, 1e-8])
def test_any_tiny_temperature_samples_the_best_token(temperature):
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    request = GenerationRequest((1,), 1, temperature=temperature, seed=0)
    chosen = choose(logits, request, torch.Generator().manual_seed(0), vocabulary=256)
    assert chosen == int(logits[:256].argmax())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probabilities = torch.tensor([0.1, 0.5, 0.3, 0.1], dtype=torch.float64)
    assert nucleus(probabilities, 0.7).tolist() == [0.0, 0.5, 0.3, 0.0]
    assert nucleus(probabilities, 0.5).tolist() == [0.0, 0.5, 0.0, 0.0]
    assert nucleus(probabilities, 1e-9).tolist() == [0.0, 0.5, 0.0, 0.0], "the best stays"
    draws = {
        choose(
            probabilities.log(),
            GenerationRequest((1,), 1, temperature=1.0, seed=seed, top_p=0.7),
            torch.Generator().manual_seed(seed),
            vocabulary=4,
        )
        for seed in range(50)
    }
    assert draws == {1, 2}


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_a_cancelled_stream_closes_its_generator_at_once(spec_version):
    """Serve cancels the response of a client that hung up, mostly while it waits in `send`
    with the event generator paused at a yield: the generator's `finally` (which takes the
    answer's sequences out of the batch) must run then, not at garbage collection."""
    import asyncio
    import gc

    from fastapi.responses import StreamingResponse

    from shipyard.serve.app import ClosingStreamingResponse

    async def cancelled_mid_stream(response_class) -> bool:
        closed = asyncio.Event()

        async def events():
            try:
                for number in range(100):
                    yield f"data: {number}\n\n"
            finally:
                closed.set()

        sent = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body":
                sent.set()
                await asyncio.Event().wait()  # a slow client: this write never ends

        async def receive():
            await asyncio.Event().wait()  # no disconnect message: Serve cancels instead

        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        response = response_class(events(), media_type="text/event-stream")
        task = asyncio.create_task(response(scope, receive, send))
        await sent.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        return closed.is_set()

    gc.disable()  # garbage collection would close a forgotten generator too
    try:
        assert asyncio.run(cancelled_mid_stream(ClosingStreamingResponse))
        assert not asyncio.run(cancelled_mid_stream(StreamingResponse)), "Starlette's does not"
    finally:
        gc.enable()


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_a_stream_fed_every_decode_step_stops_as_soon_as_it_is_cancelled(spec_version):
    """A streamed answer gets a token every decode step. Cancelled (Serve's word that the
    client left), it must stop at once, not when the answer is complete; Starlette's own
    response, streaming in an anyio child task, is not cancelled while it is always about to
    wake, and (for ASGI 2.3, as Serve speaks) runs to the end."""
    import asyncio
    import contextlib

    from fastapi.responses import StreamingResponse

    from shipyard.serve.app import ClosingStreamingResponse

    steps = 3000

    async def tokens_after_cancel(response_class) -> int:
        queue: asyncio.Queue[int] = asyncio.Queue()
        produced = 0

        async def decode() -> None:
            nonlocal produced
            for produced in range(1, steps + 1):
                queue.put_nowait(produced)
                await asyncio.sleep(0)  # the next decode step

        async def events():
            while (token := await queue.get()) < steps:
                yield f"data: {token}\n\n"

        started = asyncio.Event()

        async def send(message):  # Serve's send queues the message and returns
            started.set()

        async def receive():
            await asyncio.Event().wait()  # no disconnect message: Serve cancels instead

        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        decoder = asyncio.create_task(decode())
        task = asyncio.create_task(response_class(events())(scope, receive, send))
        await started.wait()
        cancelled_at = produced
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        stopped_at = produced
        decoder.cancel()
        return stopped_at - cancelled_at

    assert asyncio.run(tokens_after_cancel(ClosingStreamingResponse)) <= 2
    if spec_version == "2.3":
        assert asyncio.run(tokens_after_cancel(StreamingResponse)) > steps // 2, "Starlette's"


def test_a_client_that_hangs_up_ends_the_stream_and_closes_its_generator():
    """A server that reports the hang-up as `http.disconnect` ends the response there, without
    an error (the client is gone), and the generator's `finally` runs."""
    import asyncio

    from shipyard.serve.app import ClosingStreamingResponse

    async def run() -> tuple[int, bool]:
        closed = asyncio.Event()
        leave = asyncio.Event()
        sent = 0

        async def events():
            try:
                for number in range(10_000):
                    yield f"data: {number}\n\n"
                    await asyncio.sleep(0)
            finally:
                closed.set()

        async def send(message):
            nonlocal sent
            sent += 1
            if sent == 3:
                leave.set()

        async def receive():
            await leave.wait()
            return {"type": "http.disconnect"}

        await ClosingStreamingResponse(events())({"type": "http"}, receive, send)
        return sent, closed.is_set()

    sent, closed = asyncio.run(run())
    assert closed and 3 <= sent < 10, sent
