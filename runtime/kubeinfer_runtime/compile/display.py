"""What a person sees: a live status line while compiling, then the candidates table.

Progress goes to stderr (a spinner with the current stage on a terminal, one
line per finished stage everywhere), so stdout carries only the result: the
table of candidates, each with its p50/p99 at every batch size, its accuracy
delta, its speedup over onnxruntime fp32 and why it was or was not chosen.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.status import Status
from rich.table import Table

from kubeinfer_runtime.contract.compile import CompileReport


class Display:
    """A ``pipeline.Progress`` drawing on stderr with rich."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._status: Status | None = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self._status = self.console.status("Starting")
            self._status.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def step(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)

    def done(self, text: str) -> None:
        self.console.print(f"[green]✓[/green] {text}", highlight=False)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def candidates_table(report: CompileReport) -> Table:
    sizes = report.batch_sizes or [1]
    table = Table(title=f"Candidates for target {report.target}"
                        + (f" ({report.target_cpu})" if report.target_cpu else ""))
    table.add_column("candidate")
    for b in sizes:
        table.add_column(f"b{b} p50 ms", justify="right")
        table.add_column(f"b{b} p99 ms", justify="right")
    table.add_column("max-abs-diff", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("speedup", justify="right")
    table.add_column("chosen / why")
    for c in report.candidates:
        cells = [c.name.value]
        for b in sizes:
            cells += [_ms(c.p50_ms.get(b)), _ms(c.p99_ms.get(b))]
        cells += ["" if c.max_abs_diff is None else f"{c.max_abs_diff:.2g}",
                  "" if c.top1_agreement is None else f"{c.top1_agreement:.1%}",
                  "" if c.speedup is None else f"{c.speedup:.2f}x",
                  c.note]
        table.add_row(*cells, style="bold" if c.chosen else None)
    return table


def print_table(report: CompileReport, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a log: no terminal width to fit
            console = Console(width=200)
    console.print(candidates_table(report))
    if report.tvm_status:
        console.print(f"TVM: {report.tvm_status}", highlight=False)
    speed = "" if report.speedup is None else f", {report.speedup:.2f}x onnxruntime fp32"
    chosen = report.chosen.value if report.chosen else "?"
    console.print(f"Chosen: {chosen} ({report.backend}{speed}); {report.verification}",
                  highlight=False)
    console.print(f"Why: {report.reason}", highlight=False)
    console.print(f"Artifact: {report.artifact_dir_uri} (tarball {report.artifact_uri}, "
                  f"sha256 {report.sha256[:16]}…)", highlight=False)
    if report.tuning_trials or report.tuning_cache_hit:
        console.print(f"Tuning: {report.tuning_trials} new trials in "
                      f"{report.tuning_seconds:.1f} s"
                      + (" (cache hit)" if report.tuning_cache_hit else ""), highlight=False)
