"""Stage `report`: one experiment's report — summary.json, report.md, a self-contained report.html, figures and
curves/<attack>.csv (per-epoch means, for DVC plots) in reports/<experiment>/.

    python -m stages.report --experiment quick-classification

Classification: the paired attack tables (paper Table I), the lr sweep, the NTL and Sophon training, the
verdicts. Diffusion: MSE-k tables (Table II), the denoising figures (Fig. 5, 6) and the stability study (Fig. 14).
Both: the attack search's envelope verdict. Every input the config names must exist; for classification only a
baseline that never ran at all (an attack start's folder, the NTL model) is skipped, and the report says so.
"""

import csv
import io
import logging

import numpy as np

from sophon import layout
from sophon.io import write_json, write_text
from sophon.models import read_card
from sophon.report import figures
from sophon.report import generation as gen_report
from sophon.report import search as search_report
from sophon.report.aggregate import ReportInputError, build_summary, means, read_input
from sophon.report.render import (Bullets, Section, attack_table, build_document, intactness_line, paper_rule_line,
                                  render_html, render_markdown, render_text, verdict_lines)
from sophon.tasks import load_model, task_of
from sophon.tracking import stage_run
from stages.common import parser, parts, run, setup

log = logging.getLogger("sophon.report")


def figure_paths(exp: dict) -> dict:
    out = layout.report_dir(exp["name"])
    return {key: out / f"{key}.png" for key in layout.REPORT_FIGURES[exp["task"]]}


def write_common(exp: dict, summary: dict, document, images: dict, csvs: dict[str, str], tracked,
                 short: list[str]) -> None:
    """Open the document with "In short" (`short`, the variant and any imported original first), then write the
    summary, the curves, both renderings and log them."""
    out = layout.report_dir(exp["name"])
    document.sections.insert(0, Section("In short", [Bullets(short)]))
    # Which protect variant made the released model (its card says; `paper` is the paper's Sophon).
    card = read_card(layout.model_dir(exp["name"], "sophon"))
    summary["sophon_variant"] = {"name": card.get("variant", "paper"), "selected_loop": card.get("selected_loop")}
    loop = card.get("selected_loop")
    document.sections[0].blocks.insert(0, f"Sophon variant: {summary['sophon_variant']['name']}"
                                          + (f" (released weights of loop {loop})." if loop is not None else "."))
    # An imported original model (original.checkpoint) is named with the hash of the weights that were read.
    source = read_card(layout.model_dir(exp["name"], "original")).get("source")
    if source:
        summary["original_source"] = source
        document.sections[0].blocks.insert(0, f"Original model imported ({source['kind']}) from {source['path']}, "
                                              f"SHA-256 {source['sha256']}.")
    write_json(out / "summary.json", summary)
    for name, text in csvs.items():
        write_text(out / "curves" / f"{name}.csv", text)
    write_text(out / "report.md", render_markdown(document))
    write_text(out / "report.html", render_html(document))
    for path in [*images.values(), out / "summary.json", out / "report.html", out / "report.md"]:
        tracked.log_artifact(path, "report")


# --- classification ------------------------------------------------------------------------------------------

def classification_inputs(exp: dict) -> dict:
    """Everything the classification report reads, as keyword arguments of build_summary."""
    name, attack_docs = exp["name"], {}
    for attack in exp["attacks"]:
        attack_docs[attack] = {}
        for start in layout.STARTS:
            if not layout.attack_curve(name, attack, start, 0).parent.exists():
                log.warning("no curves for attack %s from %s: that start is left out of the report", attack, start)
                continue
            attack_docs[attack][start] = [read_input(layout.attack_curve(name, attack, start, s)) for s in exp["seeds"]]
    models = [m for m in task_of(exp).models() if m != "ntl" or layout.model_dir(name, m).exists()]
    cards = {m: read_card(layout.model_dir(name, m)) for m in models}
    ntl_history = layout.history(name, "ntl")
    return {"attack_docs": attack_docs,
            "sweep_docs": {lr: read_input(layout.sweep_curve(name, lr)) for lr in exp["sweep"]["lrs"]},
            "original_accuracy": {m: card["original_test_accuracy"] for m, card in cards.items()},
            "sophon_history": read_input(layout.history(name, "sophon")),
            "ntl_history": read_input(ntl_history) if ntl_history.exists() else None}


