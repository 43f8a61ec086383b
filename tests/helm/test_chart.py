"""The Helm chart (helm/stanzaguard): lint, render, validate against Kubernetes' schemas, and
check what a reviewer would otherwise check by eye.

Runs the real `helm` (fetched from the npm registry by scripts/get-helm.sh) and validates every
rendered manifest offline with kubernetes-validate, strictly (unknown fields are errors). The
value sets rendered include the chart's defaults (one proxy on SQLite, API beside it),
helm/stanzaguard/examples/distributed.yaml (Elasticsearch, Celery over Redis, three proxies,
workers with an HPA, beat running the retention round, API Deployment, Ingress,
NetworkPolicies) and one proxy on Elasticsearch running its own retention job. The rendered
environment of every container is loaded with the program's own settings loader, so the chart
cannot pass a setting the program refuses or does not know.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

from archive_api.routes.dashboard import health
from stanzaguard.api_wiring import policy_problems
from stanzaguard.beat_tasks import beat_schedule
from stanzaguard.retention_ops import load_retention
from stanzaguard.settings import Settings, load_settings, split_host_port
from tests.support.services import service_unavailable

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "stanzaguard"
DISTRIBUTED = CHART / "examples" / "distributed.yaml"
HELM_VERSION = "v3.17.2"
#: The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the
#: validator knows: the manifests must be valid on both.
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
PREFIX = "STANZAGUARD_"

Manifest = dict[str, Any]


# -- helm ------------------------------------------------------------------------------------


def _find_helm() -> str | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates = [
        os.environ.get("STANZAGUARD_HELM"),
        str(cache / "stanzaguard" / "helm" / "helm"),
        shutil.which("helm"),
    ]
    for candidate in candidates:
        if not candidate or not Path(candidate).is_file():
            continue
        try:
            done = subprocess.run(
                [candidate, "version", "--short"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.startswith("v3."):
            return candidate
    return None


@pytest.fixture(scope="module")
def helm() -> str:
    found = _find_helm()
    if found is None:
        service_unavailable(
            f"helm {HELM_VERSION} not found: run scripts/get-helm.sh (or set STANZAGUARD_HELM)"
        )
    return found


def run_helm(helm: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            "HELM_CACHE_HOME": "/nonexistent",
            "HELM_REPOSITORY_CONFIG": "/dev/null",
        },
    )


def render(helm: str, *args: str | Path, chart: Path = CHART) -> list[Manifest]:
    done = run_helm(helm, "template", "t", chart, *args)
    assert done.returncode == 0, done.stderr
    documents = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert documents, "helm template rendered nothing"
    return documents


def render_error(helm: str, *args: str | Path) -> str:
    done = run_helm(helm, "template", "t", CHART, *args)
    assert done.returncode != 0, f"rendered although it should be refused: {args}"
    return done.stderr


#: A [retention] section for value sets that set retention.content on the command line.
RETENTION_TOML = """[retention]
default = "standard"

[retention.classes]
standard = "3y"
short = "90d"

[[retention.rules]]
class = "short"
types = ["subscription", "session"]
"""

#: A policy naming its local domains, as the retention rounds need (they read it as written).
POLICY_TOML = """version = 1
local_domains = ["example.org"]

