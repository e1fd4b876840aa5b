#!/usr/bin/env bash
# MLflow tracking server for the cluster, bound to this node's private address (never 0.0.0.0: the server
# has no authentication of its own, so it must not be reachable from outside the cluster network).
#
#   bash cluster/mlflow_server.sh               start it (in the foreground; ray_cluster.yaml backgrounds it)
#   bash cluster/mlflow_server.sh --print-host  print the address it binds to, and exit
#
# Settings, from the environment or from $EVL_MLFLOW_ENV_FILE (default ~/.evl-cluster/mlflow.env,
# KEY=VALUE lines, the place for a database password):
#   MLFLOW_BACKEND_STORE_URI      database for runs, e.g. postgresql://user:pass@host:5432/mlflow;
#                                 default: SQLite in $MLFLOW_HOME (default ~/mlflow)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go, e.g. s3://bucket/prefix (required). Clients upload
#                                 through the server, so only this node needs S3 credentials for them.
#   MLFLOW_HOST                   address to bind (default: the private address of this node)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                server processes; default 4, or 1 on SQLite (one writer avoids lock errors)
#   MLFLOW_ALLOWED_HOSTS          Host headers to accept; default MLflow's own (localhost and private IPs)
#   MLFLOW_DRY_RUN=1              print the command instead of running it
set -euo pipefail

env_file="${EVL_MLFLOW_ENV_FILE:-$HOME/.evl-cluster/mlflow.env}"
if [[ -f "$env_file" ]]; then
    set -a
    # shellcheck disable=SC1090
    source "$env_file"
    set +a
fi

# The source address of the default route: the private IP on EC2 and in a pod. UDP connect sends nothing.
private_address() {
    python3 - <<'EOF'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.connect(("10.255.255.255", 1))
    print(s.getsockname()[0])
finally:
    s.close()
EOF
}

host="${MLFLOW_HOST:-$(private_address)}"
# Refuse wildcard and public addresses: binding there would publish an unauthenticated server.
if ! python3 -c '
import ipaddress, sys
a = ipaddress.ip_address(sys.argv[1])
sys.exit(0 if (a.is_private or a.is_loopback) and not a.is_unspecified else 1)
' "$host" 2>/dev/null; then
    echo "mlflow_server.sh: refusing to bind to $host: not a private address (set MLFLOW_HOST)" >&2
    exit 2
fi

if [[ "${1:-}" == "--print-host" ]]; then
    echo "$host"
    exit 0
elif [[ $# -gt 0 ]]; then
    echo "mlflow_server.sh: unknown argument $1 (only --print-host)" >&2
    exit 2
fi

port="${MLFLOW_PORT:-5000}"
mlflow_home="${MLFLOW_HOME:-$HOME/mlflow}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$mlflow_home/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
if [[ -z "$artifacts" ]]; then
    echo "mlflow_server.sh: set MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlflow-artifacts)" >&2
    exit 2
fi
if [[ "$backend" == sqlite:* ]]; then
    workers="${MLFLOW_WORKERS:-1}"
else
    workers="${MLFLOW_WORKERS:-4}"
fi

cmd=(mlflow server
     --host "$host" --port "$port"
     --backend-store-uri "$backend"
     --serve-artifacts --artifacts-destination "$artifacts"
     --workers "$workers")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    cmd+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

if [[ "${MLFLOW_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

# Started again by every `ray up`: leave a server that already answers on this address alone.
if python3 -c '
import socket, sys
with socket.socket() as s:
    s.settimeout(1)
    sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
' "$host" "$port"; then
    echo "mlflow_server.sh: a server already listens on $host:$port" >&2
    exit 0
fi

if [[ "$backend" == sqlite:* ]]; then
    mkdir -p "$mlflow_home"
fi
echo "mlflow_server.sh: serving on http://$host:$port (runs: ${backend%%://*}, artifacts: $artifacts)" >&2
exec "${cmd[@]}"
