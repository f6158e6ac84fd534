"""Peak resident memory by the end of each compile stage (the report's timings).

The figure is this process's peak so far (`ru_maxrss`, VmHWM): a stage whose figure is higher
than the one before it set a new peak, and the last figure is the compile's peak. It is not reset
between stages (Linux could, through /proc/self/clear_refs, but that also resets what an outer
`/usr/bin/time` or `getrusage(RUSAGE_CHILDREN)` reports). Child processes (the ORT-format
converter) are counted apart, by the largest one's peak.
"""

from __future__ import annotations

import resource


def peak_rss_mib() -> int:
    """This process's peak RSS so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def children_peak_rss_mib() -> int:
    """The largest peak RSS (MiB) of any child process that has finished."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
