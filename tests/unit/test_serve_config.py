"""The serve section of a job spec, the deployment options and Serve config file made from it."""

from __future__ import annotations

import pytest
import yaml

from shipyard.cli import main
from shipyard.errors import SpecError
from shipyard.serve.app import deployment_options
from shipyard.serve.deployment import Service, write_serve_config
from shipyard.serve.export import ExportedModel
from shipyard.spec.job import GptModelSpec, ServeSpec
from shipyard.spec.load import load_job
from tests.conftest import REPO


def test_autoscaling_options_follow_the_spec():
    spec = ServeSpec(min_replicas=1, max_replicas=3, target_ongoing_requests=4, upscale_delay_s=2)
    options = deployment_options(spec)
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 2,
        "downscale_delay_s": 600.0,
        "look_back_period_s": 30.0,
        "metrics_interval_s": 10.0,
    }
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_fixed_replicas_and_gpu_resources():
    options = deployment_options(ServeSpec(num_replicas=2, gpus_per_replica=1, cpus_per_replica=4))
    assert options["num_replicas"] == 2
    assert "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}


@pytest.mark.parametrize(
    ("serve", "message"),
    [
        ({"num_replicas": 2, "max_replicas": 4}, "serve.num_replicas: a fixed replica count"),
        ({"min_replicas": 3, "max_replicas": 2}, "serve.min_replicas: 3 is more than"),
        ({"max_ongoing_requests": 8}, "serve.max_ongoing_requests"),
        ({"chat_template": "{% for m in messages %}"}, "serve.chat_template: not a Jinja"),
        ({"api_keys_env": "MY KEYS"}, "serve.api_keys_env"),
        ({"max_request_bytes": 10}, "serve.max_request_bytes"),
        ({"port": 70000}, "serve.port: 70000 is not valid"),
        ({"look_back_period_s": 5}, "serve.look_back_period_s: 5.0 must be longer than"),
        ({"max_batch_sise": 4}, "Did you mean 'max_batch_size'?"),
    ],
)
def test_bad_serve_sections_name_the_field(write_job, serve, message):
    path = write_job({"name": "served", "serve": serve})
    with pytest.raises(SpecError) as error:
        load_job(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_serve_config_is_valid_for_serve_deploy(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    export = ExportedModel(
        tmp_path / "export", "tiny", 40, GptModelSpec(), {"model.safetensors": "0" * 64}
    )
    service = Service("tiny", export, ServeSpec(port=8123, max_replicas=2))
    path = write_serve_config(service, tmp_path)
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    application = config.applications[0]
    assert application.import_path == "shipyard.serve.app:build_app"
    assert application.args["export"] == str(tmp_path / "export")
    assert application.deployments[0].autoscaling_config["max_replicas"] == 2
    assert config.http_options.host == "127.0.0.1"
    assert config.http_options.port == 8123


def test_shipped_jobs_serve_on_localhost():
    job = load_job(REPO / "jobs" / "tiny-gpt.yaml")
    assert job.serve.host == "127.0.0.1"
    assert job.serve.max_batch_size > 1


def test_serve_is_told_to_send_every_request_to_the_replica_which_queues_it():
    """Serve's own limit is above the replica's batch and queue, so the replica, not Serve,
    turns the extra request away (with a 429 in OpenAI's shape)."""
    spec = ServeSpec(max_batch_size=4, max_queued_requests=6)
    assert deployment_options(spec)["max_ongoing_requests"] > 4 + 6


def test_api_keys_reach_the_replicas_through_their_environment_only(tmp_path, monkeypatch):
    from shipyard.serve.app import build_app

    export = ExportedModel(tmp_path, "tiny", 1, GptModelSpec(), {"model.safetensors": "0" * 64})
    service = Service("tiny", export, ServeSpec(api_keys_env="TINY_KEYS"))
    monkeypatch.delenv("TINY_KEYS", raising=False)
    with pytest.raises(ValueError, match="TINY_KEYS is not set"):
        build_app(service.application_args())
    monkeypatch.setenv("TINY_KEYS", "k1,k2")
    app = build_app(service.application_args())
    options = app._bound_deployment.ray_actor_options
    assert options["runtime_env"] == {"env_vars": {"TINY_KEYS": "k1,k2"}}
    assert "k1" not in write_serve_config(service, tmp_path).read_text()


def test_serving_on_an_open_address_without_keys_is_flagged(tmp_path):
    export = ExportedModel(tmp_path, "tiny", 1, GptModelSpec(), {"model.safetensors": "0" * 64})
    exposed = [
        Service("tiny", export, ServeSpec(host=host, api_keys_env=keys)).exposed_without_keys
        for host, keys in (("0.0.0.0", None), ("0.0.0.0", "K"), ("127.0.0.1", None))
    ]
    assert exposed == [True, False, False]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the CLI tries to start or join Ray."""
    import shipyard.runtime.local

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started although the command should fail first")

    monkeypatch.setattr(shipyard.runtime.local, "ray_runtime", must_not_start)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_serving_an_untrained_job_fails_before_ray_starts(write_job, tmp_path, capsys, no_ray):
    path = write_job({"name": "untrained", "storage": str(tmp_path / "runs")})
    assert main(["serve", str(path)]) == 2
    error = capsys.readouterr().err
    assert "job untrained has no checkpoint" in error
    assert "Traceback" not in error


def test_serving_a_folder_that_is_no_checkpoint_is_refused(write_job, tmp_path, capsys, no_ray):
    path = write_job({"name": "tiny", "storage": str(tmp_path / "runs")})
    assert main(["serve", str(path), "--checkpoint", str(tmp_path)]) == 2
    assert "neither a Shipyard checkpoint" in capsys.readouterr().err


def test_status_needs_a_cluster(write_job, capsys, no_ray):
    path = write_job({"name": "tiny"})
    assert main(["serve", str(path), "--status"]) == 2
    assert "--status and --shutdown act on a running cluster" in capsys.readouterr().err


def test_the_serve_spec_round_trips_through_the_application_args(tmp_path):
    from shipyard.serve.app import build_app

    export = ExportedModel(tmp_path, "tiny", 1, GptModelSpec(), {"model.safetensors": "0" * 64})
    for spec in (ServeSpec(num_replicas=2), ServeSpec(max_replicas=3, upscale_delay_s=1)):
        args = Service("tiny", export, spec).application_args()
        assert ServeSpec.model_validate(args["serve"]) == spec
        build_app(args)  # validates again, as a replica and `serve deploy` would


def test_a_dumped_job_validates_again():
    """Workers and checkpoints receive the job as a full dump; it must mean the same."""
    from shipyard.spec.job import JobSpec

    job = JobSpec(name="x", serve=ServeSpec(num_replicas=3))
    assert JobSpec.model_validate(job.model_dump(mode="json")) == job
