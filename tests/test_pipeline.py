"""The whole DAG, shrunk: Snakemake end to end in a temporary project, the MLflow runs it logged, then one state for
both orchestrators (after either, the other has nothing to do; a parameter change reruns only what depends on it,
the same stages under both), then bad input on the stage commands."""

import json
import sqlite3

import pytest
import yaml

from tests.pipeline_helpers import bin_path, copy_project, run, snakemake_dry_run, tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("pipeline"))
    params = tiny_params(root / "params.yaml")
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], root)
    done = run([bin_path("snakemake"), "--cores", "2"], root)
    return root, params, done


CLS, GEN = "quick-classification", "quick-generation"


def test_snakemake_runs_to_the_report(project):
    root, params, _ = project
    cls = params["experiments"][CLS]
    summary = json.loads((root / "reports" / CLS / "summary.json").read_text())
    assert summary["experiment"] == CLS and summary["seeds"] == [0]
    assert summary["chance_accuracy"] == pytest.approx(10.0)
    assert set(summary["original_domain_accuracy"]) == {"original", "ntl", "sophon"}
    for name, attack in summary["attacks"].items():
        assert attack["lr"] in cls["sweep"]["lrs"]  # lr: auto resolved from the sweep
        for start in ("scratch", "original", "ntl", "sophon"):
            assert list(attack["restricted_accuracy"][start]) == ["0", "1", "2"], (name, start)
            assert 0 <= attack["restricted_accuracy"][start]["2"]["mean"] <= 100
    report = root / "reports" / CLS
    assert "<img" in (report / "report.html").read_text() and (report / "restricted_accuracy.png").stat().st_size > 0
    card = json.loads((root / "models" / CLS / "sophon" / "model.json").read_text())
    assert card["architecture"] == cls["model"]["arch"] and card["weights_sha256"] and card["experiment"] == CLS
    gen = json.loads((root / "reports" / GEN / "summary.json").read_text())
    assert set(gen["original_domain_mse"]) >= {"original", "sophon"}
    # The envelope contract, for both tasks: every start, epochs 0..E, a verdict.
    for name, doc in ((CLS, summary), (GEN, gen)):
        envelope, search = doc["envelope"], params["experiments"][name]["search"]
        assert envelope["epochs"] == search["epochs"] and set(envelope["space"]) >= {
            "strategies", "optimizers", "lrs", "batch_sizes", "schedules"}
        assert set(envelope["starts"]) == {"scratch", *search["starts"]}
        for start in envelope["starts"].values():
            assert len(start["mean"]) == len(start["std"]) == len(start["config"]) == search["epochs"] + 1
        assert isinstance(envelope["holds"], bool) and 0 <= envelope["advantage"]["epoch"] <= search["epochs"]
        assert "The strongest attacker" in (root / "reports" / name / "report.md").read_text()


def test_mlflow_holds_one_run_per_job_grouped_by_invocation(project):
    root, params, done = project
    jobs = done.stderr.count("Finished jobid")
    with sqlite3.connect(root / "mlflow.db") as db:
        # Stage runs: every run of the invocation but the search's nested children.
        runs = db.execute("select r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                          "where t.key = 'sophon.invocation' and r.run_uuid not in "
                          "(select run_uuid from tags where key = 'mlflow.parentRunId')").fetchall()
        stages = {row[0] for row in db.execute("select value from tags where key = 'sophon.stage'")}
        metrics = db.execute("select count(*) from metrics where key = 'restricted_accuracy'").fetchone()[0]
    assert len(runs) == jobs - 1  # every job but `all`
    assert {status for status, _ in runs} == {"FINISHED"} and len({tag for _, tag in runs}) == 1
    assert {"split", "pretrain", "ntl", "protect", "sweep", "attack", "search", "stability", "report"} <= stages
    assert metrics >= 3 * 12  # per-epoch steps 0..2 for every paired attack run
    with sqlite3.connect(root / "mlflow.db") as db:
        children = dict(db.execute(
            "select p.value, count(*) from tags c join tags p on p.run_uuid = c.value and p.key = 'sophon.stage' "
            "where c.key = 'mlflow.parentRunId' group by p.value").fetchall())
        best = db.execute("select count(*) from tags where key = 'sophon.best_config'").fetchone()[0]
    # Every search (3 starts per experiment) is a parent run: its best configuration as a tag and one nested child
    # per coarse configuration and confirmed configuration × seed (how many were confirmed depends on which won at
    # each candidate epoch: read from the documents). The paired grid, the sweep, the stability study and the red
    # team: one parent per job, one child per run.
    cls, gen = params["experiments"][CLS], params["experiments"][GEN]
    searches = [json.loads(p.read_text()) for p in sorted(root.glob("results/*/search/*.json"))]
    assert best == len(searches) == 6
    assert children["search"] == sum(_search_runs(doc) for doc in searches)
    assert children["redteam"] == sum(len(e["redteam"]["attacks"]) * len(e["redteam"]["seeds"]) * len(e["redteam"]["starts"])
                                      for e in (cls, gen))
    assert children["attack"] == 4 * len(cls["attacks"]) * len(cls["seeds"]) + 3 * len(gen["attacks"]) * len(gen["seeds"])
    assert children["sweep"] == len(cls["sweep"]["lrs"])
    assert children["stability"] == len(gen["stability"]["losses"]) * len(gen["stability"]["seeds"])


