"""The Kubernetes manifests of deploy/k8s (docs/kubernetes.md): they parse, each RayJob runs a job module that
exists on a config file of the ConfigMap, those files load as the jobs load them, the Secret holds every variable
they need, every Ray container gets the config and the Secret, GPU groups ask Kubernetes for their GPUs, and the
CronJob fallback may create what it creates. Each check is a function returning its problems, so that a test can
also feed it a broken copy and see it complain."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from retrieval_core.config import ConfigError, load_config
from retrieval_core.config.loading import ENV_REFERENCE
from retrieval_core.config.rules import check_cluster_paths

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
NAMESPACE = "retrieval"
CONFIG_MAP = "retrieval-config"
CONFIG_DIR = "/config"
SECRET = "retrieval-secrets"
FALLBACK_MAP = "retrieval-nightly-rayjob"
AWS_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
ENTRYPOINT = re.compile(r"python -m jobs\.(?P<module>[a-z_]+) --config /config/(?P<file>[A-Za-z0-9_.-]+)")
CREDENTIAL_KEYS = {"key", "secret", "token", "password", "api_key", "aws_access_key_id", "aws_secret_access_key"}


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = _documents()


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in DOCS if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name!r} under deploy/k8s, found {len(found)}"
    return found[0]


def _config_files() -> dict[str, str]:
    return _one("ConfigMap", CONFIG_MAP)["data"]


def _rayjobs() -> list[tuple[str, dict]]:
    """(where, RayJob spec) for every RayJob: the manifests', each RayCronJob's jobTemplate, and the RayJobs kept as
    text in other ConfigMaps (the CronJob fallback's template)."""
    jobs = []
    for file, doc in DOCS:
        name = doc.get("metadata", {}).get("name")
        if doc.get("kind") == "RayJob":
            jobs.append((f"{file}:RayJob/{name}", doc["spec"]))
        elif doc.get("kind") == "RayCronJob":
            jobs.append((f"{file}:RayCronJob/{name}.jobTemplate", doc["spec"]["jobTemplate"]))
        elif doc.get("kind") == "ConfigMap" and name != CONFIG_MAP:
            for key, text in doc.get("data", {}).items():
                for inner in yaml.safe_load_all(text):
                    if isinstance(inner, dict) and inner.get("kind") == "RayJob":
                        jobs.append((f"{file}:ConfigMap/{name}[{key}]", inner["spec"]))
    return jobs


RAYJOBS = _rayjobs()


# ------------------------------------------------------------------------------------------------------ the checks


def entrypoint_problems(spec: dict, config_files: dict[str, str]) -> list[str]:
    entry = " ".join(str(spec.get("entrypoint", "")).split())
    match = ENTRYPOINT.fullmatch(entry)
    if not match:
        return [f"entrypoint {entry!r} is not 'python -m jobs.<module> --config /config/<file>'"]
    problems = []
    module = REPO / "jobs" / f"{match['module']}.py"
    if not module.exists():
        problems.append(f"entrypoint {entry!r}: jobs/{match['module']}.py does not exist")
    else:
        tree = ast.parse(module.read_text())
        if not any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            problems.append(f"entrypoint {entry!r}: jobs/{match['module']}.py defines no main()")
    if match["file"] not in config_files:
        problems.append(f"entrypoint {entry!r}: {match['file']} is not a key of the ConfigMap {CONFIG_MAP}")
    return problems


def _env_references(text: str) -> list[tuple[str, bool]]:
    """(variable, has a default) for each ``${VAR}`` of a config file."""
    return [(m.group(1), m.group(2) == ":-") for m in ENV_REFERENCE.finditer(text)]


def config_problems(name: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The file loaded as the jobs load it (keys, types, rules), with every ``${VAR}`` it uses set; its paths fit a
    cluster; runtime.address empty (RAY_ADDRESS decides); no credential written into it."""
    for var, _ in _env_references(text):
        monkeypatch.setenv(var, f"value-of-{var}")
    path = tmp_path / name
    path.write_text(text)
    try:
        cfg = load_config(str(path))
        check_cluster_paths(cfg, "http://retrieval-head-svc:8265")
    except ConfigError as exc:
        return [f"{name}: {exc}"]
    problems = []
    if cfg.runtime.address:
        problems.append(f"{name}: runtime.address = {cfg.runtime.address!r}; leave it empty (RAY_ADDRESS is set)")
    problems += [f"{name}: {p}" for p in _written_credentials(yaml.safe_load(text))]
    return problems


def _written_credentials(node: Any, where: str = "") -> list[str]:
    """Credential-looking keys whose value is not a ``${VAR}`` reference."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if str(key).lower() in CREDENTIAL_KEYS and not (
                isinstance(value, str) and ENV_REFERENCE.fullmatch(value.strip())
            ):
                found.append(f"{here} holds a credential; take it from the environment (the Secret) instead")
            found += _written_credentials(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _written_credentials(value, f"{where}[{i}]")
    return found


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of the head, each worker group and the submitter template when there is one."""
    cluster = spec["rayClusterSpec"]
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    if spec.get("submitterPodTemplate"):
        pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
    return pods


def pod_problems(spec: dict) -> list[str]:
    """Every container of every Ray pod (and of the submitter, if the RayJob gives its template) mounts the whole
    ConfigMap at /config and takes its environment from the Secret."""
    problems = []
    for group, pod in _pod_specs(spec):
        config_volumes = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("configMap", {}).get("name") == CONFIG_MAP and not v["configMap"].get("items")
        }
        for container in pod["containers"]:
            where = f"{group}, container {container.get('name')}"
            mounts = [
                m
                for m in container.get("volumeMounts", [])
                if m.get("mountPath", "").rstrip("/") == CONFIG_DIR and m["name"] in config_volumes
            ]
            if not mounts or any(m.get("subPath") for m in mounts):
                problems.append(f"{where}: no mount of the whole ConfigMap {CONFIG_MAP} at {CONFIG_DIR}")
            secrets = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
            if SECRET not in secrets:
                problems.append(f"{where}: no envFrom secretRef {SECRET}")
    return problems


def _gpus(container: dict) -> float:
    return float(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def cluster_problems(spec: dict, config_files: dict[str, str]) -> list[str]:
    """The RayJob's own settings, rayStartParams as strings (KubeRay's type), and GPUs: a group that tells Ray it
    has GPUs asks Kubernetes for them, and a job whose config puts actors on GPUs has such a group."""
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true: the Ray cluster would outlive the job")
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        if not isinstance(spec.get(key), int) or spec[key] <= 0:
            problems.append(f"{key} = {spec.get(key)!r}: expected a positive integer")
    cluster = spec["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    gpu_groups = []
    for name, group in groups:
        params = group.get("rayStartParams", {})
        for key, value in params.items():
            if not isinstance(value, str):
                problems.append(f"group {name}: rayStartParams {key} = {value!r} must be a string")
        containers = group["template"]["spec"]["containers"]
        told = float(params.get("num-gpus", 0))
        asked = _gpus(containers[0])
        if (told or "gpu" in name.lower()) and (asked <= 0 or asked != told):
            problems.append(
                f"group {name}: rayStartParams num-gpus = {params.get('num-gpus')!r} but the Ray container asks "
                f"for nvidia.com/gpu {asked:g} (resources.limits): both must name the same GPUs"
            )
        if asked > 0:
            gpu_groups.append(asked)
    match = ENTRYPOINT.fullmatch(" ".join(str(spec.get("entrypoint", "")).split()))
    if match and match["module"] in ("pipeline", "refresh", "encode", "train") and match["file"] in config_files:
        wanted = yaml.safe_load(config_files[match["file"]]).get("runtime", {}).get("gpus_per_worker", 0)
        if wanted and not any(g >= wanted for g in gpu_groups):
            problems.append(
                f"{match['file']} sets runtime.gpus_per_worker = {wanted} but no worker group has that many GPUs"
            )
    return problems


def _allows(role: dict, verb: str, group: str, resource: str) -> bool:
    return any(
        group in rule.get("apiGroups", []) and resource in rule.get("resources", []) and verb in rule.get("verbs", [])
        for rule in role.get("rules", [])
    )


def fallback_problems(cronjob: dict, docs: list[dict]) -> list[str]:
    """The CronJob fallback: Forbid, a pod that runs kubectl create on the stored RayJob, as a ServiceAccount a
    RoleBinding gives a Role that may create rayjobs.ray.io."""
    problems = []
    spec = cronjob["spec"]
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"concurrencyPolicy = {spec.get('concurrencyPolicy')!r}: expected Forbid")
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = " ".join(container.get("command", []) + container.get("args", []))
    match = re.fullmatch(r"kubectl create -f (/\S+)/([^/\s]+)", command)
    if not match:
        return problems + [f"the pod runs {command!r}, not 'kubectl create -f <file>'"]
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v.get("configMap", {}).get("name") for v in pod.get("volumes", [])}
    maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    stored = maps.get(volumes.get(mounts.get(match[1], ""), ""), {}).get("data", {}).get(match[2])
    if stored is None:
        problems.append(f"{match[1]}/{match[2]} is not a key of a ConfigMap mounted at {match[1]}")
    else:
        rayjob = yaml.safe_load(stored)
        if rayjob.get("kind") != "RayJob" or "generateName" not in rayjob.get("metadata", {}):
            problems.append(f"{match[2]} is not a RayJob with metadata.generateName (one new name a night)")
        if "name" in rayjob.get("metadata", {}):
            problems.append(f"{match[2]} has metadata.name: the second night's kubectl create would fail")
    account = pod.get("serviceAccountName")
    roles = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Role"}
    bound = [
        roles.get(b["roleRef"]["name"], {})
        for b in docs
        if b.get("kind") == "RoleBinding"
        and any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in b.get("subjects", []))
    ]
    if not any(_allows(role, "create", "ray.io", "rayjobs") for role in bound):
        problems.append(f"the ServiceAccount {account!r} is bound to no Role that may create rayjobs.ray.io")
    return problems


# ------------------------------------------------------------------------------------------------------ the tests


def test_every_manifest_parses_and_names_itself():
    files = sorted(p.name for p in K8S.glob("*.y*ml"))
    assert {"configmap.yaml", "secret.example.yaml", "rayjob-pipeline.yaml", "rbac.yaml"} <= set(files)
    assert {"raycronjob-nightly.yaml", "cronjob-nightly.yaml", "rayjob-sync.yaml"} <= set(files)
    assert files == sorted({file for file, _ in DOCS}), "a manifest file holds no document"
    for file, doc in DOCS:
        assert isinstance(doc, dict), f"{file}: a document that is not a mapping"
        for key in ("apiVersion", "kind"):
            assert doc.get(key), f"{file}: a document without {key}"
        assert doc.get("metadata", {}).get("name"), f"{file}: {doc['kind']} without metadata.name"
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{file}: {doc['kind']} not in namespace {NAMESPACE}"
    assert {d["kind"] for _, d in DOCS} >= {"ConfigMap", "Secret", "RayJob", "RayCronJob", "CronJob", "Role"}
    assert all(d["apiVersion"] == "ray.io/v1" for _, d in DOCS if d["kind"] in ("RayJob", "RayCronJob"))


def test_every_rayjob_is_checked():
    assert len(RAYJOBS) == 4, [where for where, _ in RAYJOBS]  # pipeline, sync, the RayCronJob's, the fallback's
    entrypoints = {" ".join(spec["entrypoint"].split()) for _, spec in RAYJOBS}
    assert entrypoints == {
        "python -m jobs.pipeline --config /config/pipeline.yaml",
        "python -m jobs.refresh --config /config/nightly.yaml",
        "python -m jobs.sync --config /config/nightly.yaml",
    }


@pytest.mark.parametrize("where, spec", RAYJOBS, ids=[where for where, _ in RAYJOBS])
def test_the_entrypoint_runs_a_job_module_on_a_file_of_the_configmap(where, spec):
    assert entrypoint_problems(spec, _config_files()) == []


@pytest.mark.parametrize("where, spec", RAYJOBS, ids=[where for where, _ in RAYJOBS])
def test_every_ray_container_gets_the_config_and_the_secret(where, spec):
    assert pod_problems(spec) == []


@pytest.mark.parametrize("where, spec", RAYJOBS, ids=[where for where, _ in RAYJOBS])
def test_the_cluster_settings_and_its_gpus(where, spec):
    assert cluster_problems(spec, _config_files()) == []


def test_the_pipeline_has_a_gpu_worker_group():
    spec = _one("RayJob", "retrieval-pipeline")["spec"]
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in groups if any(_gpus(c) >= 1 for c in g["template"]["spec"]["containers"])]
    cpu = [g for g in groups if not any(_gpus(c) for c in g["template"]["spec"]["containers"])]
    assert gpu and cpu, "the pipeline needs a CPU worker group and a GPU worker group"
    assert all(g["rayStartParams"].get("num-gpus") == "1" for g in gpu)


@pytest.mark.parametrize("name", sorted(_config_files()))
def test_every_config_file_loads_as_the_jobs_load_it(name, tmp_path, monkeypatch):
    assert config_problems(name, _config_files()[name], tmp_path, monkeypatch) == []


def test_the_secret_holds_every_variable_the_configs_need():
    secret = _one("Secret", SECRET)
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    needed = set(AWS_KEYS)
    for text in _config_files().values():
        data = yaml.safe_load(text)
        needed |= {s["api_key_env"] for s in data.get("serve", {}).get("sinks", []) if s.get("api_key_env")}
        model = data.get("model", {})
        if model.get("provider", "local") != "local":
            needed.add(
                model.get("api_key_env") or {"openai": "OPENAI_API_KEY", "cohere": "CO_API_KEY"}[model["provider"]]
            )
        needed |= {var for var, has_default in _env_references(text) if not has_default}
    assert "QDRANT_API_KEY" in needed, "nightly.yaml's qdrant sink names no api_key_env"
    assert needed <= set(values), f"the Secret {SECRET} lacks {sorted(needed - set(values))}"
    assert all(str(v).startswith("REPLACE-ME") for v in values.values()), "the example Secret holds a real value?"


def test_the_cron_fallback_may_create_its_rayjob():
    docs = [d for _, d in DOCS]
    assert fallback_problems(_one("CronJob", "retrieval-nightly"), docs) == []
    role = _one("Role", "retrieval-nightly-scheduler")
    assert all(_allows(role, verb, "ray.io", "rayjobs") for verb in ("create", "get", "list", "delete"))


def test_the_fallback_runs_the_raycronjob_template():
    """cronjob-nightly.yaml stores the RayJob the RayCronJob makes: the same spec, the same schedule."""
    cron = _one("RayCronJob", "retrieval-nightly")
    stored = yaml.safe_load(_one("ConfigMap", FALLBACK_MAP)["data"]["rayjob-nightly.yaml"])
    assert stored["spec"] == cron["spec"]["jobTemplate"]
    assert _one("CronJob", "retrieval-nightly")["spec"]["schedule"] == cron["spec"]["schedule"]


# ------------------------------------------------------------------------------------ the checks catch mistakes


def test_the_checks_catch_mistakes(tmp_path, monkeypatch):
    files = _config_files()
    spec = copy.deepcopy(_one("RayJob", "retrieval-pipeline")["spec"])
    assert entrypoint_problems(spec, files) == []

    typo = {**spec, "entrypoint": "python -m jobs.pipelin --config /config/pipeline.yaml"}
    assert "jobs/pipelin.py does not exist" in " ".join(entrypoint_problems(typo, files))
    elsewhere = {**spec, "entrypoint": "python -m jobs.pipeline --config /config/missing.yaml"}
    assert "missing.yaml is not a key" in " ".join(entrypoint_problems(elsewhere, files))
    no_main = {**spec, "entrypoint": "python -m jobs._cli --config /config/pipeline.yaml"}
    assert "defines no main()" in " ".join(entrypoint_problems(no_main, files))

    bad_key = files["nightly.yaml"].replace("retrain_drift:", "retrain_drfit:")
    assert "retrain_drfit" in " ".join(config_problems("nightly.yaml", bad_key, tmp_path, monkeypatch))
    local_root = files["nightly.yaml"].replace("root: s3://my-bucket/retrieval/", "root: out/nightly")
    assert "relative path" in " ".join(config_problems("nightly.yaml", local_root, tmp_path, monkeypatch))
    title = "  title_column: title\n"
    written = files["pipeline.yaml"].replace(title, title + "  storage_options: {key: AKIAEXAMPLE, secret: plain}\n")
    problems = " ".join(config_problems("pipeline.yaml", written, tmp_path, monkeypatch))
    assert "corpus.storage_options.key holds a credential" in problems
    assert "corpus.storage_options.secret holds a credential" in problems
    referenced = written.replace("AKIAEXAMPLE", '"${AWS_ACCESS_KEY_ID}"').replace("plain", '"${AWS_SECRET_ACCESS_KEY}"')
    assert config_problems("pipeline.yaml", referenced, tmp_path, monkeypatch) == []

    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["envFrom"] = []
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["volumeMounts"] = []
    problems = " ".join(pod_problems(spec))
    assert "head, container ray-head: no envFrom secretRef" in problems
    assert "worker group cpu, container ray-worker: no mount" in problems

    gpu = spec["rayClusterSpec"]["workerGroupSpecs"][1]
    del gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert "group gpu: rayStartParams num-gpus" in " ".join(cluster_problems(spec, files))

    docs = copy.deepcopy([d for _, d in DOCS])
    cronjob = next(d for d in docs if d["kind"] == "CronJob")
    cronjob["spec"]["concurrencyPolicy"] = "Allow"
    next(d for d in docs if d["kind"] == "Role")["rules"][0]["verbs"] = ["get", "list"]
    problems = " ".join(fallback_problems(cronjob, docs))
    assert "expected Forbid" in problems and "may create rayjobs.ray.io" in problems
