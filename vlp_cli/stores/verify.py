"""verify_store: read every record of a feature store (all shards) or corpus and check it.

Damage is reported, not raised: one pass finds every damaged record, so that a user learns
how much is lost (and which keys to re-extract) at once. Damage to LMDB's own structure
(a truncated file, a broken page) stops the pass and is reported as a problem.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlp_cli import VlpError
from vlp_cli.stores.integrity import ContentDigest
from vlp_cli.stores.lmdb_env import LazyReader, is_lmdb_dir

MAX_LISTED = 20  # damaged keys printed; the report keeps them all


@dataclass
class VerifyReport:
    """What `verify_store` found."""

    path: str
    kind: str  # "feature store" | "corpus"
    schema_version: int
    checksums: bool  # whether the records carry checksums (schema 2 on)
    records: int = 0  # records checked
    damaged: list[str] = field(default_factory=list)  # keys (or record numbers) that failed
    reasons: dict[str, str] = field(default_factory=dict)  # damaged key -> why
    problems: list[str] = field(default_factory=list)  # store-level damage
    notes: list[str] = field(default_factory=list)  # worth knowing, not damage

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        """The report as text, one finding a line."""
        out = [f"{self.kind} {self.path}: schema {self.schema_version}, "
               f"{'with' if self.checksums else 'WITHOUT'} record checksums",
               f"records checked: {self.records}, damaged: {len(self.damaged)}"]
        for key in self.damaged[:MAX_LISTED]:
            out.append(f"  damaged: {key} ({self.reasons.get(key, '')})")
        if len(self.damaged) > MAX_LISTED:
            out.append(f"  ... and {len(self.damaged) - MAX_LISTED} more (--json lists all)")
        out += [f"problem: {p}" for p in self.problems]
        out += [f"note: {n}" for n in self.notes]
        out.append("OK" if self.ok else "DAMAGED")
        return out


def verify_store(path: str | Path) -> VerifyReport:
    """Check every record of the feature store or corpus at `path`.

    Raises:
        VlpError: `path` is not a vlp store, or its LMDB file cannot be opened at all.
    """
    from vlp_cli.stores.features import store_parts

    path = Path(path)
    if not path.exists():
        raise VlpError(f"{path} does not exist")
    parts = store_parts(path)
    if not parts:
        raise VlpError(f"{path} is not a vlp feature store or corpus (no data.mdb, shard-* "
                       "folders or manifest.json)")
    schema = (LazyReader(parts[0]).meta("store") or {}).get("schema")
    if schema == "vlp.features":
        return _verify_features(path)
    if schema == "vlp.corpus" and is_lmdb_dir(path):
        return _verify_corpus(path)
    raise VlpError(f"{path} is an LMDB store vlp did not write (schema {schema!r})")


def _record(report: VerifyReport, key: str, why: str | None, count: bool = True) -> None:
    report.records += count
    if why is not None:
        report.damaged.append(key)
        report.reasons[key] = why


def _verify_features(path: Path) -> VerifyReport:
    from vlp_cli.stores.features import FeatureStore

    store = FeatureStore(path, allow_incomplete=True, warn=False)
    report = VerifyReport(str(path), "feature store", store.schema_version, store.checksums)
    digests = [ContentDigest() for _ in store.parts]
    try:
        for part, key, checksum, why in store.scan():
            _record(report, key, why)
            if why is None and checksum is not None:
                digests[part].add(key.encode(), checksum)
    except VlpError as exc:  # LMDB's own structure is damaged: nothing further can be read
        report.problems.append(str(exc))
        return report
    finally:
        store.close()
    if not store.complete:
        report.notes.append("the store is incomplete (extraction interrupted or running)")
    if not store.checksums:
        report.notes.append("schema-1 store: records were only checked for structure; "
                            "re-extract it to get checksums")
        return report
    for part, meta, digest in zip(store.parts, store.part_metas, digests):
        if meta.get("complete") and not report.damaged and (
                meta.get("content") != digest.hex or meta.get("images") != digest.count):
            report.problems.append(f"{part}: its records do not add up to the content "
                                   "fingerprint it recorded (records were changed or lost "
                                   "after it was written)")
    return report


def _verify_corpus(path: Path) -> VerifyReport:
    from vlp_cli.stores.corpus import Corpus

    corpus = Corpus(path)
    report = VerifyReport(str(path), "corpus", int(corpus.meta["schema_version"]),
                          corpus.checksums)
    try:
        for what, why in corpus.scan():
            _record(report, what, why, count=what.startswith("record"))
    except VlpError as exc:
        report.problems.append(str(exc))
        return report
    if report.records != len(corpus):
        report.problems.append(f"{report.records} records, but its metadata says {len(corpus)}")
    if not corpus.checksums:
        report.notes.append("schema-1 corpus: records were only checked for valid JSON; "
                            "rebuild it to get checksums")
    return report