[federation]
mode = "allow"
"""

VALUE_SETS: dict[str, tuple[str, ...]] = {
    "default": (),
    "distributed": ("-f", str(DISTRIBUTED)),
    # One proxy on Elasticsearch without Celery: it runs the retention job itself, and the API
    # is a Deployment on the same cluster.
    "elasticsearch": (
        "--set",
        "store=elasticsearch",
        "--set",
        "elasticsearch.urls={https://es:9200}",
        "--set",
        "secrets.existingSecret=stanzaguard-secrets",
        "--set",
        "secrets.keys.esApiKey=es_api_key",
        "--set",
        "secrets.keys.sessionSecret=session_secret",
        "--set",
        "retention.enabled=true",
        "--set-json",
        f"retention.content={json.dumps(RETENTION_TOML)}",
        "--set-json",
        f"policy.content={json.dumps(POLICY_TOML)}",
    ),
    # The WebSocket and BOSH listeners (docs/integrations/web-clients.md).
    "web": (
        "--set",
        "proxy.web.websocket.enabled=true",
        "--set",
        "proxy.web.bosh.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
    ),
    # Component mode (docs/integrations/component.md) publishing the block list it learns.
    "component": (
        "--set",
        "component.enabled=true",
        "--set",
        "component.jid=archive.example.org",
        "--set-json",
        'component.admins=["officer@example.org"]',
        "--set",
        "secrets.existingSecret=stanzaguard-secrets",
        "--set",
        "secrets.keys.componentSecret=component_secret",
        "--set",
        "rtblPublishing.enabled=true",
        "--set",
        "rtblPublishing.publisher=component",
        "--set",
        "rtblPublishing.http=public",
        "--set",
        "rtblPublishing.pubsub.service=pubsub.example.org",
        "--set",
        "rtblPublishing.pubsub.jid=rtbl-publisher@example.org",
        "--set",
        "secrets.keys.rtblPublishPassword=rtbl_publish_password",
        "--set",
        "ibbArchiveMaxBytes=0",
        "--set",
        "networkPolicy.enabled=true",
    ),
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, helm: str) -> tuple[str, list[Manifest]]:
    name: str = request.param
    return name, render(helm, *VALUE_SETS[name])


@pytest.fixture(scope="module")
def distributed(helm: str) -> list[Manifest]:
    return render(helm, *VALUE_SETS["distributed"])


@pytest.fixture(scope="module")
def default(helm: str) -> list[Manifest]:
    return render(helm)


# -- reading manifests -----------------------------------------------------------------------


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, suffix: str) -> Manifest:
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, found {len(found)}"
    return found[0]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for manifest in manifests:
        if manifest["kind"] in ("Deployment", "StatefulSet"):
            yield manifest["metadata"]["name"], manifest["spec"]["template"]["spec"]


def containers(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest, Manifest]]:
    """(workload/container, pod spec, container) for every container of every workload."""
    for name, spec in pod_specs(manifests):
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            yield f"{name}/{container['name']}", spec, container


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {entry["name"]: entry for entry in container.get("env", [])}


SETTINGS_FIELDS = frozenset(Settings.model_fields)


def _is_secret(annotation: object) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


SECRET_SETTINGS = frozenset(
    name for name, field in Settings.model_fields.items() if _is_secret(field.annotation)
)

#: What a Secret key might hold, to load a rendered environment as the program would.
SECRET_STAND_INS = {
    "redis_url": "redis://redis-master:6379/0",
    "es_api_key": "c3RhbnphZ3VhcmQ6dGVzdA==",
    "session_secret": "s" * 40,
    "rtbl_password": "a-long-rtbl-password",
    "es_username": "stanzaguard",
    "es_password": "an-es-password",
    "component_secret": "a-long-component-secret",
    "rtbl_publish_password": "a-long-publishing-password",
}

#: What the downward API gives a pod: the longest pod name a StatefulSet makes (a DNS label).
FIELD_STAND_INS = {"metadata.name": "t-stanzaguard-proxy-" + "9" * 43}


# -- the chart itself ------------------------------------------------------------------------


def test_chart_metadata_matches_the_package_and_needs_nothing_remote() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    assert "dependencies" not in chart
    assert not (CHART / "charts").exists()
    assert not (CHART / "requirements.yaml").exists()


def test_the_charts_list_of_settings_is_the_programs() -> None:
    """_helpers.tpl keeps the settings' names to refuse typos in `settings:`; it must follow
    stanzaguard.settings.Settings (add a new setting there too)."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    match = re.search(r'define "stanzaguard\.knownSettings" -}}(.*?){{- end }}', helpers, re.S)
    assert match is not None
    listed = set(match.group(1).split())
    assert listed - SETTINGS_FIELDS == set(), "the chart lists settings the program lacks"
    assert SETTINGS_FIELDS - listed == set(), "settings missing from knownSettings in _helpers.tpl"


def test_rendered_policy_is_one_the_proxy_loads(rendered: tuple[str, list[Manifest]]) -> None:
    """The same steps as the proxy's loading: the served domains (from the rendered
    environment) stand in for `local_domains` when the policy names none."""
    name, manifests = rendered
    config = one(manifests, "ConfigMap", "-config")
    proxy = one(manifests, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    domains = frozenset(env_of(proxy)["STANZAGUARD_DOMAIN"]["value"].split(","))
    assert policy_problems(config["data"]["policy.toml"], domains) == (), name
    assert policy_problems("version = 1\n[federation]\nmode = 'sometimes'\n", domains) != ()


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_lint_strict_passes(helm: str, values: str) -> None:
    done = run_helm(helm, "lint", "--strict", CHART, *VALUE_SETS[values])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_every_manifest_is_valid_kubernetes(rendered: tuple[str, list[Manifest]]) -> None:
    name, manifests = rendered
    for version in KUBERNETES_VERSIONS:
        for manifest in manifests:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{name}: {manifest['kind']} {manifest['metadata']['name']} is not valid "
                    f"Kubernetes {version}: {exc.message} at {list(exc.path)}"
                ) from None


