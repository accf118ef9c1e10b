"""`capfilt --help`, every `capfilt COMMAND --help` and argument errors answer without loading
torch, transformers, Prefect, duckdb or pyarrow (each is imported inside the command that
uses it), so they take a fraction of a second instead of 4-14 s (issue 23). Checked by what
the process imported, not by a timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "prefect", "duckdb", "pyarrow", "pandas")
# Runs the entry point as `capfilt ARGS` would, then lists the heavy modules it imported.
_PROBE = """
import json, sys
args = json.loads(sys.argv[1])
sys.argv = ["capfilt", *args]
from flows.entry import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)


def _probe(args: list[str]) -> tuple[int, list[str], str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, timeout=300)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], report["loaded"], done.stdout + done.stderr


@pytest.mark.parametrize("args", [
    ["--help"], ["caption", "--help"], ["filter", "--help"], ["assemble", "--help"], ["run", "--help"],
    ["demo", "--help"], ["train", "--help"], ["ingest", "web", "--help"], ["ingest", "img2dataset", "--help"],
    ["synth", "--help"], ["query", "--help"], ["browse", "--help"], ["export", "--help"], ["evaluate", "--help"],
    ["ablation", "--help"], ["report", "--help"], ["serve", "--help"], ["ingest", "human", "--help"],
    ["ingest", "videos", "--help"], ["--verbose", "caption", "--help"],
])  # fmt: skip
def test_help_loads_no_heavy_library(args: list[str]) -> None:
    code, loaded, output = _probe(args)
    assert code == 0, output
    assert loaded == [], f"capfilt {' '.join(args)} imported {loaded}"
    assert "Usage" in output


@pytest.mark.parametrize("args", [["caption"], ["filter", "--threshold", "x"], ["query"], ["export"], ["run"],
                                  ["no-such-command"]])  # fmt: skip
def test_argument_errors_load_no_heavy_library(args: list[str]) -> None:
    code, loaded, output = _probe(args)
    assert code == 2, output
    assert loaded == [], f"capfilt {' '.join(args)} imported {loaded}"
