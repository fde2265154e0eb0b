"""Load params.yaml and validate it against workflow/schemas/params.schema.yaml (filling defaults).

Every error is one line that names the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from sophon.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "params.schema.yaml"


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load_params(path: str | Path = "params.yaml", *, checked: str | Path | None = None) -> dict:
    """The validated config in `path`. With `checked` (a folder), the name checks, which import torch and every
    registry, are skipped when this exact file passed them under this exact core code before: a stamp per
    content hash is kept there (the Snakefile uses it, so a no-op rerun stays fast; every stage checks in full)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if checked is None:
        return validate_params(raw, source=str(path))
    import hashlib

    from sophon.io import code_digest

    key = hashlib.sha256(path.read_bytes() + SCHEMA_PATH.read_bytes() + code_digest().encode()).hexdigest()[:24]
    stamp = Path(checked) / key
    config = validate_params(raw, source=str(path), check_names=not stamp.exists())
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    return config


def validate_params(raw, source: str = "params.yaml", *, check_names: bool = True) -> dict:
    """Return a validated deep copy of `raw` with schema defaults filled in; `check_names` also checks the names
    only the registries know (domains, models, attack methods, strategies)."""
    import jsonschema

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    config = copy.deepcopy(raw)
    schema = load_schema()
    validator_cls = _with_defaults(jsonschema.Draft202012Validator)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: (len(e.absolute_path), e.message))
    if errors:
        raise ConfigError(_describe(errors[0], source))
    if check_names:
        _check_names(config, source)
    return config


def _describe(error, source: str) -> str:
    # For oneOf/anyOf failures, the most specific sub-error names the real problem.
    best = error
    if error.context:
        import jsonschema

        best = jsonschema.exceptions.best_match([error]) or error
    key = ".".join(str(part) for part in best.absolute_path) or "<top level>"
    if best.validator == "additionalProperties":
        allowed = ", ".join(sorted(best.schema.get("properties", {}))) or "none"
        return f"{source}: {best.message} under key '{key}'; allowed keys: {allowed}"
    if best.validator == "required":
        return f"{source}: key '{key}': {best.message}"
    value = yaml.safe_dump(best.instance, default_flow_style=True).strip().removesuffix("...").strip()
    return f"{source}: key '{key}' = {value}: {best.message}"


def _with_defaults(validator_class):
    """Extend a jsonschema validator so that `default` values fill missing properties while validating."""
    import jsonschema

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _check_names(config: dict, source: str) -> None:
    """Names the schema cannot know, per experiment: registered domains, models, attack methods, strategies."""
    from sophon.attacks import ATTACKS
    from sophon.data import domain_names

    for experiment, exp in config["experiments"].items():
        at = f"experiments.{experiment}"
        if exp["restricted"].get("checkpoint") is not None:
            raise ConfigError(f"{source}: key '{at}.restricted.checkpoint': only the original model can be imported "
                              f"(set {at}.original.checkpoint)")
        if exp["original"].get("adversary_samples") is not None:
            raise ConfigError(f"{source}: key '{at}.original.adversary_samples': the adversary's data is restricted-"
                              f"domain data (set {at}.restricted.adversary_samples)")
        for section in ("original", "restricted"):
            name = exp[section]["domain"]
            if name not in domain_names():
                raise ConfigError(f"{source}: key '{at}.{section}.domain' = {name}: unknown domain; "
                                  f"known: {', '.join(domain_names())}")
        if exp["task"] == "classification":
            arch = exp["model"]["arch"]
            from sophon.models import MODEL_BUILDERS

            if arch not in MODEL_BUILDERS:
                import timm

                if not timm.is_model(arch):
                    raise ConfigError(f"{source}: key '{at}.model.arch' = {arch}: unknown model; use a timm model "
                                      f"name (timm.list_models()) or one of: {', '.join(sorted(MODEL_BUILDERS))}")
        for name, attack in exp["attacks"].items():
            if attack.get("method", "finetune") not in ATTACKS:
                raise ConfigError(f"{source}: key '{at}.attacks.{name}.method' = {attack['method']}: unknown attack "
                                  f"method; known: {', '.join(sorted(ATTACKS))}")
        check_search(exp["search"], exp["task"], f"{at}.search", source)
        from sophon.tasks import get_task

        check_redteam(exp["redteam"], exp["task"], get_task(exp["task"]).models(), f"{at}.redteam", source)
        _check_simulated_starts(exp["sophon"], exp["task"], f"{at}.sophon", source)
        for variant, changes in exp["ablation"]["variants"].items():
            unknown_keys = sorted(set(changes) - set(exp["sophon"]))
            if unknown_keys:
                raise ConfigError(f"{source}: key '{at}.ablation.variants.{variant}' changes {', '.join(unknown_keys)}, "
                                  f"which the sophon section does not have; its keys: {', '.join(sorted(exp['sophon']))}")


