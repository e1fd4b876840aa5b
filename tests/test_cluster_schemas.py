"""The cluster files against the schemas of the APIs that consume them, offline, with broken variants rejected.

- ray_cluster.yaml's node_config of every node type against the EC2 API's own request model (RunInstances
  in botocore's service model): Ray's schema does not look inside node_config, so without this a misspelt
  key, a string VolumeSize or an instance type EC2 does not know would first fail on a real launch.
- cluster/kuberay/raycluster.yaml and rayjob.yaml against a closed JSON Schema of the KubeRay v1 fields they
  use (tests/cluster_data/kuberay_v1_subset.schema.yaml, restated from KubeRay's documented API), with every
  embedded Kubernetes type (pod templates, env, resources) checked against the `kubernetes` client's models.
- The plain Kubernetes objects of cluster/kuberay/ (namespace, ServiceAccount, NetworkPolicies, MLflow's
  Deployment and Service) against the same models.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
SCHEMA = Path(__file__).resolve().parent / "cluster_data" / "kuberay_v1_subset.schema.yaml"
# Keys of node_config that Ray's AWS provider reads itself and turns into RunInstances parameters.
RAY_NODE_CONFIG_KEYS = {"SubnetIds": "list"}


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ------------------------------------------------------------------------------------------------------------
# EC2: node_config against RunInstances' input shape


def _run_instances_shape():
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


def _shape_errors(value, shape, path: str) -> list[str]:
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping ({shape.name})"]
        errors = []
        for key, item in value.items():
            if key not in shape.members:
                close = [m for m in shape.members if m.lower().startswith(key.lower()[:4])]
                errors.append(f"{path}.{key}: not a {shape.name} field" + (f" (did you mean {close}?)" if close else ""))
            else:
                errors += _shape_errors(item, shape.members[key], f"{path}.{key}")
        return errors
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in _shape_errors(item, shape.member, f"{path}[{i}]")]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{path}: expected a string, got {value!r}"]
        if shape.enum and value not in shape.enum:
            return [f"{path}: {value!r} is not one of EC2's {shape.name} values"]
        return []
    if kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected an integer, got {value!r}"]
        low = shape.metadata.get("min")
        return [f"{path}: {value} < {low}"] if low is not None and value < low else []
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: expected true/false, got {value!r}"]
    if kind in ("double", "float"):
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [f"{path}: expected a number"]
    if kind == "timestamp":
        return [] if isinstance(value, str) else [f"{path}: expected a timestamp"]
    return [f"{path}: unchecked type {kind}"]


def ec2_node_config_errors(node_config: dict, where: str = "node_config") -> list[str]:
    """Problems EC2's RunInstances would have with this node_config (as Ray's AWS provider sends it)."""
    shape = _run_instances_shape()
    errors = []
    for key, value in node_config.items():
        if key in RAY_NODE_CONFIG_KEYS:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                errors.append(f"{where}.{key}: expected a list of ids")
            continue
        if key in ("MinCount", "MaxCount"):
            errors.append(f"{where}.{key}: set by Ray's provider, not the config")
            continue
        errors += _shape_errors({key: value}, shape, where)
    image = node_config.get("ImageId", "")
    if image.startswith("resolve:ssm:") and not re.fullmatch(r"resolve:ssm:/[\w./-]+(:\d+)?", image):
        errors.append(f"{where}.ImageId: malformed resolve:ssm: parameter {image!r}")
    return errors


@pytest.fixture(scope="module")
def launcher():
    return _yaml(ROOT / "ray_cluster.yaml")


def test_every_node_config_is_a_valid_run_instances_request(launcher):
    for name, node_type in launcher["available_node_types"].items():
        assert ec2_node_config_errors(node_type["node_config"], name) == [], name
        config = node_type["node_config"]
        # Least exposure: IMDSv2 only, encrypted root volumes that go with the instance.
        assert config["MetadataOptions"]["HttpTokens"] == "required", name
        for mapping in config["BlockDeviceMappings"]:
            assert mapping["Ebs"]["Encrypted"] is True and mapping["Ebs"]["DeleteOnTermination"] is True, name


BROKEN_NODE_CONFIGS = {
    "misspelt instance type": (("gpu_trainer", "InstanceType"), "p4d.24xlarg", "not one of EC2's InstanceType"),
    "volume size with a unit": (("gpu_trainer", "BlockDeviceMappings", 0, "Ebs", "VolumeSize"), "500GB",
                                "expected an integer"),
    "misspelt key": (("cpu_decode", "InstanceTyp"), "c6i.16xlarge", "not a RunInstancesRequest field"),
    "unknown market type": (("cpu_decode", "InstanceMarketOptions", "MarketType"), "spott", "'spott' is not one of EC2's"),
    "IMDS tokens misspelt": (("head", "MetadataOptions", "HttpTokens"), "requird", "'requird' is not one of EC2's"),
    "hop limit as text": (("head", "MetadataOptions", "HttpPutResponseHopLimit"), "1", "expected an integer"),
    "encrypted as text": (("head", "BlockDeviceMappings", 0, "Ebs", "Encrypted"), "yes", "expected true/false"),
    "volume type unknown": (("head", "BlockDeviceMappings", 0, "Ebs", "VolumeType"), "gp4", "'gp4' is not one of EC2's"),
    "profile as a string": (("head", "IamInstanceProfile"), "evl-ray-head", "expected a mapping"),
    "bad ssm reference": (("head", "ImageId"), "resolve:ssm:aws/service x", "malformed resolve:ssm:"),
}


@pytest.mark.parametrize("case", BROKEN_NODE_CONFIGS, ids=str)
def test_ec2_validator_rejects_broken_node_configs(launcher, case):
    (node_type, *keys), value, message = BROKEN_NODE_CONFIGS[case]
    config = copy.deepcopy(launcher["available_node_types"][node_type]["node_config"])
    target = config
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    errors = ec2_node_config_errors(config, node_type)
    assert errors and any(message in e for e in errors), errors
    # Ray's own schema does not look inside node_config: this is the only check that sees these.
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(launcher)
    bad["available_node_types"][node_type]["node_config"] = config
    validate_config(prepare_config(bad))


# ------------------------------------------------------------------------------------------------------------
# Kubernetes models (the `kubernetes` client) and the KubeRay schema


def _k8s_model(name: str):
    from kubernetes import client

    return getattr(client, name, None)


def _k8s_type_errors(value, type_name: str, path: str) -> list[str]:
    """Unknown fields and wrong container kinds, walking the client's attribute_map/openapi_types."""
    type_name = type_name.strip()
    if type_name.startswith(("List[", "list[")):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        inner = type_name[5:-1]
        return [e for i, item in enumerate(value) for e in _k8s_type_errors(item, inner, f"{path}[{i}]")]
    if type_name.startswith(("Dict[", "dict(")):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = type_name[type_name.index(",") + 1:-1]
        return [e for key, item in value.items() for e in _k8s_type_errors(item, inner, f"{path}.{key}")]
    model = _k8s_model(type_name)
    if model is None or not hasattr(model, "attribute_map"):
        return []  # a scalar (str, int, bool, object, datetime): from_dict checks its type
    if not isinstance(value, dict):
        return [f"{path}: expected a mapping ({type_name})"]
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        attr = by_json.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors += _k8s_type_errors(item, model.openapi_types[attr], f"{path}.{key}")
    return errors


