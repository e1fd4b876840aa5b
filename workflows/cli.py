"""The `evl` command: one subcommand per workflow module, each with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

COMMANDS = {
    "synth": ("workflows.synth", "write a synthetic video dataset (real h264 files, CVDF layout)"),
    "prepare": ("workflows.prepare", "probe a dataset's videos on Ray and write Parquet manifests"),
    "train": ("workflows.train", "train EVL with Ray Train + DeepSpeed, tracked in MLflow"),
    "eval": ("workflows.evaluate", "multi-view evaluation of a checkpoint"),
    "predict": ("workflows.predict", "top-5 labels for video files"),
    "sweep": ("workflows.sweep", "Ray Tune sweep over frame count and decoder depth"),
    "demo": ("workflows.demo", "the whole workflow on synthetic videos, on this machine"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="evl", description="EVL video recognition on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--verbose", action="store_true",
                       help="show the libraries' output (Ray, DeepSpeed, MLflow...) here instead of in logs/")
        # Only the chosen command's module is imported: `evl predict` never loads Ray.
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    # boto3 (MLflow's artifact client) retries throttled and dropped requests as evl.storage's pyarrow does.
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", "5")
    from evl.checkpoint import CheckpointError
    from evl.config import ConfigError
    from evl.storage import StorageError
    from workflows import console

    ray_was_up = _ray_is_up()  # a caller's Ray (tests, a notebook) is left as it is
    with console.session(args.command, args.verbose) as log:
        try:
            return importlib.import_module(COMMANDS[args.command][0]).run(args)
        except ConfigError as e:
            console.warn(f"evl {args.command}: configuration error: {e}")
            return 2
        except CheckpointError as e:
            console.warn(f"evl {args.command}: checkpoint error: {e}")
            return 2
        except StorageError as e:
            console.warn(f"evl {args.command}: storage error: {e}")
            return 1
        except KeyboardInterrupt:
            console.warn(f"evl {args.command}: interrupted")
            return 130
        except Exception as e:
            if log is None:
                raise
            traceback.print_exc()  # into the log
            console.warn(f"evl {args.command} failed: {type(e).__name__}: {e}\n  the whole story: {log}")
            return 1
        finally:
            if not ray_was_up and _ray_is_up():
                # Inside the session: what Ray's background threads still print (a decode task retried after
                # its actor was let go, ...) goes to the log, not after the command's summary.
                sys.modules["ray"].shutdown()


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imported here: `evl predict` runs without Ray
    return ray is not None and ray.is_initialized()
