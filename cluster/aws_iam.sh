#!/usr/bin/env bash
# One-time IAM set-up for ray_cluster.yaml and cluster/kuberay/: one role per kind of node, each with only what
# that node does (needs IAM admin rights; re-running it updates the policies and is otherwise harmless):
#
#   bash cluster/aws_iam.sh BUCKET [BUCKET ...]
#
#   evl-ray-worker  instance profile of every worker node (spot decode nodes run job code): read/write the
#                   project's bucket(s), pull the `evl` image from ECR. Nothing else: no EC2, no IAM.
#   evl-ray-head    instance profile of the head: the worker's rights, plus what Ray's autoscaler does with
#                   EC2 (launch the workers' instance types, tag and terminate this cluster's instances,
#                   list instances), iam:PassRole for evl-ray-worker only, ssm:GetParameters on the public
#                   Deep Learning AMI parameters (ImageId: resolve:ssm:...), and the MLflow database URI
#                   under the SSM prefix (SecureString).
#   evl-ray-pods    for EKS Pod Identity (cluster/kuberay/): the bucket(s) only.
#
# Settings (environment): EVL_REGION (us-west-2), EVL_CLUSTER (evl, ray_cluster.yaml's cluster_name),
# EVL_ECR_REPOSITORY (evl), EVL_SSM_PREFIX (/evl/mlflow), EVL_WORKER_INSTANCE_TYPES (the worker node types'
# instance types in ray_cluster.yaml). Prints the two instance profile ARNs that ray_cluster.yaml names.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash cluster/aws_iam.sh BUCKET [BUCKET ...]   (the S3 bucket(s) of configs/ and ray_cluster.yaml)" >&2
    exit 2
fi
buckets=("$@")
for bucket in "${buckets[@]}"; do
    if [[ ! "$bucket" =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]]; then
        echo "aws_iam.sh: '$bucket' is not an S3 bucket name (no s3://, no wildcard)" >&2
        exit 2
    fi
done

region="${EVL_REGION:-us-west-2}"
cluster="${EVL_CLUSTER:-evl}"
repository="${EVL_ECR_REPOSITORY:-evl}"
ssm_prefix="${EVL_SSM_PREFIX:-/evl/mlflow}"
read -r -a instance_types <<< "${EVL_WORKER_INSTANCE_TYPES:-c6i.16xlarge c7i.16xlarge m6i.16xlarge p4d.24xlarge}"
head_role=evl-ray-head
worker_role=evl-ray-worker
pods_role=evl-ray-pods
account="$(aws sts get-caller-identity --query Account --output text)"

# '"a","b"' from a list, for JSON arrays.
json_list() {
    local out="" item
    for item in "$@"; do
        out+="${out:+,}\"$item\""
    done
    printf '%s' "$out"
}
bucket_arns=() object_arns=()
for bucket in "${buckets[@]}"; do
    bucket_arns+=("arn:aws:s3:::$bucket")
    object_arns+=("arn:aws:s3:::$bucket/*")
done

s3_statements="{\"Sid\": \"ListProjectBuckets\", \"Effect\": \"Allow\",
     \"Action\": [\"s3:ListBucket\", \"s3:GetBucketLocation\"],
     \"Resource\": [$(json_list "${bucket_arns[@]}")]},
    {\"Sid\": \"ReadWriteProjectObjects\", \"Effect\": \"Allow\",
     \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\", \"s3:AbortMultipartUpload\",
                \"s3:ListMultipartUploadParts\"],
     \"Resource\": [$(json_list "${object_arns[@]}")]}"
ecr_statements="{\"Sid\": \"EcrLogin\", \"Effect\": \"Allow\", \"Action\": \"ecr:GetAuthorizationToken\", \"Resource\": \"*\"},
    {\"Sid\": \"PullProjectImage\", \"Effect\": \"Allow\",
     \"Action\": [\"ecr:BatchGetImage\", \"ecr:GetDownloadUrlForLayer\", \"ecr:BatchCheckLayerAvailability\"],
     \"Resource\": \"arn:aws:ecr:$region:$account:repository/$repository\"}"

worker_policy="{\"Version\": \"2012-10-17\", \"Statement\": [
    $s3_statements,
    $ecr_statements]}"
pods_policy="{\"Version\": \"2012-10-17\", \"Statement\": [
    $s3_statements]}"
