"""An image family's ablation arms and what is made of their measurements (``flows.ablation``): the rows (test
accuracy mean ± std over seeds, the validation mean any choice must read, parity, sizes, speed), the targets of
``ablation.<family>.targets`` checked against them, and the markdown table.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import date

from flows.benchmark import machine
from tasks.config import Config
from tasks.gate import meets
from tasks.images.ablation_config import AblationImages

ARMS = {  # arm -> precision of the measured ONNX model
    "teacher": "FP32", "student CE-only": "FP32", "student KD": "FP32", "CE-only + PTQ": "INT8",
    "KD + PTQ": "INT8", "QAT without KD": "INT8", "KD + QAT": "INT8", "KD + QAT + pruning": "INT8",
    "KD + QAT + weight sharing": "INT8"}
LOW_BIT_ARMS = ("CE-only + PTQ", "QAT without KD", "KD + QAT")   # again with ablation.<family>.low_bit's weights


def arms(spec: AblationImages) -> dict[str, str]:
    """Every arm of this ablation, in table order, with the precision of its measured ONNX model."""
    low = spec.low_bit
    if low is None:
        return dict(ARMS)
    return {**ARMS, **{low_bit_arm(arm, low.weight_bits): f"W{low.weight_bits}A8" for arm in LOW_BIT_ARMS}}


def low_bit_arm(arm: str, weight_bits: int) -> str:
    return f"W{weight_bits}A8 {arm}"


@dataclass(frozen=True)
class Measured:
    accuracy: float          # test split: reported
    val_accuracy: float      # validation split: what any choice made from this table must read
    parameters: int
    nonzero: int
    bytes: int
    gzip_bytes: int
    top1_agreement: float    # the ONNX file against its reference (the export stage's parity check)
    latency_ms: float        # batch-1 p50 in onnxruntime, as evaluate_<family> measures it
    throughput_ips: float    # images per second at evaluate.<family>.throughput_batch


def summarise(per_seed: dict[int, dict[str, Measured]], teacher: Measured, precision: dict[str, str]
              ) -> dict[str, dict]:
    """Per arm of ``precision`` (arm -> precision, in table order): test accuracy mean ± std over seeds (sample
    std; 0 for one seed), validation accuracy mean, the lowest top-1 agreement of its ONNX files with their
    references, sizes as seed means."""
    def row(arm: str, measured: list[Measured]) -> dict:
        acc = [m.accuracy for m in measured]
        return {"precision": precision[arm], "accuracies": acc, "val_accuracies": [m.val_accuracy for m in measured],
                "val_mean": statistics.fmean(m.val_accuracy for m in measured),
                "min_top1_agreement": min(m.top1_agreement for m in measured), **_sizes(measured),
                "mean": statistics.fmean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "n": len(acc)}

    return {"teacher": row("teacher", [teacher]),
            **{arm: row(arm, [per_seed[seed][arm] for seed in per_seed]) for arm in list(precision)[1:]}}


def _sizes(measured: list[Measured]) -> dict[str, float]:
    """Sizes and speed as seed means."""
    sizes = {key: round(statistics.fmean(getattr(m, key) for m in measured))
             for key in ("parameters", "nonzero", "bytes", "gzip_bytes")}
    return {**sizes, **{key: statistics.fmean(getattr(m, key) for m in measured)
                        for key in ("latency_ms", "throughput_ips")}}


def check_targets(rows: dict[str, dict], spec: AblationImages) -> list[dict]:
    t, kdq = spec.targets, rows["KD + QAT"]["mean"]
    drop, gain = rows["teacher"]["mean"] - kdq, kdq - rows["CE-only + PTQ"]["mean"]
    checks = [("kd_qat_accuracy", "KD + QAT INT8 accuracy", kdq, "≥", t.kd_qat_accuracy),
              ("drop_vs_teacher", "teacher − KD + QAT (pt)", drop, "≤", t.max_drop_vs_teacher),
              ("gain_over_ptq", "KD + QAT − CE-only + PTQ (pt)", gain, "≥", t.min_gain_over_ptq)]
    low = spec.low_bit
    if low is not None:
        name = f"W{low.weight_bits}A8"
        kdq_low = rows[low_bit_arm("KD + QAT", low.weight_bits)]
        gain_low = kdq_low["mean"] - rows[low_bit_arm("CE-only + PTQ", low.weight_bits)]["mean"]
        ratio = kdq_low["bytes"] / rows["KD + QAT"]["bytes"]
        checks += [("low_bit_gain_over_ptq", f"{name} KD + QAT − {name} CE-only + PTQ (pt)", gain_low, "≥",
                    low.min_gain_over_ptq),
                   ("low_bit_size_ratio", f"{name} KD + QAT bytes / KD + QAT bytes (%)", ratio, "≤",
                    low.max_size_ratio)]
    # met as the gate's checks are: within floating-point error of the threshold counts (a drop of 1.0 pt is the
    # difference of two means, 0.010000000000000009)
    return [{"key": k, "check": c, "value": v, "op": op, "threshold": th,
             "met": meets(v, ">=" if op == "≥" else "<=", th)} for k, c, v, op, th in checks]


def table(rows: dict[str, dict], checks: list[dict], cfg: Config, family: str, wall: float) -> str:
    seeds, batch = cfg.block("ablation", family).seeds, cfg.block("evaluate", family).throughput_batch
    made = (f"imported (teacher.{family}.pretrained)" if cfg.block("teacher", family).pretrained
            else "trained once by the pipeline")
    lines = [f"Ablation of {family}, {date.today()}, {machine()}; student seeds {seeds}, teacher {made}; "
             f"{wall / 60:.0f} min", "",
             "| arm | precision | val accuracy % (mean) | test accuracy % (mean ± std, n) | ONNX parity (min top-1 "
             f"agreement) | parameters | non-zero | ONNX bytes | gzip bytes | batch-1 p50 ms | batch-{batch} "
             "images/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, r in rows.items():
        lines.append(f"| {arm} | {r['precision']} | {100 * r['val_mean']:.2f} | "
                     f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (n={r['n']}) | {r['min_top1_agreement']:.4f} | "
                     f"{r['parameters']:,} | {r['nonzero']:,} | {r['bytes']:,} | {r['gzip_bytes']:,} | "
                     f"{r['latency_ms']:.3f} | {r['throughput_ips']:,.0f} |")
    lines += ["", "| target | measured | threshold | |", "|---|---:|---:|---|"]
    for c in checks:
        lines.append(f"| {c['check']} | {100 * c['value']:.2f} | {c['op']} {100 * c['threshold']:.2f} | "
                     f"{'met' if c['met'] else 'MISSED'} |")
    return "\n".join(lines)
