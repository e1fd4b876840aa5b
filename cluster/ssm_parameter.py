"""Print one SSM Parameter Store value (decrypted), for cluster/mlflow_server.sh on the head.

    python3 cluster/ssm_parameter.py /evl/mlflow/backend-store-uri

Exit status 0 with the value on stdout; 3 when the parameter does not exist (the caller falls back to its
default); 1 on any other error (no credentials, access denied), with the reason on stderr. Credentials and
region come from the usual AWS chain: on the head, its instance profile (evl-ray-head may read the MLflow
prefix only) and AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import sys

NOT_FOUND = 3


def get_parameter(name: str, client=None) -> str | None:
    """The parameter's value, None if it does not exist."""
    if client is None:
        import botocore.session

        client = botocore.session.get_session().create_client("ssm")
    try:
        return client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
    except client.exceptions.ParameterNotFound:
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("/"):
        print("usage: ssm_parameter.py /PARAMETER/NAME", file=sys.stderr)
        return 2
    try:
        value = get_parameter(argv[0])
    except Exception as e:  # noqa: BLE001 - reported to the calling script, which stops
        print(f"ssm_parameter.py: {argv[0]}: {e}", file=sys.stderr)
        return 1
    if value is None:
        return NOT_FOUND
    sys.stdout.write(value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