def _quantities_as_strings(value):
    """Kubernetes accepts resource quantities as YAML numbers; the client's models want strings."""
    if isinstance(value, dict):
        return {k: ({q: str(n) for q, n in v.items()} if k in ("limits", "requests") and isinstance(v, dict)
                    else _quantities_as_strings(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_quantities_as_strings(v) for v in value]
    return value


def k8s_errors(value, model_name: str, path: str = "") -> list[str]:
    """Every problem the Kubernetes API would see in `value` as a `model_name` (V1PodTemplateSpec, ...)."""
    errors = _k8s_type_errors(value, model_name, path or model_name)
    if errors:
        return errors
    try:
        _k8s_model(model_name).from_dict(_quantities_as_strings(value))
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        return [f"{path or model_name}: {str(e).splitlines()[0]}: {' '.join(str(e).splitlines()[1:3])}"]
    return []


def kuberay_validator():
    """A JSON Schema validator for the KubeRay subset, with `x-k8s-model` checked by the Kubernetes models."""
    from jsonschema import Draft202012Validator, ValidationError, validators

    def x_k8s_model(validator, model_name, instance, schema):
        for message in k8s_errors(instance, model_name):
            yield ValidationError(message)

    cls = validators.extend(Draft202012Validator, {"x-k8s-model": x_k8s_model})
    schema = _yaml(SCHEMA)
    cls.check_schema(schema)
    return cls(schema)


def kuberay_errors(manifest: dict) -> list[str]:
    validator = kuberay_validator()
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest))


@pytest.fixture(scope="module")
def manifests():
    return {name: _yaml(KUBERAY / f"{name}.yaml") for name in ("raycluster", "rayjob")}


def test_kuberay_manifests_match_the_crd_schema(manifests):
    for name, manifest in manifests.items():
        assert kuberay_errors(manifest) == [], name


