"""A failed command says what failed and how to fix it in one line; the traceback only with --verbose.

Every command of the app takes ``--verbose`` (`run` and `demo` also show Prefect's own log
lines with it). Without it, an exception that escapes a command (a missing input, a model
folder that is not there, a read-only output, a missing bucket, refused credentials) is
printed as ``capfilt COMMAND: error: WHAT (FIX)`` on stderr and the command exits 1;
Ctrl-C keeps its own handling (`flows.interrupt`), and argument errors stay typer's (exit 2).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.exceptions import TyperException

EXIT_FAILED = 1
VERBOSE_ENV = "CAPFILT_VERBOSE"  # "1" while a command runs with --verbose (its child processes inherit it, and a command run with it set is verbose)
VERBOSE_HELP = "Show the full traceback of an error (run and demo: also Prefect's own log lines)."
_ABOUT = "capfilt: while opening "  # the note `naming` adds to an error that names no file
_MAX_CHARS = 1000  # an error line longer than this is cut (a server's whole XML answer, a huge repr)

# What to do about an OS error, by errno.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "give a file there, not a folder",
    errno.EACCES: "choose a place you may write to, or fix its permissions",
    errno.EPERM: "choose a place you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.ENOSPC: "the disk is full: free space or choose another disk",
    errno.EDQUOT: "the disk quota is used up: free space or choose another disk",
}
# What to do about an error of a storage or network library, by its class name (no import needed).
_NAMED_FIXES = {
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or storage.options",
    "PartialCredentialsError": "give both the access key id and the secret key",
    "ClientError": "check the bucket name and the credentials",
    "EndpointConnectionError": "check AWS_ENDPOINT_URL / storage.options.s3.endpoint_url and that the store runs",
    "ConnectError": "check the endpoint address and that the server runs",
}


def is_verbose() -> bool:
    """Whether the running command was given --verbose."""
    return os.environ.get(VERBOSE_ENV) == "1"


def one_line(exc: BaseException) -> str:
    """`exc` as one line: what failed (the path for an OS error) and, where known, the fix."""
    fix = _NAMED_FIXES.get(type(exc).__name__)
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = exc.strerror or " ".join(" ".join(map(str, exc.args)).split()) or type(exc).__name__
        what = f"{exc.filename}: {reason[0].lower() + reason[1:]}"
        fix = _OS_FIXES.get(exc.errno or 0, fix)
    else:
        what = " ".join(str(exc).split()) or type(exc).__name__
        about = [note[len(_ABOUT) :] for note in getattr(exc, "__notes__", ()) if note.startswith(_ABOUT)]
        what = f"{about[0]}: {what}" if about else what
        if isinstance(exc, PermissionError) and fix is None:
            fix = "check the credentials and that they may use this place"
    if len(what) > _MAX_CHARS:
        what = what[: _MAX_CHARS - 1] + "…"
    return f"{what} ({fix})" if fix and fix not in what else what


@contextmanager
def naming(thing: str) -> Iterator[None]:
    """An error raised inside that names no file (an object store's "The specified bucket does
    not exist", "Forbidden", absent credentials) is about `thing`: its line names it. For the
    first touch of an output or run folder."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = thing
        raise
    except Exception as exc:
        exc.add_note(f"{_ABOUT}{thing}")
        raise


def console_logs_without_tracebacks() -> None:
    """Unless --verbose, the console's log lines (the root logger's stream handlers: Prefect's
    flow and task runs log there) keep their one-line message but drop the traceback, which
    the command's own error line replaces; other handlers (Prefect's API, so its UI) keep
    it. Call after the library that sets the handlers up (Prefect) is imported."""
    if is_verbose():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not getattr(handler, "_capfilt_short", False):
            handler.format = _without_traceback(handler.format)  # type: ignore[method-assign]
            handler._capfilt_short = True  # type: ignore[attr-defined]


def _without_traceback(format_record: Callable[[logging.LogRecord], str]) -> Callable[[logging.LogRecord], str]:
    def short(record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return format_record(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

    return short


def _verbose_parameter() -> inspect.Parameter:
    return inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                             default=typer.Option(False, "--verbose", help=VERBOSE_HELP))  # fmt: skip


def one_line_errors(name: str, command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` taking --verbose (when it does not already), with an escaping exception
    printed as one line and exit 1 unless --verbose (then the traceback, as Python prints it)."""
    signature = inspect.signature(command, eval_str=True)
    own = "verbose" in signature.parameters
    params = list(signature.parameters.values()) + ([] if own else [_verbose_parameter()])

    @functools.wraps(command)
    def wrapper(**values: Any) -> Any:
        verbose = bool(values["verbose"] if own else values.pop("verbose")) or is_verbose()  # or `capfilt --verbose CMD`
        if own:
            values["verbose"] = verbose
        before = os.environ.pop(VERBOSE_ENV, None)
        if verbose:
            os.environ[VERBOSE_ENV] = "1"
        try:
            return command(**values)
        except (TyperException, typer.Exit, typer.Abort):
            raise  # typer's own: a bad parameter with the usage (exit 2), or an exit the command chose
        except Exception as exc:
            if verbose:
                raise
            typer.echo(f"capfilt {name}: error: {one_line(exc)}  [--verbose shows the traceback]", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        finally:
            os.environ.pop(VERBOSE_ENV, None)
            if before is not None:
                os.environ[VERBOSE_ENV] = before

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    del wrapper.__wrapped__  # typer reads the signature above, not the command's own
    return wrapper


def global_verbose(ctx: typer.Context, verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP)) -> None:
    """The app's callback: ``capfilt --verbose COMMAND ...`` is ``capfilt COMMAND ... --verbose``."""
    if not verbose:
        return
    before = os.environ.get(VERBOSE_ENV)
    os.environ[VERBOSE_ENV] = "1"
    ctx.call_on_close(lambda: os.environ.pop(VERBOSE_ENV, None) if before is None else os.environ.update({VERBOSE_ENV: before}))


def apply(app: typer.Typer, prefix: str = "") -> None:
    """Give every command of `app` (and of its sub-apps) --verbose and one-line errors."""
    for info in app.registered_commands:
        name = prefix + (info.name or info.callback.__name__.replace("_", "-"))
        info.callback = one_line_errors(name, info.callback)
    for group in app.registered_groups:
        apply(group.typer_instance, prefix + f"{group.name} ")
