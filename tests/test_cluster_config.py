"""Offline checks of the cluster deployment files (ray_cluster.yaml, cluster/, cluster/kuberay/, README.md's cluster section).

Nothing here reaches AWS, Kubernetes or a registry. Each file goes through the parser or validator of the tool
that consumes it (Ray's cluster-config schema, Ray's own RayCluster translation, Ray's runtime-env and packaging
code, DeepSpeed's config parser and engine, bash, the `ray` and `evl` command-line parsers) and is compared with
the files it must agree with: configs/ ask for custom resources the nodes carry, the head runs no work, every
manifest runs the image cluster/Dockerfile builds, and the README's commands name files that exist and parse.
The EC2, KubeRay and Kubernetes schemas are in tests/test_cluster_schemas.py; IAM and the security group in
tests/test_cluster_iam.py; MLflow's authentication in tests/test_cluster_mlflow_auth.py; the spot interruption
watcher in tests/test_cluster_spot_drain.py.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
IMAGE_HOME = "/home/ray"  # HOME of rayproject/ray images; the launcher maps "~/" in mounts to it


def cluster_section() -> str:
    """README.md's "Run on a cluster" section, up to the next top-level heading."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Run on a cluster")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def launcher():
    return _yaml(ROOT / "ray_cluster.yaml")


