"""What a spec file must be before its fields are read (UTF-8 text, each key once), and the
local paths a job names, checked by `shipyard plan` before anything starts."""

from __future__ import annotations

import pytest
import yaml

from shipyard import SpecError, load_job
from shipyard.cli import main
from shipyard.spec.load import load_cluster, read_yaml


def refused(path, load=load_job) -> str:
    with pytest.raises(SpecError) as caught:
        load(path)
    message = str(caught.value)
    assert str(path) in message, "the error must name the file"
    return message


def plan_error(path, capsys) -> str:
    assert main(["plan", str(path)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert str(path) in captured.err, "the error must name the file"
    return captured.err


def test_a_spec_that_is_not_utf8_text_is_refused_by_plan(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: caf\xe9\n")  # Latin-1, not UTF-8
    message = plan_error(path, capsys)
    assert "not UTF-8 text" in message and "byte 9" in message


def test_a_binary_cluster_yaml_is_refused(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert "not UTF-8 text" in refused(path, load_cluster)


def test_a_top_level_key_written_twice_names_both_lines(write_job):
    path = write_job("name: t\ntrain:\n  lr: 0.1\ndata: {}\ntrain:\n  lr: 0.2\n")
    message = refused(path)
    assert "train: written twice in one mapping (lines 2 and 5)" in message
    assert "To fix:" in message


def test_a_nested_key_written_twice_is_refused(write_job):
    path = write_job("name: t\ntrain:\n  max_steps: 5\n  lr: 0.1\n  lr: 0.2\n")
    assert "lr: written twice in one mapping (lines 4 and 5)" in refused(path)


def test_a_key_written_twice_in_a_cluster_yaml_is_refused(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "cluster_name: c\nprovider: {type: local, head_ip: 127.0.0.1, worker_ips: []}\n"
        "head_node_type: h\navailable_node_types:\n"
        "  h: {resources: {}, node_config: {}, max_workers: 0, max_workers: 1}\n"
    )
    assert "max_workers: written twice in one mapping (both on line 5)" in refused(
        path, load_cluster
    )


def test_merge_keys_and_the_keys_that_override_them_are_allowed(tmp_path):
    path = tmp_path / "anchors.yaml"
    # `nested.derived` is merged into `other` before its own mapping is built.
    text = (
        "base: &b {x: 1, y: 1}\nnested:\n  derived: &d {<<: *b, x: 2}\nother:\n  <<: *d\n  y: 3\n"
    )
    path.write_text(text)
    document = read_yaml(path)
    assert document["nested"]["derived"] == {"x": 2, "y": 1}
    assert document["other"]["y"] == 3
    # Exactly what Ray's own yaml.safe_load reads, so Shipyard plans the cluster Ray launches.
    assert document == yaml.safe_load(text)


def test_a_key_written_twice_in_a_merged_mapping_is_refused(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("other:\n  <<: {x: 1, x: 2}\n  y: 3\n")
    assert "x: written twice in one mapping (both on line 2)" in refused(path, read_yaml)


def test_a_cluster_yaml_with_anchors_and_merge_keys_loads(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "cluster_name: anchors\nprovider: {type: aws, region: us-east-1}\n"
        "head_node_type: head\navailable_node_types:\n"
        "  head:\n    node_config: &node {InstanceType: m5.2xlarge, ImageId: ami-1}\n"
        "    resources: {CPU: 8}\n    max_workers: 0\n"
        "  t4:\n    node_config:\n      <<: *node\n      InstanceType: g4dn.12xlarge\n"
        "    resources: {}\n    max_workers: 2\n"
    )
    nodes = {node.name: node for node in load_cluster(path).node_types}
    assert (nodes["t4"].gpu_model, nodes["t4"].gpus, nodes["t4"].max_nodes) == ("T4", 4, 2)


@pytest.mark.parametrize("source", ["corpus-that-is-not-here", "corpus/*.jsonl"])
def test_plan_refuses_a_data_source_that_is_not_on_this_machine(
    write_job, tmp_path, monkeypatch, capsys, source
):
    monkeypatch.chdir(tmp_path)
    path = write_job({"name": "t", "data": {"source": source}})
    message = plan_error(path, capsys)
    assert f"data.source: {source!r}" in message
    assert str(tmp_path / source) in message, "the path looked for, as this machine sees it"
    assert "To fix:" in message


@pytest.mark.parametrize("source", ["corpus", "corpus/*.jsonl", "corpus/a.jsonl", "python-stdlib"])
def test_plan_accepts_a_data_source_that_is_there(write_job, tmp_path, monkeypatch, capsys, source):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["plan", str(write_job({"name": "t", "data": {"source": source}}))]) == 0
    capsys.readouterr()


def test_plan_refuses_a_tokenizer_folder_that_is_not_there(write_job, tmp_path, capsys):
    path = write_job({"name": "t", "tokenizer": {"path": str(tmp_path / "no-tokenizer")}})
    message = plan_error(path, capsys)
    assert f"tokenizer.path: {tmp_path / 'no-tokenizer'} is not a folder" in message
