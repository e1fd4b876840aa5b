#!/usr/bin/env bash
# One-time network set-up for ray_cluster.yaml: the security group `evl-ray` that every node joins.
#
#   bash cluster/aws_network.sh YOUR.PUBLIC.IP.ADDRESS/32 [VPC_ID]
#
# Inbound: all traffic between members of the group (Ray's ports, NCCL, MLflow), and SSH (what `ray up`,
# `ray dashboard` and the MLflow tunnel use) from the given network only. Nothing else: the dashboard and
# MLflow are reached through SSH tunnels. Ray uses a group of this name (provider.security_group.GroupName)
# as it is when it already has rules; left to itself, Ray would create it with SSH open to 0.0.0.0/0.
# VPC_ID defaults to the region's default VPC, where Ray looks for subnets. Re-running it adds a new address
# and removes any world-open rule (e.g. from a group Ray created before this script ran).
# Settings (environment): EVL_REGION (us-west-2), EVL_SECURITY_GROUP (evl-ray).
set -euo pipefail

cidr="${1:-}"
if ! python3 - "$cidr" <<'EOF'
import ipaddress, sys
try:
    net = ipaddress.ip_network(sys.argv[1], strict=True)
except ValueError:
    sys.exit(1)
# One address or a small office range; never the whole internet.
sys.exit(0 if net.prefixlen >= (16 if net.version == 4 else 48) else 1)
EOF
then
    echo "usage: bash cluster/aws_network.sh ADDRESS/32 [VPC_ID]   (the network SSH may come from, e.g." \
         "\$(curl -s https://checkip.amazonaws.com)/32; at most a /16, never 0.0.0.0/0)" >&2
    exit 2
fi

region="${EVL_REGION:-us-west-2}"
name="${EVL_SECURITY_GROUP:-evl-ray}"
aws_ec2() { aws ec2 --region "$region" "$@"; }

vpc="${2:-$(aws_ec2 describe-vpcs --filters Name=is-default,Values=true --query 'Vpcs[0].VpcId' --output text)}"
if [[ -z "$vpc" || "$vpc" == None ]]; then
    echo "aws_network.sh: no default VPC in $region; pass the VPC id" >&2
    exit 2
fi

group="$(aws_ec2 describe-security-groups --filters Name=vpc-id,Values="$vpc" Name=group-name,Values="$name" \
         --query 'SecurityGroups[0].GroupId' --output text)"
if [[ -z "$group" || "$group" == None ]]; then
    group="$(aws_ec2 create-security-group --group-name "$name" --vpc-id "$vpc" \
             --description "EVL Ray cluster: members talk freely, SSH from the operator only" \
             --query GroupId --output text)"
fi

# Rules that already exist are reported as duplicates: not an error on a re-run.
authorize() {
    local out
    if ! out="$(aws_ec2 authorize-security-group-ingress --group-id "$group" --ip-permissions "$1" 2>&1)"; then
        [[ "$out" == *InvalidPermission.Duplicate* ]] || { echo "$out" >&2; exit 1; }
    fi
}
authorize "[{\"IpProtocol\": \"-1\", \"UserIdGroupPairs\": [{\"GroupId\": \"$group\"}]}]"
if [[ "$cidr" == *:* ]]; then
    authorize "[{\"IpProtocol\": \"tcp\", \"FromPort\": 22, \"ToPort\": 22, \"Ipv6Ranges\": [{\"CidrIpv6\": \"$cidr\"}]}]"
else
    authorize "[{\"IpProtocol\": \"tcp\", \"FromPort\": 22, \"ToPort\": 22, \"IpRanges\": [{\"CidrIp\": \"$cidr\"}]}]"
fi
# Whatever is open to the world goes (Ray's default SSH rule, if Ray created the group first).
for rule in "[{\"IpProtocol\": \"tcp\", \"FromPort\": 22, \"ToPort\": 22, \"IpRanges\": [{\"CidrIp\": \"0.0.0.0/0\"}]}]" \
            "[{\"IpProtocol\": \"tcp\", \"FromPort\": 22, \"ToPort\": 22, \"Ipv6Ranges\": [{\"CidrIpv6\": \"::/0\"}]}]"; do
    aws_ec2 revoke-security-group-ingress --group-id "$group" --ip-permissions "$rule" >/dev/null 2>&1 || true
done
echo "$group"