@pytest.fixture(scope="module")
def prepared(launcher):
    """ray_cluster.yaml as `ray up` sees it before contacting AWS: merged with Ray's AWS defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(launcher))


@pytest.fixture(scope="module")
def kuberay():
    return {name: _yaml(CLUSTER / "kuberay" / f"{name}.yaml") for name in ("raycluster", "rayjob")}


@pytest.fixture(scope="module")
def kube_objects():
    """The plain Kubernetes objects of cluster/kuberay/ by (kind, name)."""
    out = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["apiVersion"] != "ray.io/v1":
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def dockerfile():
    return (CLUSTER / "Dockerfile").read_text()


def _worker_types(cfg):
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _training_configs():
    """configs/*.yaml that are training configs (sweeps name a `base` instead), loaded by the project."""
    from evl.config import load_config

    out = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if "base" not in _yaml(path):
            out[path.name] = load_config(path)
    return out


def _image_from(dockerfile_text: str) -> str:
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile_text, flags=re.M)
    assert len(froms) == 1, froms
    return froms[0]


def _workdir(dockerfile_text: str) -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", dockerfile_text, flags=re.M)[-1]


def _start_commands(cfg) -> list[str]:
    return cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]


# ------------------------------------------------------------------------------------------------------------
# ray_cluster.yaml


def test_ray_cluster_passes_rays_own_validation(launcher, prepared):
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepared)
    # The validator is live: the same file with a mistake a user could make is refused.
    for breakage in (lambda c: c["available_node_types"]["cpu_decode"]["resources"].update(decode_node=0.5),
                     lambda c: c["available_node_types"]["gpu_trainer"].update(min_worker=1),
                     lambda c: c["docker"].update(imag="x")):
        bad = copy.deepcopy(launcher)
        breakage(bad)
        with pytest.raises(ValidationError):
            validate_config(prepare_config(bad))


def test_node_types_head_decode_and_trainer(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert not set(head["resources"]) - {"CPU", "memory"}, "the head must not attract decode actors or trainers"
    assert head["resources"].get("CPU") == 0, "the head runs no work"
    workers = _worker_types(prepared)
    decode = [v for v in workers.values() if "decode_node" in v["resources"]]
    trainer = [v for v in workers.values() if "trainer_node" in v["resources"]]
    assert len(trainer) == 1
    (trainer,) = trainer
    # Decode nodes on spot, over several spot pools (instance types) that all offer the same resources,
    # preferred in a fixed order (autoscaler v2 priorities).
    assert len({d["node_config"]["InstanceType"] for d in decode}) >= 2
    assert len({json.dumps(d["resources"], sort_keys=True) for d in decode}) == 1
    for d in decode:
        assert d["resources"].get("GPU", 0) == 0 and d["resources"]["CPU"] > 0
        assert d["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        assert "Placement" not in d["node_config"], "decode nodes may fall back to the second zone"
    priorities = [d["priority"] for d in decode]
    assert len(set(priorities)) == len(priorities)
    assert trainer["resources"]["GPU"] > 0 and "InstanceMarketOptions" not in trainer["node_config"]
    # Several zones for decode nodes; the head and the trainers in the first one.
    zones = [z.strip() for z in prepared["provider"]["availability_zone"].split(",")]
    assert len(zones) >= 2 and all(z.startswith(prepared["provider"]["region"]) for z in zones)
    for node_type in (head, trainer):
        assert node_type["node_config"]["Placement"]["AvailabilityZone"] == zones[0]
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    # The global cap does not silently cut a node type short.
    assert prepared["max_workers"] >= sum(v["max_workers"] for v in workers.values())


def test_head_runs_no_work(launcher, kuberay):
    """`ray start --num-cpus=0` on the head (and num-cpus "0" on KubeRay): no task or actor that needs a CPU,
    such as `evl prepare`'s probes, runs beside the GCS and MLflow. tests/test_multinode.py runs a real
    cluster with such a head."""
    start = next(c for c in launcher["head_start_ray_commands"] if "ray start" in c)
    words = shlex.split(start.split("ray start", 1)[1].split(";")[0])
    assert "--head" in words and "--num-cpus=0" in words, words
    for spec in (kuberay["raycluster"]["spec"], kuberay["rayjob"]["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

        config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "evl", "namespace": "evl"},
                                                         "spec": copy.deepcopy(spec)})
        assert config["available_node_types"][config["head_node_type"]]["resources"].get("CPU", 0) == 0


def test_configs_ask_for_resources_the_nodes_carry(prepared, kuberay):
    configs = _training_configs()
    launcher_types = _worker_types(prepared)
    groups = {}
    for spec in (kuberay["raycluster"]["spec"], kuberay["rayjob"]["spec"]["rayClusterSpec"]):
        for name, node_type in _kuberay_node_types(spec).items():
            groups.setdefault(name, node_type)
    checked = 0
    for name, cfg in configs.items():
        decode, trainer = set(cfg.data.decode_resources), set(cfg.scaling.resources_per_worker)
        if not decode and not trainer:
            continue  # a local config (the demo): no placement constraints
        checked += 1
        for types in (launcher_types, groups):
            for key in decode:
                hosts = [t for t in types.values() if key in t["resources"]]
                assert hosts, f"{name}: no node type carries {key}"
                assert all(t["resources"].get("GPU", 0) == 0 for t in hosts), f"{name}: {key} is on a GPU node"
            for key in trainer:
                hosts = [t for t in types.values() if key in t["resources"]]
                assert hosts, f"{name}: no node type carries {key}"
                if cfg.scaling.use_gpu:
                    gpus = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in hosts)
                    assert gpus >= cfg.scaling.num_workers, f"{name}: {cfg.scaling.num_workers} GPU workers > {gpus}"
    assert checked, "no config in configs/ places work on decode or trainer nodes"


def test_image_setup_and_start_commands_are_coherent(launcher, prepared, dockerfile):
    import ray

    base = _image_from(dockerfile)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert match, f"{base} is not an official rayproject/ray GPU tag"
    assert match.group(1) == ray.__version__, "image Ray and client Ray differ: jobs and `ray up` would fail"
    minimum = re.search(r'requires-python\s*=\s*">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (int(match.group(2)), int(match.group(3))) >= (int(minimum.group(1)), int(minimum.group(2)))
    pin = re.search(r'"ray\[[^]]*\]==([\d.*]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert ray.__version__.startswith(pin.rstrip("*").rstrip(".")), (pin, ray.__version__)
    image = launcher["docker"]["image"]
    assert image.endswith(f":ray{match.group(1)}-py{match.group(2)}{match.group(3)}-{match.group(4)}"), image
    assert launcher["docker"]["pull_before_run"] is True

    # Everything is in the image: no setup command installs anything (not even Ray's AWS defaults).
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], key
    # Scripts the start commands run from the image's copy of the repository exist in the repository.
    workdir = _workdir(dockerfile)
    referenced = re.findall(re.escape(workdir) + r"/([\w./-]+)", "\n".join(_start_commands(launcher)))
    assert referenced
    for rel in referenced:
        assert (ROOT / rel).is_file(), rel
    # Every command the launcher runs on a node is valid shell.
    for cmd in prepared["initialization_commands"] + _start_commands(prepared):
        subprocess.run(["bash", "-n", "-c", cmd], check=True)
    # The registry the nodes log in to is the image's, in the cluster's region.
    registry = image.split("/")[0]
    region = prepared["provider"]["region"]
    login = [c for c in prepared["initialization_commands"] if "docker login" in c]
    assert login and registry in login[0] and f"--region {region}" in login[0]
    assert f".{region}." in registry
    # Nodes run with the instance profiles of cluster/aws_iam.sh: the head's on the head, the workers' on
    # every worker.
    script = (CLUSTER / "aws_iam.sh").read_text()
    roles = dict(re.findall(r"^(head_role|worker_role)=([\w-]+)$", script, flags=re.M))
    for name, node_type in prepared["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        role = roles["head_role" if name == prepared["head_node_type"] else "worker_role"]
        assert arn.endswith(f":instance-profile/{role}"), (name, arn)
        assert arn.split(":")[4] == registry.split(".")[0], "account id differs from the registry's"
    assert re.search(rf'repository="\$\{{EVL_ECR_REPOSITORY:-{re.escape(image.split("/", 1)[1].split(":")[0])}\}}"',
                     script), "the workers may pull only the image's repository"
    assert f'region="${{EVL_REGION:-{region}}}"' in script


def test_token_reaches_every_ray_process(launcher):
    """The containers get RAY_AUTH_MODE=token and a token path inside the directory `ray up` mounts."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = launcher["docker"]
    options = docker["run_options"]
    env = dict(o.split(" ", 1)[1].split("=", 1) for o in options if o.startswith("--env "))
    assert env.get("RAY_AUTH_MODE") == "token"
    token_path = env["RAY_AUTH_TOKEN_PATH"]
    for head in (True, False):
        run = docker_start_cmds("ubuntu", docker["image"], launcher["file_mounts"], docker["container_name"],
                                options + docker.get("head_run_options" if head else "worker_run_options", []),
                                launcher["cluster_name"], IMAGE_HOME, "docker")
        mounts = dict(m.split(":", 1) for m in re.findall(r"-v (\S+)", run))
        assert any(token_path.startswith(dest + "/") for dest in mounts.values()), (token_path, mounts)
        assert "--env RAY_AUTH_MODE=token" in run
    # The MLflow account jobs log with comes from the same directory, sourced before every `ray start` (and
    # before the MLflow server, which creates the account); no database password is in it: the server
    # script reads no settings file, and the head gets the database URI from SSM.
    for commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        sourced = re.search(r"set -a; \. ~/(\S+); set \+a;.*ray start", start, flags=re.S).group(1)
        assert any(f"{IMAGE_HOME}/{sourced}".startswith(dest + "/") for dest in mounts.values()), sourced
    script = (CLUSTER / "mlflow_server.sh").read_text()
    assert not re.search(r"^\s*(source|\.) ", script, flags=re.M) and "mlflow.env" not in script
    # The laptop side of the mount is the directory README.md's cluster section has users create.
    readme = cluster_section()
    for local in launcher["file_mounts"].values():
        assert f"mkdir -p {local}" in readme and f"{local}/auth_token" in readme


def test_mlflow_server_and_storage_share_the_bucket(launcher):
    head = "\n".join(launcher["head_start_ray_commands"])
    destination = re.search(r"MLFLOW_ARTIFACTS_DESTINATION=(\S+)", head).group(1)
    assert destination.startswith("s3://")
    buckets = {cfg.scaling.storage_path.split("/")[2] for cfg in _training_configs().values()
               if cfg.scaling.storage_path.startswith("s3://")}
    assert buckets == {destination.split("/")[2]}, (buckets, destination)


# ------------------------------------------------------------------------------------------------------------
# cluster/runtime_env.yaml


def test_runtime_env_is_valid_and_its_variables_exist(launcher, kuberay):
    from ray.runtime_env import RuntimeEnv

    env = _yaml(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert "working_dir" not in env, "`ray job submit --working-dir .` supplies it and would override it"
    for pattern in (".venv/", "data/", "runs/", "mlflow.db", ".git/"):
        assert pattern in env["excludes"], pattern
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    # Variables that Ray expands on the nodes must be set there: exported before `ray start` on every
    # launcher node type, set in every Ray container of the KubeRay manifests.
    needed = set(re.findall(r"\$\{(\w+)\}", json.dumps(env["env_vars"])))
    assert needed
    for commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        for var in needed:
            assert re.search(rf"export {var}=\S+.*ray start", start, flags=re.S), (var, start)
    for name, manifest in kuberay.items():
        for container in _ray_containers(manifest):
            names = {e["name"] for e in container.get("env", [])}
            assert needed <= names, (name, container["name"], needed - names)


def test_runtime_env_upload_leaves_local_state_behind():
    """What `--working-dir .` would upload, computed with Ray's packaging code and the excludes alone."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    env = _yaml(CLUSTER / "runtime_env.yaml")
    files = []
    _dir_travel(ROOT, [_get_excludes(ROOT, env["excludes"])],
                lambda p: files.append(p) if p.is_file() else None, include_gitignore=False)
    rel = [p.relative_to(ROOT).as_posix() for p in files]
    assert "pyproject.toml" in rel and "cluster/runtime_env.yaml" in rel
    for prefix in (".venv/", "data/", "runs/", "mlruns/", ".git/"):
        assert not [r for r in rel if r.startswith(prefix)], prefix
    assert sum(p.stat().st_size for p in files) < 100 * 2**20


# ------------------------------------------------------------------------------------------------------------
# cluster/Dockerfile


def test_dockerfile_installs_the_project_and_builds_nothing_for_gpus(dockerfile):
    runs = " ".join(re.findall(r"^RUN\s+((?:.*\\\n)*.*)", dockerfile, flags=re.M))
    assert re.search(r"pip install (--no-deps )?\.(\s|$)", runs), "the project is not pip-installed"
    assert "ENV DS_BUILD_OPS=0" in dockerfile
    for gpu_only in ("nvidia-smi", "ds_report", "DS_BUILD_OPS=1", "torch.cuda", "--gpus"):
        assert gpu_only not in runs, gpu_only
    for pkg in ("boto3", "psycopg2"):
        assert pkg in runs, f"{pkg} is needed on the head (autoscaler on EC2, MLflow's stores)"
    # COPY sources exist, and the Dockerfile's ignore file keeps what the build and the nodes need.
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, flags=re.M):
        for item in src.split():
            assert (ROOT / item).exists(), item
    ignored = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "evl", "workflows", "configs", "cluster"):
        assert (ROOT / needed).exists() and needed not in ignored, needed
    assert ".venv" in ignored and ".git" in ignored and "data" in ignored


def test_every_node_keeps_idle_workers_as_a_local_instance_does(dockerfile):
    """The image sets the idle-worker time of workflows/runtime.py's local instance on every node (tests/
    test_multinode.py's cluster sets the same)."""
    from workflows.runtime import LOCAL_SYSTEM_CONFIG

    env = dict(re.findall(r"(RAY_\w+)=(\S+)", " ".join(re.findall(r"^ENV\s+((?:.*\\\n)*.*)", dockerfile, flags=re.M))))
    assert env == {f"RAY_{key}": str(value) for key, value in LOCAL_SYSTEM_CONFIG.items()}


# ------------------------------------------------------------------------------------------------------------
# cluster/kuberay/


def _ray_containers(manifest):
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def _kuberay_node_types(spec):
    """Node types as Ray's KubeRay autoscaler derives them from a RayCluster spec (runs Ray's validator too)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "evl", "namespace": "default"},
                                                     "spec": copy.deepcopy(spec)})
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


AUTH_SECRET = ("evl-ray-auth", "auth_token")


def _check_cluster_spec(spec, image):
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names) and all(DNS_LABEL.match(n) for n in names)
    for group in [head, *groups]:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams values must be strings: {params}"
        pod = group["template"]["spec"]
        containers = pod["containers"]
        assert containers and containers[0]["image"] == image
        # Every pod is placed on its own pool of nodes and runs with the project's ServiceAccount; only the
        # head (its autoscaler sidecar) gets a Kubernetes API token.
        assert pod["nodeSelector"]["evl/pool"] in ("head", "decode", "trainer")
        assert pod["serviceAccountName"] == "evl-ray"
        assert pod["automountServiceAccountToken"] is (group is head)
        if "resources" in params:
            # KubeRay pastes the value into a shell command: what the shell hands `ray start` must be JSON.
            words = shlex.split(params["resources"])
            assert len(words) == 1
            assert all(isinstance(v, int) for v in json.loads(words[0]).values())
    assert head["template"]["spec"]["nodeSelector"]["evl/pool"] == "head"
    for group in groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        pool = group["template"]["spec"]["nodeSelector"]["evl/pool"]
        assert pool == ("decode" if "decode_node" in group["rayStartParams"]["resources"] else "trainer")
    assert "resources" not in head.get("rayStartParams", {}), "the head must not attract decode actors or trainers"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379

    types = _kuberay_node_types(spec)
    decode = [t for t in types.values() if "decode_node" in t["resources"]]
    trainer = [t for t in types.values() if "trainer_node" in t["resources"]]
    assert len(decode) == 1 and decode[0]["resources"].get("GPU", 0) == 0
    assert len(trainer) == 1 and trainer[0]["resources"]["GPU"] > 0

    # Token authentication through KubeRay's own API (v1.6+: authOptions with a Secret), so that the
    # operator holds the token too; no Ray container or the autoscaler wires it by hand.
    assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET[0]}
    for container in _ray_containers({"spec": spec}):
        assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                                    "RAY_AUTH_TOKEN_PATH"}, container["name"]
    assert "env" not in spec.get("autoscalerOptions", {})


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _check_mlflow_wiring(manifest, kube_objects):
    """EVL_MLFLOW_HOST names the Service of mlflow.yaml; pods that log to MLflow get the jobs' account."""
    service = kube_objects[("Service", "mlflow")]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    for container in _ray_containers(manifest):
        env = _env(container)
        assert env["EVL_MLFLOW_HOST"]["value"] == host
        if container["name"] == "ray-head" or "nvidia.com/gpu" in container["resources"]["limits"]:
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == ("evl-mlflow-tracking", var)  # the env file's own keys
        else:
            assert "MLFLOW_TRACKING_PASSWORD" not in env, "decode pods do not log to MLflow"
    return host, service


def test_kuberay_raycluster(kuberay, launcher, kube_objects):
    manifest = kuberay["raycluster"]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert DNS_LABEL.match(manifest["metadata"]["name"]) and manifest["metadata"]["namespace"] == "evl"
    _check_cluster_spec(manifest["spec"], launcher["docker"]["image"])
    _check_mlflow_wiring(manifest, kube_objects)
    # The README's port-forward names KubeRay's head service, <cluster name>-head-svc, in its namespace.
    assert f"port-forward -n evl svc/{manifest['metadata']['name']}-head-svc" in cluster_section()


def test_kuberay_rayjob(kuberay, launcher, dockerfile, kube_objects):
    from ray.runtime_env import RuntimeEnv

    job, cluster = kuberay["rayjob"], kuberay["raycluster"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert DNS_LABEL.match(job["metadata"]["name"]) and job["metadata"]["namespace"] == "evl"
    spec = job["spec"]
    assert spec["entrypoint"] == "evl train --config configs/vit_b16_8f.yaml"
    _check_evl_command(shlex.split(spec["entrypoint"]))
    _check_cluster_spec(spec["rayClusterSpec"], launcher["docker"]["image"])
    host, service = _check_mlflow_wiring(job, kube_objects)
    # Same groups and resources as the standing cluster.
    assert _kuberay_node_types(spec["rayClusterSpec"]).keys() == _kuberay_node_types(cluster["spec"]).keys()
    for name, node_type in _kuberay_node_types(spec["rayClusterSpec"]).items():
        assert node_type["resources"] == _kuberay_node_types(cluster["spec"])[name]["resources"]
    # The submitter's `ray job submit` needs RAY_AUTH_MODE and the token of authOptions' Secret.
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    env = _env(submitter)
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == AUTH_SECRET
    assert submitter["image"] == launcher["docker"]["image"]
    assert spec["submitterPodTemplate"]["spec"]["automountServiceAccountToken"] is False
    # KubeRay hands the runtime env to a shell: no "$" may be in it.
    assert "$" not in spec["runtimeEnvYAML"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The working_dir exists in the image only (Ray checks a local path exists), so it is checked apart.
    assert runtime_env.pop("working_dir") == _workdir(dockerfile), "working_dir must be the image's copy"
    RuntimeEnv(**runtime_env)
    assert set(runtime_env["env_vars"]) >= set(_yaml(CLUSTER / "runtime_env.yaml")["env_vars"])
    port = service["spec"]["ports"][0]["port"]
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"http://{host}:{port}"


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_kuberay_network_policies_admit_only_what_the_cluster_needs(kuberay, kube_objects):
    """Pods by role, with the labels they carry (KubeRay adds ray.io/node-type), against the policies."""
    policies = [o for (kind, _), o in kube_objects.items() if kind == "NetworkPolicy"]
    job = kuberay["rayjob"]["spec"]
    ray_labels = job["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    pods = {"head": {**ray_labels, "ray.io/node-type": "head"},
            "worker": {**job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"],
                       "ray.io/node-type": "worker"},
            "submitter": job["submitterPodTemplate"]["metadata"]["labels"],
            "mlflow": kube_objects[("Deployment", "mlflow")]["spec"]["template"]["metadata"]["labels"],
            "operator": {"app.kubernetes.io/name": "kuberay-operator"},  # another namespace
            "stranger": {"app": "something-else"}}
    for (kind, name), obj in kube_objects.items():  # everything lives in the namespace the policies guard
        assert (obj["metadata"]["name"] if kind == "Namespace" else obj["metadata"].get("namespace")) == "evl", name

    def admitted(source: str, target: str, port: int) -> bool:
        applying = [p for p in policies if _selects(p["spec"]["podSelector"], pods[target])]
        assert applying, f"no policy selects {target}: it would take anything"
        for policy in applying:
            for rule in policy["spec"].get("ingress", []):
                ports = [p["port"] for p in rule.get("ports", [])]
                if ports and port not in ports:
                    continue
                for peer in rule.get("from", []):
                    other_namespace = source == "operator"
                    if other_namespace and "namespaceSelector" not in peer:
                        continue
                    if _selects(peer.get("podSelector", {}), pods[source]):
                        return True
        return False

    allowed = {("worker", "head", 6379), ("head", "worker", 10002), ("worker", "worker", 8076),
               ("submitter", "head", 8265), ("operator", "head", 8265), ("head", "mlflow", 5000),
               ("worker", "mlflow", 5000)}
    refused = {("stranger", "head", 8265), ("stranger", "head", 6379), ("stranger", "mlflow", 5000),
               ("submitter", "head", 6379), ("submitter", "mlflow", 5000), ("operator", "head", 6379),
               ("stranger", "worker", 10002), ("mlflow", "head", 6379), ("submitter", "worker", 8076)}
    for case in allowed:
        assert admitted(*case), case
    for case in refused:
        assert not admitted(*case), case
    # A default deny covers every pod of the namespace.
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
               for p in policies)


def test_kuberay_mlflow_server(kube_objects, launcher):
    deployment = kube_objects[("Deployment", "mlflow")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == launcher["docker"]["image"]
    assert container["command"] == ["bash", f"{IMAGE_HOME}/evl/cluster/mlflow_server.sh"]
    env = _env(container)
    assert "MLFLOW_HOST" not in env, "binds the pod's own address, which the script finds"
    service = kube_objects[("Service", "mlflow")]
    host = f"mlflow.{service['metadata']['namespace']}.svc.cluster.local"
    allowed_hosts = env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    assert host in allowed_hosts and f"{host}:{service['spec']['ports'][0]['port']}" in allowed_hosts
    assert env["MLFLOW_PORT"]["value"] == str(container["ports"][0]["containerPort"])
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"] == re.search(
        r"MLFLOW_ARTIFACTS_DESTINATION=(\S+)", "\n".join(launcher["head_start_ray_commands"])).group(1)
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "valueFrom" in e}
    assert secrets == {"evl-mlflow-tracking", "evl-mlflow-server"}
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert _selects({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    account = kube_objects[("ServiceAccount", "evl-ray")]
    assert account["automountServiceAccountToken"] is False


# ------------------------------------------------------------------------------------------------------------
# cluster/deepspeed/


FRAGMENTS = sorted((CLUSTER / "deepspeed").glob("*.json"))


def _known_deepspeed_keys() -> set[str]:
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero import config as zero_config

    return {v for module in (constants, zero_config) for v in vars(module).values() if isinstance(v, str)}


def test_deepspeed_fragments_parse_with_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    from evl.config import TrainConfig
    from evl.training import deepspeed_config

    import torch

    assert {p.name for p in FRAGMENTS} == {"zero1_bf16.json", "zero2_bf16.json"}
    known = _known_deepspeed_keys()
    for path in FRAGMENTS:
        fragment = json.loads(path.read_text())
        stage = int(re.search(r"zero(\d)", path.name).group(1))
        assert not {k for k in fragment if "batch" in k}, "batch sizes come from the project's config"
        assert set(fragment) <= known, f"{path.name}: unknown DeepSpeed keys {set(fragment) - known}"
        assert fragment["zero_optimization"]["stage"] == stage
        assert fragment["bf16"]["enabled"] is True and fragment["fp16"]["enabled"] is False
        assert fragment["gradient_clipping"] > 0
        # Merged over the project's generated config the way `train.deepspeed_config` is, then parsed.
        # (World size 1: DeepSpeedConfig checks the batch arithmetic against the process group, here none.)
        train = TrainConfig(batch_size=16, micro_batch_size=8, deepspeed_config=str(path))
        merged = deepspeed_config(train, world_size=1, device=torch.device("cpu"))
        parsed = DeepSpeedConfig(merged)
        assert parsed.zero_optimization_stage == stage
        assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
        assert parsed.gradient_clipping == fragment["gradient_clipping"]
        assert parsed.train_batch_size == 16 and parsed.gradient_accumulation_steps == 2


ENGINE_CHECK = textwrap.dedent("""
    import json, os, socket, sys
    import torch, torch.distributed as dist
    import deepspeed
    from evl.training import skip_cpu_shared_memory_op
    skip_cpu_shared_memory_op()  # as every Trainer does: no minute of compiling an op training never calls
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", world_size=1, rank=0)
    for path in sys.argv[1:]:
        config = json.load(open(path))
        config.update(train_batch_size=4, train_micro_batch_size_per_gpu=4, steps_per_print=1 << 30)
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config)
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        x = torch.randn(4, 16).to(torch.bfloat16)
        loss = torch.nn.functional.cross_entropy(engine(x).float(), torch.tensor([0, 1, 2, 3]))
        engine.backward(loss)
        engine.step()
        moved = any(not torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters()))
        print(json.dumps({"path": path, "stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(),
                          "clip": engine.gradient_clipping(), "optimizer": type(optimizer).__name__,
                          "moved": moved}))
    dist.destroy_process_group()
""")


def test_deepspeed_fragments_drive_a_real_engine(tmp_path):
    """deepspeed.initialize + one bf16 step per fragment, world size 1 over gloo, in a fresh process."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", ENGINE_CHECK, *map(str, FRAGMENTS)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(FRAGMENTS)
    for result in results:
        fragment = json.loads(Path(result["path"]).read_text())
        assert result["stage"] == fragment["zero_optimization"]["stage"]
        assert result["bf16"] and result["clip"] == fragment["gradient_clipping"]
        assert result["optimizer"] == "DeepSpeedZeroOptimizer" and result["moved"]


# ------------------------------------------------------------------------------------------------------------
# Shell scripts


SCRIPTS = sorted(CLUSTER.glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


# ------------------------------------------------------------------------------------------------------------
# README.md's cluster section: every command refers to files that exist and parses with the tool it calls


def _readme_commands() -> list[list[str]]:
    """Each shell command in the README's bash blocks, split into words; $(...) bodies become commands too."""
    text = cluster_section()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line:
                continue
            inner = re.findall(r"\$\(([^)]*)\)", line)
            line = re.sub(r"\$\([^)]*\)", "SUBST", line)
            for part in [line, *inner]:
                lexer = shlex.shlex(part, posix=True, punctuation_chars="|&;<>")
                lexer.whitespace_split = True
                words, current = [], []
                for token in lexer:
                    if set(token) <= set("|&;<>"):
                        if current:
                            words.append(current)
                        current = []
                    else:
                        current.append(token)
                if current:
                    words.append(current)
                commands.extend(words)
    return commands


def _repo_paths(words: list[str]) -> list[str]:
    """Words that name files of this repository (relative paths, also as the value of key=path)."""
    out = []
    for word in words:
        value = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
        if re.match(r"^[\w.-]+(/[\w.-]+)*\.(ya?ml|json|sh|py|toml|md)$|^(cluster|configs)/\S+$", value) and \
                "://" not in value and not value.startswith(("/", "~", "$")):
            out.append(value)
    return out


def _parse_ray(args: list[str]):
    import click
    from ray.scripts.scripts import cli

    ctx = cli.make_context("ray", list(args))
    command = cli
    while isinstance(command, click.Group):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*getattr(ctx, "protected_args", []), *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return command.name, ctx.params


def _check_evl_command(argv: list[str]) -> None:
    """Parse with the project's own `evl` parser and load the configuration the command would run with."""
    import argparse

    from evl.config import load_config
    from workflows.cli import COMMANDS

    assert argv[0] == "evl" and argv[1] in COMMANDS, argv
    parser = argparse.ArgumentParser(prog="evl", exit_on_error=False)
    sub = parser.add_subparsers(dest="command", required=True)
    importlib.import_module(COMMANDS[argv[1]][0]).add_arguments(sub.add_parser(argv[1]))
    args = parser.parse_args(argv[1:])
    cwd = os.getcwd()
    os.chdir(ROOT)  # paths in commands are relative to the working directory the job uploads
    try:
        if args.command == "train":
            from workflows.train import preflight

            preflight(load_config(args.config, args.overrides), offline=True)  # no bucket here
        elif args.command == "sweep":
            from workflows.sweep import load_sweep

            load_sweep(args.config, args.overrides)
    finally:
        os.chdir(cwd)


def test_readme_commands_name_existing_files_and_parse(launcher):
    commands = _readme_commands()
    programs = {c[0] for c in commands}
    assert {"ray", "docker", "kubectl", "bash", "aws"} <= programs
    image = launcher["docker"]["image"]
    evl_commands, submitted, forwarded = [], set(), set()
    for words in commands:
        for path in _repo_paths(words):
            assert (ROOT / path).exists(), f"{' '.join(words)}: {path} does not exist"
        if words[0] == "ray":
            name, params = _parse_ray(words[1:])  # unknown subcommands or options raise here
            if name == "submit":
                assert params["runtime_env"] == "cluster/runtime_env.yaml" and params["working_dir"] == "."
                evl_commands.append(list(params["entrypoint"]))
                submitted.add(params["submission_id"])
            elif name in ("logs", "status", "stop"):
                assert params["job_id"] in submitted, f"{' '.join(words)}: no job was submitted with that id"
            elif name == "dashboard":
                forwarded.add(params["port"])
            if "cluster_config_file" in params:
                assert params["cluster_config_file"] == "ray_cluster.yaml"
        elif words[0] == "export" and words[1].startswith("RAY_API_SERVER_ADDRESS="):
            api_port = int(words[1].rsplit(":", 1)[1])
        elif words[0] == "kubectl" and words[1] == "port-forward" and words[-2].endswith("-head-svc"):
            forwarded.add(int(words[-1].split(":")[0]))
        elif words[0] == "docker" and words[1] in ("build", "push"):
            tag = words[words.index("-t") + 1] if "-t" in words else words[2]
            assert tag == image
            if words[1] == "build":
                assert words[words.index("-f") + 1] == "cluster/Dockerfile" and words[-1] == "."
        elif words[0] == "bash":
            assert (ROOT / words[1]).is_file()
        elif words[0] == "kubectl" and words[1] in ("apply", "delete"):
            assert words[words.index("-f") + 1].startswith("cluster/kuberay/")
    assert {c[1] for c in evl_commands} == {"prepare", "train", "sweep"}
    assert forwarded == {api_port}, "the job API address is not where the tunnels lead"
    for argv in evl_commands:
        _check_evl_command(argv)


def test_readme_covers_every_shipped_file():
    readme = cluster_section()
    shipped = [p.relative_to(ROOT).as_posix() for p in CLUSTER.rglob("*")
               if p.is_file() and p.name not in ("README.md", "Dockerfile.dockerignore")
               and "__pycache__" not in p.parts]
    for rel in ["ray_cluster.yaml", *shipped]:
        assert rel in readme or Path(rel).name in readme, f"README.md's cluster section does not mention {rel}"
