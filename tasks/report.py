"""The per-run HTML report of a family: Pareto plots (the gate's quality metric vs size and vs latency), the
models' measurements, the gate table and, when present, the ablation table. Plots are inline SVG, so the report is
one self-contained file.

Pure: ``render_report(evaluation, gate, ablation, context, view) -> str``; ``view`` says which metric and latency
the family is measured by (``ReportView``).
"""
from __future__ import annotations

import html
import io
from dataclasses import dataclass
from typing import Any

LABELS = {"teacher_fp32": "teacher FP32", "student_fp32": "student FP32", "student_ptq_int8": "student PTQ INT8",
          "student_int8": "student INT8 (the candidate)"}


@dataclass(frozen=True)
class ReportView:
    """What a family's report shows: its title, its quality metric (``val_``/``test_<metric>`` in the evaluation)
    and its latency (``<latency>_p50_ms`` ...), described for the axis."""

    title: str
    metric: str
    latency: str
    latency_what: str
    ablation: bool = False   # the family has an ablation command (`make ablation`) whose table the report shows



def pareto_svg(models: dict[str, dict[str, float]], x_key: str, x_label: str, metric: str, scale: float = 1.0) -> str:
    """Test ``metric`` against ``x_key`` for every model, log-scaled x, as an SVG string."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, m in models.items():
        x, y = m[x_key] * scale, m[f"test_{metric}"]
        ax.scatter([x], [y], s=50)
        ax.annotate(LABELS.get(name, name), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"test {metric}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog: the SVG is inlined into HTML


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


#: Who measured a model's latencies (``latency_timed_by`` in its evaluation entry, else the evaluate stage)
TIMED_BY = {"gate": "the gate, in paired rounds"}


def models_table(models: dict[str, dict[str, float]], view: ReportView) -> str:
    first = next(iter(models.values()))
    tp = next((k for k in first if k.startswith("throughput_")), None)
    lat, metric = view.latency, view.metric
    rows = [[LABELS.get(n, n), f"{m[f'val_{metric}']:.4f}", f"{m[f'test_{metric}']:.4f}", f"{m['bytes']:,}",
             f"{m['gzip_bytes']:,}", f"{m.get('parameters', 0):,}",
             *(f"{m[f'{lat}_{q}_ms']:.3f}" for q in ("p50", "p95", "p99")),
             *([f"{m[tp]:,.0f}"] if tp else []),
             TIMED_BY.get(str(m.get("latency_timed_by")), "the evaluate stage")] for n, m in models.items()]
    return _table(["model", f"val {metric}", f"test {metric}", "bytes", "gzip bytes", "parameters",
                   f"{view.latency_what} p50 ms", "p95 ms", "p99 ms", *([tp.replace("_", " ")] if tp else []),
                   "latencies timed by"], rows)


def gate_table(gate: dict[str, Any]) -> str:
    rows = [[c["name"], f"{c['value']:.4g}", f"{c['op']} {c['threshold']:.4g}", "pass" if c["passed"] else "FAIL",
             c["why"]] for c in gate["checks"]]
    return f"<p>Gate: <b>{'PASS' if gate['passed'] else 'FAIL'}</b></p>" + _table(
        ["check", "value", "threshold", "result", "why"], rows)


def ablation_table(ablation: dict[str, Any]) -> str:
    """The ablation's table; an ablation file this code cannot read (e.g. from an older version) is named, not
    fatal: the report is written after the candidate is registered, and must not fail it."""
    try:
        rows = [[r["arm"], r["precision"], f"{100 * r['val_mean']:.2f}",
                 f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (n={r['n']})", f"{r['min_top1_agreement']:.4f}",
                 f"{r['parameters']:,}", f"{r['nonzero']:,}", f"{r['bytes']:,}", f"{r['gzip_bytes']:,}",
                 f"{r['latency_ms']:.3f}", f"{r['throughput_ips']:,.0f}"]
                for r in ablation["rows"]]
        header = f"<p>{html.escape(ablation['date'])}, {html.escape(ablation['machine'])}, seeds {ablation['seeds']}</p>"
    except (KeyError, TypeError, ValueError) as err:
        return (f"<p>The ablation file is not in this version's format ({html.escape(type(err).__name__)}: "
                f"{html.escape(str(err))}); re-run <code>make ablation</code>.</p>")
    return (header
            + _table(["arm", "precision", "val accuracy % (mean)", "test accuracy % (mean ± std)",
                      "ONNX parity (min top-1 agreement)", "parameters", "non-zero", "ONNX bytes", "gzip bytes",
                      "batch-1 p50 ms", "batch throughput images/s"], rows))


def render_report(evaluation: dict[str, Any], gate: dict[str, Any], ablation: dict[str, Any] | None,
                  context: dict[str, str], view: ReportView) -> str:
    models, metric = evaluation["models"], view.metric
    meta = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in context.items())
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(view.title)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        ".plots{display:flex;gap:1em;flex-wrap:wrap}</style></head><body>",
        f"<h1>{html.escape(view.title)}</h1>", f"<ul>{meta}</ul>",
        f"<h2>Test {metric} vs size and latency (the Pareto view)</h2><div class='plots'>",
        pareto_svg(models, "bytes", "ONNX size (KB)", metric, 1 / 1024),
        pareto_svg(models, f"{view.latency}_p50_ms", f"{view.latency_what} p50 latency (ms)", metric), "</div>",
        "<p>Latencies compare best within one measurement: the Models table says which timed each model.</p>",
        "<h2>Models</h2>", models_table(models, view), "<h2>Gate</h2>", gate_table(gate)]
    if view.ablation:
        parts += ["<h2>Ablation</h2>", ablation_table(ablation) if ablation else
                  "<p>No ablation run yet (<code>make ablation</code>).</p>"]
    return "\n".join([*parts, "</body></html>"])
