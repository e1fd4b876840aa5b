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


def ui_lines(uri: str, run_id: str, port: int = 5000, experiment_page: bool = False) -> list[str]:
    """How to look at a run (or, with experiment_page, at its experiment's runs: a sweep's trials side by side):
    the UI command for a local store, then the page in MLflow's "Model training" view (MLflow 3 opens on its
    GenAI view otherwise)."""
    experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment}/runs{'' if experiment_page else '/' + run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return [f"  see it: {uri.rstrip('/')}/{page}"]
    return [f"  see it: mlflow ui --backend-store-uri {uri} --port {port}",
            f"          then open http://127.0.0.1:{port}/{page}"]


def params_of(flat: dict[str, Any]) -> dict[str, str]:
    """Every resolved config value as an MLflow param (values stringified, None as 'null')."""
    return {k: ("null" if v is None else str(v))[:6000] for k, v in flat.items()}


# MLflow 3 opens an experiment on its GenAI overview unless the experiment says it trains models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def start_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], config_yaml: str,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create a run with its params and resolved config; returns the run id. The run stays open (RUNNING)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # a SQLite store keeps artifacts beside the database, not in the driver's working directory
        location = None
        if uri.startswith("sqlite:///"):
            location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    else:
        exp_id = exp.experiment_id
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # experiments made before the kind was set
            client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
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


# How the data pipeline and the loop are doing goes to the run's "System metrics" tab (MLflow files every
# `system/` metric there), beside CPU, GPU and memory: the "Model metrics" tab keeps loss, lr and accuracy.
PIPELINE_METRICS = ("clips_per_s", "data_wait_s", "data_wait_frac", "eta_s", "data_pass", "decode_failures",
                    "decode_actors", "decode_nodes", "resumed_from_step")


def mlflow_name(metric: str) -> str:
    return f"system/{metric}" if metric in PIPELINE_METRICS else metric


def log_metrics(client: MlflowClient, run_id: str, step: int, metrics: dict[str, float]) -> None:
    now = int(mlflow.utils.time.get_current_time_millis())
    clean = [mlflow.entities.Metric(mlflow_name(k), float(v), now, step)
             for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]  # drop NaN
    if clean:
        client.log_batch(run_id, metrics=clean)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status=status)


def end_open_children(uri: str, parent_run_id: str, status: str) -> int:
    """End with `status` every child of the parent still RUNNING (trials a sweep stopped or lost); returns how
    many. A finished sweep leaves no run RUNNING."""
    client = MlflowClient(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                f"and attributes.status = 'RUNNING'")
    for run in children:
        client.set_terminated(run.info.run_id, status=status)
    return len(children)


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