def _check_simulated_starts(sophon: dict, task: str, key: str, source: str) -> None:
    """The simulation's starts and the probe attack are strategies of the task."""
    from sophon.simulate import FOCUS, START_ALIASES
    from sophon.strategies import check_strategy

    focus = {**FOCUS, **(sophon["task_space"].get("focus") or {})}
    if focus["top"] > focus["window"]:
        raise ConfigError(f"{source}: key '{key}.task_space.focus.top' = {focus['top']}: more than the "
                          f"{focus['window']} adversaries the window ({key}.task_space.focus.window) remembers")
    named = [(f"{key}.task_space.starts", s) for s in sophon["task_space"]["starts"]]
    probes = sophon["probe"] if isinstance(sophon["probe"], list) else [sophon["probe"]]
    named += [(f"{key}.probe.strategy", probe["strategy"]) for probe in probes]
    for where, strategy in named:
        strategy = START_ALIASES.get(strategy, strategy)
        depth = sophon.get("depth") or {}
        if (strategy == "lora" and where.endswith("starts") and depth.get("weight", 0) > 0
                and depth.get("at", "released") != "released"):
            raise ConfigError(f"{source}: key '{where}' = lora: a lora adversary takes no depth term at adapted "
                              f"weights ({key}.depth.at: {depth.get('at')}); use depth.at: released")
        try:
            check_strategy(strategy, task)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key '{where}' = {strategy}: {exc}") from None


def experiment(config: dict, name: str | None, source: str = "params.yaml") -> dict:
    """One experiment of a validated config, with its name under `name`; None picks the only one."""
    names = list(config["experiments"])
    if name is None:
        if len(names) != 1:
            raise ConfigError(f"{source} holds the experiments {', '.join(names)}: name one with --experiment")
        name = names[0]
    if name not in config["experiments"]:
        raise ConfigError(f"--experiment {name!r} is not in {source}; its experiments: {', '.join(names)}")
    return {**config["experiments"][name], "name": name}


def check_search(search: dict, task: str, key: str, source: str) -> None:
    """What the schema cannot check in a search section: strategy names of the task, an lr range for every
    optimiser, low ≤ high, starts the task has, and sophon among them (the verdict compares it with scratch)."""
    from sophon.strategies import check_strategy
    from sophon.tasks import get_task

    models = get_task(task).models()
    for start in search["starts"]:
        if start not in models:
            raise ConfigError(f"{source}: key '{key}.starts' = {start}: not a start of the {task} task; "
                              f"allowed: {', '.join(models)}")
    if "sophon" not in search["starts"]:
        raise ConfigError(f"{source}: key '{key}.starts' must include sophon (the envelope verdict compares it with scratch)")
    space = search["space"]
    for strategy in space["strategies"]:
        try:
            check_strategy(strategy, task)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key '{key}.space.strategies' = {strategy}: {exc}") from None
    for optimizer in space["optimizers"]:
        if optimizer not in space["lrs"]:
            raise ConfigError(f"{source}: key '{key}.space.lrs' has no range for optimizer {optimizer}; "
                         f"add {key}.space.lrs.{optimizer}: {{low: ..., high: ..., count: 3}}")
    for optimizer, spec in space["lrs"].items():
        if spec["low"] > spec["high"]:
            raise ConfigError(f"{source}: key '{key}.space.lrs.{optimizer}': low {spec['low']} is above high {spec['high']}")
    if search["confirm_top"] > max(1, search["trials"]) and search["trials"] > 0:
        raise ConfigError(f"{source}: key '{key}.confirm_top' = {search['confirm_top']}: more than the {search['trials']} trials")
    late = [e for e in search["candidate_epochs"] if e > search["coarse_epochs"]]
    if late:
        raise ConfigError(f"{source}: key '{key}.candidate_epochs' = {late[0]}: beyond coarse_epochs "
                          f"({search['coarse_epochs']})")
    shared = sorted(set(search.get("retest_seeds", [])) & set(search["seeds"]))
    if shared:
        raise ConfigError(f"{source}: key '{key}.retest_seeds' = {shared[0]}: also in {key}.seeds, which pick the "
                          f"configurations; a retest seed must take no part in the pick")


def check_redteam(redteam: dict, task: str, starts: list[str], key: str, source: str) -> None:
    """What the schema cannot check in a red-team suite: strategy names of the task, starts the task has."""
    from sophon.strategies import check_strategy

    for start in redteam["starts"]:
        if start not in starts:
            raise ConfigError(f"{source}: key '{key}.starts' = {start}: not a start of the {task} task; "
                              f"allowed: {', '.join(starts)}")
    for name, attack in redteam["attacks"].items():
        try:
            check_strategy(attack["strategy"], task)
        except ConfigError as exc:
            raise ConfigError(f"{source}: key '{key}.attacks.{name}.strategy' = {attack['strategy']}: {exc}") from None
        if task == "diffusion" and (attack["label_smoothing"] or attack["shift"]):
            raise ConfigError(f"{source}: key '{key}.attacks.{name}': label_smoothing and shift are for classifiers "
                              f"(the diffusion objective has its own augment section)")
