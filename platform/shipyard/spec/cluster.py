"""The cluster a job runs on, read from a Ray cluster-launcher YAML as users already write it.

The YAML is checked against Ray's own schema (what `ray up` accepts), then each node type is
resolved to the devices it brings: its GPU model (from an `accelerator_type:X` resource, the
`ray.io/accelerator-type` label, or the instance type through the catalog), GPU count, CPUs,
memory, network and, from `metadata.shipyard` (which Ray ignores), its price per hour.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from shipyard import hardware
from shipyard.errors import SpecError

ACCELERATOR_RESOURCE = "accelerator_type:"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
NODE_TYPE_LABEL = "ray.io/node-group"  # Ray labels each node with its node type's name
FAKE_PROVIDER = "fake_multinode"
LOCAL_PROVIDERS = ("local", FAKE_PROVIDER)
# Names Ray's providers take in practice; Shipyard also names state files after the cluster.
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class NodeType:
    """One `available_node_types` entry, resolved to what each such node brings."""

    name: str
    max_nodes: int  # what the autoscaler may start (the head: 1); the planner plans for these
    min_nodes: int
    is_head: bool
    cpus: float
    memory_gib: float
    gpu_model: str | None  # a hardware.GPUS name
    gpus: int  # per node
    simulated: bool  # a fake node advertising a GPU model it does not have (runs on CPU)
    instance_type: str | None
    network_gbit: float
    usd_per_hour: float | None
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)  # Ray resources as written

    @property
    def node_selector(self) -> dict[str, str]:
        """Labels that pick out nodes of this type: its own, else the node-group label Ray's
        launcher sets (its fake multinode provider sets none, so fake types need labels)."""
        return dict(self.labels) if self.labels else {NODE_TYPE_LABEL: self.name}

    @property
    def device(self) -> hardware.Device | None:
        """The catalog row of this node's GPU model, if it has (or simulates) GPUs."""
        return hardware.gpu(self.gpu_model) if self.gpu_model else None


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster as the planner needs it: a name, a provider and typed node types."""

    name: str
    provider: str
    node_types: tuple[NodeType, ...]
    source: str

    @property
    def has_gpus(self) -> bool:
        return any(node.gpus for node in self.node_types)

    @property
    def is_local(self) -> bool:
        return self.provider in LOCAL_PROVIDERS


LOCAL_CLUSTER = {
    "cluster_name": "local",
    "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
    "max_workers": 0,
    "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0}
    },
}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a node with `labels` is one that `selector` (a node type's labels) picks."""
    return all(labels.get(key) == value for key, value in selector.items())


def local_cluster() -> ClusterSpec:
    """This machine as a one-node cluster (what cluster/local.yaml says), its size detected."""
    return parse_cluster(LOCAL_CLUSTER, "this machine")


def parse_cluster(document: dict[str, Any], source: str) -> ClusterSpec:
    """Validate a cluster-launcher document and resolve its node types."""
    check_ray_schema(document, source)
    _check_cluster_name(document["cluster_name"], source)
    node_types = document.get("available_node_types")
    if not node_types:
        raise SpecError(
            f"{source}: available_node_types: is required by Shipyard (the planner needs to "
            "know each node's resources). To fix: list the head and worker node types, as in "
            "cluster/aws_hetero.yaml."
        )
    head = document.get("head_node_type")
    if head not in node_types:
        raise SpecError(
            f"{source}: head_node_type: {head!r} is not one of available_node_types "
            f"({', '.join(node_types)}). To fix: name the head's node type."
        )
    provider = document["provider"]["type"]
    prices = _prices(document, node_types, source)
    resolved = tuple(
        _node_type(name, entry, name == head, provider, prices.get(name), document, source)
        for name, entry in node_types.items()
    )
    _check_distinct_labels(resolved, source)
    return ClusterSpec(document["cluster_name"], provider, resolved, source)


def _check_cluster_name(name: str, source: str) -> None:
    """A plain name: it becomes file names in Shipyard's cache, where `../x` or `a/b` would
    land outside it."""
    if not CLUSTER_NAME.fullmatch(name):
        raise SpecError(
            f"{source}: cluster_name: {name!r} is not allowed; letters, digits, '-', '_' and "
            "'.' are, starting with a letter or digit, at most 64 characters. To fix: rename "
            "it, e.g. shipyard-hetero."
        )


