"""The Ray Serve application: OpenAI's completions, chat and models API over the model's
generator, continuously batched, streamed, bounded and health-checked.

Every request is checked before anything large is allocated: its key, its body's size (read
in pieces, never past `serve.max_request_bytes`), its fields, its prompt's length in tokens
and its token budget, and the replica's queue. Then each choice joins the continuous batcher
as one sequence, and its tokens come back step by step: streamed as server-sent events, or
gathered into one answer. Either way the text is built by the same `TextAssembler`, so the
two are equal for the same seed. A client that goes away takes its sequences out of the batch
at the next step.

`build_app(args)` is an application builder, so the same app deploys from Python
(`shipyard serve`) and from a Serve config file (`serve deploy`). Its args are plain data:
`export` (an export folder), `serve` (the job's serve section) and `name` (the model's name in
the API: the serving job's, by default the job that trained the export).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime.
import asyncio
import hmac
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from shipyard.data.tokenizer import saved_tokenizer
from shipyard.models.sampling import BrokenModelError, GenerationRequest
from shipyard.serve.batching import ContinuousBatcher, TokenStream
from shipyard.serve.chat import ChatTemplate, TemplateError
from shipyard.serve.export import load_generator, read_export
from shipyard.serve.openapi import openapi_document
from shipyard.serve.protocol import MAX_SEED, Answer, ApiError, ChatBody, CompletionBody, usage
from shipyard.serve.text import TextAssembler
from shipyard.spec.job import ServeSpec

DEPLOYMENT_NAME = "ShipyardModel"

# No interactive docs (their pages load scripts from a CDN); the OpenAPI document is served.
api = FastAPI(title="Shipyard model server", docs_url=None, redoc_url=None)


def _openapi() -> dict[str, Any]:
    """FastAPI's /openapi.json, from the models that validate the bodies (the routes read
    their bodies themselves, to bound them, so FastAPI cannot see those models)."""
    return openapi_document(api.title)


api.openapi = _openapi


@api.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content=error.body())


@api.exception_handler(BrokenModelError)
async def _broken_model(request: Request, error: BrokenModelError) -> JSONResponse:
    return await _api_error(request, _unavailable(error))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown paths and methods, in the same shape as every other error."""
    return await _api_error(request, ApiError(error.status_code, str(error.detail)))


# Helpers the replica's methods call are defined before the deployment class: Serve pickles
# the class when the decorator runs, with only the module globals that exist by then.


def _api_keys(spec: ServeSpec) -> list[str]:
    if not spec.api_keys_env:
        return []
    keys = [key.strip() for key in os.environ.get(spec.api_keys_env, "").split(",") if key.strip()]
    if not keys:
        raise ValueError(
            f"serve.api_keys_env: {spec.api_keys_env} holds no key on this replica's machine"
        )
    return keys


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read in pieces and refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise _too_large(limit)
        pieces.append(piece)
    return b"".join(pieces)


def _json_object(raw: bytes) -> dict[str, Any]:
    """The body's JSON object, refused (400) when it is not JSON, is nested deeper than the
    parser recurses, or holds a lone UTF-16 surrogate (valid JSON, but not text to encode)."""
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(document, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        json.dumps(document, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(
            400, "the request body holds a lone UTF-16 surrogate (such as \\ud800): not text"
        ) from None
    return document


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is over serve.max_request_bytes ({limit} bytes)",
        None,
        "request_too_large",
    )


def _invalid(error: ValidationError) -> ApiError:
    """A 400 naming the first field at fault (pydantic's own wording for what is wrong)."""
    problem = error.errors()[0]
    field = ".".join(str(part) for part in problem["loc"] if not _branch_tag(part)) or "body"
    message = (
        "not a field of this endpoint" if problem["type"] == "extra_forbidden" else problem["msg"]
    )
    return ApiError(400, f"{field}: {message}", field)


def _branch_tag(part: Any) -> bool:
    """A union's branch name in pydantic's error path ('str', 'list[int]'), not a field."""
    text = str(part)
    return "[" in text or text in {"str", "int", "float", "bool"} or text.startswith("function-")


def _unavailable(error: BrokenModelError) -> ApiError:
    return ApiError(
        503, f"{error}; this replica is being replaced, retry shortly", None, "model_unavailable"
    )


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that stops, and closes its event generator, as soon as it is
    cancelled or the client hangs up: the generator's `finally` takes its sequences out of the
    batch, so nothing is decoded for nobody.

    Starlette streams in a child task of an anyio task group, and anyio cancels that task only
    at a moment it is not about to wake. A stream's task is fed a token every decode step, so
    anyio's retries could miss it until the answer was complete (seen through Serve with a
    Hugging Face model: all 500 tokens decoded after the client left). Here the request's own
    task streams, and asyncio's cancellation always lands at its next step; a watcher task
    turns the client's `http.disconnect` into that cancellation."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = asyncio.current_task()
        left = asyncio.Event()

        async def cancel_when_client_leaves() -> None:
            await self.listen_for_disconnect(receive)
            left.set()
            streaming.cancel()

        watcher = asyncio.create_task(cancel_when_client_leaves())
        try:
            await self.stream_response(send)
        except OSError:  # ASGI 2.4 servers say a client left this way
            raise ClientDisconnect() from None
        except asyncio.CancelledError:
            if not left.is_set():
                raise
            streaming.uncancel()  # our own cancellation: the response is over, not failed
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()
        if self.background is not None:
            await self.background()


