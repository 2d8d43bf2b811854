"""The Helm chart (deploy/helm/switchboard), rendered offline in-process (helm-python-sdk
binds Helm's Go SDK: no binary, no cluster), every object validated against Kubernetes'
1.30 schemas (kubernetes-validate, strict: no unknown fields), then the chart's own
policies checked. The NATS subchart is declared, not vendored: it is not rendered here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from services.launcher import kubernetes as k8s
from services.launcher._services import SERVICES

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "switchboard"
KUBE_VERSIONS = ("1.30.0", "1.33.0")
SECRETS = {
    "secrets": {"signingKey": {"existingSecret": "sb-signing"}},
    "database": {"cnpg": {"ragRoleSecret": "sb-rag"}},
}
WORKLOADS = ("Deployment", "StatefulSet")
SANDBOXED = {"switchboard-execution", "switchboard-worker"}
CRDS = {"postgresql.cnpg.io/v1"}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text())


def render(values: dict[str, Any], namespace: str = "ai") -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    try:
        rendered = chart.render(values, name="sb", namespace=namespace, is_install=True)
    finally:
        chart.close()
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    return str(caught.value)


DEPLOYMENTS = {
    "default": SECRETS,
    "small": values_file("values-small.yaml"),
    "large": values_file("values-large.yaml"),
    "external": merge(
        SECRETS,
        {
            "database": {"mode": "external", "external": {"existingSecret": "sb-db"}},
            "nats": {"enabled": False},
            "externalNatsUrl": "nats://nats.example:4222",
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(DEPLOYMENTS))
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(DEPLOYMENTS[request.param])


def of_kind(objects: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in kinds]


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


# -- schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_core_object_is_valid_for_kubernetes(
    objects: list[dict[str, Any]], version: str
) -> None:
    checked = 0
    for obj in objects:
        if obj["apiVersion"] in CRDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 40


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """A misspelt field and a wrong type fail: the check above checks something."""
    (deployment, *_) = of_kind(render(SECRETS), "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, "1.30.0", strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, "1.30.0", strict=True)


def test_the_cnpg_cluster_has_what_the_operator_requires() -> None:
    """No CRD schema for CloudNativePG is available offline: its required shape, by hand."""
    cluster = by_name(render(SECRETS), "Cluster", "switchboard-postgres")
    spec = cluster["spec"]
    assert spec["instances"] >= 1 and spec["storage"]["size"]
    assert re.fullmatch(r"[^:@]+(:[\w.-]+|@sha256:[0-9a-f]{64})", spec["imageName"])
    assert (
        "CREATE EXTENSION IF NOT EXISTS vector"
        in spec["bootstrap"]["initdb"]["postInitApplicationSQL"]
    )
    (rag,) = spec["managed"]["roles"]
    assert rag["name"] == "switchboard_rag" and not rag["superuser"] and not rag["bypassrls"]
    assert rag["passwordSecret"]["name"] == "sb-rag"


# -- policies ---------------------------------------------------------------------------


def test_images_are_pinned(objects: list[dict[str, Any]]) -> None:
    for workload in of_kind(objects, *WORKLOADS, "Job"):
        for container in containers(workload):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image), image
            assert not image.endswith(":latest"), image


def test_every_long_running_container_has_probes_and_resources(
    objects: list[dict[str, Any]],
) -> None:
    for workload in of_kind(objects, *WORKLOADS):
        for container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            resources = container["resources"]
            for key in ("cpu", "memory"):
                assert resources["requests"][key] and resources["limits"][key], where
    for job in of_kind(objects, "Job"):
        for container in containers(job):
            assert container["resources"]["limits"], job["metadata"]["name"]


def test_services_probe_their_grpc_health_and_the_gateway_its_http_path() -> None:
    objects = render(SECRETS)
    for spec in SERVICES:
        deployment = by_name(objects, "Deployment", f"switchboard-{spec.name}")
        (app,) = deployment["spec"]["template"]["spec"]["containers"]
        port = k8s.port_of(spec)
        if spec.http:
            assert app["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
            assert {"name": "http", "containerPort": port} in app["ports"]
        else:
            assert app["readinessProbe"]["grpc"] == {"port": port, "service": spec.health_service}
            assert app["livenessProbe"]["grpc"]["port"] == port
        assert app["command"] == ["python", "-m", spec.module]


def test_containers_run_locked_down_except_the_sandbox(objects: list[dict[str, Any]]) -> None:
    for workload in of_kind(objects, *WORKLOADS, "Job"):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        for container in containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            if name in SANDBOXED and container["name"] != "envoy":
                # exactly what services/execution/sandbox needs (values.yaml, sandbox)
                assert security["capabilities"]["add"] == ["SETUID", "SETGID"]
                assert security["runAsNonRoot"] is False
                continue
            assert "add" not in security["capabilities"], name
            non_root = security.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot"))
            assert non_root is True, name
            seccomp = security.get("seccompProfile") or pod["securityContext"]["seccompProfile"]
            assert seccomp == {"type": "RuntimeDefault"}, name


def test_the_sandbox_pods_and_the_gvisor_option() -> None:
    plain = render(SECRETS)
    gvisor = render(merge(SECRETS, {"sandbox": {"runtimeClassName": "runsc"}}))
    for name in SANDBOXED:
        pod = by_name(plain, "Deployment", name)["spec"]["template"]["spec"]
        assert "runtimeClassName" not in pod
        assert pod["hostUsers"] is False  # root in the pod is not root on the node
        assert pod["securityContext"]["runAsUser"] == 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
        assert pod["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
        (app,) = pod["containers"]
        assert app["securityContext"]["procMount"] == "Unmasked"
        assert {"name": "tmp", "mountPath": "/tmp"} in app["volumeMounts"]
        assert by_name(gvisor, "Deployment", name)["spec"]["template"]["spec"][
            "runtimeClassName"
        ] == ("runsc")
    others = [d for d in of_kind(plain, "Deployment") if d["metadata"]["name"] not in SANDBOXED]
    assert all("hostUsers" not in d["spec"]["template"]["spec"] for d in others)


def test_a_pdb_for_every_workload_and_hpas(objects: list[dict[str, Any]]) -> None:
    pdbs = {
        tuple(sorted(p["spec"]["selector"]["matchLabels"].items()))
        for p in of_kind(objects, "PodDisruptionBudget")
    }
    for workload in of_kind(objects, *WORKLOADS):
        selector = tuple(sorted(workload["spec"]["selector"]["matchLabels"].items()))
        assert selector in pdbs, workload["metadata"]["name"]
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        assert by_name(objects, "Deployment", target)
        assert "replicas" not in by_name(objects, "Deployment", target)["spec"]


def test_admission_scales_on_its_queue_depth_metric() -> None:
    (hpa,) = [
        h
        for h in of_kind(render(SECRETS), "HorizontalPodAutoscaler")
        if h["metadata"]["name"] == "switchboard-admission"
    ]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods" and name == "switchboard_admission_queue_depth"
    # the name the admission service exports
    assert f'"{name}"' in (k8s.REPO_ROOT / "services" / "admission" / "metrics.py").read_text()
    inference = by_name(render(SECRETS), "HorizontalPodAutoscaler", "switchboard-inference")
    assert inference["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_topology_spread_on_every_deployment(objects: list[dict[str, Any]]) -> None:
    for deployment in of_kind(objects, "Deployment"):
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }


def test_network_policies_deny_by_default_and_open_only_envoy(
    objects: list[dict[str, Any]],
) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    deny = policies["switchboard-default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "switchboard"}}
    open_rules = [
        (name, rule)
        for name, spec in policies.items()
        for rule in spec.get("ingress", [])
        if "from" not in rule
    ]
    # the only ingress without a `from`: Envoy's public port and its probe port
    assert {name for name, _ in open_rules} == {"switchboard-envoy-ingress"}
    services = policies["switchboard-services-ingress"]
    ports = {p["port"] for p in services["ingress"][0]["ports"]}
    assert {k8s.port_of(spec) for spec in SERVICES} <= ports
    assert services["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "switchboard"}}}
    ]
    # Triton's gRPC port: only from the processes that route generations (the inference
    # service, and chat and the gateway, which embed its router)
    (grpc_rule, _) = policies["switchboard-triton-ingress"]["ingress"]
    assert grpc_rule["ports"] == [{"port": 8001, "protocol": "TCP"}]
    allowed = {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in grpc_rule["from"]
    }
    assert allowed == {"inference", "chat", "gateway"}
    # only the edge's Service is reachable from outside the cluster
    exposed = [
        s["metadata"]["name"]
        for s in of_kind(objects, "Service")
        if s["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    assert exposed in ([], ["switchboard-envoy"])
    for service in of_kind(objects, "Service"):
        if service["metadata"]["name"] != "switchboard-envoy":
            assert service["spec"]["clusterIP"] == "None"


def test_secrets_are_referenced_never_created(objects: list[dict[str, Any]]) -> None:
    assert not of_kind(objects, "Secret")
    for deployment in of_kind(objects, "Deployment"):
        volumes = deployment["spec"]["template"]["spec"].get("volumes", [])
        secrets = [v["secret"]["secretName"] for v in volumes if "secret" in v]
        if deployment["metadata"]["name"] == "switchboard-auth":
            assert len(secrets) == 1  # the signing key: the auth service's only
        else:
            assert not secrets, deployment["metadata"]["name"]


def test_the_signing_key_and_database_urls_come_from_the_named_secrets() -> None:
    objects = render(SECRETS)
    auth = by_name(objects, "Deployment", "switchboard-auth")["spec"]["template"]["spec"]
    (volume,) = [v for v in auth["volumes"] if v["name"] == "signing-key"]
    assert volume["secret"]["secretName"] == "sb-signing"
    (app,) = auth["containers"]
    env = {e["name"]: e for e in app["env"]}
    assert env["SWITCHBOARD_AUTH_SIGNING_KEY"]["value"].endswith("signing-key.pem")
    assert env["SWITCHBOARD_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "switchboard-postgres-app",
        "key": "uri",
    }
    external = render(DEPLOYMENTS["external"])
    (app,) = by_name(external, "Deployment", "switchboard-rag")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in app["env"]}
    assert env["SWITCHBOARD_RAG_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "sb-db",
        "key": "rag-url",
    }


def test_services_reach_the_mesh_through_their_loopback_sidecar() -> None:
    objects = render(SECRETS)
    for spec in SERVICES:
        pod = by_name(objects, "Deployment", f"switchboard-{spec.name}")["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "envoy"]
        if spec.name in k8s.NO_MESH_CALLS:
            assert not sidecars and "SWITCHBOARD_INFERENCE_TARGET" not in env
            continue
        (sidecar,) = sidecars
        assert sidecar["restartPolicy"] == "Always"
        assert env["SWITCHBOARD_INFERENCE_TARGET"] == "127.0.0.1:8081"
        assert env["SWITCHBOARD_ADMISSION_TARGET"] == "127.0.0.1:8081"
    (inference_env,) = [
        c["env"]
        for c in by_name(objects, "Deployment", "switchboard-inference")["spec"]["template"][
            "spec"
        ]["containers"]
    ]
    urls = next(e["value"] for e in inference_env if e["name"] == "SWITCHBOARD_TRITON_URLS")
    assert urls.split(",") == [
        f"switchboard-triton-{i}.switchboard-triton.ai.svc.cluster.local:8001" for i in (0, 1)
    ]


def test_envoy_configs_carry_the_release_namespace() -> None:
    objects = render(SECRETS, namespace="team-a")
    for name in ("switchboard-envoy-edge", "switchboard-envoy-sidecar"):
        text = by_name(objects, "ConfigMap", name)["data"]["envoy.yaml"]
        assert k8s.NAMESPACE_TOKEN not in text and k8s.DOMAIN_TOKEN not in text
        assert "switchboard-admission.team-a.svc.cluster.local" in text
        config = yaml.safe_load(text)
        assert config["static_resources"]["clusters"]


def test_gpu_flag_requests_gpus_and_serves_the_kind_gpu_models() -> None:
    cpu = by_name(render(SECRETS), "StatefulSet", "switchboard-triton")
    gpu = by_name(
        render(merge(SECRETS, {"triton": {"gpu": {"enabled": True, "count": 2}}})),
        "StatefulSet",
        "switchboard-triton",
    )
    (cpu_triton,) = cpu["spec"]["template"]["spec"]["containers"]
    (gpu_triton,) = gpu["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu_triton["resources"]["limits"]
    assert "--model-repository=/models/cpu" in cpu_triton["command"]
    assert gpu_triton["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--model-repository=/models/gpu" in gpu_triton["command"]
    assert gpu["spec"]["template"]["spec"]["tolerations"]


def test_migrations_run_as_a_hook_with_the_database_urls() -> None:
    for mode, install in (("cnpg", "post-install"), ("external", "pre-install")):
        values = DEPLOYMENTS["default" if mode == "cnpg" else "external"]
        job = by_name(render(values), "Job", "switchboard-migrations")
        assert job["metadata"]["annotations"]["helm.sh/hook"] == f"{install},pre-upgrade"
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", "services.launcher.kubernetes", "migrate"]
        env = {e["name"] for e in container["env"]}
        assert {"SWITCHBOARD_DATABASE_URL", "SWITCHBOARD_RAG_DATABASE_URL"} <= env


# -- bad input --------------------------------------------------------------------------


def test_an_invalid_replica_count_fails() -> None:
    message = render_error(merge(SECRETS, {"services": {"chat": {"replicas": 0}}}))
    assert "/services/chat/replicas" in message and "minimum" in message
    message = render_error(merge(SECRETS, {"triton": {"replicas": "two"}}))
    assert "/triton/replicas" in message


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (merge(SECRETS, {"secrets": {"signingKey": {"existingSecret": ""}}}), "secrets.signingKey"),
        (merge(SECRETS, {"database": {"cnpg": {"ragRoleSecret": ""}}}), "ragRoleSecret"),
        (
            merge(SECRETS, {"database": {"mode": "external"}}),
            "database.external.existingSecret",
        ),
        (merge(SECRETS, {"nats": {"enabled": False}}), "externalNatsUrl"),
    ],
)
def test_a_missing_secret_or_url_fails_naming_it(values: dict[str, Any], named: str) -> None:
    assert named in render_error(values)


def test_production_refuses_nats_below_three_replicas() -> None:
    production = values_file("values-large.yaml")
    render(production)  # three: fine
    message = render_error(merge(production, {"nats": {"config": {"cluster": {"replicas": 1}}}}))
    assert "nats.config.cluster.replicas >= 3" in message and "got 1" in message
    # the same count is allowed outside production
    render(merge(SECRETS, {"nats": {"config": {"cluster": {"replicas": 1}}}}))


def test_streams_are_replicated_on_the_nats_cluster_and_production_insists() -> None:
    objects = render(SECRETS)
    for spec in SERVICES:
        pod = by_name(objects, "Deployment", f"switchboard-{spec.name}")["spec"]["template"]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["SWITCHBOARD_NATS_STREAM_REPLICAS"] == "3"
    production = values_file("values-large.yaml")
    message = render_error(merge(production, {"natsStreamReplicas": 1}))
    assert "natsStreamReplicas >= 3" in message and "got 1" in message
    assert "/natsStreamReplicas" in render_error(merge(SECRETS, {"natsStreamReplicas": 0}))


def test_production_refuses_single_replicas() -> None:
    small = values_file("values-small.yaml")
    message = render_error(merge(small, {"production": True}))
    assert "production: true needs" in message


def test_latest_tags_are_refused() -> None:
    message = render_error(merge(SECRETS, {"envoy": {"image": {"tag": "latest"}}}))
    assert "/envoy/image/tag" in message


def test_chart_declares_nats_pinned_and_lints() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (nats,) = chart["dependencies"]
    assert nats["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert re.fullmatch(r"\d+\.\d+\.\d+", nats["version"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())["nats"]["config"]
    assert values["jetstream"]["merge"]["sync_interval"] == "always"
    assert values["cluster"]["replicas"] == 3
    report = helm.lint(CHART, SECRETS, kube_version="v1.30.0")
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    # the one expected warning: the dependency is declared, not downloaded
    warnings = [m["error"] for m in report["messages"] if m["severity"] == 2]
    assert not errors and not report["errors"], report
    assert all("missing these dependencies: nats" in w for w in warnings), warnings
