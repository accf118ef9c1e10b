"""Serve the bootstrap's deployments with `flow.serve` (no work pool needed).

Two deployments of the `capfilt-bootstrap` flow:

- ``capfilt-bootstrap/demo``: the synthetic-world demo (preset `demo`, or
  `demo-quick` with `quick=True`);
- ``capfilt-bootstrap/full``: a real run, from a YAML config or the `gpu` preset.

Trigger one with ``prefect deployment run capfilt-bootstrap/demo`` (optionally
``--param config='{"preset": "demo-quick", "run_dir": "runs/x"}'``). Serving needs a
Prefect API (``prefect server start`` and ``PREFECT_API_URL``); `prefect.yaml` holds the
same deployments for a `process` work pool and ``prefect worker start``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.config import load_yaml, preset

DEMO = "demo"
FULL = "full"


def deployment_parameters(quick: bool = False, full_config: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The `config` parameter of each deployment, validated now (a bad file fails here)."""
    demo = preset("demo-quick" if quick else "demo")
    full = load_yaml(full_config) if full_config else preset("gpu")
    return {
        DEMO: {"config": demo.model_dump(mode="json")},
        FULL: {"config": full.model_dump(mode="json")},
    }


def build_deployments(quick: bool = False, full_config: str | Path | None = None) -> list[Any]:
    """`RunnerDeployment`s for the demo and full runs of the bootstrap flow."""
    from flows.bootstrap import bootstrap

    params = deployment_parameters(quick, full_config)
    return [
        bootstrap.to_deployment(
            name=DEMO, parameters=params[DEMO], tags=["capfilt", "demo"],
            description="CapFilt bootstrap on the built-in synthetic world (tiny MED, CPU)",
        ),
        bootstrap.to_deployment(
            name=FULL, parameters=params[FULL], tags=["capfilt", "full"],
            description="CapFilt bootstrap at full size (base MED, GPUs, Dask)",
        ),
    ]  # fmt: skip


def serve_deployments(quick: bool = False, full_config: str | Path | None = None, limit: int | None = None) -> None:
    """Serve both deployments until interrupted (Ctrl-C); each run is a subprocess."""
    from prefect import serve

    serve(*build_deployments(quick, full_config), limit=limit)