def test_a_manifest_with_a_wrong_field_is_caught_by_the_validator(
    default: list[Manifest],
) -> None:
    """The validation above can fail: a misspelled field in a rendered StatefulSet is refused."""
    statefulset = one(default, "StatefulSet", "-proxy")
    broken = yaml.safe_load(yaml.safe_dump(statefulset))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# -- settings as environment variables -------------------------------------------------------


def test_every_stanzaguard_variable_is_a_real_setting(
    rendered: tuple[str, list[Manifest]],
) -> None:
    name, manifests = rendered
    seen = set()
    for where, _, container in containers(manifests):
        for variable in env_of(container):
            if variable.startswith(PREFIX):
                setting = variable.removeprefix(PREFIX).lower()
                assert setting in SETTINGS_FIELDS, f"{name} {where}: {variable} is no setting"
                seen.add(setting)
    assert {"domain", "data_dir", "store", "indexing"} <= seen


def test_secret_settings_come_from_the_named_secret_only(
    rendered: tuple[str, list[Manifest]],
) -> None:
    name, manifests = rendered
    assert of_kind(manifests, "Secret") == [], "the chart must not create or inline secrets"
    for where, _, container in containers(manifests):
        for variable, entry in env_of(container).items():
            setting = variable.removeprefix(PREFIX).lower()
            if variable.startswith(PREFIX) and setting in SECRET_SETTINGS:
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if setting == "redis_url" and ref is None:
                    # A password-less URL may be a plain value; the chart refuses one with '@'.
                    assert "@" not in entry["value"]
                    continue
                assert "value" not in entry, f"{name} {where}: {variable} inlined"
                assert ref is not None, f"{name} {where}: {variable} not from a Secret"
                assert ref["name"] == "stanzaguard-secrets"


def test_distributed_secrets_reach_the_components_that_need_them(
    distributed: list[Manifest],
) -> None:
    wanted = {
        "-proxy": {"STANZAGUARD_REDIS_URL", "STANZAGUARD_ES_API_KEY", "STANZAGUARD_SESSION_SECRET"},
        "-worker": {"STANZAGUARD_REDIS_URL", "STANZAGUARD_ES_API_KEY"},
        "-beat": {"STANZAGUARD_REDIS_URL", "STANZAGUARD_ES_API_KEY"},
        # review_queue=redis (examples/distributed.yaml): the API queues review actions there
        "-api": {"STANZAGUARD_REDIS_URL", "STANZAGUARD_ES_API_KEY", "STANZAGUARD_SESSION_SECRET"},
    }
    for suffix, variables in wanted.items():
        kind = "StatefulSet" if suffix == "-proxy" else "Deployment"
        container = one(distributed, kind, suffix)["spec"]["template"]["spec"]["containers"][0]
        refs = {
            name: entry["valueFrom"]["secretKeyRef"]["key"]
            for name, entry in env_of(container).items()
            if "secretKeyRef" in entry.get("valueFrom", {})
        }
        assert variables <= set(refs), f"{suffix}: missing {variables - set(refs)}"
        for variable in variables:
            assert refs[variable] == variable.removeprefix(PREFIX).lower()


