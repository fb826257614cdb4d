"""The deployment files, checked offline (this machine has no Docker engine and no cluster).

- `deploy/compose/compose.yaml`: the compose specification's JSON schema (check-jsonschema's
  vendored copy), then what a reviewer looks for: healthchecks, start order, ports, dev secrets.
- `deploy/docker/service.Dockerfile` (every service's image, by build arguments) and
  `.dockerignore`: the recipe's invariants for each service (pinned uv equal to the Makefile's,
  constraints, non-root user, healthcheck, entry point declared by the package).
- `deploy/k8s/overlays/*`: `kubectl kustomize` piped into `kubernetes-validate --strict` against a
  Kubernetes version whose schemas it ships, then probes, resources, hardening, secrets.
"""

from __future__ import annotations

import base64
import functools
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeway.common.rtsp.credentials import CredentialCipher
from edgeway.gateway.auth import Scope
from edgeway.gateway.settings import DEVELOPMENT_SECRET, GatewaySettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "deploy" / "compose" / "compose.yaml"
OVERLAYS_DIR = ROOT / "deploy" / "k8s" / "overlays"
OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())
# The tools come from the venv that runs the tests (the root dev dependency group).
VENV_BIN = Path(sys.executable).parent

# Edgeway's services with their HTTP port (/healthz, /readyz, /metrics; the gateway's API too).
DOCKERFILE = ROOT / "deploy" / "docker" / "service.Dockerfile"  # every service's image
SERVICES = {
    "gateway": 8000,
    "occupancy": 8081,
    "telemetry": 8082,
    "video-relay": 8083,
    "ingestion": 8084,
    "tracker": 8085,
}
# Services without a database of their own (the others each own one, named after the service).
NO_DATABASE = {"gateway", "video-relay"}
# Services whose state is in memory and whose queue has one consumer: exactly one replica, ever.
SINGLETONS = {"video-relay"}
# The development profile's anonymous scopes (compose and overlays/dev): Omega's producers and
# clients, the telemetry dashboards, the seed's phones and viewers send no token. Ingestion always
# needs one: ingest:write makes the service open any RTSP URL it is given.
DEVELOPMENT_ANONYMOUS_SCOPES = {
    "occupancy:publish",
    "occupancy:subscribe",
    "telemetry:subscribe",
    "video:publish",
    "video:subscribe",
}
# Backing services that compose runs beside Edgeway's own (Kubernetes expects them outside).
INFRASTRUCTURE = {"rabbitmq", "postgres", "minio"}
# Compose variables that hold credentials (RABBITMQ_DEFAULT_PASS, MINIO_ROOT_PASSWORD, ...).
COMPOSE_CREDENTIAL = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|AMQP_URL|DATABASE_URL")
# What marks a value as a well-known development one (never to be reused elsewhere).
DEVELOPMENT_MARKERS = ("dev-only", "development-only")
# kubernetes-validate ships JSON schemas per Kubernetes minor version; validate against this one.
KUBERNETES_VERSION = "1.33.0"
STABLE_API_VERSIONS = {
    "v1",
    "apps/v1",
    "autoscaling/v2",
    "policy/v1",
    "networking.k8s.io/v1",
}
# Secrets that the prod overlay expects to exist in the cluster, created out of band.
OUT_OF_BAND_SECRETS = {"edgeway-secrets", "edgeway-gateway-jwks", "edgeway-tls"}
# Environment variables that hold credentials: never a literal value in a manifest.
SECRET_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|AMQP_URL|DATABASE_URL")
# A URL with a password in it (scheme://user:password@host).
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@:]+:[^\s/@]+@", re.IGNORECASE)
TMP = "/tmp"  # noqa: S108 - the containers' own scratch mount, not a file of this machine


# ---- compose ---------------------------------------------------------------------------------


@functools.cache
def _compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def _container_port(spec: str | int | dict[str, Any]) -> int:
    """The container side of a `ports:` entry (short or long syntax)."""
    if isinstance(spec, dict):
        return int(spec["target"])
    return int(str(spec).rsplit(":", 1)[-1].split("/", 1)[0])


