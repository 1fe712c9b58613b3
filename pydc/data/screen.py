"""Is a folder of images usable at all? One message with the counts of each failure kind and example paths.

Loaders skip bad files one by one (pydc.data.decode, pydc.data.loaders); a folder where *no* file decodes would
otherwise run a whole feature pass and fail deep in PCA on an empty matrix. `screen_files` decodes files spread
evenly over the index until one decodes: a usable folder costs one decode, an unusable one at most
`SCREEN_LIMIT`. `require_enough_images` is the check after a full pass (the loaders' stats): at least k
images must have decoded for k clusters.
"""

from __future__ import annotations

from collections import defaultdict

from pydc.data.decode import MAX_PIXELS, UnreadableImage, decode, probe

SCREEN_LIMIT = 64
EXAMPLES = 3


class NoUsableImages(ValueError):
    """Too few of a folder's files decode for a run."""


class FailureSummary:
    """Failures by kind (pydc.data.decode.FAILURE_KINDS), each with a count and the first few paths."""

    def __init__(self):
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, path: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(path)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return "; ".join(f"{count} {kind} (e.g. {', '.join(self.examples[kind])})"
                         for kind, count in sorted(self.counts.items(), key=lambda item: -item[1]))


def spread_positions(length: int, limit: int) -> list[int]:
    """Up to `limit` distinct positions spread evenly over range(length), first and last included."""
    if length <= limit:
        return list(range(length))
    return sorted({round(i * (length - 1) / (limit - 1)) for i in range(limit)})


def screen_files(paths: list[str], limit: int = SCREEN_LIMIT, max_pixels: int = MAX_PIXELS) -> None:
    """Return as soon as one of `paths` decodes; raise NoUsableImages when none of those tried does."""
    failures = FailureSummary()
    positions = spread_positions(len(paths), limit)
    for position in positions:
        try:
            decode(probe(paths[position], max_pixels))
            return
        except UnreadableImage as error:
            failures.add(error.kind, paths[position])
    tried = f"all {len(paths)}" if len(positions) == len(paths) else f"{len(positions)} (spread over {len(paths)})"
    raise NoUsableImages(f"no image decodes: of the files tried, {tried}, {failures.describe()}")


def require_enough_images(stats: dict, num_clusters: int, root) -> None:
    """After a full pass: refuse to cluster fewer decoded images than clusters. `stats` is a loader's
    {"decoded", "skipped", "skipped_files"}; its skipped files are summarised by kind when probed again."""
    if stats["decoded"] >= num_clusters:
        return
    failures = FailureSummary()
    for path in sorted(stats.get("skipped_files", ()))[:SCREEN_LIMIT]:
        try:
            decode(probe(path))
        except UnreadableImage as error:
            failures.add(error.kind, path)
    detail = f"; skipped: {failures.describe()}" if failures.total else ""
    raise NoUsableImages(f"{root}: {stats['decoded']} images decoded, fewer than --k {num_clusters} clusters"
                         f"{detail}; lower --k or fix the files")