instance_arn="arn:aws:ec2:$region:$account:instance/*"
head_policy="{\"Version\": \"2012-10-17\", \"Statement\": [
    {\"Sid\": \"ListInstances\", \"Effect\": \"Allow\", \"Action\": \"ec2:DescribeInstances\", \"Resource\": \"*\"},
    {\"Sid\": \"LaunchWorkers\", \"Effect\": \"Allow\", \"Action\": \"ec2:RunInstances\", \"Resource\": \"*\"},
    {\"Sid\": \"OnlyTheWorkersInstanceTypes\", \"Effect\": \"Deny\", \"Action\": \"ec2:RunInstances\",
     \"Resource\": \"arn:aws:ec2:*:*:instance/*\",
     \"Condition\": {\"StringNotEquals\": {\"ec2:InstanceType\": [$(json_list "${instance_types[@]}")]}}},
    {\"Sid\": \"TagAtLaunch\", \"Effect\": \"Allow\", \"Action\": \"ec2:CreateTags\", \"Resource\": \"$instance_arn\",
     \"Condition\": {\"StringEquals\": {\"ec2:CreateAction\": \"RunInstances\"}}},
    {\"Sid\": \"TagAndTerminateThisCluster\", \"Effect\": \"Allow\",
     \"Action\": [\"ec2:CreateTags\", \"ec2:TerminateInstances\"], \"Resource\": \"$instance_arn\",
     \"Condition\": {\"StringEquals\": {\"ec2:ResourceTag/ray-cluster-name\": \"$cluster\"}}},
    {\"Sid\": \"PassOnlyTheWorkerRole\", \"Effect\": \"Allow\", \"Action\": \"iam:PassRole\",
     \"Resource\": \"arn:aws:iam::$account:role/$worker_role\",
     \"Condition\": {\"StringEquals\": {\"iam:PassedToService\": \"ec2.amazonaws.com\"}}},
    {\"Sid\": \"ResolveDeepLearningAmi\", \"Effect\": \"Allow\", \"Action\": \"ssm:GetParameters\",
     \"Resource\": \"arn:aws:ssm:$region::parameter/aws/service/deeplearning/*\"},
    {\"Sid\": \"MlflowDatabaseUri\", \"Effect\": \"Allow\", \"Action\": \"ssm:GetParameter\",
     \"Resource\": \"arn:aws:ssm:$region:$account:parameter$ssm_prefix/*\"}]}"

ec2_trust='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}'
pods_trust='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    "Principal": {"Service": "pods.eks.amazonaws.com"}, "Action": ["sts:AssumeRole", "sts:TagSession"]}]}'

ensure_role() {  # NAME TRUST_POLICY
    if ! aws iam get-role --role-name "$1" >/dev/null 2>&1; then
        aws iam create-role --role-name "$1" --assume-role-policy-document "$2" >/dev/null
    fi
}
ensure_instance_profile() {  # NAME (profile and role share it)
    if ! aws iam get-instance-profile --instance-profile-name "$1" >/dev/null 2>&1; then
        aws iam create-instance-profile --instance-profile-name "$1" >/dev/null
        aws iam add-role-to-instance-profile --instance-profile-name "$1" --role-name "$1"
    fi
}

ensure_role "$worker_role" "$ec2_trust"
aws iam put-role-policy --role-name "$worker_role" --policy-name evl-worker --policy-document "$worker_policy"
ensure_instance_profile "$worker_role"

ensure_role "$head_role" "$ec2_trust"
aws iam put-role-policy --role-name "$head_role" --policy-name evl-worker --policy-document "$worker_policy"
aws iam put-role-policy --role-name "$head_role" --policy-name evl-autoscaler --policy-document "$head_policy"
ensure_instance_profile "$head_role"

ensure_role "$pods_role" "$pods_trust"
aws iam put-role-policy --role-name "$pods_role" --policy-name evl-s3 --policy-document "$pods_policy"

# The first spot launch of an account creates EC2's spot service-linked role, which needs
# iam:CreateServiceLinkedRole: create it here (as admin) rather than granting that to the head.
if ! aws iam get-role --role-name AWSServiceRoleForEC2Spot >/dev/null 2>&1; then
    aws iam create-service-linked-role --aws-service-name spot.amazonaws.com >/dev/null
fi

echo "arn:aws:iam::$account:instance-profile/$head_role"
echo "arn:aws:iam::$account:instance-profile/$worker_role"
