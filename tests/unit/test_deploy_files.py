"""docker-compose.yml, the Dockerfile and deploy/ refer only to things that exist.

These machines have no Docker engine, so the files are checked by reading them: build
stages, mounted files, ports, healthchecks, depends_on, every profile's coherence, the
gateway and sidecar commands (parsed by meshgate's own CLI), Prometheus targets, the
Grafana dashboard's metric names (against the gateway's registry and the Triton names
the runtime adapter reads), and the Kubernetes manifests. The compose file is checked
against the Compose Specification's JSON schema, which `docker compose config` checks
it against first; with the `docker compose` plugin present, `docker compose config`
must accept each profile too.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from adapters.triton_runtime import SCRAPED
from fastpath.scoring import Scorer, ScoringConfig
from gateway.cli import _serve_config, build_parser
from gateway.config import DnsBackendSpec, GatewayConfig, OutlierConfig
from gateway.fleet import Fleet
from gateway.metrics import Metrics
from gateway.outliers import OutlierDetector

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROFILES = ("gpu", "cpu")
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# Sample names Prometheus' text format gives each metric type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}
METRIC_NAME = re.compile(r"\b(?:meshgate|nv)_[a-z0-9_]+\b")


def active(profile: str) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile PROFILE up` starts."""
    return {
        name: svc
        for name, svc in SERVICES.items()
        if not svc.get("profiles") or profile in svc["profiles"]
    }


