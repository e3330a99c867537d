"""What `edgegpt.bench.compare` measured, rendered: summary statistics, the targets, Markdown, JSON and a bar chart.

`summarize` turns the per-round results into one row per backend (median, min and max of every figure;
ratios taken within each round, then their median) and checks the speed targets of the benchmark issue,
which are data: targets.json beside this file (model shapes, figures, thresholds).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["environment", "markdown", "plot", "summarize", "to_json"]

FIGURES = ("ttft_s", "prefill_tok_s", "decode_tok_s", "step_p50_ms", "step_p95_ms", "python_share", "peak_rss_mb")
TARGETS = json.loads(resources.files("edgegpt.bench").joinpath("targets.json").read_text(encoding="utf-8"))
SHAPES = {
    name: tuple(shape) for name, shape in TARGETS["shapes"].items()
}  # (n_layer, n_head, n_embd) of each target shape
NOISY_PROBE_SPREAD = 0.15  # probe rounds further apart than this (of the best) mean the machine was shared
BUSY_SHARE = 0.25  # more of the CPU time than this taken by other work before the run: a busy machine


def _stats(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def environment() -> dict[str, Any]:
    """CPU model, cores, memory, load, package versions and onnxruntime providers of this machine."""
    import importlib.metadata as md

    env: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    cpu, flags = platform.processor() or "?", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("?", "", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("cpu family", "model\t")) and len(env.get("cpu_id", [])) < 2:
                env.setdefault("cpu_id", []).append(line.split(":", 1)[1].strip())
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    env["cpu"] = cpu
    env["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags.split()]
    env["l3_cache_bytes"] = _cache_bytes(3)
    env["logical_cpus"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        env["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        import psutil

        env["physical_cores"] = psutil.cpu_count(logical=False)
        env["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    versions = {}
    for dist in (
        "edgegpt",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-genai",
        "numpy",
        "tokenizers",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    env["versions"] = versions
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    env["cpu_busy_start"] = cpu_busy()
    if env["cpu_busy_start"] is None:
        try:
            env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
    return env


def cpu_busy(window_s: float = 0.5) -> dict[str, float] | None:
    """Shares of all CPUs' time over the next `window_s` seconds that other work kept busy, and that the
    hypervisor gave to other guests ("steal"), from Linux's /proc/stat; None elsewhere.

    The caller sleeps meanwhile, so this sees only other work; a load average would still hold the last
    minute's, e.g. the training and export that `make demo` runs just before its bench.

    >>> busy = cpu_busy(0.05)
    >>> busy is None or 0.0 <= busy["busy"] <= 1.0
    True
    """

    def sample() -> list[int]:
        # cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest is counted in user)
        return [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]

    try:
        before = sample()
        time.sleep(window_s)
        after = sample()
    except (OSError, ValueError):
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if len(delta) < 8 or total <= 0:
        return None
    idle, steal = delta[3] + delta[4], delta[7]
    return {"busy": round((total - idle - steal) / total, 3), "steal": round(steal / total, 3)}


def _cache_bytes(level: int) -> int | None:
    """Size of this CPU's cache of `level` (Linux sysfs), or None."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if int((index / "level").read_text()) == level and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) * {"K": 2**10, "M": 2**20}.get(size[-1], 1) if size[-1] in "KM" else int(size)
        except (OSError, ValueError):
            continue
    return None


def _bandwidth(report) -> dict[str, Any] | None:
    if not report.bandwidth:
        return None
    best = max(report.bandwidth, key=lambda b: b["gbs"])
    return {
        "gbs": best["gbs"],
        "numpy_max_gbs": max(b["numpy_max_gbs"] for b in report.bandwidth),
        "ort_gemv_gbs": max((b.get("ort_gemv_gbs", 0.0) for b in report.bandwidth), default=0.0) or None,
        "method": "best over rounds of max(numpy np.max over a 256 MiB array in `threads` threads, "
        "onnxruntime fp32 (1 x 4096) @ (4096 x 16384) MatMul)",
        "probes": report.bandwidth,
    }


def _per_round(runs: list[dict], batch: int, key: str) -> dict[int, float]:
    return {r["round"]: r["batches"][str(batch)][key] for r in runs if key in r["batches"].get(str(batch), {})}


