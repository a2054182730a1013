"""The benchmark report: the results table, the targets verdict, and the Markdown tables."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator

from bench.configs import (
    DEFAULT_SHAPE,
    TARGET_BATCHING_GAIN,
    TARGET_MODEL_BOUND_RATIO,
    TARGET_OVERHEAD_MS,
    TARGET_STANDIN_RATE,
    Json,
)

# --- report ---------------------------------------------------------------------------------

HEADER = (
    f"{'config':<8} {'batch':<5} {'shape':<16} {'conc':>4} {'pred/s':>8} {'p50 ms':>8} "
    f"{'p95 ms':>8} {'p99 ms':>8} {'batch':>9} {'model ms':>8} {'÷raw':>6} {'err':>4} "
    f"{'client':>6} {'web':>5} {'wrk':>5} {'redis':>5} {'busy':>5}"
)


def row(name: str, batching: bool, shape: str, lv: Json) -> str:
    """One table row."""
    lat = lv.get("latency_ms", {})
    batch = f"{lv.get('batch_size_mean', 0):.1f}/{lv.get('batch_size_max', 0)}"
    ratio = lv["ratio_to_best_raw"] if lv["ratio_to_best_raw"] is not None else math.nan
    flag = "!" if lv["client_bound"] else " "
    cores = lv["cpu_cores"]
    return (
        f"{name:<8} {'on' if batching else 'off':<5} {shape:<16} {lv['concurrency']:>4} "
        f"{lv['throughput_per_s']:>8.1f} {lat.get('p50', math.nan):>8.1f} "
        f"{lat.get('p95', math.nan):>8.1f} {lat.get('p99', math.nan):>8.1f} {batch:>9} "
        f"{lv.get('model_ms_mean', math.nan):>8.2f} {ratio:>6.2f} "
        f"{lv['errors']:>4} {cores['client']:>5.2f}{flag} {cores['web']:>5.2f} "
        f"{cores['worker']:>5.2f} {cores['redis']:>5.2f} {cores['machine_busy']:>5.2f}"
    )


def verdict(ok: bool | None) -> str:
    """MET / NOT MET / N/A."""
    return "N/A" if ok is None else ("MET" if ok else "NOT MET")


def unloaded_levels(report: Json) -> Iterator[tuple[str, bool, Json]]:
    """``(config, batching, level)`` of every default run's concurrency-1 level with latencies."""
    for name, cfg in report["configs"].items():
        for batching, run in default_runs(cfg).items():
            lv = next((lv for lv in run["levels"] if lv["concurrency"] == 1), None)
            if lv is not None and "latency_ms" in lv:
                yield name, batching, lv


def default_runs(cfg: Json) -> dict[bool, Json]:
    """The batching on/off runs of a config with the default shape."""
    return {r["batching"]: r for r in cfg["runs"] if r["shape"] == DEFAULT_SHAPE.label}


