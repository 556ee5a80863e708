"""The recommendation as a terminal table (rich) and an HTML page with plots (matplotlib).

matplotlib is optional (the ``recommend`` extra): ``--html`` without it says so.
"""

from __future__ import annotations

import base64
import html
import io

from rich.table import Table

from kubeinfer_runtime.contract.recommend import Quantile, RecommendReport


def _q(q: Quantile) -> str:
    return f"{q.value:.2f} [{q.low:.2f}, {q.high:.2f}]"


def table(report: RecommendReport) -> Table:
    t = Table(title=f"Candidates, best first (p99 SLO {report.sloP99Ms:g} ms; latency ms "
                    "at max throughput, 95% CI)")
    for col in ("#", "candidate", "state", "max req/s", "p50", "p90", "p99", "p99.9", "CPU %",
                "memory MiB", "instance", "cost/h", "per 1M"):
        t.add_column(col, justify="left" if col in ("candidate", "state", "instance")
                     else "right")
    for i, r in enumerate(report.results, 1):
        s = r.atMax
        cells = [_q(s.p50), _q(s.p90), _q(s.p99), _q(s.p999), f"{s.cpuPercent:.0f}",
                 f"{s.memoryBytes / 2**20:.0f}"] if s else ["-"] * 6
        state = r.state if not r.error else f"Failed: {r.error.splitlines()[0][:60]}"
        t.add_row(str(i), ("* " if r.name == report.recommended else "") + r.name, state,
                  f"{r.maxThroughput:.0f}", *cells, r.instanceType or "-",
                  f"{r.costPerHour:.3f}" if r.costPerHour is not None else "-",
                  f"{r.costPerMillion:.4f}" if r.costPerMillion is not None else "-")
    return t


def _plot(report: RecommendReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in report.results:
        if not r.steps:
            continue
        xs = [s.targetRate for s in r.steps]
        ys = [s.p99.value for s in r.steps]
        lo = [s.p99.value - s.p99.low for s in r.steps]
        hi = [s.p99.high - s.p99.value for s in r.steps]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=r.name)
    ax.axhline(report.sloP99Ms, color="red", linestyle="--", label="p99 SLO")
    ax.set_xlabel("offered rate (req/s, open loop)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def to_html(report: RecommendReport) -> str:
    png = _plot(report)
    rows = []
    for r in report.results:
        for s in r.steps:
            rows.append(
                f"<tr><td>{html.escape(r.name)}</td><td>{s.targetRate:.0f}</td>"
                f"<td>{s.achievedRate:.0f}</td><td>{s.requests}</td><td>{s.errors}</td>"
                f"<td>{_q(s.p50)}</td><td>{_q(s.p90)}</td><td>{_q(s.p99)}</td>"
                f"<td>{_q(s.p999)}</td><td>{s.cpuPercent:.0f}</td>"
                f"<td>{'held' if s.held else html.escape(s.limitedBy or '')}</td></tr>")
    ranked = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{r.state}</td><td>{r.maxThroughput:.0f}</td>"
        f"<td>{r.costPerHour if r.costPerHour is not None else '-'}</td>"
        f"<td>{f'{r.costPerMillion:.4f}' if r.costPerMillion is not None else '-'}</td>"
        f"<td>{html.escape((r.error or '')[:300])}</td></tr>" for r in report.results)
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>kubeinfer recommendation</title>
<style>body{{font-family:sans-serif}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Recommendation: {html.escape(report.recommended or "none")}</h1>
<p>{html.escape(report.reason)}</p>
<p>Search: {report.search}, {report.seconds:.0f} s. Suggested autoscaling target:
{report.autoscalingTarget} invocations per replica per minute.</p>
<h2>p99 latency vs offered rate (95% confidence intervals)</h2>
<img alt="p99 latency vs rate" src="data:image/png;base64,{png}">
<h2>Ranking</h2><table><tr><th>candidate</th><th>state</th><th>max req/s</th><th>cost/h</th>
<th>per 1M</th><th>error</th></tr>{ranked}</table>
<h2>Every step (latency ms, value [95% CI])</h2><table><tr><th>candidate</th><th>rate</th>
<th>achieved</th><th>requests</th><th>errors</th><th>p50</th><th>p90</th><th>p99</th>
<th>p99.9</th><th>CPU %</th><th>result</th></tr>{"".join(rows)}</table></body></html>
"""
