"""Bad input: a sample that cannot be used is skipped, counted and named, never fatal and never silent.

Data nobody inspected by hand has undecodable bytes, truncated or empty shards, samples without
labels, members that are not images. Each stage that reads images keeps a ``SkipLog``: every
skipped sample gets one warning line naming its shard (or file) and key, the counts go into the
stage's metrics, and the stage stops with a clear message once the skipped share passes
``data.max_bad_share`` (default 1 %), because then the data, not a sample, is broken.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pipeline.errors import DataError
from pipeline.tracking import log

MAX_WARNINGS = 20  # warning lines per log; the rest are counted (the metrics list examples)
MAX_EXAMPLES = 100


@dataclass(frozen=True)
class Skip:
    """One skipped sample (or, for a damaged shard, the ``count`` samples it lost)."""

    where: str  # shard or file name
    key: str
    reason: str
    count: int = 1


class SkipLog:
    """Counts skipped and used samples of one stage and enforces the limit on their share.

    ``expected``: how many samples the stage will read in all, when known; the limit is then
    enforced as soon as it is passed instead of at the end.
    """

    def __init__(self, stage: str, limit: float = 0.01, expected: int | None = None, quiet: bool = False):
        self.stage, self.limit, self.expected, self.quiet = stage, limit, expected, quiet
        self.skipped = 0
        self.used = 0
        self.reasons: Counter[str] = Counter()
        self.examples: list[dict] = []
        self._warned: set[tuple[str, str]] = set()

    def skip(self, item: Skip) -> None:
        self.skipped += item.count
        self.reasons[item.reason.split(":")[0]] += item.count
        seen = (item.where, item.key)
        if seen in self._warned:
            return  # the same sample again (a later epoch): counted, not repeated
        self._warned.add(seen)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"shard": item.where, "key": item.key, "reason": item.reason, "count": item.count})
        if not self.quiet:
            if len(self._warned) <= MAX_WARNINGS:
                lost = f" ({item.count} samples)" if item.count > 1 else ""
                log.warning(f"warning: {self.stage}: skipped {item.where} {item.key}{lost}: {item.reason}")
            elif len(self._warned) == MAX_WARNINGS + 1:
                log.warning(f"warning: {self.stage}: more bad samples; the rest are counted in the metrics")
        if self.expected and self.skipped > self.limit * self.expected:
            self._fail(self.expected)

    def extend(self, items) -> None:
        for item in items:
            self.skip(item)

    def use(self, n: int) -> None:
        self.used += n

    @property
    def share(self) -> float:
        total = self.used + self.skipped
        return self.skipped / total if total else 0.0

    def check(self) -> None:
        """Raise DataError if the skipped share passed the limit (call at the end of a pass)."""
        total = self.used + self.skipped
        if self.skipped and self.skipped > self.limit * total:
            self._fail(total)

    def _fail(self, total: int) -> None:
        first = self.examples[0] if self.examples else {}
        raise DataError(
            f"{self.stage}: {self.skipped} of {total} samples are bad ({100 * self.skipped / max(total, 1):.1f} %, "
            f"limit data.max_bad_share={self.limit}); first: {first.get('shard')} {first.get('key')}: "
            f"{first.get('reason')}. Fix or remove them, or raise data.max_bad_share")

    def metrics(self) -> dict:
        return {"skipped": self.skipped, "used": self.used, "skipped_share": round(self.share, 6),
                "limit": self.limit, "reasons": dict(self.reasons), "examples": self.examples}


class Tally:
    """Counts by reason, with examples, of what is not bad but must not pass silently.

    Used for inputs passed over on purpose (files that are not images, images outside a class
    folder, tar members of no sample, what a cap such as ``data.max_unlabeled`` leaves out: they do not
    count against ``data.max_bad_share``) and for images converted to the dataset's mode or size.
    """

    def __init__(self):
        self.reasons: Counter[str] = Counter()
        self.examples: list[dict] = []

    def add(self, where: str, reason: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.reasons[reason] += count
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, "reason": reason, "count": count})

    def merge(self, other: Tally) -> None:
        for e in other.examples:
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(e)
        self.reasons.update(other.reasons)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())

    def metrics(self) -> dict:
        return {"count": self.count, "reasons": dict(self.reasons), "examples": self.examples}