def _ratio(top: dict[int, float], bottom: dict[int, float]) -> dict[str, float] | None:
    """Median/min/max over the rounds that both measured of top / bottom."""
    return _stats([top[r] / bottom[r] for r in top if r in bottom and bottom[r] > 0])


def _agreement(tokens: list[int] | None, reference: list[int] | None) -> dict[str, int] | None:
    if tokens is None or reference is None:
        return None
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return {"equal_prefix": same, "of": len(reference)}


def summarize(report) -> dict[str, Any]:
    """One row per measured backend, the bandwidth, and the targets."""
    config = report.config
    b1 = min(config.batch)
    bandwidth = _bandwidth(report)
    decode = {name: _per_round(runs, b1, "decode_tok_s") for name, runs in report.runs.items()}
    first_tokens = {name: runs[0]["batches"][str(b1)]["tokens"] for name, runs in report.runs.items()}
    rows = []
    for subject in report.subjects:
        runs = report.runs.get(subject.name)
        if not runs:
            continue
        row: dict[str, Any] = {
            "name": subject.name,
            "backend": subject.backend,
            "format": subject.format,
            "runs": len(runs),
        }
        for batch in sorted(config.batch):
            figures = [r["batches"][str(batch)] for r in runs]
            row[f"batch_{batch}"] = {
                k: _stats([f.get(k) for f in figures]) for k in FIGURES if any(k in f for f in figures)
            }
        row["peak_rss_mb"] = _stats([r["peak_rss_mb"] for r in runs])  # all batch sizes
        row["generate_peak_rss_mb"] = _stats([r["cli"]["peak_rss_mb"] for r in runs if (r.get("cli") or {}).get("ok")])
        row["load_s"] = _stats([r.get("load_s") for r in runs])
        row["deterministic"] = all(r["batches"][str(b1)]["tokens"] == first_tokens[subject.name] for r in runs)
        info = report.bundles.get("torch" if subject.backend == "torch" else subject.format, {})
        row["size_bytes"] = info.get("size_bytes")
        if subject.backend != "torch" and "torch eager" in decode:
            row["x_torch"] = _ratio(decode[subject.name], decode["torch eager"])
        if subject.backend == "genai":
            row["edgegpt_over_genai"] = _ratio(decode.get(f"edgegpt {subject.format}", {}), decode[subject.name])
            row["agreement"] = _agreement(first_tokens[subject.name], first_tokens.get(f"edgegpt {subject.format}"))
            row["agreement_with"] = f"edgegpt {subject.format}"
        elif subject.backend == "edgegpt":
            row["agreement"] = _agreement(first_tokens[subject.name], first_tokens.get("torch eager"))
            row["agreement_with"] = "torch eager"
            if subject.format != "fp32" and "edgegpt fp32" in decode:
                row["x_fp32"] = _ratio(decode[subject.name], decode["edgegpt fp32"])
        weights = info.get("weights") if subject.backend != "torch" else None
        if weights and bandwidth:
            bound = bandwidth["gbs"] * 1e9 / weights["read"]
            row["weights_read_bytes"] = weights["read"]
            row["bound_tok_s"] = bound
            row["of_bound"] = _stats([d / bound for d in decode[subject.name].values()])
            l3 = report.environment.get("l3_cache_bytes")
            row["weights_fit_l3"] = bool(l3 and weights["read"] <= l3)  # then DRAM bandwidth does not bound it
        rows.append(row)
    summary = {"batch_1": b1, "bandwidth": bandwidth, "rows": rows}
    summary["targets"] = targets(report, rows)
    return summary


def _shape(model: dict) -> str | None:
    key = (model.get("n_layer"), model.get("n_head"), model.get("n_embd"))
    return next((name for name, shape in SHAPES.items() if shape == key), None)


