"""The progress printers of workflows/console.py against a real MLflow store."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from workflows.console import SweepProgress


def test_sweep_progress_reports_trials_that_end_after_its_last_poll(tmp_path, capsys):
    """A pack's heads end together, just before the sweep returns: the printer's exit still reports them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("progress")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    with SweepProgress(uri, parent, total_trials=2, total_steps=4):  # polls every 3 s: never, in here
        for name, top1 in (("f4-d1-x", 0.5), ("f4-d2-x", 0.25)):
            child = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
            client.log_metric(child, "val_top1", top1, step=4)
            client.set_terminated(child, "FINISHED")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines] == [["trial", "1/2", "f4-d1-x", "finished"],
                                                    ["trial", "2/2", "f4-d2-x", "finished"]], lines
    assert "top-1 0.500" in lines[0] and "sweep ETA" in lines[0] and "sweep ETA" not in lines[1]