def test_compose_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [
            str(VENV_BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_every_service_has_a_healthcheck() -> None:
    services = _compose()["services"]
    assert set(SERVICES) | INFRASTRUCTURE <= set(services)
    for name, service in services.items():
        healthcheck = service.get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert not healthcheck.get("disable"), f"{name} disables its healthcheck"
        assert healthcheck.get("test"), f"{name}'s healthcheck has no test"
    assert "rabbitmq-diagnostics" in services["rabbitmq"]["healthcheck"]["test"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    # The minio image has no curl (minio/minio#18389): a curl check would never turn healthy.
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]


@pytest.mark.parametrize(
    ("service", "needs"),
    [
        ("gateway", {"rabbitmq"}),
        ("occupancy", {"rabbitmq", "postgres"}),
        ("telemetry", {"rabbitmq", "postgres"}),
        ("video-relay", {"rabbitmq"}),
        ("ingestion", {"rabbitmq", "postgres", "minio"}),
        ("tracker", {"rabbitmq", "postgres", "minio"}),
    ],
)
def test_compose_services_wait_for_healthy_dependencies(service: str, needs: set[str]) -> None:
    depends_on = _compose()["services"][service].get("depends_on")
    assert isinstance(depends_on, dict), f"{service}: depends_on needs the long form (conditions)"
    assert needs <= set(depends_on), f"{service} must wait for {needs - set(depends_on)}"
    assert set(depends_on) <= needs, f"{service} waits for {set(depends_on) - needs} needlessly"
    for dependency, spec in depends_on.items():
        assert spec.get("condition") == "service_healthy", f"{service} -> {dependency}"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_builds_and_checks_the_service(service: str) -> None:
    spec = _compose()["services"][service]
    port = SERVICES[service]
    build = spec["build"]
    assert (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["args"] == {"SERVICE": service, "PORT": str(port)}
    env = spec["environment"]
    assert isinstance(env, dict), "environment as a mapping, please"
    assert env["EDGEWAY_HTTP_HOST"] == "0.0.0.0"
    assert str(env["EDGEWAY_HTTP_PORT"]) == str(port)
    assert env["EDGEWAY_ENVIRONMENT"] == "development"
    assert env["EDGEWAY_AMQP_URL"].startswith("amqp://")
    assert "@rabbitmq:" in env["EDGEWAY_AMQP_URL"]
    # Readiness, on the service's own port.
    assert f"127.0.0.1:{port}/readyz" in " ".join(spec["healthcheck"]["test"])
    published = [_container_port(p) for p in spec.get("ports", [])]
    if service == "gateway":
        assert published == [8000]
        assert env["EDGEWAY_JWT_SECRET"] == DEVELOPMENT_SECRET, (
            "compose's JWT secret must be the gateway's development secret (refused elsewhere)"
        )
    else:
        assert published == [], f"{service}'s port is internal only"
    if service in NO_DATABASE:
        assert not [v for v in env if v.endswith("_DATABASE_URL")], f"{service} has no database"
    else:
        database_url = env[f"EDGEWAY_{service.upper()}_DATABASE_URL"]
        assert database_url.startswith("postgresql://")
        assert database_url.endswith(f"@postgres:5432/{service}"), "each service its own database"


def test_compose_postgres_creates_every_service_database() -> None:
    """POSTGRES_DB is one database; init scripts mounted as configs create the others."""
    compose = _compose()
    postgres = compose["services"]["postgres"]
    created = {postgres["environment"]["POSTGRES_DB"]}
    for mount in postgres.get("configs", []):
        assert isinstance(mount, dict), "postgres configs: long form, with a target"
        if not mount["target"].startswith("/docker-entrypoint-initdb.d/"):
            continue
        assert mount["target"].endswith((".sql", ".sh"))
        source = COMPOSE_FILE.parent / compose["configs"][mount["source"]]["file"]
        created |= set(re.findall(r"CREATE DATABASE\s+(\w+)", source.read_text(), re.IGNORECASE))
    for name, service in compose["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if variable.endswith("_DATABASE_URL") and "@postgres:" in str(value):
                database = str(value).rsplit("/", 1)[-1]
                assert database in created, f"{name}: nothing creates database {database!r}"


def test_compose_gateway_lets_dashboards_in_without_a_token() -> None:
    """Development profile: Omega's producers and clients, the telemetry dashboards, phones."""
    env = _compose()["services"]["gateway"]["environment"]
    scopes = set(yaml.safe_load(env["EDGEWAY_ANONYMOUS_SCOPES"]))
    assert scopes == DEVELOPMENT_ANONYMOUS_SCOPES


def test_development_anonymous_scopes_are_the_gateways_own() -> None:
    """A misspelt scope in a profile would grant nothing, and the clients would get 403."""
    assert {scope.value for scope in Scope} >= DEVELOPMENT_ANONYMOUS_SCOPES


@pytest.mark.parametrize("service", sorted(SINGLETONS))
def test_compose_runs_one_of_each_singleton(service: str) -> None:
    spec = _compose()["services"][service]
    assert spec.get("deploy", {}).get("replicas") == 1, f"{service}: deploy.replicas must be 1"
    assert spec.get("scale", 1) == 1, service


def test_compose_has_no_host_paths() -> None:
    compose = _compose()
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            assert source in named, f"{name}: {source!r} is not a named volume (host path?)"
    for name, config in (compose.get("configs") or {}).items():
        if "file" in config:
            # A file of this repository, next to compose.yaml, named relative to it.
            assert not Path(config["file"]).is_absolute(), f"config {name}: absolute path"
            source = (COMPOSE_FILE.parent / config["file"]).resolve()
            assert source.is_file(), f"config {name}: {config['file']} is missing"
            assert source.is_relative_to(COMPOSE_FILE.parent), f"config {name}: outside compose/"
    text = COMPOSE_FILE.read_text()
    for machine_path in ("/work/", "/root/", "/home/", "/Users/", TMP + "/"):
        assert machine_path not in text


def test_compose_images_are_pinned() -> None:
    """A moving tag (or none) would change what `up` runs from one day to the next."""
    for name, service in _compose()["services"].items():
        image = service["image"]
        if "build" in service:
            assert image == f"edgeway/{name}:dev", f"{name}: the dev overlay runs this tag"
            continue
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
    # MinIO tags no minor versions, only `latest` and dated releases: one release.
    minio = _compose()["services"]["minio"]["image"]
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z", minio)


def test_compose_publishes_only_the_gateway_beyond_loopback() -> None:
    for name, service in _compose()["services"].items():
        if name == "gateway":
            continue
        for spec in service.get("ports", []):
            host_ip = spec.get("host_ip") if isinstance(spec, dict) else str(spec).split(":", 1)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {spec} beyond this host's loopback"


def test_compose_minio_publishes_its_console_and_keeps_its_data() -> None:
    compose = _compose()
    minio = compose["services"]["minio"]
    command = minio["command"]
    words = shlex.split(command) if isinstance(command, str) else command
    assert words[:2] == ["server", "/data"]
    assert words[words.index("--console-address") + 1] == ":9001"
    published = [_container_port(p) for p in minio.get("ports", [])]
    assert published == [9001], "the console only: the S3 API stays on the compose network"
    mounts = {}
    for volume in minio["volumes"]:
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume["source"]
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = source
    assert mounts.get("/data") in (compose.get("volumes") or {}), "objects in a named volume"


def test_compose_ingestion_can_reach_minio_and_seal_rtsp_urls() -> None:
    services = _compose()["services"]
    env = services["ingestion"]["environment"]
    minio = services["minio"]["environment"]
    # No endpoint would mean the embedded store, in a tmpfs: frames lost at every restart.
    assert env["EDGEWAY_STORAGE_ENDPOINT"] == "minio:9000"
    assert str(env.get("EDGEWAY_STORAGE_SECURE", "false")).lower() == "false", "plain HTTP here"
    assert env["EDGEWAY_STORAGE_ACCESS_KEY"] == minio["MINIO_ROOT_USER"]
    assert env["EDGEWAY_STORAGE_SECRET_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    # A malformed key stops the service at start; this one must seal and open.
    cipher = CredentialCipher(env["EDGEWAY_CREDENTIALS_KEY"].encode())
    url = "rtsp://camera:secret@192.0.2.10:554/stream"
    assert cipher.open(cipher.seal(url)) == url


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_compose_services_are_hardened_with_writable_scratch(service: str) -> None:
    spec = _compose()["services"][service]
    assert spec.get("read_only") is True, f"{service}: read-only root filesystem"
    assert spec.get("cap_drop") == ["ALL"], service
    assert "no-new-privileges:true" in spec.get("security_opt", []), service
    writable = set(spec.get("tmpfs", []))
    for volume in spec.get("volumes", []):
        writable.add(volume["target"] if isinstance(volume, dict) else volume.split(":")[1])
    for path in (TMP, spec["environment"]["EDGEWAY_DATA_DIR"]):
        assert path in writable, f"{service}: {path} is not writable (read-only root)"


def test_compose_credentials_are_marked_development_only() -> None:
    for name, service in _compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if COMPOSE_CREDENTIAL.search(variable):
                assert any(marker in str(value) for marker in DEVELOPMENT_MARKERS), (
                    f"{name}: {variable} does not say it is a development-only value"
                )


# ---- Dockerfiles -----------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    joined: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments, also inside continuations
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, f"{dockerfile}: dangling line continuation"
    pairs = []
    for line in joined:
        instruction, _, arguments = line.partition(" ")
        pairs.append((instruction.upper(), " ".join(arguments.split())))
    return pairs


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, arguments in instructions:
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments))
    return stages


def _uv_version() -> str:
    match = re.search(r"^UV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile: UV_VERSION not found"
    return match.group(1)


def _built_for(service: str) -> list[tuple[str, str]]:
    """The shared Dockerfile's instructions as compose builds `service`: its build arguments
    (`SERVICE`, `PORT`) filled in wherever they are used."""
    values = {"SERVICE": service, "PORT": str(SERVICES[service])}
    return [
        (instruction, re.sub(r"\$\{(SERVICE|PORT)\}", lambda m: values[m.group(1)], arguments))
        for instruction, arguments in _instructions(DOCKERFILE)
    ]


def test_each_dockerfile_stage_declares_the_build_arguments_it_uses() -> None:
    """A build argument is scoped to the stage that declares it: one used elsewhere is empty."""
    for stage in _stages(_instructions(DOCKERFILE)):
        declared = {arguments for instruction, arguments in stage if instruction == "ARG"}
        used = {
            name
            for instruction, arguments in stage[1:]
            for name in re.findall(r"\$\{(\w+)\}", arguments)
            if instruction != "ARG"
        } - {"PATH"}
        assert used <= declared, f"{stage[0][1]}: ARG {sorted(used - declared)} not declared"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dockerfile_follows_the_uv_recipe(service: str) -> None:
    instructions = _built_for(service)
    args = dict(
        arguments.split("=", 1)
        for instruction, arguments in instructions
        if instruction == "ARG" and "=" in arguments
    )
    stages = _stages(instructions)
    assert len(stages) >= 2, "multi-stage: a builder and a slim runtime"
    for stage in stages:
        base, *name = stage[0][1].split()
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        # The web console is built in a Node stage; only its output reaches the runtime.
        wanted = "node:20-slim" if name == ["AS", "console"] else "python:3.11-slim"
        assert base.startswith(wanted), f"{service}: FROM {base}"

    builder = [arguments for _, arguments in stages[0]]
    assert f"--from=ghcr.io/astral-sh/uv:{_uv_version()} /uv /bin/" in builder, (
        "uv copied from the image whose tag is the Makefile's UV_VERSION"
    )
    installs = [a for a in builder if "uv pip install" in a]
    assert installs, "the builder installs with `uv pip install`"
    for install in installs:
        words = shlex.split(install)
        assert "-c" in words
        assert words[words.index("-c") + 1] == "constraints.txt"
        assert "-e" not in words
        assert "--editable" not in words
        assert "./libs/common" in words
        assert f"./services/{service}" in words
    for instruction, arguments in instructions:
        if instruction == "COPY" and "--from=" not in arguments:
            *sources, _destination = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{service}: COPY {source}: not in the repository"

    runtime = stages[-1]
    users = [arguments for instruction, arguments in runtime if instruction == "USER"]
    assert users, f"{service}: the runtime stage sets a USER"
    uid = users[-1].split(":", 1)[0]
    assert uid.isdigit(), "numeric USER, so Kubernetes' runAsNonRoot can verify it"
    assert int(uid) != 0
    env_text = " ".join(arguments for instruction, arguments in runtime if instruction == "ENV")
    assert "EDGEWAY_HTTP_HOST=0.0.0.0" in env_text
    assert f"EDGEWAY_HTTP_PORT={SERVICES[service]}" in env_text
    exposed = [arguments for instruction, arguments in runtime if instruction == "EXPOSE"]
    assert exposed == [str(SERVICES[service])]
    healthchecks = [arguments for instruction, arguments in runtime if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "python" in healthchecks[0]
    assert "/healthz" in healthchecks[0]
    assert "EDGEWAY_HTTP_PORT" in healthchecks[0], "the port the image's ENV sets"
    assert "curl" not in healthchecks[0], "python:3.11-slim has no curl"

    # The entry point is a link, made in the builder, to the service's console script.
    entrypoints = [arguments for instruction, arguments in runtime if instruction == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entrypoint = yaml.safe_load(entrypoints[0])
    assert entrypoint == ["edgeway-service"], "exec form (the service gets SIGTERM itself)"
    script = f"edgeway-{service}"
    assert f"ln -s {script} /app/.venv/bin/edgeway-service" in " ".join(builder)
    pyproject = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())
    assert script in pyproject["project"]["scripts"]


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".git", ".venv", ".tools", "var", "**/__pycache__", ".mypy_cache", ".env"):
        assert needed in patterns, f".dockerignore: {needed} missing"
    for kept in ("constraints.txt", "libs", "services", "pyproject.toml"):
        assert kept not in patterns, f".dockerignore must not exclude {kept}"


# ---- Kubernetes ------------------------------------------------------------------------------


KUBECTL_MISSING = (
    "kubectl is not installed, so the kustomize overlays cannot be rendered. Install a kubectl "
    "with kustomize v5 (the one in Debian's kubernetes-client package is too old): see "
    "https://kubernetes.io/docs/tasks/tools/ (deploy/local/ensure-test-tools.sh checks for it)"
)


@functools.cache
def _kustomize(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # a check that cannot run fails: a skip would read as a pass
        pytest.fail(KUBECTL_MISSING)
    result = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS_DIR / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay}:\n{result.stderr}"
    return result.stdout


def _resources(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_kustomize(overlay)) if doc]


def _of_kind(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in _resources(overlay) if r["kind"] == kind}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _secret_values(secret: dict[str, Any]) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def _effective_env(
    container: dict[str, Any], configmaps: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """What the container sees: envFrom ConfigMaps in order, then `env` (literal or valueFrom)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "envFrom is for ConfigMaps; secrets come key by key"
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names a ConfigMap that is not rendered: {name}"
        env.update(configmaps[name].get("data") or {})
    for item in container.get("env", []):
        env[item["name"]] = item["value"] if "value" in item else item["valueFrom"]
    return env


def _deployments(overlay: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod spec, container) for every container of every Deployment."""
    deployments = _of_kind(overlay, "Deployment")
    assert set(SERVICES) <= set(deployments)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield name, pod, container


def test_the_overlays_are_there() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_kubernetes(overlay: str) -> None:
    manifests = _kustomize(overlay)
    result = subprocess.run(
        [
            str(VENV_BIN / "kubernetes-validate"),
            "--strict",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            "-",
        ],
        input=manifests,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # An unknown kind or apiVersion is only a WARN (exit 0) for kubernetes-validate: refuse it.
    problems = [line for line in output.splitlines() if not line.startswith("INFO")]
    assert not problems, output
    passed = [line for line in output.splitlines() if " passed for resource " in line]
    assert len(passed) == len(_resources(overlay)), output


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_uses_stable_api_versions_in_namespace_edgeway(overlay: str) -> None:
    for resource in _resources(overlay):
        assert resource["apiVersion"] in STABLE_API_VERSIONS, (
            f"{resource['kind']}/{resource['metadata']['name']}: {resource['apiVersion']}"
        )
        if resource["kind"] != "Namespace":
            assert resource["metadata"].get("namespace") == "edgeway"
    kinds = {r["kind"] for r in _resources(overlay)}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "Ingress"} <= kinds
    assert {"PodDisruptionBudget"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_have_probes_resources_and_hardening(overlay: str) -> None:
    configmaps = _of_kind(overlay, "ConfigMap")
    deployments = _of_kind(overlay, "Deployment")
    for name, pod, container in _deployments(overlay):
        where = f"{overlay}: {name}/{container['name']}"
        port = SERVICES.get(name)
        for probe, path in (
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ):
            assert probe in container, f"{where}: no {probe}"
            assert container[probe]["httpGet"]["path"] == path, f"{where}: {probe}"
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(bound, {}), f"{where}: no {bound}.{resource}"

        assert pod["securityContext"]["runAsNonRoot"] is True, where
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where

        env = _effective_env(container, configmaps)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for writable in (TMP, env.get("EDGEWAY_DATA_DIR")):
            assert writable in mounts, f"{where}: {writable} is not mounted (read-only root)"
            assert "emptyDir" in volumes[mounts[writable]], f"{where}: {writable}"
        assert set(mounts.values()) <= set(volumes), where

        grace = float(env.get("EDGEWAY_GRACEFUL_TIMEOUT", 10))
        assert pod["terminationGracePeriodSeconds"] > grace, where
        if port is not None:
            assert env["EDGEWAY_HTTP_HOST"] == "0.0.0.0", where
            assert int(env["EDGEWAY_HTTP_PORT"]) == port, where
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["http"] == port, where
            template = deployments[name]["spec"]["template"]["metadata"]
            metrics = int(template["annotations"]["prometheus.io/port"])
            # The scrape port is the public one, or (the gateway) its internal metrics port.
            if metrics != port:
                assert ports == {"http": port, "metrics": metrics}, where
                assert int(env["EDGEWAY_METRICS_PORT"]) == metrics, where
            else:
                assert ports == {"http": port}, where
        for variable, value in env.items():
            if SECRET_ENV.search(variable):
                assert isinstance(value, dict), f"{where}: {variable} is a literal value"
                assert "secretKeyRef" in value, f"{where}: {variable} not from a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_reads_only_its_own_database(overlay: str) -> None:
    configmaps = _of_kind(overlay, "ConfigMap")
    for name, _, container in _deployments(overlay):
        env = _effective_env(container, configmaps)
        databases = {variable for variable in env if variable.endswith("_DATABASE_URL")}
        if name in NO_DATABASE:
            assert not databases, f"{overlay}: {name} reads no service's database"
            continue
        own = f"EDGEWAY_{name.upper()}_DATABASE_URL"
        assert databases == {own}, f"{overlay}: {name} reads {sorted(databases)}"
        assert env[own]["secretKeyRef"]["key"] == f"{name}-database-url", f"{overlay}: {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmaps_hold_no_credentials(overlay: str) -> None:
    for name, configmap in _of_kind(overlay, "ConfigMap").items():
        for key, value in (configmap.get("data") or {}).items():
            assert not SECRET_ENV.search(key), f"{overlay}: ConfigMap {name} holds {key}"
            assert not URL_WITH_PASSWORD.search(value), f"{overlay}: ConfigMap {name}: {key}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_object_exists(overlay: str) -> None:
    rendered = {(r["kind"], r["metadata"]["name"]) for r in _resources(overlay)}
    # Only production relies on Secrets created out of band.
    external = OUT_OF_BAND_SECRETS if overlay == "prod" else set()
    secrets = {name for kind, name in rendered if kind == "Secret"} | external
    rendered_secrets = _of_kind(overlay, "Secret")
    for name, pod, container in _deployments(overlay):
        for source in container.get("envFrom", []):
            assert ("ConfigMap", source["configMapRef"]["name"]) in rendered, name
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secrets, f"{overlay}: {name} reads Secret {ref['name']}"
                if ref["name"] in rendered_secrets and not ref.get("optional"):
                    keys = _secret_values(rendered_secrets[ref["name"]])
                    assert ref["key"] in keys, f"{overlay}: {name} reads {ref['name']}/{ref['key']}"
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{overlay}: {name}"
    for ingress in _of_kind(overlay, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert ("Service", path["backend"]["service"]["name"]) in rendered
        for tls in ingress["spec"].get("tls", []):
            assert tls["secretName"] in secrets
    for hpa in _of_kind(overlay, "HorizontalPodAutoscaler").values():
        assert ("Deployment", hpa["spec"]["scaleTargetRef"]["name"]) in rendered
    for name in _of_kind(overlay, "Deployment"):
        assert name in _of_kind(overlay, "PodDisruptionBudget"), f"{overlay}: no PDB for {name}"
        assert name in _of_kind(overlay, "Service"), f"{overlay}: no Service for {name}"


def _environment_of(overlay: str) -> set[str]:
    configmaps = _of_kind(overlay, "ConfigMap")
    return {
        _effective_env(container, configmaps).get("EDGEWAY_ENVIRONMENT", "<unset>")
        for _, _, container in _deployments(overlay)
    }


def test_dev_overlay_is_one_replica_of_development() -> None:
    assert _environment_of("dev") == {"development"}
    for name, deployment in _of_kind("dev", "Deployment").items():
        assert deployment["spec"].get("replicas") == 1, name
    assert not _of_kind("dev", "HorizontalPodAutoscaler"), "an HPA would hold more replicas"
    secrets = _of_kind("dev", "Secret")
    assert secrets, "dev generates its development secrets"
    for secret in secrets.values():
        for key, value in _secret_values(secret).items():
            assert "PLACEHOLDER" not in value, f"dev still has the base placeholder for {key}"
    jwt = [_secret_values(s).get("jwt-secret") for s in secrets.values()]
    assert DEVELOPMENT_SECRET in jwt, "dev's JWT secret is the one the gateway refuses elsewhere"


def test_dev_overlay_lets_dashboards_and_phones_in_without_a_token() -> None:
    configmaps = _of_kind("dev", "ConfigMap")
    _, _, container = next(c for c in _deployments("dev") if c[0] == "gateway")
    scopes = yaml.safe_load(_effective_env(container, configmaps)["EDGEWAY_ANONYMOUS_SCOPES"])
    assert set(scopes) == DEVELOPMENT_ANONYMOUS_SCOPES


def _replicas(overlay: str, name: str) -> int:
    """A Deployment's replica count: the HPA's floor where one owns it, else spec.replicas."""
    for hpa in _of_kind(overlay, "HorizontalPodAutoscaler").values():
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            return int(hpa["spec"].get("minReplicas", 1))
    return int(_of_kind(overlay, "Deployment")[name]["spec"].get("replicas", 1))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_let_a_node_drain(overlay: str) -> None:
    """A budget that allows no eviction at full strength blocks node drains and upgrades."""
    for name, pdb in _of_kind(overlay, "PodDisruptionBudget").items():
        spec = pdb["spec"]
        replicas = _replicas(overlay, name)
        if "minAvailable" in spec:
            assert isinstance(spec["minAvailable"], int), f"{overlay}: {name}: use a count"
            assert spec["minAvailable"] < replicas, f"{overlay}: {name} could never be evicted"
        else:
            assert spec["maxUnavailable"] not in (0, "0%"), f"{overlay}: {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("service", sorted(SINGLETONS))
def test_singletons_run_exactly_one_replica_even_during_a_rollout(
    overlay: str, service: str
) -> None:
    """In-memory stream state and one consumer: one replica, no HPA, never two at once."""
    spec = _of_kind(overlay, "Deployment")[service]["spec"]
    assert spec.get("replicas") == 1, f"{overlay}: {service} must run exactly one replica"
    # RollingUpdate would start the new pod before the old one stops.
    assert spec["strategy"] == {"type": "Recreate"}, f"{overlay}: {service}: Recreate"
    autoscaled = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in _of_kind(overlay, "HorizontalPodAutoscaler").values()
    }
    assert service not in autoscaled, f"{overlay}: an HPA would run a second {service}"


def test_prod_overlay_is_production_without_secret_values() -> None:
    assert _environment_of("prod") == {"production"}
    resources = _resources("prod")
    assert not [r for r in resources if r["kind"] == "Secret"], "prod must not carry a Secret"
    for text in (s for resource in resources for s in _strings(resource)):
        assert not URL_WITH_PASSWORD.search(text), f"credentials in a URL: {text}"
        for marker in ("PLACEHOLDER", DEVELOPMENT_SECRET, *DEVELOPMENT_MARKERS):
            assert marker not in text, f"prod contains {marker!r}"
    configmaps = _of_kind("prod", "ConfigMap")
    for name, _, container in _deployments("prod"):
        env = _effective_env(container, configmaps)
        assert env["EDGEWAY_AMQP_URL"]["secretKeyRef"]["name"] == "edgeway-secrets", name
        if name == "gateway":
            assert env["EDGEWAY_ANONYMOUS_SCOPES"] == "[]", "no anonymous access in production"
            assert "*" not in env["EDGEWAY_ALLOWED_ORIGINS"]


def test_prod_overlay_scales_out() -> None:
    hpa = _of_kind("prod", "HorizontalPodAutoscaler")["gateway"]["spec"]
    assert hpa["minReplicas"] >= 2
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert "replicas" not in _of_kind("prod", "Deployment")["gateway"]["spec"], "the HPA owns it"
    assert _of_kind("prod", "Deployment")["occupancy"]["spec"]["replicas"] >= 2
    # Single active consumer: extra telemetry replicas are hot standbys (one at least), no HPA.
    assert _of_kind("prod", "Deployment")["telemetry"]["spec"]["replicas"] >= 2
    autoscaled = {
        h["spec"]["scaleTargetRef"]["name"]
        for h in _of_kind("prod", "HorizontalPodAutoscaler").values()
    }
    assert "telemetry" not in autoscaled, "an HPA would add standbys, not throughput"
    ingress = _of_kind("prod", "Ingress")["gateway"]
    assert ingress["spec"].get("tls"), "production Ingress serves TLS"
    timeout = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]
    assert int(timeout) >= 600, "WebSockets need a long proxy read timeout"


def _nginx_size(value: str) -> int:
    """An nginx size ("512k", "128m", "1g") in bytes; its units are powers of 1024."""
    match = re.fullmatch(r"(\d+)([kmg]?)", value.strip().lower())
    assert match, f"not an nginx size: {value!r}"
    unit = {"": 1, "k": 1024, "m": 1024 * 1024, "g": 1024 * 1024 * 1024}[match.group(2)]
    return int(match.group(1)) * unit


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_takes_the_largest_upload(overlay: str) -> None:
    """Above its body size ingress-nginx answers 413 itself, before the gateway sees a byte."""
    annotations = _of_kind(overlay, "Ingress")["gateway"]["metadata"].get("annotations", {})
    # ingress-nginx's default when the annotation is absent (nginx's client_max_body_size).
    limit = _nginx_size(annotations.get("nginx.ingress.kubernetes.io/proxy-body-size", "1m"))
    assert limit > 0, "bounded at the edge too (0 would be no limit)"
    fields = GatewaySettings.model_fields
    largest = max(fields["ingest_max_body_bytes"].default, fields["max_upload_bytes"].default)
    assert limit >= largest, f"{overlay}: uploads up to {largest} bytes would get 413"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingestion_uses_external_object_storage_and_one_key(overlay: str) -> None:
    configmaps = _of_kind(overlay, "ConfigMap")
    _, _, container = next(c for c in _deployments(overlay) if c[0] == "ingestion")
    env = _effective_env(container, configmaps)
    # No endpoint would mean the embedded store in the pod's emptyDir: frames lost with the
    # pod, and each replica seeing only its own.
    endpoint = env.get("EDGEWAY_STORAGE_ENDPOINT")
    assert isinstance(endpoint, str), f"{overlay}: EDGEWAY_STORAGE_ENDPOINT from the ConfigMap"
    assert re.fullmatch(r"[a-z0-9.-]+:\d+", endpoint), f"{overlay}: host:port, not {endpoint!r}"
    assert not endpoint.split(":")[0].endswith(".invalid"), f"{overlay}: the base's placeholder"
    # Every replica reads the same storage credentials and the same key (a capture's URL is
    # sealed by the replica that admits it, opened by the one that runs it).
    for variable, key in (
        ("EDGEWAY_STORAGE_ACCESS_KEY", "storage-access-key"),
        ("EDGEWAY_STORAGE_SECRET_KEY", "storage-secret-key"),
        ("EDGEWAY_CREDENTIALS_KEY", "credentials-key"),
    ):
        ref = env[variable]["secretKeyRef"]
        assert ref["key"] == key, f"{overlay}: {variable}"
        assert not ref.get("optional"), f"{overlay}: {variable} is required"
    if overlay == "prod":
        assert env["EDGEWAY_STORAGE_SECURE"] == "true", "production object storage over TLS"


def test_dev_overlay_ingestion_key_seals_and_opens() -> None:
    """Development sets a fixed key: the pods' own would differ and die with their emptyDir."""
    keys = [_secret_values(s).get("credentials-key") for s in _of_kind("dev", "Secret").values()]
    [key] = [k for k in keys if k is not None]
    cipher = CredentialCipher(key.encode())
    url = "rtsp://camera:secret@192.0.2.10:554/stream"
    assert cipher.open(cipher.seal(url)) == url


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_pins_every_image(overlay: str) -> None:
    registries = set()
    for name, _, container in _deployments(overlay):
        repository, _, tag = container["image"].rpartition(":")
        assert repository, f"{overlay}: {name} runs {container['image']} (no tag)"
        assert "/" not in tag, f"{overlay}: {name} runs {container['image']} (no tag)"
        assert tag != "latest", f"{overlay}: {name}"
        if overlay == "dev":
            # What compose builds: `docker compose build`, then load the images into the cluster.
            assert container["image"] == f"edgeway/{name}:dev", f"dev: {name}"
        else:
            registry, _, image = repository.rpartition("/edgeway/")
            assert image == name, f"{overlay}: {name} runs {container['image']}"
            registries.add(registry)
    assert len(registries) <= 1, f"{overlay}: images from several registries: {registries}"


def test_prod_runs_two_of_every_service_that_can_run_two() -> None:
    """One replica would mean an outage at every rollout and node drain (their PDBs allow one)."""
    for name, deployment in _of_kind("prod", "Deployment").items():
        if name in SINGLETONS:
            continue
        assert _replicas("prod", name) >= 2, f"prod: {name}"
        # A new pod ready before an old one goes.
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", f"prod: {name}"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, f"prod: {name}"


# Gateway endpoints for the cluster only: Prometheus and the kubelet's probes.
INTERNAL_PATHS = {"/metrics", "/healthz", "/readyz"}


def _gateway_paths() -> set[str]:
    """Every HTTP and WebSocket path the gateway's app serves (included routers walked)."""
    from edgeway.gateway.app import create_app

    app = create_app(GatewaySettings(jwt_secret="a-test-secret-that-is-long-enough-for-hs256"))
    paths: set[str] = set()
    pending = list(app.routes)
    while pending:
        route = pending.pop()
        included = getattr(route, "original_router", None)  # FastAPI's included routers
        if included is not None:
            pending.extend(included.routes)
        elif isinstance(path := getattr(route, "path", None), str):
            paths.add(path)
    return paths


def _ingress_matches(rule: dict[str, Any], path: str) -> bool:
    """Kubernetes' Ingress matching: Exact is the whole path; Prefix is whole `/` segments."""
    if rule["pathType"] == "Exact":
        return path == rule["path"]
    wanted = [part for part in rule["path"].split("/") if part]
    return path.split("/")[1 : 1 + len(wanted)] == wanted


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_exposes_every_public_endpoint_and_no_internal_one(overlay: str) -> None:
    ingress = _of_kind(overlay, "Ingress")["gateway"]
    rules = [path for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    served = _gateway_paths()
    assert served >= INTERNAL_PATHS
    for path in sorted(served):
        exposed = any(_ingress_matches(rule, path) for rule in rules)
        assert exposed == (path not in INTERNAL_PATHS), path
