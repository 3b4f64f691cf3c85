"""Benchmark: keeping a serving store in step with a night's change against reloading it whole.

A synthetic corpus of ``--docs`` documents (default 100,000) is published with ``jobs.refresh`` (a random
2-layer encoder of ``--dim`` dimensions, default 384 as the default model's: no SciFact, no downloads), then a
night changes ``--churn`` of them (default 5%; a fifth of that deleted and as many added) and is published too.
For each sink (a LanceDB table on a local path, a Qdrant collection in the client's local mode on a path),
measured side by side in one run:
  * reload: an empty store brought to the night's version (what a user without change files does: every vector);
  * sync: a store holding the previous version brought to the night's version (the night's changes only);
  * rollback: that store brought back to the previous version (Qdrant: the night undone in place; LanceDB: the
    tagged table version checked out);
each store checked afterwards to hold exactly the target version's doc ids. Printed: seconds of each and the
ratios sync / reload and rollback / reload (the target: sync / reload <= 0.15 at 5% change).

Run (from the repository root, with the venv active):
  python bench/sink_vs_reload.py --out sinks.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--churn", type=float, default=0.05)
    p.add_argument("--dim", type=int, default=384, help="the encoder's dimension (384: the default model's)")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--sinks", nargs="+", default=["lance", "qdrant"], choices=["lance", "qdrant"])
    p.add_argument("--workdir", type=Path, help="work here; a workdir of an earlier run keeps its two nights")
    p.add_argument("--repeat", type=int, default=5, help="runs whose medians are taken when a reload is under 5 s")
    p.add_argument("--out", type=Path)
    p.add_argument("--set", action="append", default=[])
    return p.parse_args(argv)


def publish_two_nights(args, work: Path) -> tuple[Path, str, str]:
    from helpers import build_tiny_model, write_parquet
    from refresh_vs_full import next_night, synthetic_docs, uniform_config

    from jobs import refresh

    root, names = work / "root", []
    from retrieval_core.io import versions
    from retrieval_core.io.folder import Folder

    if (root / "CURRENT").exists():  # --workdir of an earlier run: its two nights again
        v1, v2 = versions.list_versions(Folder(str(root)))[:2]
        return root, v1, v2
    model = str(build_tiny_model(work / "model", dropout=0.0, hidden_size=args.dim, intermediate_size=args.dim))
    rng = np.random.default_rng(0)
    docs = synthetic_docs(args.docs, rng)
    night_docs = [docs, next_night(docs, args.churn, rng, 1, args.docs)[0]]
    for night, snapshot in enumerate(night_docs):
        corpus = write_parquet(work / f"night{night}" / "corpus.parquet", snapshot, row_group_size=10_000)
        started = time.perf_counter()
        record = refresh.run(uniform_config(args, corpus, root, model))
        names.append(record["version"])
        print(f"night {night}: published {record['version']} in {time.perf_counter() - started:.1f} s", flush=True)
    return root, names[0], names[1]


RUN = time.strftime("%Y%m%dT%H%M%S")  # stores of this run: a --workdir reused never starts from earlier stores


def spec_of(kind: str, work: Path, name: str, batch_size: int) -> dict:
    from retrieval_core.config.sinks import sink_specs

    name = f"{name}-{RUN}"
    entry = (
        {"kind": "lance", "uri": str(work / "lance"), "table": name}
        if kind == "lance"
        else {"kind": "qdrant", "url": str(work / f"qdrant-{name}"), "collection": name}
    )
    return sink_specs([entry], batch_size)[0]


def timed_sync(spec: dict, root: Path, target: str) -> tuple[float, dict]:
    from retrieval_core.encode import embeddings
    from retrieval_core.io import versions
    from retrieval_core.io.folder import Folder
    from retrieval_core.serve import syncing
    from retrieval_core.serve.stores import open_sink

    folder = Folder(str(root))
    manifest = embeddings.read_embeddings_manifest(Folder(versions.version_root(str(root), target)))
    sink = open_sink(spec, manifest["dim"], True)
    try:
        started = time.perf_counter()
        record = syncing.sync(sink, folder, target)
        return time.perf_counter() - started, record
    finally:
        sink.close()


def held_ids(spec: dict, dim: int) -> set[str]:
    from retrieval_core.serve.stores import open_sink

    sink = open_sink(spec, dim, True)
    try:
        if spec["kind"] == "lance":
            return set(sink._table().to_arrow().column("doc_id").to_pylist())
        ids, offset = set(), None
        while True:
            points, offset = sink.client.scroll(spec["collection"], limit=10_000, offset=offset)
            ids.update(p.payload["doc_id"] for p in points)
            if offset is None:
                return ids
    finally:
        sink.close()


def version_ids(root: Path, name: str) -> tuple[set[str], int]:
    from retrieval_core.encode import embeddings
    from retrieval_core.io import versions
    from retrieval_core.io.folder import Folder

    _, vectors, doc_ids = embeddings.load_embeddings(Folder(versions.version_root(str(root), name)))
    return set(doc_ids), vectors.shape[1]


def current(root: Path, name: str) -> None:
    """CURRENT moved to version ``name`` (a rollback, or forward again): the sync's target."""
    from jobs import refresh

    assert refresh.main(["--set", f"output.root={root}", "--rollback", name, "--log-level", "WARNING"]) == 0