def _set(doc: dict, path: str, value=None, *, rename: str | None = None, delete: bool = False) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = doc
    for key in parents:
        target = target[key]
    if rename:
        target[rename] = target.pop(last)
    elif delete:
        del target[last]
    else:
        target[last] = value
    return doc


TRAINER = "spec.rayClusterSpec.workerGroupSpecs.1"
BROKEN_KUBERAY = {
    "shutdownAfterJobFinish": ("rayjob", dict(path="spec.shutdownAfterJobFinishes", rename="shutdownAfterJobFinish"),
                               "shutdownAfterJobFinish"),
    "tolerationz": ("rayjob", dict(path=f"{TRAINER}.template.spec.tolerations", rename="tolerationz"), "tolerationz"),
    "minReplica": ("raycluster", dict(path="spec.workerGroupSpecs.0.minReplicas", rename="minReplica"), "minReplica"),
    "auth mode": ("raycluster", dict(path="spec.authOptions.mode", value="tokens"), "tokens"),
    "authOption": ("rayjob", dict(path="spec.rayClusterSpec.authOptions", rename="authOption"), "authOption"),
    "num-cpus as a number": ("raycluster", dict(path="spec.headGroupSpec.rayStartParams.num-cpus", value=0),
                             "is not of type 'string'"),
    "container without a name": ("raycluster", dict(path="spec.headGroupSpec.template.spec.containers.0.name",
                                                    delete=True), "name"),
    "port as text": ("raycluster", dict(path="spec.headGroupSpec.template.spec.containers.0.ports.0.containerPort",
                                        value="6379"), "integer"),
    "env value as a number": ("rayjob", dict(path="spec.submitterPodTemplate.spec.containers.0.env.0.value", value=1),
                              "string"),
    "nodeSelectors": ("raycluster", dict(path="spec.workerGroupSpecs.0.template.spec.nodeSelector",
                                         rename="nodeSelectors"), "nodeSelectors"),
    "old api version": ("raycluster", dict(path="apiVersion", value="ray.io/v1alpha1"), "ray.io/v1"),
    "upscaling mode": ("rayjob", dict(path="spec.rayClusterSpec.autoscalerOptions.upscalingMode", value="Fast"),
                       "Fast"),
}


@pytest.mark.parametrize("case", BROKEN_KUBERAY, ids=str)
def test_kuberay_schema_rejects_broken_manifests(manifests, case):
    name, change, needle = BROKEN_KUBERAY[case]
    errors = kuberay_errors(_set(manifests[name], **change))
    assert errors and any(needle in e for e in errors), errors


KINDS = {("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount",
         ("v1", "Service"): "V1Service", ("apps/v1", "Deployment"): "V1Deployment",
         ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy"}


def kubernetes_objects():
    """Every plain Kubernetes object of cluster/kuberay/ (not the KubeRay custom resources)."""
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            if doc["apiVersion"] != "ray.io/v1":
                out.append((path.name, doc))
    return out


def test_kubernetes_objects_match_the_api():
    objects = kubernetes_objects()
    kinds = {doc["kind"] for _, doc in objects}
    assert {"Namespace", "ServiceAccount", "NetworkPolicy", "Deployment", "Service"} <= kinds
    for file, doc in objects:
        model = KINDS[(doc["apiVersion"], doc["kind"])]
        assert k8s_errors(doc, model) == [], (file, doc["kind"], doc["metadata"]["name"])


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["spec"].update(podSelectr=d["spec"].pop("podSelector")), "podSelectr"),
    (lambda d: d["spec"]["ingress"][0].update(form=[]), "form"),
    (lambda d: d["spec"].update(policyTypes="Ingress"), "list"),
], ids=["podSelectr", "form", "policyTypes as text"])
def test_kubernetes_validator_rejects_broken_network_policies(change, needle):
    policy = next(d for _, d in kubernetes_objects() if d["kind"] == "NetworkPolicy" and d["spec"].get("ingress"))
    bad = copy.deepcopy(policy)
    change(bad)
    errors = k8s_errors(bad, "V1NetworkPolicy")
    assert errors and any(needle in e for e in errors), errors


def test_kubernetes_validator_rejects_a_broken_deployment():
    deployment = next(d for _, d in kubernetes_objects() if d["kind"] == "Deployment")
    bad = _set(deployment, "spec.template.spec.nodeSelector", rename="nodeselector")
    assert any("nodeselector" in e for e in k8s_errors(bad, "V1Deployment"))
    bad = _set(deployment, "spec.template.spec.containers.0.env.0.valueFrom", {"secretKeyRef": {"nam": "x"}})
    assert any("nam" in e for e in k8s_errors(bad, "V1Deployment"))