def names_on_network(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every host name the active services answer to (service names and aliases)."""
    hosts = {name: name for name in services}
    for name, svc in services.items():
        for network in (svc.get("networks") or {}).values():
            for alias in network.get("aliases", []):
                assert alias not in hosts, f"{name}: alias {alias} is taken by {hosts[alias]}"
                hosts[alias] = name
    return hosts


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> base image of the Dockerfile's `FROM image AS name` lines."""
    found = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    return {stage: image for image, stage in found}


def healthcheck_enabled(svc: dict[str, Any]) -> bool:
    return not svc["healthcheck"].get("disable", False)


def serve_config(command: list[str]) -> GatewayConfig:
    args = build_parser().parse_args(command)
    assert args.command == "serve"
    return _serve_config(args, args.backend)


def flag(command: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in a command."""
    for i, arg in enumerate(command):
        if arg.startswith(f"{name}="):
            return arg[len(name) + 1 :]
        if arg == name:
            return command[i + 1]
    raise AssertionError(f"{name} not in {command}")


# -- compose --------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_depends_on_is_resolvable_and_waits_for_health(profile: str) -> None:
    services = active(profile)
    for name, svc in services.items():
        for dependency, condition in (svc.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on {dependency}, not in {profile}"
            assert condition == {"condition": "service_healthy"}, name
            assert healthcheck_enabled(services[dependency]), f"{dependency} has no healthcheck"


@pytest.mark.parametrize("profile", PROFILES)
def test_host_ports_do_not_collide(profile: str) -> None:
    published = [
        port.rsplit(":", 1)[0] for svc in active(profile).values() for port in svc.get("ports", [])
    ]
    assert len(published) == len(set(published)), published


def test_every_service_has_a_healthcheck() -> None:
    for name, svc in SERVICES.items():
        assert "healthcheck" in svc, name
        if healthcheck_enabled(svc):
            test = svc["healthcheck"]["test"]
            assert test[0] == "CMD" and len(test) > 1, name


def test_builds_name_existing_stages() -> None:
    stages = dockerfile_stages()
    built = {name: svc["build"] for name, svc in SERVICES.items() if "build" in svc}
    assert {"gateway", "gateway-cpu", "gpu-adapter-0", "gpu-adapter-1"} <= built.keys()
    for name, build in built.items():
        assert (REPO / build["context"] / build["dockerfile"]).is_file(), name
        assert build["target"] in stages, f"{name}: no stage {build['target']}"
    assert stages["triton"] == TRITON_IMAGE


def test_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, svc in SERVICES.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert (REPO / "model_repository" / "tiny_lm" / "config.pbtxt").is_file()


def test_gpu_reservations() -> None:
    for name in ("triton-0", "triton-1", "gpu-adapter-0", "gpu-adapter-1"):
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    # Each sidecar reads the GPU its Triton has.
    assert SERVICES["gpu-adapter-0"]["deploy"] == SERVICES["triton-0"]["deploy"]
    assert SERVICES["gpu-adapter-1"]["deploy"] == SERVICES["triton-1"]["deploy"]
    for name, svc in active("cpu").items():
        assert "deploy" not in svc, f"{name} reserves devices in the cpu profile"


def test_plain_up_is_the_gpu_profile() -> None:
    env = dict(
        line.split("=", 1)
        for line in (REPO / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["COMPOSE_PROFILES"] == "gpu"
    assert not [
        name
        for name, svc in SERVICES.items()
        if svc.get("profiles") is None and ("triton" in name or "gateway" in name)
    ], "Triton and gateway services belong to a profile"


@pytest.mark.parametrize("profile", PROFILES)
def test_gateway_backends_reach_this_profiles_tritons(profile: str) -> None:
    services = active(profile)
    hosts = names_on_network(services)
    gateways = [svc for svc in services.values() if svc.get("command", [""])[0] == "serve"]
    assert len(gateways) == 1
    config = serve_config(gateways[0]["command"])
    assert config.host == "0.0.0.0" and config.trace_exporter == "otlp"
    assert len(config.backends) == 2
    for backend in config.backends:
        host, port = backend.grpc_target.rsplit(":", 1)
        triton = services[hosts[host]]
        assert triton["image"] == TRITON_IMAGE
        assert flag(triton["command"], "--grpc-port") == port
        assert backend.metrics_url is not None
        metrics = urlsplit(backend.metrics_url)
        assert metrics.hostname == host
        assert str(metrics.port) == flag(triton["command"], "--metrics-port")
        assert backend.http_target == f"{host}:{flag(triton['command'], '--http-port')}"
    assert config.trace_endpoint is not None
    assert urlsplit(config.trace_endpoint).hostname in hosts
    for svc in services.values():
        if svc.get("command", [""])[0] == "adapter":
            args = build_parser().parse_args(svc["command"])
            assert args.backend_id in {b.id for b in config.backends}
            assert urlsplit(args.push).hostname in hosts
            assert urlsplit(args.push).port == config.port
            assert svc["environment"]["MESHGATE_ADMIN_TOKEN"]


@pytest.mark.parametrize("profile", PROFILES)
def test_prometheus_scrapes_gateway_and_tritons(profile: str) -> None:
    services = active(profile)
    hosts = names_on_network(services)
    mount = SERVICES["prometheus"]["volumes"][0].split(":")
    assert flag(SERVICES["prometheus"]["command"], "--config.file") == mount[1]
    config = yaml.safe_load((REPO / mount[0]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        job: [t for group in jobs[job]["static_configs"] for t in group["targets"]]
        for job in ("meshgate", "triton")
    }
    for target in targets["meshgate"]:
        host, port = target.split(":")
        assert serve_config(services[hosts[host]]["command"]).port == int(port)
    assert len(targets["triton"]) == 2
    for target in targets["triton"]:
        host, port = target.split(":")
        assert flag(services[hosts[host]]["command"], "--metrics-port") == port


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    mounts = dict(v.split(":")[:2] for v in SERVICES["grafana"]["volumes"] if v.startswith("."))
    provisioning = REPO / next(h for h, c in mounts.items() if c == "/etc/grafana/provisioning")
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    provider = yaml.safe_load((provisioning / "dashboards" / "meshgate.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    dashboards = REPO / next(h for h, c in mounts.items() if c == path)
    assert [p.name for p in dashboards.glob("*.json")] == ["meshgate.json"]
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((dashboards / "meshgate.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]


def exported_metric_names() -> set[str]:
    """Sample names the gateway's /metrics can show, and the Triton names meshgate reads."""
    fleet = Fleet(GatewayConfig())
    scorer = Scorer(ScoringConfig(), fleet.state.array)
    metrics = Metrics(fleet, OutlierDetector(fleet, OutlierConfig()), scorer)
    names = {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in SUFFIXES[family.type]
    }
    return names | set(SCRAPED)


def test_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "meshgate.json").read_text())
    exported = exported_metric_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, target["expr"]
            assert names <= exported, f"{panel['title']}: unknown {sorted(names - exported)}"
            used |= names
    # TTFT, ITL, throughput, queue depth, VRAM per backend, admission refusals.
    assert {
        "meshgate_time_to_first_token_seconds_bucket",
        "meshgate_inter_token_seconds_bucket",
        "meshgate_requests_total",
        "meshgate_backend_queue_depth",
        "meshgate_backend_vram_used_bytes",
        "nv_gpu_memory_used_bytes",
        "meshgate_admission_refusals_total",
    } <= used