def _check_distinct_labels(node_types: tuple[NodeType, ...], source: str) -> None:
    """Ranks are placed by label, so two node types must not share the same labels."""
    seen: dict[tuple, str] = {}
    for node in node_types:
        key = tuple(sorted(node.node_selector.items()))
        if key in seen:
            raise SpecError(
                f"{source}: available_node_types.{node.name}.labels: the same as "
                f"{seen[key]}'s, so ranks could not be placed on one and not the other. "
                "To fix: give each node type a label of its own."
            )
        seen[key] = node.name


def check_ray_schema(document: dict[str, Any], source: str) -> None:
    """Ray's own cluster YAML schema; its first error in Shipyard's words."""
    import json
    from importlib import resources

    import jsonschema

    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(document), key=lambda e: list(e.path)
    )
    if errors:
        problems = [_schema_problem(error, source) for error in errors[:5]]
        raise SpecError("\n".join(problems))


def _schema_problem(error, source: str) -> str:
    where = ".".join(str(part) for part in error.path) or "the top level"
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = [key for key in error.instance if key not in allowed]
        guess = difflib.get_close_matches(unknown[0], allowed, n=1, cutoff=0.6) if unknown else []
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        return (
            f"{source}: {where}: unknown field {', '.join(map(repr, unknown))}.{hint} To fix: "
            f"rename or remove it; {where} allows: {', '.join(allowed)} (Ray's cluster schema; "
            "put Shipyard's own settings under metadata.shipyard)."
        )
    return f"{source}: {where}: {error.message}. To fix: follow Ray's cluster YAML schema."


def _prices(document: dict[str, Any], node_types: dict, source: str) -> dict[str, float]:
    shipyard = (document.get("metadata") or {}).get("shipyard") or {}
    unknown = [key for key in shipyard if key != "usd_per_hour"]
    if unknown:
        raise SpecError(
            f"{source}: metadata.shipyard.{unknown[0]}: unknown field. To fix: remove it; "
            "metadata.shipyard allows: usd_per_hour."
        )
    prices = shipyard.get("usd_per_hour") or {}
    for name, price in prices.items():
        if name not in node_types:
            raise SpecError(
                f"{source}: metadata.shipyard.usd_per_hour.{name}: no such node type. "
                f"To fix: use one of {', '.join(node_types)}."
            )
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            raise SpecError(
                f"{source}: metadata.shipyard.usd_per_hour.{name}: {price!r} is not a price. "
                "To fix: give US dollars per node-hour, e.g. 32.77."
            )
    return {name: float(price) for name, price in prices.items()}