def measure_once(kind: str, args, work: Path, root: Path, v1: str, v2: str, run: int) -> dict:
    """One reload, one sync and one rollback of fresh stores, each store checked."""
    reload_spec = spec_of(kind, work, f"reload{run}", args.batch_size)
    synced_spec = spec_of(kind, work, f"synced{run}", args.batch_size)
    reload_s, _ = timed_sync(reload_spec, root, v2)
    current(root, v1)  # the synced store first holds v1 (untimed)
    timed_sync(synced_spec, root, v1)
    current(root, v2)
    sync_s, record = timed_sync(synced_spec, root, v2)
    (ids2, dim), (ids1, _) = version_ids(root, v2), version_ids(root, v1)
    assert held_ids(reload_spec, dim) == ids2 and held_ids(synced_spec, dim) == ids2
    current(root, v1)
    rollback_s, back = timed_sync(synced_spec, root, v1)
    assert held_ids(synced_spec, dim) == ids1
    current(root, v2)
    return {"reload_s": reload_s, "sync_s": sync_s, "rollback_s": rollback_s, "record": record, "back": back}


def measure(kind: str, args, work: Path, root: Path, v1: str, v2: str) -> dict:
    """The medians of several runs when a reload takes under 5 s (sub-second timings are noisy), else one run."""
    runs = [measure_once(kind, args, work, root, v1, v2, 0)]
    if runs[0]["reload_s"] < 5:
        runs += [measure_once(kind, args, work, root, v1, v2, i) for i in range(1, args.repeat)]
    reload_s, sync_s, rollback_s = (
        float(np.median([r[k] for r in runs])) for k in ("reload_s", "sync_s", "rollback_s")
    )
    record, back = runs[0]["record"], runs[0]["back"]
    return {
        "runs": len(runs),
        "sink": kind,
        "reload_s": round(reload_s, 3),
        "sync_s": round(sync_s, 3),
        "rollback_s": round(rollback_s, 3),
        "sync_over_reload": round(sync_s / reload_s, 4),
        "rollback_over_reload": round(rollback_s / reload_s, 4),
        "sync": {k: record["last_sync"][k] for k in ("upserted", "deleted")},
        "rollback_steps": [s["kind"] for s in back["last_sync"]["steps"]],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    random.seed(0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sink-bench-"))
    root, v1, v2 = publish_two_nights(args, work)
    rows = [measure(kind, args, work, root, v1, v2) for kind in args.sinks]
    lines = [
        f"{args.docs:,} documents; a night: {args.churn:.0%} changed, {args.churn / 5:.0%} deleted and as many added",
        "| sink | runs | reload s | sync s | sync / reload | rollback s | rollback / reload | rollback by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['sink']} | {r['runs']} | {r['reload_s']} | {r['sync_s']} | {r['sync_over_reload']} | "
            f"{r['rollback_s']} | {r['rollback_over_reload']} | {', '.join(r['rollback_steps'])} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "table": lines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
