"""The Ray Serve application: an HTTP API over the model's generator, batched and health-checked.

Batching has two stages: `@serve.batch` groups requests that arrive within
`batch_wait_timeout_s`, and `ContinuousBatcher` lets each group join the sequences already
decoding at the next step, up to `max_batch_size` sequences per step.

`build_app(args)` is an application builder, so the same app deploys from Python
(`shipyard serve`) and from a Serve config file (`serve deploy`). Its args are plain data:
`export` (an export folder) and `serve` (the job's serve section).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime.
import asyncio
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from shipyard.data.tokenizer import saved_tokenizer
from shipyard.models.sampling import BrokenModelError, GenerationRequest
from shipyard.serve.batching import ContinuousBatcher, Generated
from shipyard.serve.export import load_generator, read_export
from shipyard.spec.job import ServeSpec

DEPLOYMENT_NAME = "ShipyardModel"
MAX_SEED = 2**63 - 1

api = FastAPI(title="Shipyard model server")


class GenerateBody(BaseModel):
    """`POST /v1/generate`: a prompt and how to continue it. Types are checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


class RequestError(Exception):
    """A request that is well-formed but cannot be served as asked (answered with a 4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(problem["type"] == "json_invalid" for problem in problems):
        return _error(400, "the request body is not valid JSON")
    described = [_describe(problem) for problem in problems]
    return _error(422, "; ".join(described))


@api.exception_handler(RequestError)
async def _unservable_request(request: Request, error: RequestError) -> JSONResponse:
    return _error(error.status, str(error))


@api.exception_handler(BrokenModelError)
async def _broken_model(request: Request, error: BrokenModelError) -> JSONResponse:
    return _error(503, f"{error}; this replica is being replaced, retry shortly")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class ModelServer:
    """One replica: the exported model, its generator, and the HTTP routes."""

    def __init__(self, export_folder: str, serve_spec: dict[str, Any]):
        spec = ServeSpec.model_validate(serve_spec)
        self.export = read_export(export_folder)
        device = "cuda" if spec.gpus_per_replica > 0 else "cpu"
        self.generator = load_generator(self.export, device)
        self.tokenizer = saved_tokenizer(self.export.folder)
        self.generator.check()
        self.batcher = ContinuousBatcher(self.generator, spec.max_batch_size)
        self.default_max_new_tokens = spec.default_max_new_tokens
        self._admit.set_max_batch_size(spec.max_batch_size)
        self._admit.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id

    @api.post("/v1/generate")
    async def generate(self, body: GenerateBody) -> dict[str, Any]:
        request = self._generation_request(body)
        generated = await (await self._admit(request))
        return {
            "text": self.tokenizer.decode(generated.tokens),
            "tokens": generated.tokens,
            "prompt_tokens": len(request.prompt),
            "completion_tokens": len(generated.tokens),
            "seed": request.seed,
            "finish_reason": "stop" if generated.stopped else "length",
            "batch_size": generated.batch_size,
            "replica": self.replica,
        }

    @api.get("/v1/health")
    async def health(self) -> dict[str, Any]:
        await asyncio.to_thread(self.generator.check)
        return {"status": "ok", "replica": self.replica}

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        return {**self.export.describe(), "context_length": self.generator.context_length}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _admit(self, requests: list[GenerationRequest]) -> list[asyncio.Future[Generated]]:
        """Dynamic batching of arrivals: requests that come within the wait window are handed
        to the continuous batcher together and join its running batch at the next step."""
        return self.batcher.submit(requests)

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

    def _generation_request(self, body: GenerateBody) -> GenerationRequest:
        prompt = tuple(int(i) for i in self.tokenizer.encode([body.prompt])[0])
        context = self.generator.context_length
        # The default shrinks to fit the context; an explicit request is checked as asked.
        max_new_tokens = body.max_new_tokens or min(
            self.default_max_new_tokens, max(context - len(prompt), 1)
        )
        if len(prompt) >= context:
            raise RequestError(
                422,
                f"prompt: {len(prompt)} tokens ({self.tokenizer.name}) is over the context length "
                f"{context}; at most {context - 1} fit with room for one new token",
            )
        if len(prompt) + max_new_tokens > context:
            raise RequestError(
                422,
                f"max_new_tokens: {max_new_tokens} new tokens after a {len(prompt)}-token prompt "
                f"exceed the context length {context}; ask for at most {context - len(prompt)}",
            )
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        return GenerationRequest(prompt, max_new_tokens, body.temperature, body.top_k, seed)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for an export folder, configured by a serve spec (plain dicts)."""
    spec = ServeSpec.model_validate(args.get("serve", {}))
    return ModelServer.options(**deployment_options(spec)).bind(
        args["export"], spec.model_dump(mode="json")
    )


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


def _describe(problem: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in problem["loc"] if part != "body") or "body"
    return f"{field}: {problem['msg']}"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})
