"""The Helm chart (deploy/helm/cachesync): rendered with the real helm, every object validated offline.

Core kinds are checked by kubernetes-validate (strict: an unknown field is an error),
KEDA's ScaledObject and the Prometheus Operator's ServiceMonitor by the schemas in
deploy/helm/schemas/; an object of any other kind fails. helm comes from
deploy/helm/install-helm.sh (idempotent; built into .stack/bin/ the first time).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from cachesync.consumers.cli.app import app
from cachesync.consumers.settings import Settings, region_var
from cachesync.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy/helm/cachesync"
SCHEMAS = REPO / "deploy/helm/schemas"
TOPOLOGY = REPO / "topology/topology.yaml"
KUBE_VERSION = "1.33.0"  # the schemas kubernetes-validate checks against, and helm's --kube-version
VALUES = [CHART / "values.yaml", *sorted((CHART / "ci").glob("*-values.yaml"))]

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> str:
    subprocess.run(["bash", str(REPO / "deploy/helm/install-helm.sh")], check=True, timeout=1200)
    return str(REPO / ".stack/bin/helm")


def template(
    helm: str, *args: str, chart: Path = CHART, topology: bool = True
) -> subprocess.CompletedProcess[str]:
    """`helm template` of `chart`, with the repository's topology unless told otherwise."""
    given = ["--set-file", f"topology={TOPOLOGY}"] if topology else []
    return subprocess.run(
        [helm, "template", "cachesync", str(chart), "--kube-version", KUBE_VERSION, *given, *args],
        capture_output=True,
        text=True,
        check=False,
    )


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently;
    the API server's strict decoding does not)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = {k for k in keys if keys.count(k) > 1}
        if twice:
            raise yaml.constructor.ConstructorError(
                None, None, f"keys given twice: {sorted(map(str, twice))}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def render(helm: str, *args: str, chart: Path = CHART) -> list[Manifest]:
    """The objects `helm template` renders."""
    result = template(helm, *args, chart=chart)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.load_all(result.stdout, Loader=_StrictLoader) if doc]