def targets(configs: dict[str, Json]) -> Json:
    """The issue's four targets, each with the measured value and whether it is met."""
    out: Json = {}
    for name, cfg in configs.items():
        # Every VGG16 224 px variant (each precision, each upload size) against its own raw best.
        if not name.startswith("vgg224"):
            continue
        on = default_runs(cfg).get(True)
        best = max(on["levels"], key=lambda lv: lv["throughput_per_s"]) if on else None
        raw = cfg["raw"]
        ratio = best["throughput_per_s"] / raw["best_images_per_s"] if best else None
        key = "model_bound_e2e_vs_raw" + ("" if name == "vgg224" else f"[{name}]")
        out[key] = {
            "target": f">= {TARGET_MODEL_BOUND_RATIO} x best raw (VGG16 224 px, batching on)",
            "value": round(ratio, 3) if ratio is not None else None,
            "detail": (
                f"{best['throughput_per_s']} pred/s at concurrency {best['concurrency']} vs "
                f"{raw['best_images_per_s']} img/s raw (batch {raw['best_batch_size']})"
                if best
                else None
            ),
            "verdict": verdict(None if ratio is None else ratio >= TARGET_MODEL_BOUND_RATIO),
        }
    if "vgg32" in configs:
        runs = default_runs(configs["vgg32"])
        gain = detail = None
        if runs.get(True, {}).get("levels") and runs.get(False, {}).get("levels"):
            top = max(lv["concurrency"] for lv in runs[True]["levels"])
            on = next(lv for lv in runs[True]["levels"] if lv["concurrency"] == top)
            off = next((lv for lv in runs[False]["levels"] if lv["concurrency"] == top), None)
            if off is not None:
                gain = on["throughput_per_s"] / max(1e-9, off["throughput_per_s"])
                detail = (
                    f"{on['throughput_per_s']} vs {off['throughput_per_s']} pred/s at "
                    f"concurrency {top}"
                )
        out["vgg32_batching_gain"] = {
            "target": f"batching on >= {TARGET_BATCHING_GAIN} x off (VGG16 32 px, top concurrency)",
            "value": round(gain, 2) if gain is not None else None,
            "detail": detail,
            "verdict": verdict(None if gain is None else gain >= TARGET_BATCHING_GAIN),
        }
    if "standin" in configs:
        best_run, best = None, None
        for run in configs["standin"]["runs"]:
            for lv in run["levels"]:
                if best is None or lv["throughput_per_s"] > best["throughput_per_s"]:
                    best_run, best = run, lv
        out["standin_rate"] = {
            "target": f">= {TARGET_STANDIN_RATE:g} predictions/s (stand-in model)",
            "value": best["throughput_per_s"] if best else None,
            "detail": (
                f"batching {'on' if best_run['batching'] else 'off'}, {best_run['shape']}, "
                f"concurrency {best['concurrency']}, client {best['cpu_cores']['client']} cores "
                f"of {best['cpu_cores']['machine_busy']} busy"
                if best and best_run
                else None
            ),
            "verdict": verdict(
                None if best is None else best["throughput_per_s"] >= TARGET_STANDIN_RATE
            ),
        }
    overheads = {}
    for name, cfg in configs.items():
        for batching, run in default_runs(cfg).items():
            lv = next((lv for lv in run["levels"] if lv["concurrency"] == 1), None)
            if lv and "overhead_ms_p50" in lv:
                overheads[f"{name} batching {'on' if batching else 'off'}"] = lv["overhead_ms_p50"]
    # The served default: VGG16 224 px with batching on; every config is listed beside it.
    heads = ("vgg224 batching on", "vgg32 batching on", "standin batching on")
    head = next((k for k in heads if k in overheads), None)
    value = overheads.get(head) if head else None
    out["overhead_p50"] = {
        "target": f"<= {TARGET_OVERHEAD_MS:g} ms p50 of (e2e - model ms) at concurrency 1",
        "value": value,
        "detail": f"{head}; all: {overheads}" if head else str(overheads),
        "verdict": verdict(None if value is None else value <= TARGET_OVERHEAD_MS),
        "all": overheads,
        "all_met": all(v <= TARGET_OVERHEAD_MS for v in overheads.values()) if overheads else None,
    }
    return out