def _node_type(
    name: str,
    entry: dict[str, Any],
    is_head: bool,
    provider: str,
    price: float | None,
    document: dict[str, Any],
    source: str,
) -> NodeType:
    where = f"{source}: available_node_types.{name}"
    resources = dict(entry.get("resources") or {})
    labels = dict(entry.get("labels") or {})
    instance_name = _instance_type_name(entry.get("node_config") or {})
    instance = hardware.INSTANCE_TYPES.get(instance_name) if instance_name else None
    attached = (entry.get("node_config") or {}).get("guestAccelerators")
    if instance_name and instance is None and not resources and not attached:
        guess = difflib.get_close_matches(instance_name, hardware.INSTANCE_TYPES, n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        raise SpecError(
            f"{where}.node_config: instance type {instance_name!r} is not in Shipyard's "
            f"catalog.{hint} To fix: give its resources (CPU, GPU, memory and "
            "accelerator_type:<model>) in available_node_types."
            f"{name}.resources."
        )
    gpu_model = _gpu_model(where, resources, labels, entry.get("node_config") or {}, instance)
    gpus = int(resources.get("GPU", _catalog_gpus(entry, instance)))
    simulated = provider == FAKE_PROVIDER and gpu_model is not None and gpus == 0
    if simulated:
        gpus = 1  # a fake node stands in for one GPU of its advertised model
    if gpus and gpu_model is None:
        raise SpecError(
            f"{where}.resources: {gpus} GPUs of an unknown model. To fix: add a resource "
            f"'accelerator_type:<model>: 1' with a model from {', '.join(hardware.GPUS)}, "
            "or use a catalogued instance type."
        )
    cpus, memory_gib = _cpus_and_memory(resources, instance, is_head, provider)
    min_nodes, max_nodes = _node_counts(where, entry, document, is_head)
    return NodeType(
        name=name,
        max_nodes=max_nodes,
        min_nodes=min_nodes,
        is_head=is_head,
        cpus=cpus,
        memory_gib=memory_gib,
        gpu_model=hardware.GPU_ALIASES.get(gpu_model, gpu_model) if gpu_model else None,
        gpus=gpus,
        simulated=simulated,
        instance_type=instance_name,
        network_gbit=instance.network_gbit if instance else hardware.DEFAULT_NETWORK_GBIT,
        usd_per_hour=price,
        labels=labels,
        resources=resources,
    )


def _node_counts(where: str, entry: dict, document: dict, is_head: bool) -> tuple[int, int]:
    """The fewest and most nodes of a type the autoscaler runs (the head: one). Ray's schema
    lets a node type's counts be negative; the planner would plan for them."""
    counts = {
        "min_workers": int(entry.get("min_workers", 0)),
        "max_workers": int(entry.get("max_workers", document.get("max_workers", 0))),
    }
    for key, count in counts.items():
        if count < 0:
            raise SpecError(
                f"{where}.{key}: {count} is negative. To fix: give a number of nodes, 0 or more."
            )
    if is_head:
        return 1, 1
    if counts["min_workers"] > counts["max_workers"]:
        raise SpecError(
            f"{where}.min_workers: {counts['min_workers']} is more than max_workers "
            f"{counts['max_workers']}. To fix: lower min_workers or raise max_workers."
        )
    return counts["min_workers"], counts["max_workers"]


def _instance_type_name(node_config: dict[str, Any]) -> str | None:
    """AWS `InstanceType`, GCP `machineType` (possibly a full URL), Azure `azure_arm_parameters`."""
    name = node_config.get("InstanceType") or node_config.get("machineType")
    if name is None:
        name = (node_config.get("azure_arm_parameters") or {}).get("vmSize")
    return str(name).rsplit("/", 1)[-1] if name else None


def _gpu_model(where, resources, labels, node_config, instance) -> str | None:
    named = [
        key.removeprefix(ACCELERATOR_RESOURCE)
        for key in resources
        if key.startswith(ACCELERATOR_RESOURCE)
    ]
    if ACCELERATOR_LABEL in labels:
        named.append(labels[ACCELERATOR_LABEL])
    for accelerator in node_config.get("guestAccelerators") or []:
        kind = str(accelerator.get("acceleratorType", "")).rsplit("/", 1)[-1]
        named.append(hardware.GCP_ACCELERATORS.get(kind, kind))
    if instance and instance.gpu:
        named.append(instance.gpu)
    for model in named:
        if hardware.gpu(model) is None:
            known = [*hardware.GPUS, *hardware.GPU_ALIASES]
            guess = difflib.get_close_matches(model, known, n=1, cutoff=0.5)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            raise SpecError(
                f"{where}: GPU model {model!r} is not in Shipyard's catalog.{hint} To fix: use "
                f"one of {', '.join(hardware.GPUS)} (Ray's accelerator type names)."
            )
    distinct = {hardware.GPU_ALIASES.get(model, model) for model in named}
    if len(distinct) > 1:
        raise SpecError(
            f"{where}: names more than one GPU model ({', '.join(sorted(distinct))}). "
            "To fix: make its accelerator_type resource, label and instance type agree."
        )
    return named[0] if named else None


def _catalog_gpus(entry: dict[str, Any], instance) -> int:
    attached = (entry.get("node_config") or {}).get("guestAccelerators") or []
    if attached:
        return sum(int(accelerator.get("acceleratorCount", 1)) for accelerator in attached)
    return instance.gpu_count if instance else 0


def _cpus_and_memory(resources, instance, is_head: bool, provider: str) -> tuple[float, float]:
    """As written, else the catalog's, else (for the head of a local cluster) this machine's."""
    cpus = resources.get("CPU")
    memory = resources.get("memory")  # bytes, as Ray counts it
    if cpus is None and instance:
        cpus = instance.cpus
    if memory is None and instance:
        memory = instance.memory_gib * hardware.GIB
    if is_head and provider in LOCAL_PROVIDERS:
        cpus = os.cpu_count() if cpus is None else cpus
        memory = _machine_memory_bytes() if memory is None else memory
    return float(cpus or 0), float(memory or 0) / hardware.GIB


def _machine_memory_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
