#!/usr/bin/env bash
# One-time IAM set-up for ray_cluster.yaml: the instance profile every node runs with.
#   bash cluster/aws_iam.sh [NAME]        (default NAME: evl-ray-node; needs IAM admin rights)
# Every node reads videos and writes checkpoints on S3 and pulls the image from ECR; the head also launches
# and terminates the workers, passing them this same profile. Re-running it is harmless.
# For a tighter policy, replace AmazonS3FullAccess with one limited to your bucket.
set -euo pipefail

name="${1:-evl-ray-node}"
account="$(aws sts get-caller-identity --query Account --output text)"

if ! aws iam get-role --role-name "$name" >/dev/null 2>&1; then
    aws iam create-role --role-name "$name" --assume-role-policy-document '{
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                       "Action": "sts:AssumeRole"}]}' >/dev/null
fi
for policy in AmazonEC2FullAccess AmazonS3FullAccess AmazonEC2ContainerRegistryReadOnly; do
    aws iam attach-role-policy --role-name "$name" --policy-arn "arn:aws:iam::aws:policy/$policy"
done
# The head starts workers with this profile, which EC2 allows only with iam:PassRole on the role.
aws iam put-role-policy --role-name "$name" --policy-name pass-own-role --policy-document "{
    \"Version\": \"2012-10-17\",
    \"Statement\": [{\"Effect\": \"Allow\", \"Action\": \"iam:PassRole\",
                     \"Resource\": \"arn:aws:iam::$account:role/$name\"}]}"

if ! aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
fi
echo "arn:aws:iam::$account:instance-profile/$name"