def print_report(report: Json) -> None:
    """The table, memory, raw throughput and the summary block."""
    print("\n" + HEADER)
    print("-" * len(HEADER))
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            for lv in run["levels"]:
                print(row(name, run["batching"], run["shape"], lv))
            if run.get("error"):
                on = "on" if run["batching"] else "off"
                print(f"{name:<8} {on:<5} {run['shape']:<16} FAILED: {run['error'][:120]}")
    print(
        "(batch = mean/max executed batch size; ÷raw = pred/s ÷ best raw img/s; client, web, wrk,"
        " redis, busy = CPU cores used by the load generator, gunicorn, inference workers,\n"
        " redis-server and the whole machine; ! = load generator bound)"
    )
    print("\nunloaded latency (concurrency 1, p50 ms; overhead = e2e - model):")
    for name, batching, lv in unloaded_levels(report):
        t = lv["server_ms_mean"]
        on = "on " if batching else "off"
        print(
            f"  {name:<8} batching {on}: e2e {lv['latency_ms']['p50']:.1f}"
            f"  overhead {lv['overhead_ms_p50']:.1f}  (means: queue {t['queue']:.1f},"
            f" decode {t['decode']:.1f}, batch_wait {t['batch_wait']:.1f}, model"
            f" {t['model']:.1f}; outside the worker p50 {lv['outside_worker_ms_p50']:.1f})"
        )
    print("\nraw model throughput (Classifier.predict_batch, images/s by batch size):")
    for name, cfg in report["configs"].items():
        raw = cfg["raw"]
        sizes = "  ".join(
            f"{r['batch_size']}:{r['images_per_s']:.1f}" for r in raw["by_batch_size"]
        )
        print(
            f"  {name:<8} {sizes}   best {raw['best_images_per_s']:.1f} @ {raw['best_batch_size']}"
        )
    print("\ninference worker memory (RSS MiB when serving -> after load, peak):")
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            end = {m["pid"]: m for m in run["worker_memory_end"]}
            mems = ", ".join(
                f"{m.get('VmRSS', 0):.0f} -> {end.get(m['pid'], {}).get('VmRSS', 0):.0f}"
                f" (peak {end.get(m['pid'], {}).get('VmHWM', 0):.0f})"
                for m in run["worker_memory_serving"]
            )
            on = "on " if run["batching"] else "off"
            print(f"  {name:<8} batching {on} [{run['shape']}]: {mems}")
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            probe = run.get("keyspace_probe")
            if probe:
                print(
                    f"\nRedis keyspace ({name}, batching on, concurrency {probe['concurrency']}): "
                    f"{probe['baseline_throughput_per_s']} pred/s from an empty keyspace, "
                    f"{probe['throughput_per_s']} pred/s with {probe['finished_jobs_added']} "
                    "finished jobs stored (uploads scan every key: PredictionClient.workers)"
                )
            prof = run.get("profile")
            if prof and prof.get("top_inclusive"):
                print(f"\nprofile ({name}, concurrency {prof['concurrency']}, py-spy --gil), "
                      "share of GIL-holding samples in project code:")  # fmt: skip
                for label, frames in prof["top_inclusive"].items():
                    own = [f.strip() for f in frames if re.search(r"\((web|worker|ml)/", f)]
                    print(f"  {label}: " + "; ".join(own[:6]))
    print("\nsummary (targets):")
    for key, t in report["targets"].items():
        print(f"  {key:<24} {t['verdict']:<8} value {t['value']}  ({t['target']}; {t['detail']})")
    if report.get("load_generator_note"):
        print(f"  note: {report['load_generator_note']}")
    if report.get("sources_changed_during_run"):
        changed = report["sources_changed_during_run"]
        print(f"  WARNING: service code changed during the run: {', '.join(changed)}")
    if report["contention"]["foreign_jobs_seen"]:
        jobs = report["contention"]["foreign_jobs_seen"]
        print(
            f"  WARNING: {len(jobs)} CPU-heavy job(s) of others ran meanwhile: {jobs[0][:80]} ..."
        )
    print(f"\nrun time {report['run_seconds']:.0f} s")


