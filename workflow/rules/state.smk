# One state for both orchestrators: dvc.lock records what every stage's outputs were made from (its params and
# code), whoever ran it, and Snakemake reads its rerun decisions about params and code from there.
#
# * Every job has one extra input, a stamp per DVC stage (.snakemake/dvc-state/<stage>) holding the config values
#   the job reads (what `params:` would hold). At parse time the stamp is dated 1970 when dvc.lock holds the stage
#   with today's params values and code, and "now" when it does not (a params.yaml edit, a code edit, a stage DVC
#   never saw), so Snakemake reruns exactly what `dvc status` lists, and after a `dvc repro` it has nothing to do.
#   Its content says which, and since when (Snakemake does not rerun for a newer input whose checksum it recorded
#   as unchanged); a second edit while out of date re-dates it.
# * After a successful Snakemake run (onsuccess, in the main process once every job has finished; never inside a
#   job), `dvc commit` records the jobs' stages in dvc.lock, and the outputs' modification times, which DVC's commit
#   rewrites when it copies files into its cache, are put back: `dvc status` is clean and Snakemake stays up to date.
# With a --configfile other than params.yaml (which DVC does not read) a stamp is re-dated when its content changes
# and nothing is committed.
import functools as _functools
import hashlib as _hashlib
import json as _json
import subprocess as _subprocess
import time as _time
from pathlib import Path as _Path

from snakemake.logging import logger as _logger

STATE_DIR = _Path(".snakemake/dvc-state")
CODE_DIRS = ("sophon/", "stages/")
# The DVC projects: the top-level one and the ablation's (its stages run with wdir = the project root).
DVC_FILES = {"dvc.yaml": "dvc.lock", "workflow/ablation/dvc.yaml": "workflow/ablation/dvc.lock"}
SYNC_DVC = PARAMS_FILE == "params.yaml" and _Path(".dvc").is_dir()


def dvc_stage(rule_name, wildcards):
    """The DVC stage (its dvc.yaml and name) a Snakemake job runs, or None (the target rules)."""
    name = wildcards.get("experiment")
    if rule_name in ("split", "pretrain", "ntl", "protect", "sweep", "stability"):
        return "dvc.yaml", f"{rule_name}-{name}"
    if rule_name in ("attack", "search"):
        start = wildcards["start"]
        return "dvc.yaml", f"{rule_name}_scratch-{name}" if start == "scratch" else f"{rule_name}-{name}@{start}"
    if rule_name == "redteam":
        return "dvc.yaml", f"{rule_name}-{name}@{wildcards['start']}"
    if rule_name.startswith("report_"):
        return "dvc.yaml", f"report-{rule_name[len('report_'):]}"
    if rule_name == "ablation_variant":
        return "workflow/ablation/dvc.yaml", f"ablation-{name}@{wildcards['variant']}"
    if rule_name == "ablation_table":
        return "workflow/ablation/dvc.yaml", f"ablation_table-{name}"
    return None


_CACHE = {}


def _yaml(path):
    """YAML as DVC reads it (ruamel, YAML 1.2), so values compare equal to those dvc.lock recorded."""
    if path not in _CACHE:
        from ruamel.yaml import YAML

        file = _Path(path)
        _CACHE[path] = YAML(typ="safe").load(file.read_text()) if file.exists() else None
    return _CACHE[path]


def _lookup(doc, key):
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


_MISSING = object()


@_functools.lru_cache(maxsize=None)
def _md5(path):
    """DVC's hash of a file (md5 of its bytes) or folder (md5 of its sorted listing, '.dir')."""
    path = _Path(path)
    if path.is_file():
        return _hashlib.md5(path.read_bytes()).hexdigest()
    if not path.is_dir():
        return None
    listing = sorted(
        ({"md5": _hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()}
         for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts),
        key=lambda entry: entry["relpath"])
    return _hashlib.md5(_json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def _in_sync(dvcfile, stage):
    """True when dvc.lock holds the stage with today's params values and code."""
    entry = ((_yaml(DVC_FILES[dvcfile]) or {}).get("stages") or {}).get(stage)
    if entry is None:
        return False
    for file, keys in entry.get("params", {}).items():
        if any(_lookup(_yaml(file), key) != value for key, value in keys.items()):
            return False
    return all(_md5(dep["path"]) == dep.get("md5") for dep in entry.get("deps", [])
               if dep["path"].startswith(CODE_DIRS))


def dvc_state(rule_name, values=lambda wildcards: None):
    """An input function: the job's stage stamp holding `values` (the config values the job reads), dated as the
    comment at the top says. Only the main process writes it."""

    def stamp(wildcards):
        found = dvc_stage(rule_name, dict(wildcards.items()))
        if found is None:
            return []
        dvcfile, stage = found
        path = STATE_DIR / stage
        if workflow.is_main_process and path not in _CACHE:
            _CACHE[path] = True
            _date_stamp(path, dvcfile, stage, _json.loads(_json.dumps(values(wildcards), default=str)))
            _listed(path)
        return str(path)

    return stamp


def _listed(path):
    """Tell Snakemake's file cache that the stamp exists: it lists a folder once, the first time it checks a file
    there, and takes a file missing from that listing as missing, so a stamp written after it (the second of several
    targets on a fresh clone) would stop the run with a MissingInputException."""
    listing = getattr(getattr(workflow, "iocache", None), "exists_local", None)
    if listing is not None:
        listing[str(path)] = True


def _write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_json.dumps(doc, sort_keys=True, indent=1))
    tmp.replace(path)


def _date_stamp(path, dvcfile, stage, values):
    # The content changes with the date: Snakemake takes a newer input whose checksum it recorded as unchanged.
    try:
        old = _json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if not SYNC_DVC:  # re-dated when the values change
        if old != {"values": values}:
            _write(path, {"values": values})
    elif _in_sync(dvcfile, stage):
        if old != {"values": values, "dvc.lock": "in sync"}:
            _write(path, {"values": values, "dvc.lock": "in sync"})
        if path.stat().st_mtime != 0:
            os.utime(path, (0, 0))
    elif not (old and old.get("values") == values and old.get("dvc.lock", "").startswith("out of date")):
        _write(path, {"values": values, "dvc.lock": f"out of date since {_time.time()}"})
    # else: out of date since an earlier invocation; outputs made since then stay valid


def _walk(path):
    """A path and, for a folder, everything under it, deepest first."""
    path = _Path(path)
    if path.is_dir():
        yield from sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    if path.exists() or path.is_symlink():
        yield path


def commit_to_dvc(jobs):
    """Record the stages of these (finished) jobs in dvc.lock, keeping the outputs' modification times."""
    if not SYNC_DVC:
        return
    targets, outputs = set(), []
    for job in jobs:
        found = dvc_stage(job.rule.name, job.wildcards_dict)
        if found:
            dvcfile, stage = found
            targets.add(stage if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage}")
            outputs.extend(str(f) for f in job.output)
    if not targets:
        return
    times = {p: os.stat(p, follow_symlinks=False) for out in outputs for p in _walk(out)}
    command = [sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *sorted(targets)]
    done = _subprocess.run(command, capture_output=True, text=True)
    for p, st in times.items():  # files before their folders (deepest first)
        if p.exists():
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    if done.returncode != 0:
        _logger.warning(f"dvc commit failed ({done.returncode}); dvc.lock does not hold this run: "
                       f"{done.stderr.strip()[-2000:]}\nrun: {' '.join(command[2:])}")
    else:
        _logger.info(f"dvc.lock: recorded {len(targets)} stages")