def test_released_models_are_registered_and_load_without_pickle(project):
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    root, params, _ = project
    store = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)  # this process may have pointed MLflow at another test's store
    mlflow.set_registry_uri(store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    for name in (CLS, GEN):
        versions = client.search_model_versions(f"name = 'sophon-{name}'")
        card = json.loads((root / "models" / name / "sophon" / "model.json").read_text())
        assert len(versions) == 1 and versions[0].tags["weights_sha256"] == card["weights_sha256"], name
    model = mlflow.pyfunc.load_model(f"models:/sophon-{CLS}/1")
    size = params["experiments"][CLS]["data"]["image_size"]
    logits = model.predict(np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32))
    assert logits.shape == (2, params["experiments"][CLS]["model"]["num_classes"])


def test_ablation_target_tables_the_paper_and_the_pipeline_model(project):
    """`snakemake ablation`, outside the default target: each variant protects the original model and meets the
    Sophon start's search; the table holds it beside the pipeline's own Sophon model, under the variants' names."""
    root, params, _ = project
    run([bin_path("snakemake"), "--cores", "2", "ablation"], root)
    for name in (CLS, GEN):
        table = json.loads((root / "results" / name / "ablation.json").read_text())
        rows = {row["variant"]: row for row in table["rows"]}
        assert set(rows) == {"paper", "pipeline (params.yaml)"}
        assert rows["paper"]["name"] == "paper"
        pipeline = rows["pipeline (params.yaml)"]["name"]  # the quick profile changes both tasks' protect
        assert pipeline.startswith("paper + "), pipeline
        for row in rows.values():  # 3 epochs in the tiny search
            assert isinstance(row["holds"], bool) and set(row["gain_at"]) == {"1", "2", "3"}
        card = json.loads((root / "models" / name / "ablation" / "paper" / "model.json").read_text())
        assert card["variant"] == "paper" and card["protect_settings"]["select"] == "last"
        assert "| paper | paper |" in (root / "results" / name / "ablation.md").read_text()
    assert not [j for j in snakemake_dry_run(root, "ablation") if j["rule"] != "ablation"]
    # Its own dvc.yaml: the run was recorded in workflow/ablation/dvc.lock.
    assert "up to date" in run([bin_path("dvc"), "status", "workflow/ablation/dvc.yaml"], root).stdout


def dvc_changed(root, dvcfile="dvc.yaml") -> list[str]:
    """The stages `dvc status` lists as changed."""
    out = run([bin_path("dvc"), "status", dvcfile], root).stdout
    if "Data and pipelines are up to date." in out:
        return []
    return sorted(line.rstrip(":") for line in out.splitlines() if line and not line.startswith((" ", "\t")))


def snakemake_jobs(root, *extra) -> list[str]:
    return sorted(j["rule"] for j in snakemake_dry_run(root, *extra) if j["rule"] not in ("all", "ablation"))


def edit_params(root, change) -> None:
    edited = yaml.safe_load((root / "params.yaml").read_text())
    change(edited["experiments"])
    (root / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))