def markdown(report: Json) -> str:
    """The tables of a report as Markdown (for bench/README.md)."""
    contended = False
    changed = ", ".join(report.get("sources_changed_during_run", []))
    lines = [
        f"{report['mode']} run {report['started_at']}, {report['run_seconds']:.0f} s, "
        f"{report['machine']['cpu_count']} CPUs, TensorFlow {report['machine']['tensorflow']}"
        + (f"; service code changed during the run: {changed}" if changed else ""),
        "",
        "| config | batching | shape | conc | pred/s | p50 ms | p95 ms | p99 ms | batch mean/max "
        "| model ms | ÷ best raw | errors | CPU cores client/web/worker/redis/busy |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            on = "on" if run["batching"] else "off"
            if run.get("error"):
                lines.append(f"| {name} | {on} | {run['shape']} | FAILED: {run['error'][:80]} |")
            for lv in run["levels"]:
                lat, c = lv.get("latency_ms", {}), lv["cpu_cores"]
                mark = " †" if lv["foreign_jobs"] else ""
                contended = contended or bool(mark)
                ratio = lv["ratio_to_best_raw"]
                lines.append(
                    f"| {name} | {on} | {run['shape']} | {lv['concurrency']}{mark} "
                    f"| {lv['throughput_per_s']:.1f} | {lat.get('p50', math.nan):.1f} "
                    f"| {lat.get('p95', math.nan):.1f} | {lat.get('p99', math.nan):.1f} "
                    f"| {lv.get('batch_size_mean', 0):.1f}/{lv.get('batch_size_max', 0)} "
                    f"| {lv.get('model_ms_mean', math.nan):.2f} "
                    f"| {ratio if ratio is not None else ''} | {lv['errors']} "
                    f"| {c['client']}/{c['web']}/{c['worker']}/{c['redis']}/{c['machine_busy']} |"
                )
    if contended:
        lines += ["", "† another CPU-heavy job (training or pytest) ran during this level."]
    lines += [
        "",
        "| concurrency 1 | e2e p50 ms | overhead p50 ms | queue | decode | batch_wait | model |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, batching, lv in unloaded_levels(report):
        t = lv["server_ms_mean"]
        lines.append(
            f"| {name} batching {'on' if batching else 'off'} | {lv['latency_ms']['p50']:.1f} "
            f"| {lv['overhead_ms_p50']:.1f} | {t['queue']:.1f} | {t['decode']:.1f} "
            f"| {t['batch_wait']:.1f} | {t['model']:.1f} |"
        )
    lines += ["", "| model | raw images/s by batch size | best |", "|---|---|--:|"]
    for name, cfg in report["configs"].items():
        raw = cfg["raw"]
        sizes = ", ".join(
            f"{r['batch_size']}: {r['images_per_s']:.1f}" for r in raw["by_batch_size"]
        )
        lines.append(f"| {name} | {sizes} | {raw['best_images_per_s']:.1f} |")
    lines += [
        "",
        "| inference worker process | RSS MiB serving | RSS after load | peak |",
        "|---|--:|--:|--:|",
    ]
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            end = {m["pid"]: m for m in run["worker_memory_end"]}
            for m in run["worker_memory_serving"]:
                after = end.get(m["pid"], {})
                lines.append(
                    f"| {name} batching {'on' if run['batching'] else 'off'} [{run['shape']}] "
                    f"| {m.get('VmRSS', 0):.0f} | {after.get('VmRSS', 0):.0f} "
                    f"| {after.get('VmHWM', 0):.0f} |"
                )
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            probe = run.get("keyspace_probe")
            if probe:
                lines += [
                    "",
                    f"Redis keyspace ({name}, batching on, concurrency {probe['concurrency']}): "
                    f"{probe['baseline_throughput_per_s']} pred/s with finished jobs deleted, "
                    f"{probe['throughput_per_s']} pred/s with {probe['finished_jobs_added']} "
                    "finished jobs kept in Redis.",
                ]
    lines += ["", "| target | verdict | measured |", "|---|---|---|"]
    for t in report["targets"].values():
        detail = t["detail"] if "all" not in t else f"{t['detail'].split(';')[0]}; {t['all']}"
        lines.append(f"| {t['target']} | **{t['verdict']}** | {t['value']} — {detail} |")
    return "\n".join(lines)


def load_generator_note(configs: dict[str, Json]) -> str | None:
    """Say whether the Python load generator limited any level."""
    bound = [
        f"{name} {'on' if run['batching'] else 'off'} [{run['shape']}] c={lv['concurrency']}"
        f" ({lv['cpu_cores']['client']} cores)"
        for name, cfg in configs.items()
        for run in cfg["runs"]
        for lv in run["levels"]
        if lv["client_bound"]
    ]
    if bound:
        return "the Python load generator was near one full core (GIL-bound) at: " + "; ".join(
            bound
        )
    shares = [
        (lv["client_cpu_share"] or 0, name, lv["concurrency"])
        for name, cfg in configs.items()
        for run in cfg["runs"]
        for lv in run["levels"]
    ]
    top = max(shares, default=None)
    if top and top[0] >= 0.2:
        return (
            f"the load generator never saturated its core, but used up to {top[0]:.0%} of all CPU "
            f"used ({top[1]} c={top[2]}): on {os.cpu_count()} cores it competes with the stack"
        )
    return None
