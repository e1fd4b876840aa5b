"""MLflow wiring: which store, one run per training run (the driver creates it, rank 0 writes to it).

The driver opens the run before any worker starts and hands its id to the workers, so a worker group that Ray
restarts after a failure, or a later `evl train --resume`, keeps writing to the same run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_STORE = "mlflow.db"


def resolve_tracking_uri(uri: str | None, root: str | Path | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else ./mlflow.db; relative SQLite paths become absolute (against
    `root`, default the current directory), so Ray workers in other directories reach the driver's store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((Path(root or Path.cwd()) / uri.removeprefix("sqlite:///")).resolve())
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def params_of(flat: dict[str, Any]) -> dict[str, str]:
    """Every resolved config value as an MLflow param (values stringified, None as 'null')."""
    return {k: ("null" if v is None else str(v))[:6000] for k, v in flat.items()}


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], config_yaml: str,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create a run with its params and resolved config; returns the run id. The run stays open (RUNNING)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # a SQLite store keeps artifacts beside the database, not in the driver's working directory
        location = None
        if uri.startswith("sqlite:///"):
            location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    log_params(client, run.info.run_id, params)
    client.log_text(run.info.run_id, config_yaml, "config.yaml")
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = list(params_of(params).items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])


def log_metrics(client: MlflowClient, run_id: str, step: int, metrics: dict[str, float]) -> None:
    clean = [mlflow.entities.Metric(k, float(v), int(mlflow.utils.time.get_current_time_millis()), step)
             for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]  # drop NaN
    if clean:
        client.log_batch(run_id, metrics=clean)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


def log_confusion_matrix(client: MlflowClient, run_id: str, confusion, class_names: list[str],
                         path: str = "confusion_matrix.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = min(40, max(4, 0.35 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 60:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    client.log_figure(run_id, fig, path)
    plt.close(fig)


def per_class_csv(per_class_accuracy, confusion, class_names: list[str]) -> str:
    out = io.StringIO()
    out.write("class_index,class_name,videos,accuracy\n")
    for i, name in enumerate(class_names):
        videos = int(confusion[i].sum())
        acc = "" if videos == 0 else f"{per_class_accuracy[i]:.6f}"
        out.write(f'{i},"{name}",{videos},{acc}\n')
    return out.getvalue()
