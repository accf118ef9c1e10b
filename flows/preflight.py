"""What `capfilt run` and `capfilt demo` check before Prefect starts (several seconds), so
a run that cannot work is refused at once, in one line, instead of inside the flow: a
device this machine lacks, a run folder another process is writing."""

from __future__ import annotations

from flows.config import RunConfig


def preflight(config: RunConfig) -> RunConfig:
    """`config` with its device made concrete for this machine (``auto``: cuda when there is
    one, else cpu), after refusing (ValueError) a device that is not here, in the run or in
    a stage's `execution` block, and (`data.run_lock.RunLockedError`) a run folder held by
    another process."""
    from data.run_lock import ensure_free
    from flows.commands.errors import naming
    from tasks.execution import available_device

    for where, name in (("caption.execution.device", config.caption.execution.device),
                        ("filter.execution.device", config.filter.execution.device)):  # fmt: skip
        try:
            available_device(name)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    device = available_device(config.device)
    with naming(config.run_dir):  # the first touch of the run folder: a missing bucket names it
        ensure_free(config.run_dir)
    return config.model_copy(update={"device": device})
