"""The Helm chart without a cluster: helm lint, helm template, and the values schema."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

import posttrain

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/posttrain"
RELEASE_NAMESPACE = "posttrain-system"

FULLNAME = "posttrain"  # release "posttrain" contains the chart's name
OPERATOR_SA = f"{FULLNAME}-operator"
TRAINER_SA = "posttrain-trainer"  # the default of spec.serviceAccountName


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def chart_meta() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def operator_container(docs: list[dict]) -> dict:
    (deployment,) = find(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def args_of(docs: list[dict]) -> list[str]:
    return operator_container(docs)["args"]


# ---- chart metadata ----------------------------------------------------------------------


def test_helm_lint_strict(chart) -> None:
    # lint renders without a cluster, so the JobSet check is off here (tested below).
    proc = subprocess.run(
        [chart.helm, "lint", "--strict", str(CHART), "--set", "jobset.check=false"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_helm_templates_for_the_pinned_kubernetes(chart, tmp_path) -> None:
    # hack/tools.sh links helm's default Kubernetes version (v1.20 when unset, which the
    # chart's kubeVersion refuses) from helm's client-go, as upstream's release build does.
    probe = tmp_path / "probe"
    (probe / "templates").mkdir(parents=True)
    (probe / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (probe / "templates/cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        "data: {kube: '{{ .Capabilities.KubeVersion.Version }}'}\n"
    )
    proc = subprocess.run(
        [chart.helm, "template", str(probe)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    reported = yaml.safe_load(proc.stdout)["data"]["kube"]
    pinned_minor = chart.kube_version.split(".")[:2]  # v1.34.4 -> v1, 34
    assert reported.split(".")[:2] == pinned_minor, (reported, chart.kube_version)


def test_chart_crds_equal_the_generated_ones() -> None:
    top = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    ours = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert ours == top, "charts/posttrain/crds/ must hold exactly the files of crds/"
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/posttrain/crds/{name} differs from crds/{name}: "
            f"cp crds/{name} charts/posttrain/crds/"
        )


def test_app_version_is_the_package_version() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert chart_meta()["appVersion"] == pyproject["project"]["version"] == posttrain.__version__


def test_chart_names_the_jobset_it_needs(chart) -> None:
    meta = chart_meta()
    pinned = chart.pinned_version("jobset", "sigs.k8s.io/jobset")
    # The version the local cluster runs (hack/tools/jobset) is the one the chart asks for.
    assert meta["annotations"]["posttrain.dev/jobset-min-version"] == pinned
    assert pinned in meta["description"]
    assert meta["annotations"]["posttrain.dev/jobset-api-version"] + "/JobSet" == chart.jobset_api


def test_install_is_refused_without_jobset(chart) -> None:
    proc = chart.template(jobset=False)
    assert proc.returncode != 0
    assert (
        "needs JobSet" in proc.stderr
        and chart_meta()["annotations"]["posttrain.dev/jobset-min-version"] in proc.stderr
    )
    # ... unless the check is switched off (helm template for GitOps tools).
    assert find(chart.render("--set", "jobset.check=false", jobset=False), "Deployment")


# ---- what a default install creates -----------------------------------------------------


def test_default_install_objects(chart) -> None:
    docs = chart.render()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("CustomResourceDefinition", "posttrainjobs.posttrain.dev"),
            ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
            ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
            ("ServiceAccount", OPERATOR_SA),
            ("ServiceAccount", TRAINER_SA),
            ("ClusterRole", f"{FULLNAME}-operator"),
            ("ClusterRole", f"{FULLNAME}-operator-cluster"),
            ("ClusterRole", f"{FULLNAME}-trainer"),
            ("ClusterRoleBinding", f"{FULLNAME}-operator"),
            ("ClusterRoleBinding", f"{FULLNAME}-operator-cluster"),
            ("RoleBinding", f"{FULLNAME}-trainer"),
            ("Deployment", f"{FULLNAME}-operator"),
        ]
    )
    crd = find(docs, "CustomResourceDefinition", "posttrainjobs.posttrain.dev")[0]
    generated = yaml.safe_load((REPO / "crds/posttrain.dev_posttrainjobs.yaml").read_text())
    assert crd == generated


def test_deployment_one_replica_recreate_probe_resources(chart) -> None:
    docs = chart.render()
    (deployment,) = find(docs, "Deployment")
    assert deployment["metadata"]["namespace"] == RELEASE_NAMESPACE
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == OPERATOR_SA
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    container = operator_container(docs)
    assert container["image"] == f"posttrain/operator:{chart_meta()['appVersion']}"
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080}
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "192Mi"}


def test_restricted_security_context(chart) -> None:
    docs = chart.render()
    (deployment,) = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = operator_container(docs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not sc.get("privileged")
    # Writable: only an emptyDir at /tmp; no hostPath or other volume.
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert operator_container(docs)["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]


# ---- RBAC --------------------------------------------------------------------------------


def rules_of(docs: list[dict], name: str) -> list[dict]:
    (role,) = find(docs, "ClusterRole", name)
    return role["rules"]


@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]])
def test_rbac_has_no_wildcards(chart, watch: list[str]) -> None:
    docs = chart.render(*[f"--set=watchNamespaces[{i}]={ns}" for i, ns in enumerate(watch)])
    roles = find(docs, "ClusterRole") + find(docs, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in "".join(rule.get(key, [])), (role["metadata"]["name"], rule)


def test_operator_rbac_cluster_wide_by_default(chart) -> None:
    docs = chart.render()
    (binding,) = find(docs, "ClusterRoleBinding", f"{FULLNAME}-operator")
    assert binding["roleRef"]["name"] == f"{FULLNAME}-operator"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": RELEASE_NAMESPACE}
    ]
    assert not [b for b in find(docs, "RoleBinding") if "operator" in b["metadata"]["name"]]
    assert not [a for a in args_of(docs) if a.startswith("--namespace")]  # all namespaces
    # Trainers: the release namespace only, until more are listed.
    (trainer_binding,) = find(docs, "RoleBinding", f"{FULLNAME}-trainer")
    assert trainer_binding["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert trainer_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": TRAINER_SA, "namespace": RELEASE_NAMESPACE}
    ]


def test_operator_rbac_per_watched_namespace(chart) -> None:
    docs = chart.render("--set", "watchNamespaces={team-a,team-b}")
    assert not find(docs, "ClusterRoleBinding", f"{FULLNAME}-operator")
    bindings = find(docs, "RoleBinding", f"{FULLNAME}-operator")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{FULLNAME}-operator",
        }
        assert b["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    args = args_of(docs)
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    # The trainer follows the watched namespaces.
    trainer_sas = find(docs, "ServiceAccount", TRAINER_SA)
    assert sorted(sa["metadata"]["namespace"] for sa in trainer_sas) == ["team-a", "team-b"]
    trainer_bindings = find(docs, "RoleBinding", f"{FULLNAME}-trainer")
    assert sorted(b["metadata"]["namespace"] for b in trainer_bindings) == ["team-a", "team-b"]
    # The cluster-scoped part (kopf's discovery) stays one ClusterRoleBinding.
    assert find(docs, "ClusterRoleBinding", f"{FULLNAME}-operator-cluster")


def triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every permission a list of rules grants."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def documented_role(kind: str) -> set[tuple[str, str, str]]:
    """The rules of the (Cluster)Role shown in docs/operator.md, the operator's own list."""
    text = (REPO / "docs/operator.md").read_text()
    blocks = text.split("```yaml")[1:]
    for block in blocks:
        for doc in yaml.safe_load_all(block.split("```")[0]):
            if doc and doc.get("kind") == kind and "rules" in doc:
                return triples(doc["rules"])
    raise AssertionError(f"docs/operator.md shows no {kind} with rules")