def _settings_from(container: Manifest, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for variable in list(os.environ):
        if variable.startswith(PREFIX):
            monkeypatch.delenv(variable)
    for variable, entry in env_of(container).items():
        if not variable.startswith(PREFIX):
            continue
        if "value" in entry:
            monkeypatch.setenv(variable, entry["value"])
        elif "fieldRef" in entry["valueFrom"]:
            monkeypatch.setenv(
                variable, FIELD_STAND_INS[entry["valueFrom"]["fieldRef"]["fieldPath"]]
            )
        else:
            monkeypatch.setenv(variable, SECRET_STAND_INS[variable.removeprefix(PREFIX).lower()])
    return load_settings()


def test_every_rendered_environment_loads_as_settings(
    rendered: tuple[str, list[Manifest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart hands each container is accepted by the program's settings loader, and
    every file or directory a setting names is on a volume mounted into that container."""
    name, manifests = rendered
    for where, _, container in containers(manifests):
        with monkeypatch.context() as patch:
            settings = _settings_from(container, patch)
        mounts = [Path(m["mountPath"]) for m in container.get("volumeMounts", [])]
        paths = [
            settings.data_dir,
            settings.cert,
            settings.key,
            settings.policy,
            settings.retention_file,
            settings.es_ca_file,
        ]
        for path in paths:
            if path is not None:
                assert any(path.is_relative_to(m) for m in mounts), (
                    f"{name} {where}: {path} is on no mounted volume (the root is read-only)"
                )
        writable = {
            Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")
        }
        assert settings.data_dir in writable, f"{name} {where}: data_dir is not writable"


def test_distributed_proxies_ship_to_celery_on_elasticsearch(
    distributed: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = one(distributed, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    settings = _settings_from(proxy, monkeypatch)
    assert settings.store == "elasticsearch"
    assert settings.indexing == "celery"
    assert settings.counters == "redis"
    assert settings.api_listen is None  # a Deployment of its own on store=elasticsearch
    assert settings.es_url == [
        "https://es-master-0.es.svc.cluster.local:9200",
        "https://es-master-1.es.svc.cluster.local:9200",
    ]
    assert settings.domain == ["corp.example", "conference.corp.example"]
    assert settings.upload_hosts == ["upload.corp.example"]
    assert settings.spool_max_bytes == 16 * 1024**3  # a big whole number stays exact

    worker = one(distributed, "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"] == ["worker"]
    assert _settings_from(worker, monkeypatch).worker_concurrency == 4
    # Officers' actions from the API Deployment reach the proxies through Redis.
    api = one(distributed, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    assert settings.review_queue == "redis"
    assert settings.counters_flush_interval == 0.05
    assert _settings_from(api, monkeypatch).review_queue == "redis"


# -- Elasticsearch as a full store: the API and retention -------------------------------------

#: Where each value set runs its retention rounds: the containers given a retention_file.
RETENTION_RUNNERS = {
    "distributed": {"t-stanzaguard-beat/beat", "t-stanzaguard-worker/worker"},
    "elasticsearch": {"t-stanzaguard-proxy/proxy"},
}


def test_retention_rounds_run_in_one_place(
    rendered: tuple[str, list[Manifest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With indexing=celery beat schedules the round and the workers run it, and the proxies do
    not run a job of their own as well; otherwise the single proxy runs it. On either store."""
    name, manifests = rendered
    runners: dict[str, Settings] = {}
    for where, _, container in containers(manifests):
        with monkeypatch.context() as patch:
            settings = _settings_from(container, patch)
        if settings.retention_file is not None:
            runners[where] = settings
    assert set(runners) == RETENTION_RUNNERS.get(name, set()), name
    if "t-stanzaguard-beat/beat" in runners:
        beat = runners["t-stanzaguard-beat/beat"]
        assert beat.store == "elasticsearch"
        assert "retention" in beat_schedule(beat)
        worker = runners["t-stanzaguard-worker/worker"]
        assert worker.store == "elasticsearch"
        assert worker.policy is not None, "the rules may name the policy's groups"


def test_retention_rules_load_as_the_round_loads_them(
    rendered: tuple[str, list[Manifest]], tmp_path: Path
) -> None:
    name, manifests = rendered
    data = one(manifests, "ConfigMap", "-config")["data"]
    if name not in RETENTION_RUNNERS:
        assert "retention.toml" not in data, name
        return
    (tmp_path / "policy.toml").write_text(data["policy.toml"])
    (tmp_path / "retention.toml").write_text(data["retention.toml"])
    rules = load_retention(tmp_path / "retention.toml", tmp_path / "policy.toml")
    assert rules.default == "standard", name


def test_api_on_elasticsearch_is_a_deployment_on_the_cluster(
    helm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(helm, *ES)
    proxy = one(manifests, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert _settings_from(proxy, monkeypatch).api_listen is None
    api = one(manifests, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["args"] == ["api"]
    settings = _settings_from(api, monkeypatch)
    assert settings.store == "elasticsearch"
    assert settings.es_url == ["https://es:9200"]


def test_obsolete_preview_switches_are_accepted_and_change_nothing(helm: str) -> None:
    """Values files written for older charts set them; they must still install, unchanged."""
    flags = ("--set", "preview.apiOnElasticsearch=true", "--set", "preview.multipleProxies=true")
    assert render(helm, *ES, *flags) == render(helm, *ES)
    assert render(helm, *ES, "--set", "preview.apiOnElasticsearch=false") == render(helm, *ES)


# -- one hash chain per proxy replica -------------------------------------------------------


def test_each_proxy_replica_names_its_chain_after_its_pod(
    rendered: tuple[str, list[Manifest]],
) -> None:
    name, manifests = rendered
    proxy = one(manifests, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(proxy)["STANZAGUARD_CHAIN_NAME"] == {
        "name": "STANZAGUARD_CHAIN_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }, name
    # Only the proxies spool; nothing else is handed a chain name.
    for where, _, container in containers(manifests):
        if not where.endswith("-proxy/proxy"):
            assert "STANZAGUARD_CHAIN_NAME" not in env_of(container), where


def test_several_proxies_on_elasticsearch_need_no_preview_flag(helm: str) -> None:
    manifests = render(helm, *ES, "--set", "proxy.replicas=4")
    assert one(manifests, "StatefulSet", "-proxy")["spec"]["replicas"] == 4


def test_a_single_proxy_can_keep_a_pinned_chain_name(
    helm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(helm, "--set", "proxy.chainName=spool")
    proxy = one(manifests, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(proxy)["STANZAGUARD_CHAIN_NAME"]["value"] == "spool"
    assert _settings_from(proxy, monkeypatch).chain_name == "spool"


# -- volumes, probes, security ---------------------------------------------------------------


def test_each_proxy_replica_gets_its_own_volume(distributed: list[Manifest]) -> None:
    statefulset = one(distributed, "StatefulSet", "-proxy")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3
    claims = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    assert set(claims) == {"data"}
    assert claims["data"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claims["data"]["spec"]["resources"]["requests"]["storage"] == "100Gi"
    pod = spec["template"]["spec"]
    assert "data" not in {v["name"] for v in pod["volumes"]}, "data must come from the template"
    container = pod["containers"][0]
    data_dir = env_of(container)["STANZAGUARD_DATA_DIR"]["value"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == data_dir
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    headless = one(distributed, "Service", "-proxy-headless")
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"


def _port_number(container: Manifest, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"probe port {port!r} is not a port of {container['name']}"
    return int(named[port])


API_HEALTH_PATHS = frozenset(getattr(route, "path", "") for route in health.routes)


def test_probes_ask_paths_the_service_serves(rendered: tuple[str, list[Manifest]]) -> None:
    """The proxy's probes ask its Prometheus endpoint (metrics_listen, which serves /metrics);
    the API's ask the app's own /healthz and /readyz, on the port the settings listen on."""
    assert {"/healthz", "/readyz"} <= API_HEALTH_PATHS
    name, manifests = rendered
    probed = 0
    for where, _, container in containers(manifests):
        env = env_of(container)
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            get = probe["httpGet"]
            port = _port_number(container, get["port"])
            if get["path"] == "/metrics":
                listen = env["STANZAGUARD_METRICS_LISTEN"]["value"]
            else:
                assert get["path"] in API_HEALTH_PATHS, f"{name} {where}: {get['path']}"
                listen = env["STANZAGUARD_API_LISTEN"]["value"]
            assert split_host_port(listen) == ("0.0.0.0", port), f"{name} {where} {kind}"
            probed += 1
    proxy = one(manifests, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(proxy)
    assert probed >= 3


def test_pods_run_locked_down(rendered: tuple[str, list[Manifest]]) -> None:
    name, manifests = rendered
    for workload, spec in pod_specs(manifests):
        assert spec["securityContext"]["runAsNonRoot"] is True, workload
        assert spec["securityContext"]["runAsUser"] != 0, workload
        assert spec["automountServiceAccountToken"] is False, workload
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), workload
    for where, _, container in containers(manifests):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, f"{name} {where}"
        assert context["allowPrivilegeEscalation"] is False, f"{name} {where}"
        assert context["capabilities"]["drop"] == ["ALL"], f"{name} {where}"
        assert "add" not in context["capabilities"], f"{name} {where}"
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), f"{name} {where}"
        assert "memory" in resources["limits"], f"{name} {where}"


def test_default_image_is_pinned_to_the_app_version(default: list[Manifest]) -> None:
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    images = {container["image"] for _, _, container in containers(default)}
    assert images == {f"stanzaguard:{version}"}
    assert not any(image.endswith(":latest") for image in images)


# -- components ------------------------------------------------------------------------------


def test_default_is_one_proxy_with_the_api_beside_it(default: list[Manifest]) -> None:
    assert [m["metadata"]["name"] for m in of_kind(default, "Deployment")] == []
    statefulset = one(default, "StatefulSet", "-proxy")
    assert statefulset["spec"]["replicas"] == 1
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["run"]
    api_port = _port_number(container, "api")
    service = one(default, "Service", "-api")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "proxy"
    assert service["spec"]["ports"][0]["targetPort"] == "api"
    assert env_of(container)["STANZAGUARD_API_LISTEN"]["value"] == f"0.0.0.0:{api_port}"
    pdb = one(default, "PodDisruptionBudget", "-proxy")
    assert pdb["spec"]["selector"]["matchLabels"] == statefulset["spec"]["selector"]["matchLabels"]


def test_distributed_has_workers_one_beat_and_an_api_behind_an_ingress(
    distributed: list[Manifest],
) -> None:
    beat = one(distributed, "Deployment", "-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert beat["spec"]["template"]["spec"]["containers"][0]["args"] == ["beat"]

    worker = one(distributed, "Deployment", "-worker")
    assert "replicas" not in worker["spec"], "the HPA owns the worker count"
    hpa = one(distributed, "HorizontalPodAutoscaler", "-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]

    api = one(distributed, "Deployment", "-api")
    assert api["spec"]["template"]["spec"]["containers"][0]["args"] == ["api"]
    service = one(distributed, "Service", "-api")
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    ingress = one(distributed, "Ingress", "-api")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "archive-corp-example-tls"

    proxy_service = one(distributed, "Service", "-proxy")
    assert {p["port"] for p in proxy_service["spec"]["ports"]} == {5222, 5223}
    assert proxy_service["spec"]["sessionAffinity"] == "ClientIP"
    policies = {m["metadata"]["name"] for m in of_kind(distributed, "NetworkPolicy")}
    assert policies == {"t-stanzaguard-proxy", "t-stanzaguard-celery", "t-stanzaguard-api"}


# -- refused and hostile values --------------------------------------------------------------

ES = ("--set", "store=elasticsearch", "--set", "elasticsearch.urls={https://es:9200}")
REDIS = ("--set", "redis.url=redis://redis:6379/0")

REFUSED: list[tuple[str, tuple[str, ...], str]] = [
    ("celery on sqlite", ("--set", "indexing=celery", *REDIS), "needs store=elasticsearch"),
    ("es without urls", ("--set", "store=elasticsearch"), "needs elasticsearch.urls"),
    ("celery without redis", (*ES, "--set", "indexing=celery"), "need Redis"),
    (
        "shared review without redis",
        ("--set", "settings.review_queue=redis"),
        "settings.review_queue=redis needs Redis",
    ),
    ("shared ledger without redis", ("--set", "settings.seen_ledger=redis"), "needs Redis"),
    (
        "redis password in values",
        ("--set", "counters=redis", "--set", "redis.url=redis://:pw@redis:6379/0"),
        "must not hold a password",
    ),
    ("key without secret name", ("--set", "secrets.keys.sessionSecret=s"), "existingSecret"),
    (
        "half an es user",
        ("--set", "secrets.existingSecret=x", "--set", "secrets.keys.esUsername=u"),
        "give both or neither",
    ),
    ("replicas on sqlite", ("--set", "proxy.replicas=2"), "needs store=elasticsearch"),
    (
        "one chain name for several replicas",
        (
            *ES,
            "--set",
            "api.enabled=false",
            "--set",
            "proxy.replicas=3",
            "--set",
            "proxy.chainName=spool",
        ),
        "every replica needs its own",
    ),
    ("bad chain name", ("--set", "proxy.chainName=Proxy 0"), "proxy.chainName: Does not match"),
    (
        "overlong chain name",
        ("--set", "proxy.chainName=" + "x" * 64),
        "proxy.chainName: Does not match",
    ),
    (
        "retention in each of several proxies",
        (
            *ES,
            "--set",
            "proxy.replicas=2",
            "--set",
            "retention.enabled=true",
            "--set-json",
            f"retention.content={json.dumps(RETENTION_TOML)}",
            "--set-json",
            f"policy.content={json.dumps(POLICY_TOML)}",
        ),
        "needs indexing=celery",
    ),
    ("retention without rules", (*ES, "--set", "retention.enabled=true"), "retention.content"),
    (
        "obsolete switch of the wrong type",
        ("--set-string", "preview.apiOnElasticsearch=yes"),
        "preview.apiOnElasticsearch: Invalid type",
    ),
    ("latest tag", ("--set", "image.tag=latest"), "image.tag=latest"),
    ("unknown setting", ("--set", "settings.max_sesions=5"), "settings.max_sesions: no such"),
    (
        "managed setting",
        ("--set", "settings.data_dir=/tmp/elsewhere"),
        "settings.data_dir: the chart sets",
    ),
    ("secret through settings", ("--set", "settings.redis_url=redis://x:1/0"), "chart sets"),
    ("unknown value", ("--set", "proxy.replica=3"), "Additional property replica is not allowed"),
    ("replicas as text", ("--set-string", "proxy.replicas=3"), "proxy.replicas: Invalid type"),
    ("port out of range", ("--set", "proxy.ports.c2s=70000"), "proxy.ports.c2s: Must be less than"),
    ("unknown store", ("--set", "store=mongodb"), "store must be one of"),
    (
        "url with credentials",
        (*ES[:2], "--set", "elasticsearch.urls={https://u:p@es:9200}"),
        "elasticsearch.urls.0: Does not match",
    ),
    (
        "domain with a comma",
        ("--set-json", 'xmpp.domains=["a.example,b.example"]'),
        "xmpp.domains.0: Does not match",
    ),
    ("upstream without port", ("--set", "xmpp.upstream=prosody"), "xmpp.upstream: Does not match"),
    ("setting name injection", ("--set-json", 'settings={"A: b":"1"}'), "settings: Does not match"),
    (
        "huge setting value",
        ("--set", "settings.model=" + "m" * 70000),
        "settings.model: String length",
    ),
    ("bad digest", ("--set", "image.digest=md5:abc"), "image.digest: Does not match"),
    ("component without jid", ("--set", "component.enabled=true"), "needs component.jid"),
    (
        "component without its secret",
        ("--set", "component.enabled=true", "--set", "component.jid=archive.example.org"),
        "secrets.keys.componentSecret",
    ),
    (
        "component jid with a user",
        ("--set", "component.jid=archive@example.org"),
        "component.jid: Does not match",
    ),
    (
        "component server without port",
        ("--set", "component.server=xmpp-server"),
        "component.server: Does not match",
    ),
    (
        "component admin injection",
        ("--set-json", 'component.admins=["a@example.org,b@example.org"]'),
        "component.admins.0: Does not match",
    ),
    (
        "publisher component without component",
        ("--set", "rtblPublishing.publisher=component"),
        "needs component.enabled=true",
    ),
    (
        "pubsub without learning",
        ("--set", "rtblPublishing.pubsub.service=pubsub.example.org"),
        "needs rtblPublishing.enabled=true",
    ),
    (
        "pubsub without password",
        (
            "--set",
            "rtblPublishing.enabled=true",
            "--set",
            "rtblPublishing.pubsub.service=pubsub.example.org",
            "--set",
            "rtblPublishing.pubsub.jid=rtbl@example.org",
        ),
        "secrets.keys.rtblPublishPassword",
    ),
    (
        "pubsub in plain text in production",
        (
            "--set",
            "rtblPublishing.enabled=true",
            "--set",
            "rtblPublishing.pubsub.service=pubsub.example.org",
            "--set",
            "rtblPublishing.pubsub.jid=rtbl@example.org",
            "--set",
            "secrets.existingSecret=s",
            "--set",
            "secrets.keys.rtblPublishPassword=p",
            "--set",
            "rtblPublishing.pubsub.tls=plain",
        ),
        "tls=plain is refused",
    ),
    ("unknown review mode", ("--set", "rtblPublishing.review=never"), "review must be one of"),
    ("negative ibb bytes", ("--set", "ibbArchiveMaxBytes=-1"), "ibbArchiveMaxBytes: Must be"),
    (
        "managed component setting",
        ("--set", "settings.component_jid=x.example.org"),
        "settings.component_jid: the chart sets",
    ),
    (
        "managed publishing setting",
        ("--set", "settings.rtbl_publish_service=pubsub.example.org"),
        "settings.rtbl_publish_service: the chart sets",
    ),
]


@pytest.mark.parametrize(("args", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_values_say_why(helm: str, args: tuple[str, ...], message: str) -> None:
    assert message in render_error(helm, *args)


def test_hostile_text_stays_a_value(helm: str) -> None:
    """Text that looks like YAML or a second document is quoted into one value, not parsed."""
    hostile = 'x"\n---\nkind: Secret\nmetadata: {name: pwned}\n'
    manifests = render(
        helm,
        "--set-json",
        "settings=" + json.dumps({"model": hostile}),
        "--set-json",
        "policy=" + json.dumps({"enabled": True, "content": hostile}),
    )
    assert of_kind(manifests, "Secret") == []
    container = one(manifests, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["STANZAGUARD_MODEL"]["value"] == hostile
    config = one(manifests, "ConfigMap", "-config")
    assert config["data"]["policy.toml"].rstrip("\n") == hostile.rstrip("\n")


# -- NOTES.txt -------------------------------------------------------------------------------


def render_notes(helm: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it (helm template skips it; installing needs a
    cluster): a copy of the chart renders it through `tpl` into a ConfigMap-like document."""
    chart = tmp_path / "stanzaguard"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-copy.txt")
    (chart / "templates" / "notes-probe.yaml").write_text(
        'notes: |\n{{ tpl (.Files.Get "notes-copy.txt") . | indent 2 }}\n'
    )
    done = run_helm(
        helm, "template", "t", chart, "--show-only", "templates/notes-probe.yaml", *args
    )
    assert done.returncode == 0, done.stderr
    notes: str = yaml.safe_load(done.stdout)["notes"]
    return notes


def test_notes_state_the_limits(helm: str, tmp_path: Path) -> None:
    notes = render_notes(helm, tmp_path, "-f", str(DISTRIBUTED))
    assert "Not distributed-safe yet" in notes
    assert "Each proxy replica writes its own hash chain" in notes
    assert "t-stanzaguard-proxy-0, -1, ..." in notes
    assert "XEP-0198" in notes
    assert "multipleProxies" not in notes
    assert "preview" not in notes
    assert "exec deploy/t-stanzaguard-api -c api -- stanzaguard token create" in notes
    assert "The API Deployment's data directory is an emptyDir" in notes


def test_notes_of_the_default_install(helm: str, tmp_path: Path) -> None:
    notes = render_notes(helm, tmp_path)
    assert "placeholder example.org" in notes
    assert "stanzaguard token create --role admin" in notes
    assert "web UI sign-in is off" in notes
    assert "preview" not in notes
    assert "exec deploy/" not in notes
    assert "emptyDir" not in notes


def test_web_listeners_are_served_and_reachable(helm: str) -> None:
    """Enabled web listeners: the setting, a named container port, both Services and the
    network policy agree on the port; off by default (no open port, the setting 'off')."""
    manifests = render(helm, *VALUE_SETS["web"])
    proxy = one(manifests, "StatefulSet", "-proxy")
    container = proxy["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["STANZAGUARD_LISTEN_WEBSOCKET"]["value"] == "0.0.0.0:5443"
    assert env["STANZAGUARD_LISTEN_BOSH"]["value"] == "0.0.0.0:5281"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (ports["websocket"], ports["bosh"]) == (5443, 5281)
    for service in of_kind(manifests, "Service"):
        if service["metadata"]["name"].endswith(("-proxy", "-proxy-headless")):
            served = {port["name"]: port["port"] for port in service["spec"]["ports"]}
            assert (served["websocket"], served["bosh"]) == (5443, 5281)
    policy = one(manifests, "NetworkPolicy", "-proxy")
    open_ports = {p["port"] for p in policy["spec"]["ingress"][0]["ports"]}
    assert {"websocket", "bosh"} <= open_ports

    default_proxy = one(render(helm), "StatefulSet", "-proxy")
    default_container = default_proxy["spec"]["template"]["spec"]["containers"][0]
    assert env_of(default_container)["STANZAGUARD_LISTEN_WEBSOCKET"]["value"] == "off"
    assert "websocket" not in {port["name"] for port in default_container["ports"]}


def test_component_mode_is_one_deployment_that_publishes_the_list(
    helm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """component.enabled: one `stanzaguard component` (Recreate, its own kept claim), its
    secret from the Secret; with publisher=component the pubsub settings go to it alone."""
    manifests = render(helm, *VALUE_SETS["component"])
    deployment = one(manifests, "Deployment", "-component")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["component"]
    env = env_of(container)
    assert env["STANZAGUARD_COMPONENT_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "stanzaguard-secrets",
        "key": "component_secret",
    }
    claim = one(manifests, "PersistentVolumeClaim", "-component")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    settings = _settings_from(container, monkeypatch)
    assert settings.component_jid == "archive.example.org"
    assert settings.component_admins == ["officer@example.org"]
    assert settings.component_secret is not None
    assert (settings.blocklist_learning, settings.blocklist_http) == (True, "public")
    assert settings.rtbl_publish_service == "pubsub.example.org"
    assert settings.rtbl_publish_jid == "rtbl-publisher@example.org"
    assert settings.ibb_archive_max_bytes == 0
    proxy = one(manifests, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    proxy_settings = _settings_from(proxy, monkeypatch)
    assert proxy_settings.rtbl_publish_service is None, "one publisher only"
    assert proxy_settings.blocklist_learning is True
    assert proxy_settings.ibb_archive_max_bytes == 0
    policy = one(manifests, "NetworkPolicy", "-component")
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == deployment["spec"]["selector"]["matchLabels"]
    )


def test_component_mode_and_publishing_are_off_by_default(
    default: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert [m for m in default if m["metadata"]["name"].endswith("-component")] == []
    proxy = one(default, "StatefulSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    settings = _settings_from(proxy, monkeypatch)
    assert settings.blocklist_learning is False
    assert settings.rtbl_publish_service is None
    assert settings.ibb_archive_max_bytes == 10 * 1024 * 1024
