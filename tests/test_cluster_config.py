"""Offline checks of the cluster deployment files (ray_cluster.yaml, cluster/, cluster/kuberay/, README.md's cluster section).

Nothing here reaches AWS, Kubernetes or a registry. Each file goes through the parser or validator of the tool
that consumes it (Ray's cluster-config schema, Ray's own RayCluster translation, Ray's runtime-env and packaging
code, DeepSpeed's config parser and engine, bash, the `ray` and `evl` command-line parsers) and is compared with
the files it must agree with: configs/ ask for custom resources the nodes carry, every manifest runs the image
cluster/Dockerfile builds, and the README's commands name files that exist and parse.
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
    workers = _worker_types(prepared)
    decode = [v for v in workers.values() if "decode_node" in v["resources"]]
    trainer = [v for v in workers.values() if "trainer_node" in v["resources"]]
    assert len(decode) == 1 and len(trainer) == 1
    (decode,), (trainer,) = decode, trainer
    assert decode["resources"].get("GPU", 0) == 0 and decode["resources"]["CPU"] > 0
    assert decode["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    assert trainer["resources"]["GPU"] > 0 and "InstanceMarketOptions" not in trainer["node_config"]
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    # The global cap does not silently cut a node type short.
    assert prepared["max_workers"] >= sum(v["max_workers"] for v in workers.values())


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
    # Nodes run with the instance profile of cluster/aws_iam.sh.
    profile = (CLUSTER / "aws_iam.sh").read_text()
    default_name = re.search(r'name="\$\{1:-([\w-]+)\}"', profile).group(1)
    for node_type in prepared["available_node_types"].values():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.endswith(f":instance-profile/{default_name}")
        assert arn.split(":")[4] == registry.split(".")[0], "account id differs from the registry's"


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
    # mlflow_server.sh looks for its optional settings file in that directory too.
    script = (CLUSTER / "mlflow_server.sh").read_text()
    env_file = re.search(r'env_file="\$\{EVL_MLFLOW_ENV_FILE:-\$HOME/([^}]+)\}"', script).group(1)
    assert any(f"{IMAGE_HOME}/{env_file}".startswith(dest + "/") for dest in mounts.values()), env_file
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
        containers = group["template"]["spec"]["containers"]
        assert containers and containers[0]["image"] == image
        if "resources" in params:
            # KubeRay pastes the value into a shell command: what the shell hands `ray start` must be JSON.
            words = shlex.split(params["resources"])
            assert len(words) == 1
            assert all(isinstance(v, int) for v in json.loads(words[0]).values())
    for group in groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert "resources" not in head.get("rayStartParams", {}), "the head must not attract decode actors or trainers"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379

    types = _kuberay_node_types(spec)
    decode = [t for t in types.values() if "decode_node" in t["resources"]]
    trainer = [t for t in types.values() if "trainer_node" in t["resources"]]
    assert len(decode) == 1 and decode[0]["resources"].get("GPU", 0) == 0
    assert len(trainer) == 1 and trainer[0]["resources"]["GPU"] > 0


def _check_auth_env(env, secret=("evl-ray-auth", "auth_token")):
    by_name = {e["name"]: e for e in env}
    assert by_name["RAY_AUTH_MODE"]["value"] == "token"
    ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == secret


def test_kuberay_raycluster(kuberay, launcher):
    manifest = kuberay["raycluster"]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert DNS_LABEL.match(manifest["metadata"]["name"])
    _check_cluster_spec(manifest["spec"], launcher["docker"]["image"])
    for container in _ray_containers(manifest):
        _check_auth_env(container["env"])
    _check_auth_env(manifest["spec"]["autoscalerOptions"]["env"])  # the autoscaler is a GCS client too
    # The README's port-forward names KubeRay's head service, <cluster name>-head-svc.
    assert f"svc/{manifest['metadata']['name']}-head-svc" in cluster_section()


def test_kuberay_rayjob(kuberay, launcher, dockerfile):
    from ray.runtime_env import RuntimeEnv

    job, cluster = kuberay["rayjob"], kuberay["raycluster"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert DNS_LABEL.match(job["metadata"]["name"])
    spec = job["spec"]
    assert spec["entrypoint"] == "evl train --config configs/vit_b16_8f.yaml"
    _check_evl_command(shlex.split(spec["entrypoint"]))
    _check_cluster_spec(spec["rayClusterSpec"], launcher["docker"]["image"])
    # Same groups and resources as the standing cluster.
    assert _kuberay_node_types(spec["rayClusterSpec"]).keys() == _kuberay_node_types(cluster["spec"]).keys()
    for name, node_type in _kuberay_node_types(spec["rayClusterSpec"]).items():
        assert node_type["resources"] == _kuberay_node_types(cluster["spec"])[name]["resources"]
    for container in _ray_containers(job):
        _check_auth_env(container["env"])
    _check_auth_env(spec["rayClusterSpec"]["autoscalerOptions"]["env"])
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    _check_auth_env(submitter["env"])
    assert submitter["image"] == launcher["docker"]["image"]
    # KubeRay hands the runtime env to a shell: no "$" may be in it.
    assert "$" not in spec["runtimeEnvYAML"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The working_dir exists in the image only (Ray checks a local path exists), so it is checked apart.
    assert runtime_env.pop("working_dir") == _workdir(dockerfile), "working_dir must be the image's copy"
    RuntimeEnv(**runtime_env)
    assert set(runtime_env["env_vars"]) >= set(_yaml(CLUSTER / "runtime_env.yaml")["env_vars"])


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
    # A CPU-only shared-memory all-reduce kernel, JIT-compiled on first use (a minute): not what is tested.
    # (sys.modules: the package attribute deepspeed.comm.torch is the torch package, not this module.)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
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


def _mlflow(tmp_path, *args, **env):
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_DRY_RUN": "1"}
    return subprocess.run(["bash", str(CLUSTER / "mlflow_server.sh"), *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=60)


def test_mlflow_server_command(tmp_path):
    art = "s3://YOUR-BUCKET/evl/mlflow-artifacts"
    out = _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_ARTIFACTS_DESTINATION=art)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:2] == ["mlflow", "server"]
    flags = cmd[2:]
    value = {flags[i]: flags[i + 1] for i in range(len(flags) - 1) if flags[i].startswith("--")}
    assert value["--host"] == "10.0.1.23" and value["--port"] == "5000"
    assert value["--artifacts-destination"] == art and "--serve-artifacts" in flags
    assert value["--backend-store-uri"] == f"sqlite:///{tmp_path}/mlflow/mlflow.db" and value["--workers"] == "1"

    # A database URI from the environment file (where a password belongs), and more workers.
    secrets = tmp_path / ".evl-cluster"
    secrets.mkdir()
    (secrets / "mlflow.env").write_text("MLFLOW_BACKEND_STORE_URI=postgresql://u:p@db:5432/mlflow\n")
    out = _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_ARTIFACTS_DESTINATION=art, MLFLOW_WORKERS="8")
    flags = shlex.split(out.stdout)
    assert flags[flags.index("--backend-store-uri") + 1] == "postgresql://u:p@db:5432/mlflow"
    assert flags[flags.index("--workers") + 1] == "8"
    out = _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23", MLFLOW_ARTIFACTS_DESTINATION=art)
    assert shlex.split(out.stdout)[shlex.split(out.stdout).index("--workers") + 1] == "4"

    # Never on a wildcard or public address; never without an artifact store.
    for host in ("0.0.0.0", "::", "8.8.8.8"):
        out = _mlflow(tmp_path, MLFLOW_HOST=host, MLFLOW_ARTIFACTS_DESTINATION=art)
        assert out.returncode != 0 and "mlflow" not in out.stdout, host
    assert _mlflow(tmp_path, MLFLOW_HOST="10.0.1.23").returncode != 0
    out = _mlflow(tmp_path, "--print-host", MLFLOW_HOST="10.0.1.23")
    assert out.returncode == 0 and out.stdout.strip() == "10.0.1.23"
    assert _mlflow(tmp_path, "--bogus", MLFLOW_HOST="10.0.1.23").returncode != 0
    # The flags are ones this MLflow's server command accepts.
    from mlflow.cli import server

    accepted = {opt for param in server.params for opt in param.opts}
    assert {f for f in flags if f.startswith("--")} <= accepted


FAKE_AWS = textwrap.dedent("""
    import json, os, sys
    with open(os.environ["FAKE_AWS_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    if sys.argv[1:3] == ["sts", "get-caller-identity"]:
        print("123456789012")
    elif sys.argv[1:3] in (["iam", "get-role"], ["iam", "get-instance-profile"]):
        sys.exit(254)  # not there yet
""")


def test_aws_iam_script_creates_a_profile_nodes_can_use(tmp_path):
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n{FAKE_AWS}")
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    out = subprocess.run(["bash", str(CLUSTER / "aws_iam.sh")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "FAKE_AWS_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    verbs = [c[1] for c in calls if c[0] == "iam"]
    for verb in ("create-role", "attach-role-policy", "put-role-policy", "create-instance-profile",
                 "add-role-to-instance-profile"):
        assert verb in verbs, verb
    policies = {c[c.index("--policy-arn") + 1].rsplit("/", 1)[1] for c in calls if "--policy-arn" in c}
    assert {"AmazonS3FullAccess", "AmazonEC2ContainerRegistryReadOnly", "AmazonEC2FullAccess"} <= policies
    for call in calls:
        for flag in ("--assume-role-policy-document", "--policy-document"):
            if flag in call:
                json.loads(call[call.index(flag) + 1])  # the inline JSON survives the shell quoting
    pass_role = next(c for c in calls if "put-role-policy" in c)
    document = json.loads(pass_role[pass_role.index("--policy-document") + 1])
    assert document["Statement"][0]["Action"] == "iam:PassRole"
    launcher = _yaml(ROOT / "ray_cluster.yaml")
    assert out.stdout.strip() == launcher["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Arn"]


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

            preflight(load_config(args.config, args.overrides))
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
        elif words[0] == "kubectl" and words[1] == "port-forward":
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
               if p.is_file() and p.name not in ("README.md", "Dockerfile.dockerignore")]
    for rel in ["ray_cluster.yaml", *shipped]:
        assert rel in readme or Path(rel).name in readme, f"README.md's cluster section does not mention {rel}"
