"""Stage `gen_report`: the generation experiment's report — Table II (MSE-k, mean ± std over seeds), the MSE-vs-epoch
figure (Fig. 4), denoising figures (Fig. 5, 6), the stability study (Fig. 14) and the verdicts.

    python -m stages.gen_report [--params params.yaml]

Writes into reports/<generation.experiment>/: summary.json, report.md, report.html, mse_curves.png,
denoise_restricted.png, denoise_original.png, stability.png, protect_history.png, envelope.png and curves/<attack>.csv.
"""


from safetensors.torch import load_file

from sophon import layout
from sophon.diffusion import denoise_figure_batch, figure_batch, make_scheduler, to_uint8
from sophon.io import write_json, write_text
from sophon.models import read_card
from sophon.report import generation as gen_report
from sophon.report import search as search_report
from sophon.report.aggregate import ReportInputError, read_input
from sophon.report.render import render_html, render_markdown, render_text
from sophon.tracking import stage_run
from stages import gen_common
from stages.common import parser, run, setup

FIGURES = {"mse_curves": "mse_curves.png", "denoise_restricted": "denoise_restricted.png",
           "denoise_original": "denoise_original.png", "stability": "stability.png",
           "protect_history": "protect_history.png"}



def denoised_rows(gen: dict, device) -> tuple[list, list]:
    """Rows of the two denoising figures: clean, noised, then each model's one-step denoising."""
    figure, seed = gen["report"], gen["eval"]["seed"]
    count, t = figure["images"], figure["denoise_timestep"]
    scheduler = make_scheduler()
    models = {name: gen_common.model(name, device)[0] for name in layout.GEN_MODELS}
    rows = {}
    for part in ("restricted_test", "original_test"):
        data = gen_common.part(part)
        x0, x_t, _ = figure_batch(data, count, t, seed)
        rows[part] = [("clean", to_uint8(x0).numpy()), (f"noised (t={t})", to_uint8(x_t).numpy())]
        for name in layout.GEN_MODELS:
            label = f"{name} model" if part == "original_test" else f"{name} (no fine-tuning)"
            rows[part].append((label, denoise_figure_batch(models[name], scheduler, data, count, t, seed, device).numpy()))
    attack, first_seed = next(iter(gen["attacks"])), gen["seeds"][0]
    for start in layout.GEN_STARTS:
        path = layout.gen_attack_denoised(attack, start, first_seed)
        if not path.exists():
            raise ReportInputError(f"report input missing: {path} (run the gen_attack stage first)")
        rows["restricted_test"].append((f"fine-tuned {start}", load_file(str(path))["images"].numpy()))
    return rows["restricted_test"], rows["original_test"]


def main() -> None:
    args = parser(__doc__).parse_args()
    config, device = setup(args)
    gen = gen_common.section(config, args.params)
    curves = {attack: {start: [read_input(layout.gen_attack_curve(attack, start, s)) for s in gen["seeds"]]
                       for start in layout.GEN_STARTS} for attack in gen["attacks"]}
    cards = {name: read_card(layout.gen_model_dir(name)) for name in layout.GEN_MODELS}
    histories = {name: read_input(layout.gen_history(name)) for name in layout.GEN_MODELS}
    stability = {loss: [read_input(layout.gen_stability(loss, s)) for s in gen["stability"]["seeds"]]
                 for loss in gen["stability"]["losses"]}
    summary = gen_report.summarize(experiment=gen["experiment"], seeds=gen["seeds"], attacks=gen["attacks"],
                                   curves=curves, cards=cards, histories=histories, stability=stability,
                                   report=gen["report"])
    out = layout.report_dir(gen["experiment"])
    images = {key: out / name for key, name in FIGURES.items()}
    restricted_rows, original_rows = denoised_rows(gen, device)
    t = gen["report"]["denoise_timestep"]
    notes = [f"Original domain: {gen['original']['domain']}; restricted domain: {gen['restricted']['domain']}; images "
             f"{gen['data']['image_size']}×{gen['data']['image_size']}, {gen['data']['channels']} channel(s).",
             f"UNet: {gen['unet']}; {cards['original'].get('num_parameters')} parameters.",
             f"Fixed-noise evaluation: every test image noised {gen['eval']['repeats']} times with (noise, t) from seed "
             f"{gen['eval']['seed']}, t uniform in 0..999.",
             f"Sophon: suppression {gen['sophon']['suppression']}, {gen['sophon']['loops']} loops, alpha "
             f"{gen['sophon']['alpha']}, beta {gen['sophon']['beta']}, {gen['sophon']['inner_steps']} inner steps."]
    summary["envelope"], search_section, images["envelope"] = search_report.build(
        gen["search"], "generation", out, gen["report"]["epochs"])
    with stage_run("gen_report", gen["experiment"], params={"attacks": ",".join(gen["attacks"]), "seeds": gen["seeds"],
                                                            "report": gen["report"]}) as tracked:
        write_json(out / "summary.json", summary)
        gen_report.mse_curves(summary, images["mse_curves"])
        gen_report.image_grid(restricted_rows, images["denoise_restricted"],
                              f"restricted domain ({gen['restricted']['domain']}): noised at t={t}, denoised in one step")
        gen_report.image_grid(original_rows, images["denoise_original"],
                              f"original domain ({gen['original']['domain']}): noised at t={t}, denoised in one step")
        gen_report.stability(summary, stability, images["stability"])
        gen_report.protect_history(histories["sophon"], images["protect_history"])
        for name, entry in summary["attacks"].items():
            write_text(out / "curves" / f"{name}.csv", gen_report.curve_csv(entry))
        document = gen_report.build_document(summary, gen["report"]["epochs"], images, notes)
        document.sections.insert(1, search_section)
        write_text(out / "report.md", render_markdown(document))
        write_text(out / "report.html", render_html(document))
        for path in [*images.values(), out / "summary.json", out / "report.html", out / "report.md"]:
            tracked.log_artifact(path, "report")
        v = summary["verdicts"]
        tracked.log_metrics({"protection_holds": int(v["protection_holds"]),
                             "intactness_holds": int(v["intactness_within_tolerance"]),
                             "sophon_at_or_above_scratch": int(v["sophon_at_or_above_scratch_every_epoch"]),
                             "pretraining_advantage": int(v["pretraining_advantage"])})
    for name in summary["attacks"]:
        print(render_text(gen_report.attack_table(summary, name, gen["report"]["epochs"])))
        print()
    print("\n".join(gen_report.verdict_lines(summary)))
    print(search_report.verdict_line(summary["envelope"]))
    print(f"\nreport: {out / 'report.html'}")


if __name__ == "__main__":
    run(main)