def accuracy_csv(entry: dict) -> str:
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


def classification_report(exp: dict, device) -> tuple[dict, list[str]]:
    inputs = classification_inputs(exp)
    summary = build_summary(exp, **inputs)
    images = figure_paths(exp)
    summary["envelope"], search_section, _ = search_report.build(exp["search"], exp["name"], images["envelope"].parent,
                                                                 exp["report"]["epochs"], exp.get("redteam"))
    with stage_run("report", exp["name"], params={"attacks": ",".join(exp["attacks"]), "seeds": exp["seeds"],
                                                  "sweep_lrs": exp["sweep"]["lrs"]}) as tracked:
        figures.restricted_accuracy(summary, images["restricted_accuracy"])
        figures.protect_history(inputs["sophon_history"], images["protect_history"])
        figures.sweep(summary["sweep"], images["sweep"])
        document = build_document(summary, exp["report"]["epochs"], images)
        document.sections.insert(1, search_section)
        short = search_report.in_short(summary["envelope"], intactness_line(summary), paper_rule_line(summary))
        write_common(exp, summary, document, images,
                     {name: accuracy_csv(entry) for name, entry in summary["attacks"].items()}, tracked, short)
        tracked.log_metrics({**headline_metrics(summary), **search_report.holds_metrics(summary["envelope"])})
    first = next(iter(exp["attacks"]))
    return summary, [*short, "", render_text(attack_table(summary, first, exp["report"]["epochs"])), "",
                     *verdict_lines(summary), *search_report.verdict_lines(summary["envelope"])]


# --- diffusion -----------------------------------------------------------------------------------------------

def denoised_rows(exp: dict, device) -> tuple[list, list]:
    """Rows of the two denoising figures: clean, noised, then each model's one-step denoising."""
    from sophon.diffusion import denoise_figure_batch, figure_batch, make_scheduler, to_uint8

    figure, seed = exp["report"], exp["eval"]["seed"]
    count, t = figure["images"], figure["denoise_timestep"]
    scheduler = make_scheduler()
    names = task_of(exp).models()
    models = {name: load_model(exp, name, device)[0] for name in names}
    rows = {}
    for part, data in zip(("restricted_test", "original_test"), parts(exp, "restricted_test", "original_test")):
        x0, x_t, _ = figure_batch(data, count, t, seed)
        rows[part] = [("clean", to_uint8(x0).numpy()), (f"noised (t={t})", to_uint8(x_t).numpy())]
        for name in names:
            label = f"{name} model" if part == "original_test" else f"{name} (no fine-tuning)"
            rows[part].append((label, denoise_figure_batch(models[name], scheduler, data, count, t, seed, device).numpy()))
    attack, first_seed = next(iter(exp["attacks"])), exp["seeds"][0]
    for start in task_of(exp).starts:
        path = layout.attack_curve(exp["name"], attack, start, first_seed)
        denoised = read_input(path).get("denoised")
        if denoised is None:
            raise ReportInputError(f"report input {path} holds no denoised images (rerun the attack stage)")
        images = np.asarray(denoised["uint8"], dtype=np.uint8).reshape(denoised["shape"])
        rows["restricted_test"].append((f"fine-tuned {start}", images))
    return rows["restricted_test"], rows["original_test"]


