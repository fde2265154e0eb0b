"""Stage `report`: aggregate the attack grid over seeds, judge the protection, write summary, figures and report.

    python -m stages.report [--params params.yaml]

Writes into reports/<experiment>/: summary.json, report.md, report.html, restricted_accuracy.png,
protect_history.png, sweep.png, envelope.png and curves/<attack>.csv (per-epoch means, for DVC plots). Every input named by
params.yaml must exist; only a baseline that never ran at all is skipped (an attack start whose folder is absent,
the NTL model and history), and the report says so.
"""

import csv
import io
import logging

from sophon import layout
from sophon.io import write_json, write_text
from sophon.models import read_card
from sophon.report import figures
from sophon.report import search as search_report
from sophon.report.aggregate import build_summary, means, read_input
from sophon.report.render import attack_table, build_document, render_html, render_markdown, render_text, verdict_lines
from sophon.tracking import stage_run
from stages.common import parser, run, setup

log = logging.getLogger("sophon.report")
FIGURES = {"restricted_accuracy": "restricted_accuracy.png", "protect_history": "protect_history.png", "sweep": "sweep.png"}



def load_inputs(config: dict) -> dict:
    """Everything the report reads, as keyword arguments of build_summary."""
    attack_docs = {}
    for attack in config["attacks"]:
        attack_docs[attack] = {}
        for start in layout.STARTS:
            if not layout.attack_curve(attack, start, 0).parent.exists():
                log.warning("no curves for attack %s from %s: that start is left out of the report", attack, start)
                continue
            attack_docs[attack][start] = [read_input(layout.attack_curve(attack, start, s)) for s in config["seeds"]]
    cards = {m: read_card(layout.model_dir(m)) for m in layout.MODELS if m != "ntl" or layout.model_dir(m).exists()}
    ntl_history = layout.history("ntl")
    return {"attack_docs": attack_docs,
            "sweep_docs": {lr: read_input(layout.sweep_curve(lr)) for lr in config["sweep"]["lrs"]},
            "original_accuracy": {m: card["original_test_accuracy"] for m, card in cards.items()},
            "sophon_history": read_input(layout.history("sophon")),
            "ntl_history": read_input(ntl_history) if ntl_history.exists() else None}


def curves_csv(entry: dict) -> str:
    """Per-epoch mean restricted accuracy, one column per start (empty where a start is missing)."""
    columns = {start: means(stats) for start, stats in entry["restricted_accuracy"].items()}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *layout.STARTS])
    for epoch in range(max(len(c) for c in columns.values())):
        writer.writerow([epoch, *(f"{columns[s][epoch]:.4f}" if s in columns else "" for s in layout.STARTS)])
    return buffer.getvalue()


def headline_metrics(summary: dict) -> dict:
    v = summary["verdicts"]
    metrics = {"protection_holds": int(v["protection_holds"]), "intactness_holds": int(v["intactness"]["holds"])}
    if v["intactness"]["drop"] is not None:
        metrics["intactness_drop"] = v["intactness"]["drop"]
    for name, a in v["attacks"].items():
        metrics[f"{name}.holds"] = int(a["sophon_at_or_below_scratch_every_epoch"])
        metrics.update({f"{name}.{k}": a[k] for k in ("sophon_final", "scratch_final", "original_final",
                                                      "max_excess_over_scratch", "pretraining_advantage")
                        if a[k] is not None})
    return metrics


def main() -> None:
    args = parser(__doc__).parse_args()
    config, _ = setup(args)
    inputs = load_inputs(config)
    summary = build_summary(config, **inputs)
    out = layout.report_dir(config["experiment"])
    images = {key: out / name for key, name in FIGURES.items()}
    summary["envelope"], search_section, images["envelope"] = search_report.build(
        config["search"], "classification", out, config["report"]["epochs"])
    with stage_run("report", config["experiment"], params={"attacks": ",".join(config["attacks"]),
                                                           "seeds": config["seeds"], "sweep_lrs": config["sweep"]["lrs"]}) as tracked:
        write_json(out / "summary.json", summary)
        figures.restricted_accuracy(summary, images["restricted_accuracy"])
        figures.protect_history(inputs["sophon_history"], images["protect_history"])
        figures.sweep(summary["sweep"], images["sweep"])
        for name, entry in summary["attacks"].items():
            write_text(out / "curves" / f"{name}.csv", curves_csv(entry))
        document = build_document(summary, config["report"]["epochs"], images)
        document.sections.insert(1, search_section)
        write_text(out / "report.md", render_markdown(document))
        write_text(out / "report.html", render_html(document))
        for path in [*images.values(), out / "summary.json", out / "report.html", out / "report.md"]:
            tracked.log_artifact(path, "report")
        tracked.log_metrics(headline_metrics(summary))
    first = next(iter(config["attacks"]))
    print(render_text(attack_table(summary, first, config["report"]["epochs"])))
    print()
    print("\n".join(verdict_lines(summary)))
    print(search_report.verdict_line(summary["envelope"]))
    print(f"\nreport: {out / 'report.html'}")


if __name__ == "__main__":
    run(main)