@pytest.mark.parametrize("watch", [[], ["team-a"]])
def test_operator_rules_are_the_documented_ones(chart, watch: list[str]) -> None:
    docs = chart.render(*[f"--set=watchNamespaces[{i}]={ns}" for i, ns in enumerate(watch)])
    granted = triples(rules_of(docs, f"{FULLNAME}-operator")) | triples(
        rules_of(docs, f"{FULLNAME}-operator-cluster")
    )
    documented = documented_role("ClusterRole")
    if not watch:  # kopf reads namespaces only to follow named ones
        documented -= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    assert granted == documented, (
        f"granted, not documented: {sorted(granted - documented)}; "
        f"documented, not granted: {sorted(documented - granted)}"
    )
    # Namespaced permissions never sit in the cluster-wide role, and vice versa.
    cluster = triples(rules_of(docs, f"{FULLNAME}-operator-cluster"))
    assert {r for _, r, _ in cluster} <= {"customresourcedefinitions", "namespaces"}


def test_trainer_may_only_report_status(chart) -> None:
    rules = rules_of(chart.render(), f"{FULLNAME}-trainer")
    assert triples(rules) == documented_role("Role")
    assert triples(rules) == {
        ("posttrain.dev", "posttrainjobs/status", "get"),
        ("posttrain.dev", "posttrainjobs/status", "patch"),
    }


def test_rbac_create_false_creates_none(chart) -> None:
    docs = chart.render("--set", "rbac.create=false")
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not find(docs, kind), kind
    assert find(docs, "Deployment")


# ---- values ------------------------------------------------------------------------------


