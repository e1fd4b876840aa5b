#!/usr/bin/env bash
# MLflow tracking server for the cluster, with MLflow's basic authentication, bound to this node's private
# address (never 0.0.0.0 or a public address).
#
#   bash cluster/mlflow_server.sh               start it (in the foreground; ray_cluster.yaml backgrounds it)
#   bash cluster/mlflow_server.sh --print-host  print the address it binds to, and exit
#
# Who may do what: every request needs a user and password. MLFLOW_TRACKING_USERNAME/PASSWORD (required) is
# the account jobs log with (the same variables MLflow's clients read): created, or its password reset, at
# each start. It may create experiments and owns what it creates; any other account sees them read-only.
# The admin account (MLFLOW_AUTH_ADMIN_USERNAME, default `admin`) manages users; its password is
# MLFLOW_AUTH_ADMIN_PASSWORD or else generated once and kept in $MLFLOW_HOME/auth/ (mode 600), on this node.
#
# Settings, from the environment:
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go, e.g. s3://bucket/prefix (required). Clients upload
#                                 through the server, so only this node needs S3 rights for them.
#   MLFLOW_BACKEND_STORE_URI      database for runs, e.g. postgresql://user:pass@host:5432/mlflow; else the
#                                 SSM parameter $EVL_MLFLOW_SSM_PREFIX/backend-store-uri (SecureString) when
#                                 EVL_MLFLOW_SSM_PREFIX is set; else SQLite in $MLFLOW_HOME (default ~/mlflow)
#   MLFLOW_AUTH_DATABASE_URI      the users' database; default SQLite in $MLFLOW_HOME/auth
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key of the auth app; default generated once in $MLFLOW_HOME/auth
#   MLFLOW_HOST                   address to bind (default: the private address of this node)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                server processes; default 4, or 1 on SQLite (one writer avoids lock errors)
#   MLFLOW_ALLOWED_HOSTS          Host headers to accept; default MLflow's own (localhost and private IPs)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runners; default false (not used for training)
#   MLFLOW_DRY_RUN=1              print the command instead of running it (nothing is written)
# MLflow 3.5 or later with its `auth` extra (mlflow[auth]) is required: older servers have no Host-header
# (DNS rebinding) protection.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
min_mlflow=3.5

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
# Refuse wildcard and public addresses: binding there would publish the server beyond the cluster network.
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

if ! python3 - "$min_mlflow" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    have = version("mlflow")
except PackageNotFoundError:
    sys.exit("mlflow_server.sh: mlflow is not installed")
def key(v):
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split(".")[:3])
if key(have) < key(sys.argv[1]):
    sys.exit(f"mlflow_server.sh: mlflow {have} has no Host-header protection; install mlflow>={sys.argv[1]}")
try:
    import flask_wtf  # noqa: F401 - the basic-auth app's CSRF protection
except ImportError:
    sys.exit("mlflow_server.sh: the basic-auth app needs Flask-WTF: install mlflow[auth]")
EOF
then
    exit 2
fi

user="${MLFLOW_TRACKING_USERNAME:-}"
password="${MLFLOW_TRACKING_PASSWORD:-}"
if [[ -z "$user" || ${#password} -lt 12 ]]; then
    echo "mlflow_server.sh: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (12 characters or more):" \
         "the account jobs log with" >&2
    exit 2
fi
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
if [[ -z "$artifacts" ]]; then
    echo "mlflow_server.sh: set MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlflow-artifacts)" >&2
    exit 2
fi

port="${MLFLOW_PORT:-5000}"
mlflow_home="${MLFLOW_HOME:-$HOME/mlflow}"
auth_dir="$mlflow_home/auth"
backend="${MLFLOW_BACKEND_STORE_URI:-}"
if [[ -z "$backend" && -n "${EVL_MLFLOW_SSM_PREFIX:-}" ]]; then
    status=0
    backend="$(python3 "$here/ssm_parameter.py" "${EVL_MLFLOW_SSM_PREFIX%/}/backend-store-uri")" || status=$?
    if [[ $status -eq 3 ]]; then
        echo "mlflow_server.sh: no ${EVL_MLFLOW_SSM_PREFIX%/}/backend-store-uri in SSM: runs stay in SQLite" >&2
    elif [[ $status -ne 0 ]]; then
        exit 1
    fi
fi
backend="${backend:-sqlite:///$mlflow_home/mlflow.db}"
if [[ "$backend" == sqlite:* ]]; then
    workers="${MLFLOW_WORKERS:-1}"
else
    workers="${MLFLOW_WORKERS:-4}"
fi

cmd=(mlflow server
     --app-name basic-auth
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

# Secrets of this server alone, generated once and readable only by this user.
umask 077
mkdir -p "$auth_dir"
secret() {  # VALUE_FROM_ENV FILE: the value, else the file's content, else a new random one kept in FILE
    if [[ -n "$1" ]]; then
        printf '%s' "$1"
    else
        [[ -s "$2" ]] || python3 -c 'import secrets; print(secrets.token_urlsafe(32), end="")' > "$2"
        cat "$2"
    fi
}
MLFLOW_FLASK_SERVER_SECRET_KEY="$(secret "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" "$auth_dir/flask_secret_key")"
export MLFLOW_FLASK_SERVER_SECRET_KEY
admin_password="$(secret "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" "$auth_dir/admin_password")"
auth_db="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$auth_dir/basic_auth.db}"
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
# configparser reads "%" as the start of an interpolation: double it.
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = READ
database_uri = ${auth_db//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
admin_password = ${admin_password//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
# MLflow reads the admin from the file; variables of the same name would take precedence over it.
unset MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD

# The jobs' account, in the users' database before the server starts (the server adds the admin).
python3 - "$auth_db" <<'EOF'
import os, sys
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore
store = SqlAlchemyStore()
store.init_db(sys.argv[1])
user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
if store.has_user(user):
    store.update_user(user, password=password)
else:
    store.create_user(user, password)
EOF

if [[ "$backend" == sqlite:* ]]; then
    mkdir -p "$mlflow_home"
fi
# MLflow's background job runners (GenAI evaluation jobs) are not used for training runs: fewer processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "mlflow_server.sh: serving on http://$host:$port (runs: ${backend%%://*}, artifacts: $artifacts," \
     "basic auth; jobs log as $user)" >&2
exec "${cmd[@]}"