def diffusion_report(exp: dict, device) -> tuple[dict, list[str]]:
    name, task = exp["name"], task_of(exp)
    curves = {attack: {start: [read_input(layout.attack_curve(name, attack, start, s)) for s in exp["seeds"]]
                       for start in task.starts} for attack in exp["attacks"]}
    cards = {m: read_card(layout.model_dir(name, m)) for m in task.models()}
    histories = {m: read_input(layout.history(name, m)) for m in task.models()}
    stability = {loss: [read_input(layout.stability(name, loss, s)) for s in exp["stability"]["seeds"]]
                 for loss in exp["stability"]["losses"]}
    summary = gen_report.summarize(experiment=name, seeds=exp["seeds"], attacks=exp["attacks"], curves=curves,
                                   cards=cards, histories=histories, stability=stability, report=exp["report"])
    images = figure_paths(exp)
    summary["envelope"], search_section, _ = search_report.build(exp["search"], name, images["envelope"].parent,
                                                                 exp["report"]["epochs"], exp.get("redteam"))
    restricted_rows, original_rows = denoised_rows(exp, device)
    t, sophon = exp["report"]["denoise_timestep"], exp["sophon"]
    notes = [f"Original domain: {exp['original']['domain']}; restricted domain: {exp['restricted']['domain']}; images "
             f"{exp['data']['image_size']}×{exp['data']['image_size']}, {exp['data']['channels']} channel(s).",
             f"UNet: {exp['unet']}; {cards['original'].get('num_parameters')} parameters.",
             f"Fixed-noise evaluation: every test image noised {exp['eval']['repeats']} times with (noise, t) from seed "
             f"{exp['eval']['seed']}, t uniform in 0..999.",
             f"Sophon: suppression {sophon['suppression']}, {sophon['loops']} loops, alpha {sophon['alpha']}, beta "
             f"{sophon['beta']}, {sophon['inner_steps']} inner steps."]
    with stage_run("report", name, params={"attacks": ",".join(exp["attacks"]), "seeds": exp["seeds"],
                                           "report": exp["report"]}) as tracked:
        gen_report.mse_curves(summary, images["mse_curves"])
        gen_report.image_grid(restricted_rows, images["denoise_restricted"],
                              f"restricted domain ({exp['restricted']['domain']}): noised at t={t}, denoised in one step")
        gen_report.image_grid(original_rows, images["denoise_original"],
                              f"original domain ({exp['original']['domain']}): noised at t={t}, denoised in one step")
        gen_report.stability(summary, stability, images["stability"])
        gen_report.protect_history(histories["sophon"], images["protect_history"])
        document = gen_report.build_document(summary, exp["report"]["epochs"], images, notes)
        document.sections.insert(1, search_section)
        short = search_report.in_short(summary["envelope"], gen_report.intactness_line(summary),
                                       gen_report.paper_rule_line(summary))
        write_common(exp, summary, document, images,
                     {a: gen_report.curve_csv(entry) for a, entry in summary["attacks"].items()}, tracked, short)
        v = summary["verdicts"]
        tracked.log_metrics({"protection_holds": int(v["protection_holds"]),
                             "intactness_holds": int(v["intactness_within_tolerance"]),
                             "sophon_at_or_above_scratch": int(v["sophon_at_or_above_scratch_every_epoch"]),
                             "pretraining_advantage": int(v["pretraining_advantage"]),
                             **search_report.holds_metrics(summary["envelope"])})
    lines = [*short, ""]
    for attack in summary["attacks"]:
        lines += [render_text(gen_report.attack_table(summary, attack, exp["report"]["epochs"])), ""]
    return summary, [*lines, *gen_report.verdict_lines(summary), *search_report.verdict_lines(summary["envelope"])]


def main() -> None:
    args = parser(__doc__).parse_args()
    exp, device = setup(args)
    build = classification_report if exp["task"] == "classification" else diffusion_report
    _, lines = build(exp, device)
    print("\n".join(lines))
    print(f"\nreport: {layout.report_dir(exp['name']) / 'report.html'}")


if __name__ == "__main__":
    run(main)
