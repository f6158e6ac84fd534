"""The end of every compile: the ORT-format file, the report's last figures and the report files.

`pipeline.compile_into` leaves a `StagedCompile`: the artifacts and the manifest written in the
staging folder, the report assembled but not yet written, and the ORT-format conversion prepared
but not run. `finish_compile` runs the converter (about twice the weights in its own process),
adds its time and peak memory to the report's timings and writes report.{json,md,png}.

It is its own step so that the CLI can run it in its small parent process once the compile's
process has exited (`kvcompile.compile_process`); `pipeline.compile_model` runs both in one
process. This module imports nothing heavy; the report writer (numpy, matplotlib) is imported
when the converter has finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvcompile.ort_format import PendingConversion, run_converter
from kvcompile.report_types import Report

# progress(stage description, total units) -> advance(units): how every compile step reports
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class CompileResult:
    out_dir: Path
    report: Report

    @property
    def passed(self) -> bool:
        """False only when the quality gate failed (an unverified compile has not failed it)."""
        return self.report.quality.passed is not False


@dataclass(frozen=True)
class StagedCompile:
    """A compile whose artifacts and manifest are in the staging folder, before `finish_compile`."""

    result: CompileResult  # its report is not written yet
    ort_format: PendingConversion | None  # the ORT-format file to convert, if the ort-cpu target writes one
    gate_failure: str | None  # the quality gate's message when the gate failed


def finish_compile(stage: Path, staged: StagedCompile, progress: Progress | None = None) -> CompileResult:
    """Convert the pending ORT-format file, then write the report with the converter's figures."""
    report = staged.result.report
    if staged.ort_format is not None:
        if progress is not None:
            progress("writing the ORT-format file (onnxruntime's converter, in its own process)", 0)
        run = run_converter(staged.ort_format)
        timings = dict(report.timings)
        timings["ort_format_s"] = run.seconds
        if "peak_rss_mib" in timings:  # a calibrated compile's per-stage peaks: the converter's own beside them
            timings["peak_rss_mib"] = {**timings["peak_rss_mib"], "ort_format_converter": run.peak_rss_mib}
        report = dataclasses.replace(report, timings=timings)
    from kvcompile.report import write_report  # numpy and matplotlib: not beside the converter

    write_report(report, stage)
    return dataclasses.replace(staged.result, report=report)
