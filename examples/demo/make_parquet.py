"""Convert corpus.jsonl (next to this file) to corpus.parquet with 32-row row groups."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "corpus.jsonl").read_text().splitlines() if line.strip()]
    table = pa.table(
        {
            "id": pa.array([r["id"] for r in rows], type=pa.string()),
            "title": pa.array([r["title"] for r in rows], type=pa.string()),
            "text": pa.array([r["text"] for r in rows], type=pa.string()),
        }
    )
    pq.write_table(table, HERE / "corpus.parquet", row_group_size=32)
    print(f"wrote {table.num_rows} rows to {HERE / 'corpus.parquet'}")


if __name__ == "__main__":
    main()