def schema_errors(obj: Manifest) -> list[str]:
    """Why `obj` is not a valid object of its kind (empty: it is)."""
    kind, api = obj.get("kind", "?"), obj.get("apiVersion", "?")
    where = f"{kind} {obj.get('metadata', {}).get('name', '?')}"
    group, _, version = api.rpartition("/")
    crd = SCHEMAS / f"{group}_{version}_{kind}.json"
    if crd.exists():
        validator = jsonschema.Draft7Validator(json.loads(crd.read_text()))
        return [
            f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {api} {kind}: add one to {SCHEMAS.relative_to(REPO)}"]
    except kubernetes_validate.ValidationError as exc:
        # (kubernetes-validate stops at the first error: fix it and the next one shows.)
        return [f"{where}: {'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
    return []


def of_kind(objects: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: Manifest) -> Manifest:
    (found,) = deployment["spec"]["template"]["spec"]["containers"]
    result: Manifest = found
    return result


def env(deployment: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


def values_of(path: Path) -> Manifest:
    """The chart's values with `path` over them, merged as helm does (maps key by key,
    lists and scalars replaced)."""

    def merge(base: Manifest, over: Manifest) -> Manifest:
        out = dict(base)
        for key, value in over.items():
            both = isinstance(value, dict) and isinstance(base.get(key), dict)
            out[key] = merge(base[key], value) if both else value
        return out

    base: Manifest = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(base, yaml.safe_load(path.read_text()) or {})


@pytest.fixture(scope="module", params=VALUES, ids=lambda p: p.name)
def rendered(
    request: pytest.FixtureRequest, helm: str
) -> Iterator[tuple[Manifest, list[Manifest]]]:
    path: Path = request.param
    yield values_of(path), render(helm, "-f", str(path))


def test_every_rendered_object_passes_its_schema(rendered: tuple[Manifest, list[Manifest]]) -> None:
    _, objects = rendered
    assert objects
    errors = [e for obj in objects for e in schema_errors(obj)]
    assert errors == []


def test_a_deployment_for_the_mapper_and_one_per_region_and_sink_kind(
    rendered: tuple[Manifest, list[Manifest]],
) -> None:
    values, objects = rendered
    expected = {("run", "mapper")} | {
        ("run", "sink", "--region", region["name"], "--sink", kind)
        for region in values["regions"]
        for kind in region["sinks"]
    }
    deployments = of_kind(objects, "Deployment")
    assert {tuple(container(d)["args"]) for d in deployments.values()} == expected
    assert len(deployments) == len(expected)


def test_each_container_runs_a_real_cli_command_with_probes_on_the_metrics_port(
    rendered: tuple[Manifest, list[Manifest]],
) -> None:
    values, objects = rendered
    for name, deployment in of_kind(objects, "Deployment").items():
        spec = container(deployment)
        result = CliRunner().invoke(app, [*spec["args"], "--help"])
        assert result.exit_code == 0, f"{name}: {spec['args']}: {result.output}"
        (port,) = spec["ports"]
        variables = env(deployment)
        assert variables["CACHESYNC_METRICS_PORT"]["value"] == str(port["containerPort"])
        assert variables["CACHESYNC_METRICS_HOST"]["value"] == "0.0.0.0"
        assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
        assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
        grace = float(variables["CACHESYNC_SHUTDOWN_GRACE_S"]["value"])
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > grace, "the drain must end before SIGKILL"
        assert pod["securityContext"]["runAsNonRoot"] is True
        mount = next(m for m in spec["volumeMounts"] if m["name"] == "topology")
        assert variables["CACHESYNC_TOPOLOGY"]["value"].startswith(mount["mountPath"] + "/")
        home = values["kafka"]["bootstrapServers"]
        assert variables["KAFKA_BOOTSTRAP_SERVERS"]["value"] == home
        if spec["args"][1] == "mapper":
            continue
        region = next(r for r in values["regions"] if r["name"] == spec["args"][3])
        own = variables.get(region_var("KAFKA_BOOTSTRAP_SERVERS_", region["name"]), {})
        assert own.get("value") == region.get("kafkaBootstrapServers"), (
            f"{name}: the region's own cluster, as Settings.kafka_bootstrap_for reads it"
        )
        for prefix, key in [("REDIS_URL_", "redisUrl"), ("EDGE_URL_", "edgeUrl")]:
            if key in region:
                assert variables[region_var(prefix, region["name"])]["value"] == region[key]


def test_a_scaled_object_per_consumer_group_capped_at_its_topics_partitions(
    rendered: tuple[Manifest, list[Manifest]],
) -> None:
    """Each group scales on its own lag, under the names the code gives its groups and topics."""
    values, objects = rendered
    topology = load_topology(TOPOLOGY)
    settings = Settings.model_validate(
        {
            "group_prefix": values["groupPrefix"],
            "topic_prefix": values["topicPrefix"],
            "topology_file": TOPOLOGY,
        }
    )
    partitions = {t.name: t.partitions for t in topology.topics.content}
    deployments = of_kind(objects, "Deployment")
    scaled = of_kind(objects, "ScaledObject")
    assert scaled.keys() == deployments.keys()
    groups = set()
    for name, so in scaled.items():
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        args = container(deployments[name])["args"]
        if args[1] == "mapper":
            group, topics = settings.group_id("mapper"), settings.content_topics
            cap = max(partitions.values())
        else:
            region, kind = args[3], args[5]
            group, topics = (
                settings.group_id("sink", region, kind),
                [settings.commands_topic(region)],
            )
            cap = topology.topics.commands.partitions
        assert [t["metadata"]["topic"] for t in spec["triggers"]] == topics
        for trigger in spec["triggers"]:
            assert trigger["type"] == "kafka"
            assert trigger["metadata"]["consumerGroup"] == group
            variables = env(deployments[name])
            own = region_var("KAFKA_BOOTSTRAP_SERVERS_", args[3]) if args[1] == "sink" else ""
            read = variables.get(own, variables["KAFKA_BOOTSTRAP_SERVERS"])["value"]
            assert trigger["metadata"]["bootstrapServers"] == read, "the cluster the group is on"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= cap
        groups.add(group)
    assert len(groups) == len(scaled), "one ScaledObject per consumer group"


def test_the_topology_is_a_config_map_and_secrets_are_only_referenced(
    rendered: tuple[Manifest, list[Manifest]],
) -> None:
    _, objects = rendered
    assert of_kind(objects, "Secret") == {}, "the chart never carries a secret's value"
    (config,) = of_kind(objects, "ConfigMap").values()
    assert yaml.safe_load(config["data"]["topology.yaml"]) == yaml.safe_load(TOPOLOGY.read_text())
    secret_vars = {"CLOUDFLARE_API_TOKEN": "cloudflare", "AWS_ACCESS_KEY_ID": "cloudfront"}
    secret_vars["AWS_SECRET_ACCESS_KEY"] = "cloudfront"
    for name, deployment in of_kind(objects, "Deployment").items():
        args = container(deployment)["args"]
        kind = args[5] if args[1] == "sink" else "mapper"
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "topology", "configMap": {"name": config["metadata"]["name"]}} in volumes
        for var, entry in env(deployment).items():
            if var in secret_vars:
                assert secret_vars[var] == kind, f"{name} gets {var} it does not need"
                assert set(entry) == {"name", "valueFrom"}, f"{name}: {var} must come from a Secret"
                assert entry["valueFrom"]["secretKeyRef"]["name"]


def test_a_disruption_budget_per_deployment_selects_its_pods_only(
    rendered: tuple[Manifest, list[Manifest]],
) -> None:
    _, objects = rendered
    deployments = of_kind(objects, "Deployment")
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert budgets.keys() == deployments.keys()
    for name, pdb in budgets.items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            n
            for n, d in deployments.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched == [name]
        assert pdb["spec"]["maxUnavailable"] >= 1, "a single-replica group must stay drainable"


def test_prometheus_finds_every_pod(rendered: tuple[Manifest, list[Manifest]]) -> None:
    """By the ServiceMonitor (through the headless Service) and by the scrape annotations
    that deploy/prometheus/prometheus.yml's kubernetes_sd job keeps."""
    _, objects = rendered
    (monitor,) = of_kind(objects, "ServiceMonitor").values()
    services = [
        s
        for s in of_kind(objects, "Service").values()
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert len(services) == 1
    (service,) = services
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    for name, deployment in of_kind(objects, "Deployment").items():
        template = deployment["spec"]["template"]
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items(), name
        assert port["targetPort"] in {p["name"] for p in container(deployment)["ports"]}
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(
            container(deployment)["ports"][0]["containerPort"]
        )
        assert annotations["prometheus.io/path"] == endpoint["path"] == "/metrics"


def test_the_prometheus_config_scrapes_annotated_pods_and_the_local_default() -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    local = jobs["cachesync"]["static_configs"][0]["targets"]
    assert local == [f"127.0.0.1:{Settings.model_fields['metrics_port'].default}"]
    pods = next(j for j in jobs.values() if "kubernetes_sd_configs" in j)
    assert pods["kubernetes_sd_configs"] == [{"role": "pod"}]
    sources = {tuple(r.get("source_labels", ())) for r in pods["relabel_configs"]}
    for annotation in ("scrape", "port", "path"):
        label = f"__meta_kubernetes_pod_annotation_prometheus_io_{annotation}"
        assert any(label in s for s in sources), f"{label} is not used"


@pytest.mark.parametrize(
    ("kind", "breakage"),
    [
        ("ScaledObject", lambda o: o["spec"]["triggers"][0]["metadata"].update(lagThreshold=500)),
        ("ScaledObject", lambda o: o["spec"].update(maxReplicas=o["spec"].pop("maxReplicaCount"))),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="30 seconds")),
        ("Deployment", lambda o: container(o)["readinessProbe"].update(periodSecond=10)),
        ("PodDisruptionBudget", lambda o: o["spec"].update(maxUnavailable=[1])),
    ],
    ids=["lag-as-number", "misnamed-field", "bad-duration", "probe-typo", "wrong-type"],
)
def test_a_broken_object_fails_validation(helm: str, kind: str, breakage: Any) -> None:
    """The validation can fail: each deliberately broken object is reported."""
    objects = render(helm)
    broken = next(o for o in objects if o["kind"] == kind)
    assert schema_errors(broken) == []
    breakage(broken)
    assert schema_errors(broken), f"a broken {kind} passed"


def test_a_chart_change_that_breaks_a_schema_fails(helm: str, tmp_path: Path) -> None:
    """Edit a template as a careless change would: the rendered chart no longer validates."""
    chart = tmp_path / "cachesync"
    shutil.copytree(CHART, chart)
    template = chart / "templates/scaledobjects.yaml"
    template.write_text(template.read_text().replace("cooldownPeriod:", "coolDownPeriod:"))
    deployments = chart / "templates/deployments.yaml"
    deployments.write_text(
        deployments.read_text().replace(
            "containerPort: {{ $.Values.metrics.port }}",
            "containerPort: {{ $.Values.metrics.port | quote }}",
        )
    )
    errors = [e for obj in render(helm, chart=chart) for e in schema_errors(obj)]
    assert any(e.startswith("ScaledObject") and "coolDownPeriod" in e for e in errors), errors
    assert any(e.startswith("Deployment") and "containerPort" in e for e in errors), errors


@pytest.mark.parametrize(
    ("region", "message"),
    [
        ({"name": "mars", "sinks": ["redis"]}, '"mars" is not a region of the topology'),
        ({"name": "eu-west", "sinks": ["memcached"]}, 'unknown sink "memcached"'),
        ({"name": "eu-west", "sinks": ["cloudflare"]}, "the cloudflare sink needs cloudflareZone"),
    ],
    ids=["unknown-region", "unknown-sink", "cdn-without-zone"],
)
def test_values_the_topology_cannot_run_fail_the_render(
    helm: str, tmp_path: Path, region: Manifest, message: str
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"regions": [region]}))
    result = template(helm, "-f", str(values))
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_rendering_without_the_topology_says_how_to_pass_it(helm: str) -> None:
    result = template(helm, topology=False)
    assert result.returncode != 0 and "--set-file topology=" in result.stderr, result.stderr


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name)
def test_helm_lint_passes_strictly(helm: str, values: Path) -> None:
    given = [
        "--kube-version",
        KUBE_VERSION,
        "-f",
        str(values),
        "--set-file",
        f"topology={TOPOLOGY}",
    ]
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART), *given],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
