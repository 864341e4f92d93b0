"""Cluster YAMLs: Ray's own schema, node types resolved to devices, errors that say the fix."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib

import pytest
import yaml

from shipyard import SpecError
from shipyard.spec.cluster import local_cluster
from shipyard.spec.load import load_cluster
from tests.conftest import REPO

AWS = yaml.safe_load((REPO / "cluster" / "aws_hetero.yaml").read_text())


def error_for(tmp_path, document) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(SpecError) as caught:
        load_cluster(path)
    message = str(caught.value)
    assert str(path) in message, "the error must name the file"
    return message


def edited(change) -> dict:
    document = copy.deepcopy(AWS)
    change(document)
    return document


def test_instance_types_bring_their_gpus_cpus_memory_and_prices():
    cluster = load_cluster(REPO / "cluster" / "aws_hetero.yaml")
    nodes = {node.name: node for node in cluster.node_types}
    assert (nodes["a100_80gb"].gpu_model, nodes["a100_80gb"].gpus) == ("A100-80G", 8)
    assert (nodes["v100_32gb"].gpu_model, nodes["v100_32gb"].gpus) == ("V100-32G", 8)
    assert (nodes["t4"].gpu_model, nodes["t4"].gpus, nodes["t4"].cpus) == ("T4", 4, 48)
    assert nodes["t4"].memory_gib == 192 and nodes["t4"].usd_per_hour == 3.912
    assert nodes["head"].is_head and nodes["head"].gpus == 0 and nodes["head"].cpus == 8
    assert nodes["a100_80gb"].network_gbit == 400


def test_fake_nodes_stand_in_for_the_gpu_model_they_advertise():
    cluster = load_cluster(REPO / "cluster" / "fake_hetero.yaml")
    nodes = {node.name: node for node in cluster.node_types}
    assert nodes["a100_node"].simulated and nodes["a100_node"].gpu_model == "A100-80G"
    assert nodes["t4_node"].simulated and nodes["t4_node"].gpus == 1
    assert not nodes["ray.head.default"].simulated


def test_local_yaml_is_this_machine():
    from_file = load_cluster(REPO / "cluster" / "local.yaml").node_types
    assert from_file == local_cluster().node_types
    assert from_file[0].cpus >= 1 and from_file[0].memory_gib > 0


def test_gcp_accelerators_and_ray_accelerator_resources_name_the_model(tmp_path):
    document = {
        "cluster_name": "gcp",
        "provider": {"type": "gcp", "region": "us-central1", "project_id": "p"},
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 4}, "node_config": {"machineType": "n1-standard-4"}},
            "v100": {
                "resources": {},
                "node_config": {
                    "machineType": "n1-standard-32",
                    "guestAccelerators": [
                        {"acceleratorType": "nvidia-tesla-v100", "acceleratorCount": 4}
                    ],
                },
                "max_workers": 2,
            },
            "l4": {"resources": {"GPU": 2, "accelerator_type:L4": 1}, "node_config": {}},
        },
    }
    path = tmp_path / "gcp.yaml"
    path.write_text(yaml.safe_dump(document))
    nodes = {node.name: node for node in load_cluster(path).node_types}
    assert (nodes["v100"].gpu_model, nodes["v100"].gpus, nodes["v100"].max_nodes) == (
        "V100-16G",
        4,
        2,
    )
    assert (nodes["l4"].gpu_model, nodes["l4"].gpus) == ("L4", 2)


def test_a_field_ray_does_not_know_is_refused_with_a_suggestion(tmp_path):
    message = error_for(tmp_path, edited(lambda d: d.update(max_worker=3)))
    assert "unknown field 'max_worker'" in message and "Did you mean 'max_workers'" in message
    assert "metadata.shipyard" in message


def test_ray_schema_types_are_checked(tmp_path):
    def bad(document):
        document["available_node_types"]["t4"]["min_workers"] = "two"

    message = error_for(tmp_path, edited(bad))
    assert "available_node_types.t4.min_workers" in message and "'two'" in message


def test_unknown_gpu_model_names_the_catalog(tmp_path):
    def bad(document):
        document["available_node_types"]["t4"]["resources"] = {"GPU": 1, "accelerator_type:T5": 1}

    message = error_for(tmp_path, edited(bad))
    assert "available_node_types.t4" in message and "'T5'" in message
    assert "Did you mean 'T4'" in message


def test_gpus_of_unknown_model_are_refused(tmp_path):
    def bad(document):
        document["available_node_types"]["t4"]["node_config"]["InstanceType"] = "x9.huge"
        document["available_node_types"]["t4"]["resources"] = {"GPU": 4}

    message = error_for(tmp_path, edited(bad))
    assert "4 GPUs of an unknown model" in message and "accelerator_type:<model>" in message


def test_unknown_instance_type_without_resources_is_refused(tmp_path):
    def bad(document):
        document["available_node_types"]["t4"]["node_config"]["InstanceType"] = "g4dn.12xlarg"

    message = error_for(tmp_path, edited(bad))
    assert "'g4dn.12xlarg' is not in Shipyard's catalog" in message
    assert "Did you mean 'g4dn.12xlarge'" in message


def test_head_node_type_must_be_a_node_type(tmp_path):
    message = error_for(tmp_path, edited(lambda d: d.update(head_node_type="boss")))
    assert "head_node_type: 'boss'" in message


def test_prices_must_name_node_types_and_be_numbers(tmp_path):
    message = error_for(
        tmp_path, edited(lambda d: d["metadata"]["shipyard"]["usd_per_hour"].update(h100=98))
    )
    assert "metadata.shipyard.usd_per_hour.h100: no such node type" in message
    message = error_for(
        tmp_path, edited(lambda d: d["metadata"]["shipyard"]["usd_per_hour"].update(t4="cheap"))
    )
    assert "'cheap' is not a price" in message


def test_min_workers_above_max_workers(tmp_path):
    message = error_for(
        tmp_path, edited(lambda d: d["available_node_types"]["t4"].update(min_workers=2))
    )
    assert "available_node_types.t4.min_workers: 2 is more than max_workers 1" in message


@pytest.mark.parametrize(
    ("node_type", "counts", "expected"),
    [
        ("t4", {"max_workers": -1}, "available_node_types.t4.max_workers: -1 is negative"),
        ("t4", {"min_workers": -1}, "available_node_types.t4.min_workers: -1 is negative"),
        (
            "t4",
            {"min_workers": -2, "max_workers": -1},
            "available_node_types.t4.min_workers: -2 is negative",
        ),
        ("head", {"max_workers": -1}, "available_node_types.head.max_workers: -1 is negative"),
    ],
)
def test_negative_worker_counts_are_refused(tmp_path, node_type, counts, expected):
    message = error_for(
        tmp_path, edited(lambda d: d["available_node_types"][node_type].update(counts))
    )
    assert expected in message and "To fix:" in message


@pytest.mark.parametrize(
    "name", ["../../x", "a/b", ".hidden", "-x", "", "a b", "x" * 65, "naïve", "a\\b"]
)
def test_a_cluster_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    message = error_for(tmp_path, edited(lambda d: d.update(cluster_name=name)))
    assert f"cluster_name: {name!r} is not allowed" in message
    assert "letters, digits" in message and "64 characters" in message


@pytest.mark.parametrize("name", ["shipyard-hetero", "my_cluster.v2", "A1", "x" * 64])
def test_plain_cluster_names_are_accepted(tmp_path, name):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(edited(lambda d: d.update(cluster_name=name))))
    assert load_cluster(path).name == name


def pip_installs(document: dict) -> list[str]:
    """Every shell command in a cluster YAML (its own and its node types') that runs pip."""
    sections = [document, *(document.get("available_node_types") or {}).values()]
    commands = [
        command
        for section in sections
        for key, value in section.items()
        if key.endswith("_commands") and isinstance(value, list)
        for command in value
    ]
    return [command for command in commands if re.search(r"\bpip3? install\b", command)]


def installed(command: str) -> list[str]:
    """What a `pip install` command asks for: its words after `install` that are no option."""
    words = shlex.split(command)
    return [word for word in words[words.index("install") + 1 :] if not word.startswith("-")]


@pytest.mark.parametrize("path", sorted((REPO / "cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_yamls_install_exact_versions_only(path):
    document = yaml.safe_load(path.read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for command in pip_installs(document):
        assert "git+" not in command, f"{path.name}: {command!r} installs from git"
        for requirement in installed(command):
            if requirement.endswith(".whl"):  # a wheel's file name carries its version
                assert requirement in (document.get("file_mounts") or {}), (
                    f"{path.name}: {requirement} is not carried by file_mounts"
                )
                assert f"shipyard-{version}-" in requirement, (
                    f"{path.name}: {requirement} is not the wheel of Shipyard {version}"
                )
            else:
                assert re.fullmatch(r"[A-Za-z0-9._\-\[\],]+==[A-Za-z0-9.+!]+", requirement), (
                    f"{path.name}: {requirement!r} is not pinned to an exact version (==)"
                )