def test_traces_reach_the_collector_and_jaeger() -> None:
    collector = SERVICES["otel-collector"]
    source, target = collector["volumes"][0].split(":")[:2]
    assert flag(collector["command"], "--config") == target
    config = yaml.safe_load((REPO / source).read_text())
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    exporter = config["service"]["pipelines"]["traces"]["exporters"][0]
    assert config["exporters"][exporter]["endpoint"].split(":")[0] in SERVICES
    endpoints = [flag(SERVICES["triton-0"]["command"], "--trace-config=opentelemetry,url")]
    endpoints.append(serve_config(SERVICES["gateway"]["command"]).trace_endpoint or "")
    for endpoint in endpoints:
        url = urlsplit(endpoint)
        assert (url.hostname, url.port) == ("otel-collector", int(http.rsplit(":", 1)[1]))


# schema/compose-spec.json of github.com/compose-spec/compose-spec at 170098ba
# (2026-06-23, Apache-2.0): the schema docker compose v2 validates files with.
COMPOSE_SCHEMA = json.loads((REPO / "tests/unit/data/compose-spec.json").read_text())


def test_the_compose_file_follows_the_compose_specification() -> None:
    errors = [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in jsonschema.Draft7Validator(COMPOSE_SCHEMA).iter_errors(COMPOSE)
    ]
    assert not errors, "\n".join(errors)


def test_the_compose_schema_check_catches_a_misspelt_key() -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["gateway"]["healtcheck"] = broken["services"]["gateway"]["healthcheck"]
    assert not jsonschema.Draft7Validator(COMPOSE_SCHEMA).is_valid(broken)


def compose_plugin() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not compose_plugin(), reason="no `docker compose` plugin here")
@pytest.mark.parametrize("profile", PROFILES)
def test_docker_compose_config(profile: str) -> None:
    env = {**os.environ, "MESHGATE_ADMIN_TOKEN": "test-token"}
    subprocess.run(
        ["docker", "compose", "--profile", profile, "config", "--quiet"],
        cwd=REPO,
        env=env,
        check=True,
    )


# -- Kubernetes -----------------------------------------------------------------------------

K8S = DEPLOY / "kubernetes"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
OBJECTS = {
    (doc["kind"], doc["metadata"]["name"]): doc
    for resource in KUSTOMIZATION["resources"]
    for doc in yaml.safe_load_all((K8S / resource).read_text())
}


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = OBJECTS[("Deployment", name)]["spec"]["template"]["spec"]
    return spec


def test_gateway_deployment_discovers_tritons_through_the_headless_service() -> None:
    gateway = pod_spec("meshgate")["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert OBJECTS[("Deployment", "meshgate")]["spec"]["replicas"] > 1
    config = serve_config(gateway["args"])
    assert not config.backends
    [name] = config.dns_backends
    assert isinstance(name, DnsBackendSpec)
    service = OBJECTS[("Service", name.name)]["spec"]
    assert service["clusterIP"] == "None"
    ports = {p["name"]: p["port"] for p in service["ports"]}
    assert (name.port, name.metrics_port, name.http_port) == (
        ports["grpc"],
        ports["metrics"],
        ports["http"],
    )
    triton = OBJECTS[("Deployment", "triton")]["spec"]["template"]
    assert service["selector"].items() <= triton["metadata"]["labels"].items()
    container_ports = {p["name"] for p in triton["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= container_ports


def test_gateway_outlives_its_drain_on_termination() -> None:
    spec = pod_spec("meshgate")
    config = serve_config(spec["containers"][0]["args"])
    assert spec["terminationGracePeriodSeconds"] > config.drain_timeout_s
    assert spec["securityContext"]["runAsNonRoot"]


def test_hpa_scales_the_gateway_on_cpu_and_inflight() -> None:
    hpa = OBJECTS[("HorizontalPodAutoscaler", "meshgate")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "meshgate"
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert pod_spec("meshgate")["containers"][0]["resources"]["requests"]["cpu"]
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    [rule] = rules["rules"]["custom"]
    assert kinds["Pods"]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(METRIC_NAME.findall(rule["seriesQuery"])) <= exported_metric_names()


def test_every_image_is_built_here() -> None:
    images = {i["name"] for i in KUSTOMIZATION["images"]}
    used = {c["image"] for name in ("meshgate", "triton") for c in pod_spec(name)["containers"]}
    assert used == images == {"meshgate", "meshgate-triton"}
    assert {"runtime", "triton"} <= dockerfile_stages().keys()