@dataclass
class Choice:
    """One sequence of an answer: its index, its tokens as they come, its text."""

    index: int
    stream: TokenStream
    text: TextAssembler
    finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        """Every token the model gave it (its end token too)."""
        ended = self.stream.finished is not None and self.stream.finished.stopped
        return len(self.text.tokens) + int(ended)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class ModelServer:
    """One replica: the exported model, its generator and tokenizer, and the HTTP routes."""

    def __init__(self, export_folder: str, serve_spec: dict[str, Any], model_name: str):
        self.spec = ServeSpec.model_validate(serve_spec)
        self.export = read_export(export_folder)
        device = "cuda" if self.spec.gpus_per_replica > 0 else "cpu"
        self.generator = load_generator(self.export, device)
        self.tokenizer = saved_tokenizer(self.export.folder)
        self.generator.check()
        self.batcher = ContinuousBatcher(
            self.generator, self.spec.max_batch_size, self.spec.batch_wait_timeout_s
        )
        self.model_name = model_name
        self.template = self._chat_template()
        self.keys = _api_keys(self.spec)
        self.replica = serve.get_replica_context().replica_id.unique_id

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        body = await self._body(request, CompletionBody)
        if not body.prompts():
            raise ApiError(400, "prompt: give at least one prompt", "prompt")
        self._check_choices(len(body.prompts()) * body.n)
        prompts = [self._encode_prompt(prompt) for prompt in body.prompts()]
        return await self._answer(body, Answer("completion", *self._identity()), prompts)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Any:
        body = await self._body(request, ChatBody)
        self._check_choices(body.n)
        if self.template is None:
            raise ApiError(
                400,
                "this model has no chat template (neither its tokenizer nor serve.chat_template "
                "gives one); use /v1/completions, or set serve.chat_template",
                "messages",
                "no_chat_template",
            )
        try:
            text = self.template.render([m.as_template_input() for m in body.messages])
        except TemplateError as error:
            raise ApiError(400, str(error), "messages") from None
        prompt = self._encode_prompt(text, field="messages")
        return await self._answer(body, Answer("chat", *self._identity()), [prompt])

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model}")
    async def model(self, model: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._check_model(model, "model")
        return {**self._model_card(), "shipyard": self.export.describe()}

    @api.get("/v1/health")
    async def health(self) -> dict[str, Any]:
        """Open to probes without a key: says nothing about the model but that it works."""
        await asyncio.to_thread(self.generator.check)
        stats = self.batcher.stats
        return {
            "status": "ok",
            "replica": self.replica,
            "running": self.batcher.running,
            "waiting": self.batcher.waiting,
            "idle": self.batcher.idle,
            "decoded_tokens": stats.decoded_tokens,
            "abandoned": stats.abandoned,
        }

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        await asyncio.to_thread(self.generator.check)

    def corrupt_weights_for_drill(self) -> str:
        """Fault drill: poison this replica's weights so its health check fails.

        Reachable only through a Ray deployment handle (cluster access), never over HTTP.
        """
        for parameter in self.generator.model.parameters():
            parameter.data.fill_(float("nan"))
        return self.replica

    # --- checking a request -------------------------------------------------------------

    async def _body(self, request: Request, schema: type[BaseModel]) -> Any:
        """The request's body as `schema`, after its key and its size are checked."""
        self._authorize(request)
        raw = await _read_body(request, self.spec.max_request_bytes)
        document = _json_object(raw)
        try:
            body = schema.model_validate(document)
        except ValidationError as error:
            raise _invalid(error) from None
        problem = body.problems()
        if problem:
            raise problem
        self._check_model(body.model, "model")
        return body

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # Every key is compared, each in constant time: the answer's timing says nothing.
        matches = [hmac.compare_digest(given.encode(), key.encode()) for key in self.keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ApiError(
                401,
                "a valid API key is required: Authorization: Bearer <key>",
                None,
                "invalid_api_key",
            )

    def _check_model(self, model: str, field: str) -> None:
        if model != self.model_name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                field,
                "model_not_found",
            )

    def _encode_prompt(self, prompt: str | list[int], field: str = "prompt") -> tuple[int, ...]:
        """A prompt's token ids, refused if it leaves no room for an answer or is over the cap."""
        if isinstance(prompt, str):
            ids = tuple(int(i) for i in self.tokenizer.encode([prompt])[0])
        else:
            ids = tuple(prompt)
            vocabulary = self.tokenizer.vocabulary_size
            if any(not 0 <= token < vocabulary for token in ids):
                raise ApiError(400, f"{field}: token ids must be in [0, {vocabulary})", field)
        if not ids:
            raise ApiError(400, f"{field}: the prompt is empty", field)
        cap = min(self.generator.context_length - 1, self.spec.max_prompt_tokens or 2**62)
        if len(ids) > cap:
            raise ApiError(
                400,
                f"{field}: {len(ids)} prompt tokens are over this server's limit of {cap} "
                f"(context length {self.generator.context_length})",
                field,
                "context_length_exceeded",
            )
        return ids

    def _check_choices(self, count: int) -> None:
        """Every choice is a sequence of one batch: no more than a batch holds."""
        if count > self.spec.max_batch_size:
            raise ApiError(
                400,
                f"n: {count} choices are more than this server decodes together "
                f"(serve.max_batch_size {self.spec.max_batch_size})",
                "n",
            )

    def _token_budget(self, asked: int | None, prompt: tuple[int, ...], field: str) -> int:
        """How many new tokens a choice may have: as asked (checked), or the default that fits."""
        room = self.generator.context_length - len(prompt)
        cap = self.spec.max_completion_tokens or room
        if asked is None:
            return max(1, min(self.spec.default_max_tokens, room, cap))
        if asked > cap and cap < room:
            raise ApiError(400, f"{field}: {asked} is over this server's limit of {cap}", field)
        if asked > room:
            raise ApiError(
                400,
                f"{field}: {asked} new tokens after a {len(prompt)}-token prompt exceed the "
                f"context length {self.generator.context_length}; ask for at most {room}",
                field,
                "context_length_exceeded",
            )
        return asked

    # --- answering ----------------------------------------------------------------------

    async def _answer(self, body: Any, answer: Answer, prompts: list[tuple[int, ...]]) -> Any:
        budgets = [self._token_budget(body.token_limit, p, body.limit_field) for p in prompts]
        count = len(prompts) * body.n
        room = (
            self.spec.max_batch_size
            + self.spec.max_queued_requests
            - (self.batcher.running + self.batcher.waiting)
        )
        if count > room:
            raise ApiError(429, "this replica's queue is full; retry shortly", None, "queue_full")
        base_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        choices = []
        for index in range(count):
            prompt = prompts[index // body.n]
            request = GenerationRequest(
                prompt=prompt,
                max_new_tokens=budgets[index // body.n],
                temperature=body.temperature,
                top_k=body.top_k,
                seed=(base_seed + index) % 2**64,
                top_p=body.top_p,
            )
            stream = self.batcher.submit(request)
            choices.append(Choice(index, stream, TextAssembler(self.tokenizer, body.stop_strings)))
        prompt_tokens = body.n * sum(len(prompt) for prompt in prompts)
        if body.stream:
            events = self._events(answer, choices, prompt_tokens, body.include_usage)
            return ClosingStreamingResponse(events, media_type="text/event-stream")
        return await self._whole(answer, choices, prompt_tokens, base_seed)

    async def _whole(
        self, answer: Answer, choices: list[Choice], prompt_tokens: int, seed: int
    ) -> dict[str, Any]:
        texts = {choice.index: [] for choice in choices}

        async def collect(index: int, piece: str | None) -> None:
            if piece:
                texts[index].append(piece)

        try:
            async with asyncio.timeout(self.spec.request_timeout_s):
                await asyncio.gather(*(self._decode(choice, collect) for choice in choices))
        except TimeoutError:
            raise self._timed_out() from None
        finally:
            for choice in choices:
                choice.stream.cancel()
        return {
            **answer.envelope(chunk=False),
            "choices": [
                answer.choice(c.index, "".join(texts[c.index]), c.finish_reason) for c in choices
            ],
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
            "shipyard": {
                "replica": self.replica,
                "seed": seed,
                "batch_size": max(
                    (c.stream.finished.batch_size for c in choices if c.stream.finished),
                    default=1,
                ),
            },
        }

    async def _events(
        self, answer: Answer, choices: list[Choice], prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        queue: asyncio.Queue[tuple[int, str | None] | BaseException | None] = asyncio.Queue()
        extra = {"usage": None} if include_usage else {}

        async def emit(index: int, piece: str | None) -> None:
            await queue.put((index, piece))

        async def decode_all() -> None:
            try:
                await asyncio.gather(*(self._decode(choice, emit) for choice in choices))
                await queue.put(None)
            except Exception as error:
                await queue.put(error)

        worker = asyncio.create_task(decode_all())
        started = set()
        try:
            async with asyncio.timeout(self.spec.request_timeout_s):
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    index, piece = item
                    choice = choices[index]
                    finish = choice.finish_reason if piece is None else None
                    first = index not in started
                    started.add(index)
                    delta = answer.delta(index, piece, finish, first)
                    yield _event({**answer.envelope(chunk=True), "choices": [delta], **extra})
            if include_usage:
                total = sum(choice.completion_tokens for choice in choices)
                last = {
                    **answer.envelope(chunk=True),
                    "choices": [],
                    "usage": usage(prompt_tokens, total),
                }
                yield _event(last)
            yield "data: [DONE]\n\n"
        except TimeoutError:
            yield _event(self._timed_out().body())
        except BrokenModelError as error:
            yield _event(_unavailable(error).body())
        finally:  # the client went away, or it is over: nothing more is decoded for it
            for choice in choices:
                choice.stream.cancel()
            worker.cancel()

    async def _decode(self, choice: Choice, emit) -> None:
        """Feed a choice's tokens through its text assembler; `emit(index, piece)` for each
        new piece of text, then `emit(index, None)` once its finish reason is known."""
        async for tokens in choice.stream:
            piece = choice.text.add(tokens)
            if piece:
                await emit(choice.index, piece)
            if choice.text.hit_stop:
                choice.stream.cancel()
                choice.finish_reason = "stop"
                break
        else:
            piece = choice.text.finish()
            if piece:
                await emit(choice.index, piece)
            choice.finish_reason = "stop" if choice.stream.finished.stopped else "length"
        await emit(choice.index, None)

    # --- helpers ------------------------------------------------------------------------

    def _identity(self) -> tuple[str, str]:
        return self.model_name, f"shipyard-{self.export.sha256[:12]}"

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": int(self.export.folder.stat().st_mtime),
            "owned_by": "shipyard",
            "max_model_len": self.generator.context_length,
        }

    def _chat_template(self) -> ChatTemplate | None:
        source = self.spec.chat_template or self.tokenizer.chat_template
        if source is None:
            return None
        return ChatTemplate(
            source,
            bos_token="",
            eos_token=self.tokenizer.token_text(self.tokenizer.end_of_text),
        )

    def _timed_out(self) -> ApiError:
        return ApiError(
            504,
            f"the answer took longer than serve.request_timeout_s ({self.spec.request_timeout_s} s)",
            None,
            "timeout",
        )


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for an export folder, configured by a serve spec (plain dicts).

    With `serve.api_keys_env`, the keys are read here (from the deploying process, or from
    Serve's controller under `serve deploy`) and reach the replicas through their runtime
    environment, never through a config file."""
    spec = ServeSpec.model_validate(args.get("serve", {}))
    options = deployment_options(spec)
    if spec.api_keys_env:
        keys = os.environ.get(spec.api_keys_env)
        if not keys:
            raise ValueError(
                f"serve.api_keys_env: the environment variable {spec.api_keys_env} is not set "
                "(or empty). To fix: export it with the accepted keys, comma-separated."
            )
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {spec.api_keys_env: keys}}
    export = args["export"]
    name = args.get("name") or read_export(export).job_name
    return ModelServer.options(**options).bind(export, spec.model_dump(mode="json"), name)


def deployment_options(spec: ServeSpec) -> dict[str, Any]:
    """Serve deployment options from the serve spec: replicas or autoscaling, resources, health."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica},
        "max_ongoing_requests": spec.max_ongoing_requests,
        "health_check_period_s": spec.health_check_period_s,
        "health_check_timeout_s": spec.health_check_timeout_s,
    }
    if spec.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": spec.min_replicas,
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": spec.target_ongoing_requests,
            "upscale_delay_s": spec.upscale_delay_s,
            "downscale_delay_s": spec.downscale_delay_s,
            "look_back_period_s": spec.look_back_period_s,
            "metrics_interval_s": spec.metrics_interval_s,
        }
    else:
        options["num_replicas"] = spec.num_replicas
    return options
