"""Defaults the command line shows in its help, kept free of pyarrow and duckdb so that
`capfilt --help` and every `capfilt COMMAND --help` build without them. Each belongs to
the module that uses it, which imports it from here (`data.gallery.DEFAULT_LIMIT`, ...)."""

from __future__ import annotations

DEFAULT_LIMIT = 200  # rows on a `capfilt browse` page (data.gallery)
DEFAULT_SHARD_ROWS = 10_000  # img2dataset's default samples per shard (data.export)
DEFAULT_BASE_URL = "http://127.0.0.1:8000"  # base of the synthetic world's URL list (data.synth)
DEFAULT_TIMEOUT_S = 60.0  # `capfilt query/browse --timeout`: a runaway query is stopped, not left running (data.catalog)