def targets(report, rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets (targets.json) that apply to this model shape: value, threshold, met."""
    by_name = {row["name"]: row for row in rows}
    shape, b1 = _shape(report.model), min(report.config.batch)
    out = []
    for target in TARGETS["targets"]:
        if "backend" in target:
            applies = [row for row in rows if row["backend"] == target["backend"]]
        else:
            applies = [by_name.get(target["row"]) or {}] if target["shape"] == shape else []
        out += [result for row in applies if (result := _check(target, row, b1)) is not None]
    return out


def _check(target: dict, row: dict, b1: int) -> dict[str, Any] | None:
    """One target on one row: its median against the threshold; None when the row lacks the figure."""
    stat = _figure(row, target["figure"], b1)
    if not stat and target.get("fallback"):
        target = {**target, **target["fallback"]}
        stat = _figure(row, target["figure"], b1)
    if stat is None:
        return None
    value, above = stat["median"], "at_least" in target
    threshold = target["at_least"] if above else target["below"]
    return {
        "target": target["text"].format(format=row.get("format")),
        "value": value,
        "threshold": threshold,
        "met": value >= threshold if above else value < threshold,
    }


def _figure(row: dict, path: list[str], b1: int) -> Any:
    """row[path[0]][path[1]]..., None where a key is missing; "{b1}" in a key is the smallest batch size."""
    for key in path:
        row = (row or {}).get(key.format(b1=b1))
    return row


# ------------------------------------------------------------------ rendering


def _fmt(stat: dict | None, scale: float = 1.0, digits: int = 0, spread: bool = True) -> str:
    if not stat:
        return "-"
    med, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    text = f"{med:,.{digits}f}"
    return f"{text} ({lo:,.{digits}f}-{hi:,.{digits}f})" if spread and stat["n"] > 1 else text


def _digits(stat: dict | None, scale: float = 1.0) -> int:
    """Enough decimals for about three significant digits."""
    if not stat:
        return 0
    value = abs(stat["median"] * scale)
    return 0 if value >= 100 else 1 if value >= 10 else 2


def _auto(stat: dict | None, scale: float = 1.0, spread: bool = True) -> str:
    return _fmt(stat, scale, _digits(stat, scale), spread)


def markdown(report) -> str:
    """The tables: speed (median and min-max over rounds), ratios/bound/memory, targets, notes."""
    summary = report.summary()
    config, model, env = report.config, report.model, report.environment
    b1, batches = summary["batch_1"], sorted(config.batch)
    shape = _shape(model)
    title = f"{shape} shape" if shape else "model"
    lines = [
        f"### edgegpt bench: {title} ({model['n_layer']} layers x {model['n_embd']} wide, vocab {model['vocab_size']}), "
        f"{config.prompt_tokens}-token prompt, {config.new_tokens} new tokens, greedy, {config.threads} threads, {config.provider}",
        "",
        _env_line(env),
    ]
    bw = summary["bandwidth"]
    if bw:
        gemv = f", onnxruntime GEMV {bw['ort_gemv_gbs']:.1f}" if bw.get("ort_gemv_gbs") else ""
        lines.append(
            f"Memory read bandwidth ({config.threads} threads, best of {len(bw['probes'])}): "
            f"**{bw['gbs']:.1f} GB/s** (numpy {bw['numpy_max_gbs']:.1f}{gemv})."
        )
    lines += ["", f"Median (min-max) of {config.runs} interleaved rounds, one fresh process per backend per round.", ""]
    head = [
        "backend",
        "load s",
        "first token ms",
        "prefill tok/s",
        f"decode tok/s b{b1}",
        "p50 ms/token",
        "p95 ms/token",
    ]
    head += [f"decode tok/s b{b}" for b in batches if b != b1]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row in summary["rows"]:
        f1 = row[f"batch_{b1}"]
        cells = [
            row["name"],
            _auto(row.get("load_s")),
            _auto(f1.get("ttft_s"), 1e3),
            _auto(f1.get("prefill_tok_s")),
            _auto(f1.get("decode_tok_s")),
            _auto(f1.get("step_p50_ms")),
            _auto(f1.get("step_p95_ms")),
        ]
        cells += [_auto(row[f"batch_{b}"].get("decode_tok_s")) for b in batches if b != b1]
        lines.append("| " + " | ".join(cells) + " |")
    head = [
        "backend",
        "x torch",
        "x fp32",
        "edgegpt / genai",
        "weights read MB/token",
        "bound tok/s",
        "of bound",
        "peak RSS MB (b%d)" % b1,
        "`generate` RSS MB",
        "size MB",
        "python share",
        "tokens = ref",
    ]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row in summary["rows"]:
        f1 = row[f"batch_{b1}"]
        agreement = row.get("agreement")
        agree = (
            f"{agreement['equal_prefix']}/{agreement['of']} ({row['agreement_with']})"
            if agreement
            else "ref"
            if row["backend"] == "torch"
            else "-"
        )
        share = f1.get("python_share")
        cells = [
            row["name"],
            _auto(row.get("x_torch"), spread=False),
            _auto(row.get("x_fp32"), spread=False),
            _auto(row.get("edgegpt_over_genai"), spread=False),
            f"{row['weights_read_bytes'] / 1e6:,.1f}" if row.get("weights_read_bytes") else "-",
            f"{row['bound_tok_s']:,.0f}" if row.get("bound_tok_s") else "-",
            ("in L3" if row.get("weights_fit_l3") else f"{row['of_bound']['median']:.0%}")
            if row.get("of_bound")
            else "-",
            _fmt(f1.get("peak_rss_mb"), spread=False),
            _fmt(row.get("generate_peak_rss_mb"), spread=False),
            f"{row['size_bytes'] / 1e6:,.1f}" if row.get("size_bytes") else "-",
            f"{share['median']:.0%}" if share else "-",
            agree,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    hp = "with" if config.huge_pages else "without"
    lines += [
        "",
        f"Load: checkpoint or bundle to a ready model (edgegpt: {hp} its move to huge pages). "
        f"Ratios are medians of per-round ratios (decode tok/s, batch {b1}). Bound = bandwidth / weights read "
        "per token (embedding tables excluded, KV cache not counted); 'in L3': the weights fit in the L3 cache, so "
        "no DRAM bound applies. Python share: time outside session.run in the edgegpt loop. Peak RSS: the "
        "backend's own process (torch's includes torch itself); `generate` RSS: the `edgegpt generate` command "
        "on the same prompt. Torch size: the checkpoint.",
    ]
    if summary["targets"]:
        lines += ["", "Targets (met if the median ratio meets the threshold; set for 2 threads, batch 1, CPU):", ""]
        for t in summary["targets"]:
            mark = "met" if t["met"] else "MISSED"
            value = (
                f"{t['value']:.0%}"
                if t["threshold"] < 1 and "bound" in t["target"]
                else _ratio_text(t["value"], t["threshold"])
            )
            if "RSS" in t["target"]:
                value = f"{t['value']:.0f} MB"
            lines.append(f"- [{'x' if t['met'] else ' '}] {t['target']}: {value} ({mark})")
    notes = list(report.notes) + _noise_notes(env, report.bandwidth)
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _ratio_text(value: float, threshold: float) -> str:
    """Two decimals, or as many more as it takes to show on which side of the threshold the value lies."""
    digits = 2
    while digits < 6 and f"{value:.{digits}f}" == f"{threshold:.{digits}f}" and value != threshold:
        digits += 1
    return f"{value:.{digits}f}"


def _noise_notes(env: dict, probes: list[dict]) -> list[str]:
    """Warnings about a machine that was not quiet.

    Other processes show in the CPU time they took just before the run (`cpu_busy`; elsewhere than Linux
    the load average); other tenants of a virtual machine's host in the time the hypervisor stole, and
    in the bandwidth probe: the same fixed work in every round.
    """
    notes = []
    cpus = env.get("usable_cpus") or env.get("logical_cpus") or 1
    start = env.get("cpu_busy_start")
    busy = start["busy"] if start else (env.get("loadavg_start") or [0])[0] / cpus
    if busy > BUSY_SHARE:
        seen = (
            f"{busy:.0%} of the CPU time taken by other work"
            if start
            else f"load average {busy * cpus:.1f} on {cpus} CPUs"
        )
        notes.append(
            f"the machine was busy before the run ({seen}): figures are noisy and low, PyTorch's OpenMP "
            "threads most of all; measure on a quiet machine for figures to report"
        )
    if start and start["steal"] > BUSY_SHARE / 5:
        notes.append(f"the hypervisor gave {start['steal']:.0%} of this VM's CPU time to other guests before the run")
    rates = [p["gbs"] for p in probes if p.get("gbs")]
    if len(rates) > 1 and (max(rates) - min(rates)) / max(rates) > NOISY_PROBE_SPREAD:
        notes.append(
            f"the bandwidth probe ranged {min(rates):.1f}-{max(rates):.1f} GB/s over the rounds (the same work "
            "each time): something else shared the cores or memory (on a VM, other tenants of the host); "
            "compare the per-round ratios, not absolute figures"
        )
    return notes


def _env_line(env: dict) -> str:
    versions = env.get("versions", {})
    shown = ", ".join(f"{k} {versions[k]}" for k in ("onnxruntime", "onnxruntime-genai", "torch") if k in versions)
    cores = env.get("usable_cpus") or env.get("logical_cpus")
    load = ""
    if busy := env.get("cpu_busy_start"):
        load = f"; other work took {busy['busy']:.0%} of the CPU time before the run ({busy['steal']:.0%} stolen)"
    elif env.get("loadavg_start"):
        load = f"; load average {env['loadavg_start'][0]:.1f} at start"
    flags = "/".join(env.get("cpu_flags", []))
    cpu = env.get("cpu", "?") + (
        " family %s model %s" % tuple(env["cpu_id"]) if len(env.get("cpu_id", [])) == 2 else ""
    )
    return f"Machine: {cpu} ({cores} CPUs{', ' + flags if flags else ''}, {env.get('memory_gib', '?')} GiB); {shown}{load}."


def to_json(report) -> dict[str, Any]:
    """Every figure, per round and summarized, with the environment and configuration."""
    summary = report.summary()
    return {
        "config": report.config.to_dict(),
        "model": report.model,
        "source": report.source,
        "environment": report.environment,
        "bandwidth": summary["bandwidth"],
        "bundles": report.bundles,
        "summary": summary["rows"],
        "targets": summary["targets"],
        "order": report.order,
        "runs": report.runs,
        "notes": report.notes,
        "wall_s": report.wall_s,
    }


def plot(report, path: Path) -> Path:
    """Bar charts of decode tokens/s per batch size (min-max whiskers, the bandwidth bound as a tick) and first-token time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report.summary()
    rows, batches = summary["rows"], sorted(report.config.batch)
    b1 = summary["batch_1"]
    panels = [(f"decode tokens/s, batch {b}", f"batch_{b}", "decode_tok_s", 1.0) for b in batches]
    panels.append(
        (
            f"time to first token, ms (batch {b1}, {report.config.prompt_tokens}-token prompt)",
            f"batch_{b1}",
            "ttft_s",
            1e3,
        )
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.2), squeeze=False)
    names = [row["name"] for row in rows]
    colors = {"torch": "#888888", "edgegpt": "#1f77b4", "genai": "#ff7f0e"}
    for ax, (title, batch, key, scale) in zip(axes[0], panels):
        stats = [row[batch].get(key) for row in rows]
        med = [s["median"] * scale if s else 0 for s in stats]
        err = [
            [(s["median"] - s["min"]) * scale if s else 0 for s in stats],
            [(s["max"] - s["median"]) * scale if s else 0 for s in stats],
        ]
        ax.bar(range(len(rows)), med, yerr=err, capsize=3, color=[colors.get(r["backend"], "#555555") for r in rows])
        ax.set_yscale("log")  # ratios between backends read as equal steps
        for i, value in enumerate(med):
            if value > 0:
                ax.annotate(
                    f"{value:,.3g}", (i, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7
                )
        if key == "decode_tok_s" and batch == f"batch_{b1}":
            for i, row in enumerate(rows):
                if row.get("bound_tok_s") and not row.get("weights_fit_l3"):
                    ax.plot([i - 0.4, i + 0.4], [row["bound_tok_s"]] * 2, color="black", linewidth=1.5)
            ax.plot([], [], color="black", label="bandwidth bound")
            ax.legend(fontsize=7)
        ax.set_title(title + " (log scale)", fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    model = report.model
    fig.suptitle(
        f"edgegpt bench: {model['n_layer']} x {model['n_embd']}, vocab {model['vocab_size']}, "
        f"{report.config.threads} threads, median (min-max) of {report.config.runs} rounds",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
