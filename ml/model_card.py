"""Model cards (Mitchell et al. 2019, "Model Cards for Model Reporting"), built from the registry.

Every field comes from a version's ``metadata.json``, its ``evaluation.json`` and the audit log
entries the caller passes in (``ml`` never reads Redis: the web side fetches them). Nothing is
written by hand per version; the only fixed text is what holds for every version of this
service (intended use, the limits of the data it knows about). Three renderings of one
JSON-native dict: :func:`build_card` (JSON), :func:`card_markdown`, :func:`card_html`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from ml.intervals import wilson_interval
from ml.versions import ModelMetadata

__all__ = ["CARD_FILE", "build_card", "card_html", "card_markdown"]

CARD_FILE = "model_card.md"

INTENDED_USE = [
    "Research and engineering software: a demonstration of serving an image classifier. "
    "It is not a medical device, is not cleared or approved for clinical use, and must not "
    "be used to diagnose, triage or treat anyone.",
    "Input: one frontal (PA/AP) chest radiograph, grayscale. Images the out-of-distribution gate "
    "does not recognise as such are refused (no label).",
]
GENERAL_LIMITS = [
    "No lateral views were trained on; a lateral film is outside what the model knows.",
    "No follow-up: each image is classified alone, with no prior images of the same patient.",
    "Labels are image-level diagnoses from the source dataset; no per-finding localisation.",
    "The test metrics hold for images like the test split; other scanners, hospitals, ages or "
    "populations can differ, and the intervals above do not cover that shift.",
]
# What is known about the source of a dataset, matched on its recorded path or name.
KNOWN_SOURCES = {
    "pneumonia": {
        "source": "Kermany et al. 2018 (Cell 172(5)), via Kaggle 'Chest X-Ray Images "
        "(Pneumonia)'; CC BY 4.0",
        "population": "paediatric patients aged 1-5 years of one centre (Guangzhou Women and "
        "Children's Medical Center), anterior-posterior views: adults and other hospitals are "
        "outside this population",
    },
}


def _interval(value: Any) -> list[float] | None:
    return [float(value[0]), float(value[1])] if isinstance(value, list | tuple) else None


def _metrics(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The test metrics, each with its 95% interval (recomputed from counts when missing)."""
    if not evaluation:
        return {}
    stored = evaluation.get("intervals_95") or {}
    confusion = evaluation.get("confusion_matrix") or []
    names = evaluation.get("class_names") or []
    negative = (
        names.index(evaluation["negative_class"])
        if evaluation.get("negative_class") in names
        else 0
    )
    counts: dict[str, tuple[int, int]] = {}
    if confusion:
        n = sum(sum(row) for row in confusion)
        hits = sum(confusion[i][i] for i in range(len(confusion)))
        neg_row = confusion[negative]
        diseased = [row for i, row in enumerate(confusion) if i != negative]
        tp = sum(sum(v for j, v in enumerate(row) if j != negative) for row in diseased)
        counts = {
            "accuracy": (hits, n),
            "sensitivity": (tp, sum(sum(row) for row in diseased)),
            "specificity": (neg_row[negative], sum(neg_row)),
        }
    out: dict[str, Any] = {}
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        value = evaluation.get(name)
        ci = _interval(stored.get(name))
        if ci is None and name in counts:
            ci = _interval(wilson_interval(*counts[name]))
        method = "bootstrap" if name == "roc_auc" else "wilson"
        out[name] = {"value": value, "ci95": ci, "interval": method if ci else None}
    return out


def _source(metadata: dict[str, Any]) -> dict[str, str]:
    dataset = metadata.get("dataset") or {}
    hp = metadata.get("hyperparameters") or {}
    ood_dataset = (metadata.get("ood") or {}).get("dataset") or {}
    text = " ".join(
        str(x) for x in (dataset.get("path"), hp.get("dataset"), ood_dataset.get("path"))
    )
    for key, info in KNOWN_SOURCES.items():
        if key in text.lower():
            return info
    return {"source": "not recorded", "population": "not recorded: unknown who the images show"}