def test_values_are_respected(chart) -> None:
    docs = chart.render(
        "--set",
        "image.repository=registry.example/pt/operator,image.tag=dev1,image.pullPolicy=Always",
        "--set",
        "logLevel=debug,logFormat=plain,healthPort=9090,replicaCount=0",
        "--set",
        "trainer.image.repository=registry.example/pt/trainer",
        "--set-string",
        "trainer.image.tag=7",
        "--set",
        "trainer.image.overrides.gpu=registry.example/custom-gpu@sha256:abc",
        "--set",
        "resources.limits.memory=1Gi,nodeSelector.pool=system",
        "--set",
        "trainer.serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=t@p.iam.gserviceaccount.com",
        "--set",
        "trainer.namespaces={ml}",
    )
    container = operator_container(docs)
    assert container["image"] == "registry.example/pt/operator:dev1"
    assert container["imagePullPolicy"] == "Always"
    args = container["args"]
    assert {"--verbose", "--log-format=plain", "--liveness=http://0.0.0.0:9090/healthz"} <= set(
        args
    )
    assert {
        "--trainer-image-tpu=registry.example/pt/trainer:7-tpu",
        "--trainer-image-gpu=registry.example/custom-gpu@sha256:abc",
        "--trainer-image-cpu=registry.example/pt/trainer:7-cpu",
    } <= set(args)
    assert container["ports"][0]["containerPort"] == 9090
    assert container["resources"]["limits"]["memory"] == "1Gi"
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 0
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "system"}
    (trainer_sa,) = find(docs, "ServiceAccount", TRAINER_SA)
    assert trainer_sa["metadata"]["namespace"] == "ml"
    assert trainer_sa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "t@p.iam.gserviceaccount.com"
    }


def test_default_trainer_images_are_the_operators_own(chart) -> None:
    """The chart passes the same defaults the operator has built in (one naming scheme)."""
    from posttrain.operator.render import ImageDefaults

    args = args_of(chart.render())
    for family in ("tpu", "gpu", "cpu"):
        assert f"--trainer-image-{family}={getattr(ImageDefaults(), family)}" in args


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("replicaCount=banana", "replicaCount"),
        ("replicaCount=9", "replicaCount"),
        ("logLevel=loud", "logLevel"),
        ("logFormat=xml", "logFormat"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("watchNamespaces={Team_A}", "watchNamespaces"),
        ("healthPort=70000", "healthPort"),
        ("trainer.serviceAccount.create=maybe", "create"),
        ("image.tag=7", "tag"),  # a number: tags are strings (--set-string)
        ("replicas=1", "replicas"),  # a misspelt key is refused, not ignored
    ],
)
def test_bad_values_are_refused(chart, setting: str, field: str) -> None:
    proc = chart.template("--set", setting)
    assert proc.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr


def test_every_value_is_described_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, props: dict, path: str) -> None:
        for key, value in node.items():
            assert key in props, f"{path}{key} is in values.yaml but not in values.schema.json"
            sub = props[key]
            assert sub.get("description") or isinstance(value, dict), f"{path}{key}: no description"
            if isinstance(value, dict) and "properties" in sub:
                walk(value, sub["properties"], f"{path}{key}.")

    walk(values, schema["properties"], "")


def test_values_table_in_docs_lists_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = (REPO / "docs/install.md").read_text()

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict) and value and key not in {"resources"}:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    missing = [leaf for leaf in leaves(values) if f"`{leaf}`" not in docs]
    assert not missing, f"docs/install.md's values table lacks: {missing}"


@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]])
def test_two_replicas_peer(chart, watch: list[str]) -> None:
    """replicaCount 2: kopf peering on (--peering, POD_ID), its object and RBAC, RollingUpdate."""
    args = ["--set", "replicaCount=2"]
    if watch:
        args += ["--set", "watchNamespaces={" + ",".join(watch) + "}"]
    docs = chart.render(*args)
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    container = operator_container(docs)
    assert f"--peering={FULLNAME}" in container["args"]
    assert [e["name"] for e in container["env"]] == ["POD_ID"]
    rules = {
        d["metadata"]["name"]: [
            (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in d["rules"]
        ]
        for d in find(docs, "ClusterRole")
    }
    if watch:
        peerings = find(docs, "KopfPeering")
        assert sorted(p["metadata"]["namespace"] for p in peerings) == watch
        assert {p["metadata"]["name"] for p in peerings} == {FULLNAME}
        want = (("kopf.dev",), ("kopfpeerings",), ("list", "watch", "patch"))
        assert want in rules[f"{FULLNAME}-operator"]
    else:
        (peering,) = find(docs, "ClusterKopfPeering")
        assert peering["metadata"]["name"] == FULLNAME
        want = (("kopf.dev",), ("clusterkopfpeerings",), ("list", "watch", "patch"))
        assert want in rules[f"{FULLNAME}-operator-cluster"]
    # one replica: no peering at all
    single = chart.render()
    assert not find(single, "ClusterKopfPeering") and "env" not in operator_container(single)
