"""One document model (sections of paragraphs, bullet lists, tables, images) rendered to Markdown, to a
self-contained HTML page (images inlined as base64 data URIs) and, for tables, to plain text."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from sophon.layout import STARTS

ROW_NAMES = {"scratch": "Train from scratch", "original": "Original model", "ntl": "NTL model", "sophon": "Sophon model"}


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph), Bullets, Table or Image


@dataclass
class Document:
    title: str
    sections: list[Section]


# ---- numbers → words and tables ---------------------------------------------------------------------------------

def pm(stat: dict) -> str:
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _epochs(epochs) -> str:
    return ", ".join(str(e) for e in epochs)


def intactness_line(summary: dict) -> str:
    i = summary["verdicts"]["intactness"]
    if i["drop"] is None:
        return "Intactness: not measured (the original or Sophon model card is missing)."
    return (f"Intactness {'holds' if i['holds'] else 'does NOT hold'}: Sophon loses {i['drop']:.1f} points of "
            f"original-domain accuracy against the original model (tolerance {i['tolerance']:.1f}).")


def paper_rule_line(summary: dict) -> str:
    """The paper's fixed attacks under its strict rule, in one line (the report's first section)."""
    attacks = summary["verdicts"]["attacks"]
    held = [n for n, a in attacks.items() if a["sophon_at_or_below_scratch_every_epoch"]]
    failed = [f"{n} +{a['max_excess_over_scratch']:.1f} points, "
              f"{'within' if a['within_noise_every_epoch'] else 'beyond'} seed noise"
              for n, a in attacks.items() if n not in held]
    return (f"The paper's fixed attacks (Table I), strict rule (Sophon at or below scratch under the same recipe at "
            f"every epoch, no allowance for seed noise): protection holds under {len(held)} of {len(attacks)}"
            + (f" (largest excess: {'; '.join(failed)})." if failed else "."))


def verdict_lines(summary: dict) -> list[str]:
    """The paper's verdicts in plain words, one line each, the paper's overall rule first."""
    v, chance = summary["verdicts"], summary["chance_accuracy"]
    lines = [f"The paper's rule over every fixed attack: protection {'holds' if v['protection_holds'] else 'does NOT hold'} "
             "(needs intactness and Sophon at or below training from scratch at every epoch under every attack).",
             intactness_line(summary)]
    for name, a in v["attacks"].items():
        final = (f"final {a['sophon_final']:.1f}% vs scratch {a['scratch_final']:.1f}%"
                 + (f" and original {a['original_final']:.1f}%" if a["original_final"] is not None else ""))
        if a["sophon_at_or_below_scratch_every_epoch"]:
            lines.append(f"Protection holds under {name}: Sophon at or below training from scratch at every epoch ({final}).")
        else:
            noise = "within seed noise (±1 std each) at every epoch" if a["within_noise_every_epoch"] else \
                "beyond seed noise at some epoch"
            lines.append(f"Protection does NOT hold under {name}: Sophon above scratch at epochs "
                         f"{_epochs(a['epochs_above_scratch'])} (max +{a['max_excess_over_scratch']:.1f} points, {noise}; {final}).")
        gain = a["pretraining_advantage"]
        if gain is not None and gain <= 0:
            lines.append(f"Caveat under {name}: fine-tuning the original model never beats training from scratch "
                         "(B2 ≤ B1), so this attack cannot show that Sophon removes a pretraining advantage.")
        elif gain is not None:
            lines.append(f"Pretraining advantage under {name}: the original model beats scratch by up to "
                         f"{gain:.1f} points (epoch {a['pretraining_advantage_epoch']}).")
    for name in v["attacks_without_verdict"]:
        missing = ", ".join(summary["attacks"][name]["missing_starts"])
        lines.append(f"No verdict under {name}: curves missing for {missing}.")
    if v["ntl"] is not None:
        n = v["ntl"]
        lines.append(f"NTL under {n['attack']}: {n['before_finetune']:.1f}% before fine-tuning, {n['after_finetune']:.1f}% "
                     f"after; fine-tuning {'recovers' if n['recovered'] else 'does not recover'} it "
                     f"(recovered = {n['recovered_rule']}).")
    # 1/classes; the envelope's chance level (beside its verdict) is the test set's majority-class share instead.
    lines.append(f"Uniform guess (1 / classes): {chance:.1f}%.")
    return lines


def attack_table(summary: dict, name: str, epochs) -> Table:
    """Table-I-like: a row per start, the original-domain accuracy, then restricted accuracy mean ± std per epoch."""
    entry = summary["attacks"][name]
    last = max(len(s) for s in entry["restricted_accuracy"].values()) - 1
    shown = [e for e in epochs if e <= last]
    original = summary["original_domain_accuracy"]
    rows = [[ROW_NAMES[start], f"{original[start]['mean']:.1f}" if start in original else "–",
             *(pm(stats[str(e)]) for e in shown)]
            for start, stats in ((s, entry["restricted_accuracy"].get(s)) for s in STARTS) if stats is not None]
    return Table(["Model", "Original ACC (%)", *(f"Epoch {e}" for e in shown)], rows,
                 f"{name}: {entry['strategy']}, {entry['optimizer']}, lr {entry['lr']}, batch {entry['batch_size']}, "
                 f"weight decay {entry.get('weight_decay')}, {entry['epochs']} epochs; restricted-domain accuracy (%), "
                 f"mean ± std over seeds {_epochs(summary['seeds'])}")


def _key_values(settings: dict) -> Table:
    return Table(["Setting", "Value"], [[k, str(v)] for k, v in settings.items()])


def build_document(summary: dict, epochs, images: dict[str, Path]) -> Document:
    """The report: verdicts, intactness, per-attack tables, sweep, protection and NTL training runs."""
    seeds = _epochs(summary["seeds"])
    intro = (f"Experiment {summary['experiment']}. Attack seeds {seeds}: every restricted-domain number is mean ± std "
             f"over these seeds, std being the {summary['std']}. "
             f"Uniform guess (1 / classes) {summary['chance_accuracy']:.1f}%.")
    sections = [Section("Verdicts", [intro, Bullets(verdict_lines(summary))])]
    sections.append(Section("Intactness (original-domain test accuracy)", [Table(
        ["Model", "Original-domain accuracy (%)"],
        [[ROW_NAMES[m], f"{s['mean']:.2f}"] for m, s in summary["original_domain_accuracy"].items()],
        "single trained models (no seed spread)")]))
    attacks = Section("Restricted-domain accuracy under fine-tuning (paper Table I)",
                      [attack_table(summary, name, epochs) for name in summary["attacks"]])
    attacks.blocks.append(Image(images["restricted_accuracy"], "restricted-domain accuracy vs epoch, mean ± std"))
    sections.append(attacks)
    sw = summary["sweep"]
    sections.append(Section("Learning-rate sweep (original model)", [
        f"Attacks with lr auto use the best lr, {sw['best_lr']}; score = {sw['score']}.",
        Table(["lr", "score (%)", "final accuracy (%)", "best"],
              [[lr, f"{score:.1f}", f"{sw['curves'][lr][-1]:.1f}", "✓" if lr == str(sw["best_lr"]) else ""]
               for lr, score in sw["lrs"].items()]),
        Image(images["sweep"], "sweep score vs learning rate")]))
    training = summary["training"]
    if "sophon" in training:
        t = training["sophon"]
        sections.append(Section("Sophon protection run", [
            f"Loops: {t['loops']}; rollbacks: {t['rollbacks']}; loops with a non-finite suppression loss (update "
            f"skipped): {t['nonfinite']}; quality checks: {t['checks']}. Final original-domain accuracy "
            f"{t['original_accuracy']:.2f}%, restricted-domain accuracy before fine-tuning {t['restricted_accuracy']:.2f}%.",
            basin_sentence(t.get("basin")),
            readout_sentence(t.get("readout")),
            _key_values(t["settings"]), Image(images["protect_history"], "Sophon protection history")]))
    if "ntl" in training:
        t = training["ntl"]
        sections.append(Section("NTL baseline run", [
            f"{t['steps']} steps. Original-domain accuracy {t['original_accuracy']:.2f}%, restricted-domain accuracy "
            f"before fine-tuning {t['restricted_accuracy']:.2f}%.", _key_values(t["settings"])]))
    return Document(f"Sophon report: {summary['experiment']}", sections)


def readout_sentence(readout: dict | None) -> str:
    """What a linear probe reads of the restricted labels at each stage (sophon.features.stage_readout)."""
    if not readout:
        return "Linear-probe readout of the restricted labels: not measured (a protect run before it was added)."
    stages = ", ".join(s.rsplit(".", 1)[-1] for s in readout["stages"])
    values = "; ".join(f"{label} {'/'.join(f'{v:.2f}' for v in readout[key])}" for key, label in (
        ("random_init", "a random init"), ("original", "the original"), ("released", "the release")))
    return (f"What a linear probe reads of the restricted labels at each stage ({stages}; held-out R² of a ridge "
            f"probe, 0: nothing): {values}. Below a random init means the features hold less of the restricted "
            f"domain than random ones; how fast fine-tuning relearns it is the attack search's to measure.")


def basin_sentence(basin: dict | None) -> str:
    """Linear-mode connectivity of the release to the original weights (sophon.basin), in one sentence."""
    if not basin:
        return "Linear-mode connectivity to the original weights: not measured (a protect run before it was added)."
    r, o = basin["restricted"], basin["original"]
    return (f"Linear-mode connectivity to the original weights (loss along the line released → original, "
            f"{len(r['alphas'])} points): restricted-domain loss {r['losses'][0]:.4g} → {r['losses'][-1]:.4g}, barrier "
            f"{r['barrier']:.4g} (above the chord; ≤ 0: one basin); original-domain loss {o['losses'][0]:.4g} → "
            f"{o['losses'][-1]:.4g}, barrier {o['barrier']:.4g}; distance {basin['distance']['relative']:.3f} × "
            f"‖θ_original‖.")


# ---- renderers ----------------------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(doc: Document) -> str:
    """Markdown; images are referenced by file name (the report sits beside them)."""
    out = [f"# {doc.title}", ""]
    for section in doc.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, str):
                out += [block, ""]
            elif isinstance(block, Bullets):
                out += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                out += [f"*{block.caption}*", ""] if block.caption else []
                out += ["| " + " | ".join(map(_md_cell, block.header)) + " |",
                        "|" + "|".join("---" for _ in block.header) + "|"]
                out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows] + [""]
            elif isinstance(block, Image):
                out += [f"![{block.alt}]({Path(block.path).name})", ""]
    return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
       "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}caption{caption-side:top;text-align:left;"
       "font-style:italic;padding-bottom:.3em}img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}")


def render_html(doc: Document) -> str:
    """A self-contained HTML page: inline CSS, images embedded as base64 data URIs."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(doc.title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]
    for section in doc.sections:
        out.append(f"<h2>{e(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, str):
                out.append(f"<p>{e(block)}</p>")
            elif isinstance(block, Bullets):
                out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>")
            elif isinstance(block, Table):
                caption = f"<caption>{e(block.caption)}</caption>" if block.caption else ""
                head = "".join(f"<th>{e(str(h))}</th>" for h in block.header)
                body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block.rows)
                out.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Image):
                data = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{e(block.alt)}" src="data:image/png;base64,{data}"></figure>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_text(table: Table) -> str:
    """A table as fixed-width plain text (for the terminal)."""
    cells = [table.header, *table.rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(table.header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(([table.caption] if table.caption else []) + lines)