def test_one_state_snakemake_then_dvc_repro(project):
    """After Snakemake, dvc.lock holds its outputs (no manual step); a params edit makes both orchestrators want the
    same stages; `dvc repro` runs exactly those, and then Snakemake has nothing to do."""
    root, params, _ = project
    assert dvc_changed(root) == [] and snakemake_jobs(root) == []
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert lock[f"protect-{CLS}"]["outs"][0]["md5"]  # datasets and checkpoints hashed and cached
    assert (root / ".dvc" / "cache").is_dir()

    edit_params(root, lambda e: e[CLS]["attacks"]["initfc_fc"].update(epochs=3))
    changed = dvc_changed(root)
    assert changed == sorted([f"attack_scratch-{CLS}", f"attack-{CLS}@original", f"attack-{CLS}@ntl",
                              f"attack-{CLS}@sophon"]), changed
    snake = snakemake_jobs(root)  # not run: DVC runs them
    assert snake == ["attack"] * 4 + [f"report_{CLS}"], snake

    repro = run([bin_path("dvc"), "repro"], root).stdout
    ran = sorted(set(line.split("'")[1] for line in repro.splitlines() if line.startswith("Running stage")))
    assert ran == sorted(changed + [f"report-{CLS}"]), ran  # the same set as Snakemake's
    # The run cache: each start's job recomputed the edited attack only.
    runs = [line for line in repro.splitlines() if line.startswith("attacks/")]
    assert len(runs) == 4 * len(params["experiments"][CLS]["attacks"]), runs
    assert all(("(cached)" in line) == (" initfc_fc " not in line) for line in runs), runs
    summary = json.loads((root / "reports" / CLS / "summary.json").read_text())
    assert list(summary["attacks"]["initfc_fc"]["restricted_accuracy"]["sophon"]) == ["0", "1", "2", "3"]
    assert "summary.json" in run([bin_path("dvc"), "metrics", "show"], root).stdout

    assert snakemake_jobs(root) == [] and dvc_changed(root) == []


def _search_runs(doc: dict) -> int:
    """The fine-tuning runs a search document stands for: its coarse runs, every confirmed seed and every retest."""
    retest = doc.get("retest", {"runs": {}})
    return (len(doc["coarse"]) + sum(len(entry["seeds"]) for entry in doc["confirmed"].values())
            + sum(len(curves) for curves in retest["runs"].values()))


def test_one_state_edit_then_snakemake(project):
    """The other way round: after a search edit, Snakemake reruns what `dvc status` lists, and leaves dvc.lock clean."""
    root, params, _ = project
    assert dvc_changed(root) == []
    edit_params(root, lambda e: e[GEN]["search"]["space"]["lrs"]["adam"].update(high=0.002))
    changed = dvc_changed(root)
    assert changed == sorted([f"search_scratch-{GEN}", f"search-{GEN}@original", f"search-{GEN}@sophon"]), changed
    assert snakemake_jobs(root) == ["report_" + GEN] + ["search"] * 3

    done = run([bin_path("snakemake"), "--cores", "2"], root)
    assert done.stderr.count("Finished jobid") == 5  # 3 searches, the report, `all`
    assert dvc_changed(root) == [] and snakemake_jobs(root) == []
    # The per-run cache: configurations the change did not touch were reused, not recomputed.
    for start in ("scratch", "original", "sophon"):
        doc = json.loads((root / "results" / GEN / "search" / f"{start}.json").read_text())
        assert doc["runs"]["cached"] + doc["runs"]["computed"] == _search_runs(doc) and doc["runs"]["cached"] >= 1, (
            start, doc["runs"])

def test_bad_input_gives_one_line_and_keeps_outputs(project):
    root, params, _ = project
    curve = root / "results" / CLS / "attacks" / "sophon" / "direct_all" / "seed_0.json"
    kept = curve.read_bytes()
    weights = root / "models" / CLS / "sophon" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-64] + bytes(64))
    try:
        done = run(["python", "-m", "stages.attack", "--experiment", CLS, "--start", "sophon"], root, check=False)
    finally:
        weights.write_bytes(original)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "corrupted" in done.stderr and curve.read_bytes() == kept

    def stage_error(config_text: str, stage: str = "split") -> str:
        (root / "bad.yaml").write_text(config_text)
        result = run(["python", "-m", f"stages.{stage}", "--params", "bad.yaml", "--experiment", CLS], root, check=False)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1
        return lines[0]

    good = (root / "params.yaml").read_text()
    manifest = (root / "data" / CLS / "manifest.json").read_bytes()
    assert "not valid YAML" in stage_error(good + "\nthreads: [0,\n")
    assert f"key 'experiments.{CLS}.restricted.domain' = nope: unknown domain" in stage_error(
        good.replace("domain: mnist5k", "domain: nope", 1))
    assert f"key 'experiments.{CLS}.model.arch' = resnet_nope: unknown model" in stage_error(
        good.replace("arch: test_resnet", "arch: resnet_nope"))
    missing = stage_error(good.replace("domain: mnist5k", "domain: cifar10", 1).replace("root: data/raw", "root: nowhere", 1))
    assert "dataset 'cifar10'" in missing and "nowhere" in missing
    assert "--experiment 'nope' is not in params.yaml" in run(
        ["python", "-m", "stages.split", "--params", "params.yaml", "--experiment", "nope"], root, check=False).stderr
    assert (root / "data" / CLS / "manifest.json").read_bytes() == manifest  # earlier output kept