def build_card(
    metadata: dict[str, Any],
    evaluation: dict[str, Any] | None,
    audit: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The model card of one version as a JSON-native dict (sections in Mitchell et al.'s order).

    ``metadata`` is a :meth:`ml.versions.ModelMetadata.to_dict` (or a ``metadata.json``);
    whether the version was trained is its ``trained`` field. ``audit`` is the active-version
    audit log (any order); the entries naming this version are kept as its promotion history.
    """
    version = metadata.get("version")
    hp = metadata.get("hyperparameters") or {}
    dataset = metadata.get("dataset") or {}
    ood = metadata.get("ood") or {}
    source = _source(metadata)
    # What the registry says (an older metadata.json gets it from ml.versions.infer_trained),
    # not a guess from whether an evaluation exists: an imported model may have none.
    trained = ModelMetadata.from_dict(metadata).trained
    operating = {
        "decision_threshold": metadata.get("decision_threshold"),
        "rule": (
            "argmax of the class probabilities"
            if metadata.get("decision_threshold") is None
            else "disease when 1 - p(NORMAL) >= threshold"
        ),
        "chosen": (
            "none chosen (argmax)"
            if metadata.get("decision_threshold") is None
            else f"highest threshold reaching sensitivity >= {hp.get('target_sensitivity')} on "
            "the validation split"
        ),
    }
    history = [
        {k: e.get(k) for k in ("at", "actor", "action", "from_version", "to_version", "reason")}
        for e in audit
        if e.get("to_version") == version or e.get("from_version") == version
    ]
    return {
        "model_details": {
            "version": version,
            "created_at": metadata.get("created_at"),
            "architecture": "VGG16 base (include_top=False) + global average pooling + dropout "
            "+ softmax",
            "input": f"{metadata.get('input_size')} x {metadata.get('input_size')} grayscale",
            "classes": metadata.get("class_names"),
            "base_weights": metadata.get("base_weights"),
            "parent_version": metadata.get("parent_version"),
            "job_id": metadata.get("job_id"),
            "trained": trained,
            "training_seconds": metadata.get("training_seconds"),
        },
        "intended_use": INTENDED_USE,
        "training_data": {
            "name": dataset.get("path") or hp.get("dataset") or "not recorded",
            "fingerprint": dataset.get("sha256"),
            "files": dataset.get("files"),
            "class_counts": dataset.get("counts"),
            "val_source": dataset.get("val_source"),
            "source": source["source"],
            "population": source["population"],
        },
        "training_config": hp,
        "metrics": {"split": "test", **_metrics(evaluation)},
        "confusion_matrix": {
            "class_names": (evaluation or {}).get("class_names"),
            "rows_true_columns_predicted": (evaluation or {}).get("confusion_matrix"),
        },
        "operating_point": operating,
        "ood_gate": {
            "method": ood.get("method", "none"),
            "threshold": ood.get("threshold"),
            "target_acceptance": ood.get("target_acceptance"),
            "val_acceptance": ood.get("val_acceptance"),
            "test_acceptance": ood.get("test_acceptance"),
            "why_none": ood.get("why") if ood.get("method", "none") == "none" else None,
        },
        "promotions": history,
        "limits": [f"Population: {source['population']}.", *GENERAL_LIMITS]
        + ([] if trained else ["This version was never trained: its predictions mean nothing."]),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _ci(metric: dict[str, Any]) -> str:
    ci = metric.get("ci95")
    return f"{ci[0]:.3f}–{ci[1]:.3f} ({metric['interval']})" if ci else "—"


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown (what ``model_card.md`` holds and ``cxr model N --card`` prints)."""
    d, data, gate = card["model_details"], card["training_data"], card["ood_gate"]
    lines = [f"# Model card: cxr version {d['version']}", "", "## Model details", ""]
    lines += [f"- **{k.replace('_', ' ')}**: {_fmt(v)}" for k, v in d.items()]
    lines += ["", "## Intended use", ""] + [f"- {t}" for t in card["intended_use"]]
    lines += ["", "## Training data", ""]
    for key in ("name", "fingerprint", "files", "val_source", "source", "population"):
        lines.append(f"- **{key.replace('_', ' ')}**: {_fmt(data[key])}")
    if data["class_counts"]:
        lines += ["", "| split | " + " | ".join(next(iter(data["class_counts"].values()))) + " |"]
        lines.append("|---" * (1 + len(next(iter(data["class_counts"].values())))) + "|")
        for split, counts in data["class_counts"].items():
            lines.append(f"| {split} | " + " | ".join(str(c) for c in counts.values()) + " |")
    lines += ["", "## Training configuration", ""]
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in sorted(card["training_config"].items())] or ["—"]
    lines += ["", "## Metrics (test split, 95% intervals)", ""]
    metrics = {k: v for k, v in card["metrics"].items() if k != "split"}
    if metrics:
        lines += ["| metric | value | 95% interval |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(m['value'])} | {_ci(m)} |" for k, m in metrics.items()]
    else:
        lines.append("Not evaluated.")
    cm = card["confusion_matrix"]
    if cm["rows_true_columns_predicted"]:
        names = cm["class_names"]
        lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
        lines += ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, row in zip(names, cm["rows_true_columns_predicted"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    op = card["operating_point"]
    lines += ["", "## Operating point", "", f"- **rule**: {op['rule']}"]
    lines += [f"- **threshold**: {_fmt(op['decision_threshold'])}", f"- **chosen**: {op['chosen']}"]
    lines += ["", "## Out-of-distribution gate", ""]
    if gate["method"] == "none":
        lines.append(f"- **gate: none** ({gate['why_none'] or 'not fitted'})")
    else:
        for key in (
            "method",
            "threshold",
            "target_acceptance",
            "val_acceptance",
            "test_acceptance",
        ):
            lines.append(f"- **{key.replace('_', ' ')}**: {_fmt(gate[key])}")
    lines += ["", "## Promotions (audit log)", ""]
    lines += [
        f"- {e['at']}: {e['action']} by {e['actor']} (v{e['from_version']} → v{e['to_version']})"
        + (f": {e['reason']}" if e.get("reason") else "")
        for e in card["promotions"]
    ] or ["- none recorded"]
    lines += ["", "## Limits and caveats", ""] + [f"- {t}" for t in card["limits"]]
    return "\n".join(lines) + "\n"


def card_html(card: dict[str, Any]) -> str:
    """The card as a self-contained HTML page (the Markdown, escaped, in simple markup)."""
    body: list[str] = []
    in_list = False
    table: list[list[str]] = []

    def flush_table() -> None:
        if table:
            rows = [r for r in table if not all(set(c) <= {"-"} for c in r)]
            body.append("<table>" + "".join(
                "<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows
            ) + "</table>")  # fmt: skip
            table.clear()

    for raw in card_markdown(card).splitlines():
        line = html.escape(raw).replace("**", "")
        if not raw.startswith("- ") and in_list:
            body.append("</ul>")
            in_list = False
        if not raw.startswith("|"):
            flush_table()
        if raw.startswith("# "):
            body.append(f"<h1>{line[2:]}</h1>")
        elif raw.startswith("## "):
            body.append(f"<h2>{line[3:]}</h2>")
        elif raw.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{line[2:]}</li>")
        elif raw.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif raw:
            body.append(f"<p>{line}</p>")
    flush_table()
    if in_list:
        body.append("</ul>")
    title = html.escape(f"Model card v{card['model_details']['version']}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body>{''.join(body)}</body></html>"
    )
