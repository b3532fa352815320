"""The `flywheel` command line. Every command takes `--config FILE`; scriptable ones take `--json`."""

from __future__ import annotations

import contextlib
import getpass
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from feedback.cli import app as feedback_app
from feedback.cli import curator as curator_command
from feedback.cli import lineage_command, users_app
from flywheel.cli_common import ConfigOption, JsonOption, emit, fail, json_only_on_stdout, progress, settings_or_exit
from flywheel.config import SHARED_SETTINGS_ENV
from flywheel.keys_cli import app as keys_app
from flywheel.logs import configure_logging, stdout_to_stderr
from flywheel.registry import RegistryError

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from pydantic import BaseModel

    from flywheel.bases import ServedBase
    from flywheel.canary import Ratings
    from flywheel.config import Settings
    from flywheel.registry import Registry

app = typer.Typer(
    help="flywheel: serve LoRA-tuned DeepSeek-R1-distilled models and keep improving them from feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
adapters_app = typer.Typer(help="Adapter versions in the registry: list them, import one trained elsewhere.",
                           no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
tasks_app = typer.Typer(help="The tasks this platform serves: list them, declare a new one.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
TaskOption = Annotated[str | None, typer.Option("--task", "-t", help="Task name (default: model.task, else the "
                                                "first configured task).")]
ExpectedChampionOption = Annotated[str | None, typer.Option(
    "--expect", help="Move only if this version is still the champion (compare-and-swap); refused if it changed.")]
bases_app = typer.Typer(help="Inspect quantized base versions in the registry.", no_args_is_help=True)
app.add_typer(bases_app, name="bases")
app.add_typer(feedback_app, name="feedback")
app.add_typer(keys_app, name="keys")
app.add_typer(users_app, name="users")
app.command("curator")(curator_command)
app.command("lineage")(lineage_command)
canary_app = typer.Typer(help="A task's canary: a gate-passed candidate on trial with a share of users.",
                         no_args_is_help=True)
app.add_typer(canary_app, name="canary")
bench_app = typer.Typer(help="Benchmarks: ratios measured in one run (see loadtests/).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

@app.command()
def bootstrap(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Build the local demo model (no hub) and register a first champion adapter. Idempotent."""
    from training.demo_bootstrap import bootstrap as run_bootstrap

    result = run_bootstrap(settings_or_exit(config), progress=progress)
    emit(as_json, result.model_dump(),
          f"ready: base {result.base_model}, champion {result.champion}"
          + ("" if result.base_built or result.adapter_registered else " (already bootstrapped)"))


@app.command()
def up(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default from config: 8000).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    engine: Annotated[str | None, typer.Option(help="`vllm` or `hf` (default from config).")] = None,
    kafka: Annotated[str | None, typer.Option(
        help="Kafka bootstrap HOST:PORT for the feedback stream (default: the embedded local log).")] = None,
    kafka_api_version: Annotated[str | None, typer.Option(
        help="Broker protocol version, e.g. 0.9 for deploy/local/kafka.sh's broker (default: detect).")] = None,
) -> None:
    """Start local Ray and the Serve app: the gateway, the LLM replicas and the loop's keeper (the curator, the
    retrain scheduler and the canary controller). Ctrl-C stops everything."""
    import psutil

    from services import app as serve_app
    from training.demo_bootstrap import bootstrap as run_bootstrap

    configure_logging()
    settings = settings_or_exit(config)
    overrides = {k: v for k, v in {"port": port, "host": host, "engine": engine}.items() if v is not None}
    try:
        settings.serving = type(settings.serving).model_validate({**settings.serving.model_dump(), **overrides})
    except ValueError as exc:
        fail(f"invalid option: {exc}")
    if kafka:
        settings.feedback.kafka_bootstrap = kafka
        settings.feedback.kafka_api_version = kafka_api_version or settings.feedback.kafka_api_version
    result = run_bootstrap(settings, progress=progress)
    base = _servable_base_or_exit(settings)
    _say_which_tasks_need_an_adapter(settings)
    feedback_target = f"kafka {kafka}" if settings.feedback.kafka_bootstrap else f"local log {settings.feedback_dir}"
    serving = settings.serving
    typer.echo(f"starting Ray and Serve (engine={serving.engine}, ingress={serving.ingress}, "
               f"topology={'fused' if serving.fused else 'split'}, base={base.label}, "
               f"champion={result.champion}, feedback={feedback_target}) …", err=True)
    typer.echo("auth: keys (every route but /healthz and /metrics needs Authorization: Bearer <key>; "
               "`flywheel keys create NAME`)" if settings.auth_mode == "keys" else
               f"auth: open (no key needed: only {serving.host} can connect; ratings without a key count as "
               "anonymous and train nothing until reviewed)", err=True)

    # What this Ray runs for others (`flywheel retrain --address` jobs) uses this python and these settings.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ[SHARED_SETTINGS_ENV] = json.dumps(settings.shareable())
    stop_signals = StopSignals()
    try:
        serve_app.ensure_ray(settings)
        signal.signal(signal.SIGTERM, stop_signals.on_signal)  # after ray.init, which installs a handler of its own
        # Ctrl-C too, and even where a shell started us in the background with SIGINT ignored
        signal.signal(signal.SIGINT, stop_signals.on_signal)
        url = serve_app.run(settings)
        typer.echo(f"flywheel is serving at {url}  (POST {url}/predict, POST {url}/feedback, GET {url}/healthz; "
                   "Ctrl-C stops)")
        while True:
            time.sleep(1.0)  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass
    except TimeoutError as exc:
        fail(str(exc))
    finally:
        stop_signals.stopping = True
        typer.echo("stopping Serve (the loop's keeper stops the curator first) and Ray …", err=True)
        started_here = psutil.Process().children(recursive=True)  # Ray's processes, vLLM's, the agents
        serve_app.shutdown()
        _end(started_here)
        typer.echo("stopped", err=True)


class StopSignals:
    """SIGTERM and SIGINT for `flywheel up`: the first stops serving, even while Serve is still starting.

    A second one while the cleanup runs is ignored: raised there, it cut the cleanup short and left Ray's
    and vLLM's processes behind (a supervisor repeats SIGTERM before its kill timeout). The third forces
    an exit, for an operator who really means it.
    """

    FORCE_AT = 3

    def __init__(self) -> None:
        self.received = 0
        self.stopping = False

    def on_signal(self, signum: int, _frame: object) -> None:
        # Ray's native failure-signal handler saw SIGTERM first and armed a 3 s SIGALRM that aborts the
        # process (ray-project/ray#64830): cancel it, a clean shutdown takes longer than that.
        signal.alarm(0)
        self.received += 1
        if self.received >= self.FORCE_AT:
            typer.echo("stop signal received again: exiting now, the cleanup cut short", err=True)
            os._exit(128 + signum)
        if self.stopping:
            typer.echo("already stopping; a third stop signal forces an exit", err=True)
            return
        self.stopping = True
        raise KeyboardInterrupt


def _end(processes: list[Any], grace_s: float = 15.0) -> None:
    """Terminate what outlived Ray's own shutdown (its agents can), then kill what ignores that."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=grace_s)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _servable_base_or_exit(settings: Settings) -> ServedBase:
    """Check before Ray starts that the configured engine can serve the configured base."""
    from flywheel.bases import served_base
    from flywheel.registry import registry_for
    from services.engines import check_engine_runs_base
    from services.engines.protocol import UnsupportedBaseError

    try:
        base = served_base(settings, registry_for(settings))
        check_engine_runs_base(settings, base)
    except (RegistryError, UnsupportedBaseError) as exc:
        fail(f"cannot serve: {exc}", code=2)
    return base


def _say_which_tasks_need_an_adapter(settings: Settings) -> None:
    """A task with no champion answers with the bare base: say exactly how to give it an adapter."""
    from flywheel.bases import budget_problem
    from flywheel.registry import known_tasks, registry_for

    for name, spec in known_tasks(settings).items():
        if problem := budget_problem(settings, spec):
            typer.secho(f"warning: {problem}", err=True, fg=typer.colors.YELLOW)
        if registry_for(settings, name).alias("champion") is None:
            typer.secho(f"warning: task {name!r} has no adapter yet and answers with the bare base; train one "
                        f"from your data with `flywheel train --task {name} --data FILE.jsonl`, or register one "
                        f"trained elsewhere with `flywheel adapters import --task {name} DIR`", err=True,
                        fg=typer.colors.YELLOW)


@adapters_app.command("list")
def adapters_list(config: ConfigOption = None, task: TaskOption = None, as_json: JsonOption = False) -> None:
    """List a task's registered adapter versions, oldest first, marking aliases."""
    registry = _registry_or_exit(settings_or_exit(config), task)
    aliases = registry.aliases()
    rows = []
    for manifest in registry.versions():
        names = [a for a, record in aliases.items() if record.version == manifest.version]
        rows.append({"version": manifest.version, "status": manifest.status, "parent": manifest.parent,
                     "created_at": manifest.created_at.isoformat(), "aliases": names})
    lines = [f"{r['version']:<16} {r['status']:<9} {r['created_at'][:19]}  parent={r['parent'] or '-':<14}"
             f" {' '.join(r['aliases'])}" for r in rows]
    emit(as_json, rows, "\n".join(lines) or "no adapter versions yet (run `flywheel bootstrap`)")


def _registry_or_exit(settings: Settings, task: str | None) -> Any:
    from flywheel.registry import registry_for

    try:
        return registry_for(settings, task)
    except RegistryError as exc:
        fail(str(exc), code=2)


def _task_of(version: str) -> str:
    """`faq-v3` -> `faq`: a version names its task."""
    return version.rsplit("-v", 1)[0] if "-v" in version else version


@adapters_app.command("import")
def adapters_import(
    path: Annotated[Path, typer.Argument(help="A PEFT adapter directory (adapter_config.json + weights).")],
    task: Annotated[str, typer.Option("--task", "-t", help="The task it answers (declared in config or by "
                                      "`flywheel tasks add`).")],
    config: ConfigOption = None,
    promote_it: Annotated[bool, typer.Option("--promote", help="Make it champion even if the task has one.")
                          ] = False,
    as_json: JsonOption = False,
) -> None:
    """Register an adapter trained elsewhere, after checking it fits the configured base.

    It becomes champion when the task has none (or with --promote); otherwise it is registered ready.
    """
    from flywheel.bases import base_ref
    from flywheel.registry import UnknownTaskError, resolve_task
    from training.adapter_import import AdapterImportError, check_adapter_fits

    settings = settings_or_exit(config)
    try:
        spec = resolve_task(settings, task)
    except UnknownTaskError as exc:
        fail(f"{exc}; declare it in config (`tasks:`) or with `flywheel tasks add`", code=2)
    registry = _registry_or_exit(settings, spec.name)
    champion = registry.alias("champion")  # the one this import replaces, if any: the move names it
    try:
        summary = check_adapter_fits(path, settings.base_model_path)
        manifest = registry.register(path, base=base_ref(settings), parent=champion,
                                     lora=summary, training={"source": "import", "path": path.name})
    except (AdapterImportError, RegistryError) as exc:
        fail(f"{path} not imported: {exc}", code=2)
    registry.save_task_spec(spec) if registry.task_spec() is None else None
    promoted = champion is None or promote_it
    if promoted:
        try:
            registry.promote(manifest.version, actor=getpass.getuser(), reason=f"imported from {path.name}",
                             expected_champion=champion)
        except RegistryError as exc:  # a champion was made meanwhile: leave it, say so
            fail(f"{path} imported as {manifest.version} (ready) but not made champion: {exc}", code=1)
    emit(as_json, {"version": manifest.version, "champion": promoted, "lora": summary},
         f"imported {path} as {manifest.version}" + (" (champion)" if promoted else " (ready)"))


@tasks_app.command("list")
def tasks_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every task: declared in config or stored in the registry, with its kind, metric and champion."""
    from flywheel.registry import known_tasks, registry_for

    settings = settings_or_exit(config)
    rows = [{**spec.model_dump(), "champion": registry_for(settings, name).alias("champion"),
             "default": name == settings.default_task} for name, spec in sorted(known_tasks(settings).items())]
    lines = [f"{r['name']:<24} {r['kind']:<15} metric={r['metric'] or '-':<11} champion={r['champion'] or '-'}"
             f"{'  (default)' if r['default'] else ''}" for r in rows]
    emit(as_json, rows, "\n".join(lines) or "no tasks")


@tasks_app.command("add")
def tasks_add(
    name: Annotated[str, typer.Argument(help="Task name: lowercase letters, digits and dashes (max 64).")],
    kind: Annotated[str, typer.Option(help="`classification` or `generation`.")] = "generation",
    labels: Annotated[str | None, typer.Option(help="Classification: the allowed answers, comma-separated.")
                      ] = None,
    metric: Annotated[str | None, typer.Option(help="Gate metric (default: accuracy or token_f1 by kind).")
                      ] = None,
    instruction: Annotated[str | None, typer.Option(help="System prompt added to every conversation.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer budget, thinking included (default: 512, "
                                                       "or a quarter of a smaller base's context).")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Training sequence length (default: 1024, or the base's "
                                                    "context when smaller).")] = None,
    rollout: Annotated[str, typer.Option(help="`direct`: a gate-passed retrain becomes champion; `canary`: it "
                                         "earns users' traffic on their ratings first.")] = "direct",
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Declare a task in the registry (every serving replica picks it up); config `tasks:` does the same.

    Budgets that can never fit the base's context are refused; budgets left out fit it.
    """
    from pydantic import ValidationError

    from flywheel.bases import budget_problem, context_length, fitting_budgets
    from flywheel.registry import registry_for
    from flywheel.tasks import TaskSpec

    settings = settings_or_exit(config)
    try:
        context: int | None = context_length(settings)
    except (OSError, ValueError) as exc:  # a hub id this machine cannot read: the budgets go unchecked
        context = None
        typer.secho(f"warning: cannot read the context of base {settings.model.base!r} ({exc}); the task's budgets "
                    "are not checked against it", err=True, fg=typer.colors.YELLOW)
    fitted = fitting_budgets(context)
    budgets = {"max_new_tokens": fitted[0] if max_new_tokens is None else max_new_tokens,
               "max_seq_len": fitted[1] if max_seq_len is None else max_seq_len}
    try:
        spec = TaskSpec(name=name, kind=kind, labels=[x.strip() for x in (labels or "").split(",") if x.strip()],
                        metric=metric, instruction=instruction, rollout=rollout, **budgets)  # type: ignore[arg-type]
    except ValidationError as exc:
        fail("invalid task: " + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'task'}: {e['msg']}"
                                          for e in exc.errors()), code=2)
    if context is not None and (problem := budget_problem(settings, spec)):
        fail(f"{problem}; leave the budget out to get one that fits", code=2)
    registry_for(settings, spec.name).save_task_spec(spec)
    within = f" (within the base's {context}-token context)" if context is not None else ""
    emit(as_json, spec.model_dump(), f"task {spec.name} declared ({spec.kind}, metric {spec.gate_metric}); "
                                     f"budgets: max_new_tokens {spec.max_new_tokens}, max_seq_len "
                                     f"{spec.max_seq_len}{within}")


def _canary_task(settings: Settings, task: str | None) -> tuple[Registry, Callable[[datetime], Ratings]]:
    """The task's registry and the ratings its canary is judged on (the replicas' guardrail figures live in the
    running app: GET /admin/canary shows them)."""
    from feedback.dataset import canary_ratings
    from flywheel.registry import UnknownTaskError, registry_for, resolve_task

    try:
        name = resolve_task(settings, task).name
    except (UnknownTaskError, RegistryError) as exc:
        fail(str(exc), code=2)
    return registry_for(settings, name), partial(canary_ratings(settings), name)


@canary_app.command("status")
def canary_status(config: ConfigOption = None, task: TaskOption = None, as_json: JsonOption = False) -> None:
    """The task's canary: both arms' ratings, the test's estimate and interval, its share, what comes next."""
    from flywheel.canary import interval, review

    settings = settings_or_exit(config)
    registry, ratings = _canary_task(settings, task)
    decided = review(registry, settings.canary, ratings, {})
    if decided is None:
        emit(as_json, {"task": registry.task, "canary": None}, f"task {registry.task} runs no canary")
        return
    arms = "\n".join(f"  {arm:<9} {a.version:<20} ratings={a.ratings:<5} mean={_fmt(a.mean_rating)} "
                     f"thumbs-up={_fmt(a.thumbs_up_rate)}" for arm, a in decided.arms.items())
    test = decided.test
    next_step = f"{decided.next_share:.0%}" if decided.next_share else "none (last step)"
    emit(as_json, decided.model_dump(mode="json"),
         f"task {decided.task}: canary {decided.canary} serves {decided.share:.0%} of users since "
         f"{decided.step_started_at:%Y-%m-%d %H:%M:%S} (trial began {decided.started_at:%H:%M:%S}; next share "
         f"{next_step}; deadline {decided.deadline:%Y-%m-%d %H:%M})\n{arms}\n"
         f"  difference {test.difference:+.2f} ({decided.confidence:.0%} interval {interval(test)}, "
         f"p={test.p_value:.3f})\n  now: {decided.verdict} — {decided.reason}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@canary_app.command("promote")
def canary_promote(config: ConfigOption = None, task: TaskOption = None, as_json: JsonOption = False) -> None:
    """Make the canary champion now, whatever the ratings say (the history records who did)."""
    _canary_by_hand(config, task, "promote", as_json)


@canary_app.command("abort")
def canary_abort(config: ConfigOption = None, task: TaskOption = None, as_json: JsonOption = False) -> None:
    """Roll the canary back now: its share goes to 0, the champion answers everyone."""
    _canary_by_hand(config, task, "rollback", as_json)


def _canary_by_hand(config: Path | None, task: str | None, verdict: Literal["promote", "rollback"],
                    as_json: bool) -> None:
    from flywheel.canary import NoCanaryError, decide_by_hand

    settings = settings_or_exit(config)
    registry, ratings = _canary_task(settings, task)
    try:
        decided = decide_by_hand(registry, settings.canary, ratings, verdict, actor="cli", via="cli")
    except NoCanaryError as exc:
        fail(str(exc), code=2)
    emit(as_json, {"task": registry.task, "canary": decided.canary, "verdict": verdict},
         f"task {registry.task}: canary {decided.canary} " + ("is champion" if verdict == "promote"
                                                              else "rolled back; the champion answers everyone"))


@app.command()
def train(
    task: Annotated[str, typer.Option("--task", "-t", help="The task to train (declared in config or by "
                                      "`flywheel tasks add`).")],
    data: Annotated[Path, typer.Option(help="Your data: JSONL, JSON, CSV or Parquet; alpaca, prompt/completion, "
                                       "OpenAI messages or sharegpt rows.", exists=True, dir_okay=False)],
    eval_file: Annotated[Path | None, typer.Option(help="A held-out file to score and keep as the golden set "
                                                   "(default: a test split of --data).", exists=True,
                                                   dir_okay=False)] = None,
    val_size: Annotated[float | None, typer.Option(help="Validation share (<1) or rows (>=1); default 0.15.")
                        ] = None,
    test_size: Annotated[float | None, typer.Option(help="Test share (<1) or rows (>=1); default 0.15.")] = None,
    columns: Annotated[str | None, typer.Option(help="Map your field names: `text=input,label=output`.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad row instead of skipping it.")
                      ] = False,
    balance: Annotated[bool, typer.Option("--balance", help="Oversample minority labels in the training split.")
                       ] = False,
    force: Annotated[bool, typer.Option("--force", help="Make a task's first adapter champion even if it does not "
                                        "beat the bare base on the test split (the report says it was forced).")
                     ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a task's adapter from your own data on Ray Train, score it, and register it.

    Bad rows are counted by type with their line numbers and skipped (--strict stops instead); rows are
    normalised, deduplicated (exactly and near-exactly) and PII-masked before anything is written; the
    split is seeded, grouped by prompt (one prompt is never in two splits) and stratified by label for
    classification; --eval-file rows whose prompt train or validation holds are dropped. The task, its
    budgets and the files are checked before any work. The new version becomes champion when the task has
    none and it beats the bare base on the test split by the task's gate test (or with --force); otherwise
    it is registered as ready and the report says why it is not serving. Exit codes: 0 registered,
    2 unusable input (nothing registered), 1 training failed.
    """
    from flywheel.bases import budget_problem
    from flywheel.registry import UnknownTaskError, resolve_task
    from training.demo_bootstrap import ensure_demo_base
    from training.train_task import TaskTrainer, TrainError, TrainRequest
    from training.user_data import DataError, check_columns, check_readable

    configure_logging()
    settings = settings_or_exit(config)
    mapping: dict[str, str] = {}
    for pair in (columns or "").split(","):
        if pair.strip():
            source, _, target = pair.partition("=")
            if not source.strip() or not target.strip():
                fail(f"--columns takes `yours=ours` pairs, not {pair!r}", code=2)
            mapping[source.strip()] = target.strip()
    try:
        spec = resolve_task(settings, task)
    except (UnknownTaskError, RegistryError) as exc:
        fail(f"{exc}; {_declare_task_hint(task, data, mapping)}", code=2)
    # Everything that can be checked is, before any work (building the demo base takes minutes)
    try:
        problem = budget_problem(settings, spec)
    except OSError as exc:
        fail(f"cannot read base model {settings.model.base!r} to check task {spec.name}'s budgets: {exc}", code=2)
    if problem:
        fail(problem, code=2)
    try:
        check_columns(mapping)
        for path in (data, eval_file or (Path(spec.golden_path) if spec.golden_path else None)):
            if path is not None:
                check_readable(path)
    except DataError as exc:
        fail(str(exc), code=2)
    ensure_demo_base(settings, progress=progress)  # the base alone: training a task never trains the demo's
    request = TrainRequest(task=spec.name, data=data, eval_file=eval_file, val_size=val_size, test_size=test_size,
                           strict=strict, balance=balance, columns=mapping, force=force)
    trainer = TaskTrainer(settings, spec, request, say=progress)
    ray_was_up = _ray_is_up()
    try:
        splits, data_report = trainer.prepare()
    except (DataError, TrainError) as exc:
        fail(str(exc), code=2)
    for line in data_report.lines():
        progress(line)
    try:
        with stdout_to_stderr():  # Ray forwards its workers' output to stdout: keep stdout for --json
            report = trainer.run(splits, data_report)
    except TrainError as exc:
        fail(str(exc), code=2)
    except Exception as exc:  # Ray Train or the engine: nothing was registered
        logging.getLogger("flywheel.train").exception("event=train_failed task=%s", spec.name)
        fail(f"training {spec.name} failed, nothing was registered: {type(exc).__name__}: {exc}")
    finally:
        if not ray_was_up:  # a Ray this command started for training; never one it was handed
            _shutdown_ray()
    emit(as_json, report.model_dump(mode="json"), "\n".join(report.lines()))


def _declare_task_hint(task: str, data: Path, columns: dict[str, str]) -> str:
    """How to declare an unknown task: the `flywheel tasks add` line, its kind and labels read from the data."""
    import shlex

    from flywheel.tasks import TASK_NAME_PATTERN
    from training.user_data import DataError, infer_task

    bare = f"declare it in config (`tasks:`) or with `flywheel tasks add {task} --kind ...`"
    if not re.fullmatch(TASK_NAME_PATTERN, task):
        return f"{bare} (a task name is lowercase letters, digits and dashes, at most 64)"
    try:
        kind, labels = infer_task(data, columns=columns or None)
    except DataError:
        return bare
    line = f"flywheel tasks add {task} --kind {kind}"
    if labels:
        line += f" --labels {shlex.quote(','.join(labels))}"
    return f"declare it first; your data looks like a {kind} task:\n  {line}\n(or declare it in config `tasks:`)"


def _ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Adapter version to make champion of its task, e.g. faq-v2.")],
    config: ConfigOption = None,
    reason: Annotated[str, typer.Option(help="Why; recorded in the alias history.")] = "manual promotion",
    expected_champion: ExpectedChampionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point VERSION's task's champion alias at it (weights and base are verified first). Serving hot-swaps."""
    registry = _registry_or_exit(settings_or_exit(config), _task_of(version))
    try:
        entry = registry.promote(version, actor=getpass.getuser(), reason=reason,
                                 expected_champion=expected_champion or ...)
    except RegistryError as exc:
        fail(f"{version} not promoted: {exc}")
    emit(as_json, entry.model_dump(mode="json"),
          f"champion: {entry.previous or '-'} -> {entry.version}")


@app.command()
def rollback(
    config: ConfigOption = None,
    task: TaskOption = None,
    reason: Annotated[str, typer.Option(help="Why; recorded in the alias history.")] = "manual rollback",
    expected_champion: ExpectedChampionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move a task's champion alias back to the version it pointed at before the last promotion."""
    registry = _registry_or_exit(settings_or_exit(config), task)
    try:
        entry = registry.rollback(actor=getpass.getuser(), reason=reason,
                                  expected_champion=expected_champion or ...)
    except RegistryError as exc:
        fail(f"rollback refused: {exc}")
    emit(as_json, entry.model_dump(mode="json"), f"champion rolled back: {entry.previous} -> {entry.version}")


@app.command()
def quantize(
    config: ConfigOption = None,
    bits: Annotated[int | None, typer.Option(help="Bits per weight: 2, 3, 4 or 8 (default from config: 4).")] = None,
    group_size: Annotated[int | None, typer.Option(
        help="Columns per quantization group, -1 for one per row (default from config: 128).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="JSONL of {prompt, reasoning, answer} to calibrate on (default: the champion's training data).",
        exists=True, dir_okay=False)] = None,
    min_top1_agreement: Annotated[float | None, typer.Option(
        help="Quality bar: refuse a base whose next token agrees with the source's less often (default 0.9).")
    ] = None,
    min_logit_cosine: Annotated[float | None, typer.Option(
        help="Quality bar: refuse a base whose mean logit cosine with the source is lower (default 0.95).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """GPTQ-quantize the base model into the registry as a base version, checked against the original.

    Calibration uses the task's own training data; the quality check compares next-token predictions
    with the unquantized base on the held-out golden set. Exit codes: 0 ready, 1 refused by the quality bar.
    """
    from training.quantize import QuantizeError, quantize_base

    configure_logging()
    overrides = {"bits": bits, "group_size": group_size, "min_top1_agreement": min_top1_agreement,
                 "min_logit_cosine": min_logit_cosine}
    settings = settings_or_exit(config)
    try:
        settings.quantize = settings.quantize.model_validate(
            {**settings.quantize.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as exc:
        fail(f"invalid option: {exc}", code=2)
    try:
        outcome, _manifest = quantize_base(settings, calibration_path=calibration, say=progress)
    except QuantizeError as exc:
        fail(str(exc), code=2)
    except Exception as exc:  # GPTQModel's own errors: say so plainly; nothing was registered
        logging.getLogger("flywheel.quantize").exception("event=quantize_failed")
        fail(f"quantization failed, nothing was registered: {type(exc).__name__}: {exc}")
    emit(as_json, outcome.model_dump(), "\n".join([
        f"{outcome.name}: {outcome.status}",
        f"  GPTQ {outcome.bits}-bit group {outcome.group_size}, {outcome.size_bytes / 1e6:.2f} MB "
        f"(source {outcome.source_size_bytes / 1e6:.2f} MB), {outcome.seconds:.0f} s",
        f"  top-1 agreement {outcome.top1_agreement:.4f} (bar {outcome.min_top1_agreement}), "
        f"logit cosine {outcome.logit_cosine:.4f} (bar {outcome.min_logit_cosine})",
        f"  {outcome.message}",
    ]))
    raise typer.Exit(0 if outcome.status == "ready" else 1)


@bases_app.command("list")
def bases_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List quantized base versions (from `flywheel quantize`) with their quality figures."""
    from flywheel.registry import registry_for

    settings = settings_or_exit(config)
    rows = [m.model_dump(mode="json", exclude={"files"}) for m in registry_for(settings).bases()]
    lines = [f"{r['name']:<28} {r['status']:<9} {r['created_at'][:19]}  top-1 "
             f"{r['quality'].get('top1_agreement', 0):.3f}  cosine {r['quality'].get('logit_cosine', 0):.4f}"
             f"{'  (serving)' if r['name'] == settings.model.quantized_base else ''}"
             f"{'  ' + r['reason'] if r['reason'] else ''}" for r in rows]
    emit(as_json, rows, "\n".join(lines) or "no quantized bases yet (run `flywheel quantize`)")


RETRAIN_EXIT = {"passed": 0, "rejected": 0, "superseded": 0, "insufficient_data": 2, "failed": 1}


@app.command()
def retrain(
    config: ConfigOption = None,
    task: TaskOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Run in the foreground and print the verdict.")] = False,
    as_json: JsonOption = False,
    address: Annotated[str | None, typer.Option(
        help="A Ray cluster's dashboard, e.g. http://HOST:8265: run there as a Ray job (`ray job submit`), with "
        "the cluster's own config, or --config's if given (secrets stay the cluster's). https, or plain http "
        "to this machine only.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Allow --address over plain http to another machine (the Ray token travels in clear)."
    )] = False,
    run_id: Annotated[str | None, typer.Option(hidden=True)] = None,
    trigger: Annotated[str, typer.Option(hidden=True)] = "cli",
    lock: Annotated[int | None, typer.Option(hidden=True)] = None,  # the retrain lock's epoch its launcher claimed
    fence: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Retrain a task's champion adapter on that task's curated feedback; the gate decides whether it ships.

    Without --wait the run starts in the background and its id is printed (see `flywheel status`).
    Exit codes with --wait: 0 passed, rejected or superseded (the champion changed meanwhile), 2 too little
    data, 1 failed, 3 another run is busy; with --address also 2 when the cluster cannot be reached.
    """
    from flywheel.registry import UnknownTaskError, registry_for, resolve_task
    from flywheel.runs import RetrainBusyError, RunRecord, RunStore, new_run_id

    configure_logging()
    if address:
        from flywheel.runs import job_address

        try:
            address = job_address(address, insecure=insecure)
        except ValueError as exc:
            fail(str(exc), code=2)
        _retrain_as_ray_job(address, settings_or_exit(config) if config else None, task, wait, as_json)
        return
    settings = settings_or_exit(config)
    try:
        task = resolve_task(settings, task).name
    except (UnknownTaskError, RegistryError) as exc:
        fail(str(exc), code=2)
    if fence is not None and not 0 < fence <= registry_for(settings, task).loop_epoch():
        # an epoch never claimed would fence out the real leader's moves from then on
        fail(f"--fence {fence} is not an epoch the loop's lease has reached", code=2)
    store = RunStore.for_settings(settings)
    if not wait and lock is None:
        try:
            record = store.launch_retrain(settings, trigger, task)
        except RetrainBusyError as exc:
            fail(str(exc), code=3)
        emit(as_json, {"run_id": record.run_id, "state": record.state},
              f"retrain {record.run_id} started; follow it with `flywheel status`")
        return
    from training.pipeline import Retrain

    run_id = run_id or new_run_id()
    record = store.get(run_id) or RunRecord(run_id=run_id, trigger=trigger, task=task)
    record.task, record.host, record.pid = task, socket.gethostname(), os.getpid()
    record.fence = fence if fence is not None else record.fence
    try:
        with store.exclusive(run_id, claimed=lock) as record.lock, store.heartbeat(run_id), stdout_to_stderr():
            result = Retrain(settings, record, say=progress).run()  # stdout carries --json's answer alone
    except RetrainBusyError as exc:
        fail(str(exc), code=3)
    payload = {"run_id": result.run_id, "task": result.task, "verdict": result.verdict, "version": result.version,
               "report": result.report, "message": result.message, "dataset": result.dataset,
               "training": result.metrics}
    emit(as_json, payload, f"{result.run_id}: {result.verdict} {result.version or ''} — {result.message}")
    raise typer.Exit(RETRAIN_EXIT[result.verdict])


def _retrain_as_ray_job(address: str, settings: Settings | None, task: str | None, wait: bool, as_json: bool
                        ) -> None:
    from flywheel.runs import follow_retrain_job, submit_retrain_job

    try:
        job_id = submit_retrain_job(address, task, settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(f"cannot submit the retrain to the Ray cluster at {address}: {exc}", code=2)
    if not wait:
        emit(as_json, {"job_id": job_id}, f"retrain submitted as Ray job {job_id}; follow it with "
                                          f"`ray job logs --address {address} --follow {job_id}`")
        return
    progress(f"Ray job {job_id} submitted; its output follows")
    job = follow_retrain_job(address, job_id, say=lambda chunk: typer.echo(chunk, err=True))
    result = job.output[job.output.rindex("\n{\n") + 1:] if "\n{\n" in job.output else None
    if job.exit_code is None or result is None:  # it never ran (e.g. the cluster could not start it)
        fail(f"Ray job {job_id} ended {job.status}: {job.message}", code=1)
    payload = {"job_id": job_id, **json.loads(result)}
    emit(as_json, payload, f"{payload['run_id']}: {payload['verdict']} {payload.get('version') or ''} — "
                           f"{payload['message']}")
    raise typer.Exit(job.exit_code)


@app.command()
def status(
    config: ConfigOption = None,
    task: TaskOption = None,
    url: Annotated[str | None, typer.Option(help="Also ask a running server's /healthz.")] = None,
    as_json: JsonOption = False,
) -> None:
    """A task's champion, versions, recent alias moves and retrains, every task's champion, and (with --url)
    what serving runs."""
    import httpx

    from flywheel.registry import known_tasks, registry_for
    from flywheel.runs import RunStore

    settings = settings_or_exit(config)
    registry = _registry_or_exit(settings, task)
    payload: dict[str, Any] = {
        "task": registry.task,
        "champion": registry.alias("champion"),
        "tasks": {name: registry_for(settings, name).alias("champion") for name in known_tasks(settings)},
        "aliases": {k: v.model_dump(mode="json") for k, v in registry.aliases().items()},
        "versions": [m.version for m in registry.versions()],
        "history": [e.model_dump(mode="json") for e in registry.history()[-5:]],
        "registry": settings.registry_uri,
        "engine": settings.serving.engine,
        "base_model": settings.model.base,
        "quantized_base": settings.model.quantized_base,
        "runs": [r.model_dump(mode="json", exclude={"report"}) for r in RunStore.for_settings(settings).list(5)],
    }
    if url:
        try:
            payload["serving"] = httpx.get(f"{url.rstrip('/')}/healthz", timeout=10).json()
        except httpx.HTTPError as exc:
            payload["serving"] = {"error": repr(exc)}
    lines = [f"task: {payload['task']}  champion: {payload['champion'] or '-'}",
             f"versions: {', '.join(payload['versions']) or '-'}",
             "tasks: " + ", ".join(f"{t}={c or '-'}" for t, c in payload["tasks"].items()),
             f"engine: {payload['engine']}  base: {payload['base_model']}"
             + (f"  quantized base: {payload['quantized_base']}" if payload["quantized_base"] else ""),
             "recent alias moves:"]
    lines += [f"  {e['at'][:19]} {e['action']:<8} {e['alias']} {e['previous'] or '-'} -> {e['version']}"
              f"  by {e['actor']}: {e['reason']}" for e in payload["history"]]
    lines.append("recent retrains:")
    lines += [f"  {r['run_id']} {r['state']:<17} stage={r['stage']:<9} version={r['version'] or '-'}"
              f"  {r['message'][:80]}" for r in payload["runs"]]
    if "serving" in payload:
        lines.append(f"serving: {json.dumps(payload['serving'].get('serving', payload['serving']))}")
    emit(as_json, payload, "\n".join(lines))


@app.command()
def demo(
    config: ConfigOption = None,
    quick: Annotated[bool, typer.Option("--quick", help="One full loop in about 10 minutes.")] = False,
    out: Annotated[Path, typer.Option(help="Where report.json, the PNG and Locust's stats go.")] = Path("demo-out"),
    url: Annotated[str | None, typer.Option(help="Drive a running platform instead of starting one.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for prompts, drift and raters.")] = 0,
    rollout: Annotated[str, typer.Option(help="`canary`: the retrained adapter serves half the simulated people "
                                         "until their ratings promote or roll it back; `direct`: champion at "
                                         "once.")] = "canary",
) -> None:
    """Drifting traffic + simulated raters under Locust; retrains, a canary, swaps, and a learning report."""
    from loadtests.demo import DemoPlan, run_demo

    configure_logging()
    if rollout not in ("canary", "direct"):
        fail(f"--rollout must be canary or direct, not {rollout!r}", code=2)
    plan = (DemoPlan.quick() if quick else DemoPlan.full()).model_copy(update={"rollout": rollout})
    report = run_demo(settings_or_exit(config), out_dir=out, quick=quick, url=url, seed=seed, plan=plan)
    raise typer.Exit(0 if report.swaps and report.failed_requests == 0 else 1)


def write_report(out: Path, report: BaseModel, text: str, as_json: bool) -> None:
    """Write a benchmark's JSON report to `out` and print it (or its text, ending with where it went)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.model_dump_json(indent=2))
    emit(as_json, report.model_dump(), f"{text}\nreport: {out}")


@bench_app.command("serve")
def bench_serve(
    config: ConfigOption = None,
    seconds: Annotated[float, typer.Option(help="Length of each load phase.")] = 10.0,
    replicas: Annotated[int | None, typer.Option(help="LLM replicas (default from config).")] = None,
    port: Annotated[int, typer.Option(help="Port for the benchmark's own Serve app.")] = 8765,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/serve.json"),
    as_json: JsonOption = False,
) -> None:
    """HTTP vs in-process p50, 16-vs-1 concurrency throughput, and a hot swap under load."""
    from loadtests.bench_serve import run_serve_bench

    configure_logging()
    settings = settings_or_exit(config)
    settings.serving.port = port
    if replicas:
        settings.serving.replicas = replicas
    report = run_serve_bench(settings, seconds=seconds, say=progress)
    r = report
    write_report(out, report, "\n".join([
        f"HTTP p50 {r.http_p50_ms:.1f} ms / in-process p50 {r.in_process_p50_ms:.1f} ms "
        f"= {r.http_over_in_process_p50:.2f} (goal <= 1.10)",
        f"rps at 16 concurrent {r.rps_at_16:.1f} / at 1 {r.rps_at_1:.1f} = {r.rps_16_over_1:.1f}x (goal >= 4x)",
        f"swap under load: {r.swap_failed_requests} failed of {r.swap_requests} (goal 0); p99 "
        f"{r.swap_p99_ms:.0f} ms / steady {r.steady_p99_ms:.0f} ms = {r.swap_p99_over_steady_p99:.2f} "
        f"(goal <= 1.5); alias -> all {r.replicas} replicas on {r.swapped_to} in "
        f"{r.alias_to_all_replicas_s:.2f} s (goal <= 1 s)",
    ]), as_json)


@bench_app.command("trust")
def bench_trust(
    config: ConfigOption = None,
    requests: Annotated[int, typer.Option(help="Pairs of /predict requests (one with a key, one without).")] = 200,
    rows: Annotated[int, typer.Option(help="Curated rows in the scratch home for lineage and forget.")] = 100_000,
    port: Annotated[int, typer.Option(help="Port for the benchmark's own Serve app.")] = 8766,
    predict: Annotated[bool, typer.Option(help="Measure /predict with a key vs without (starts the model and a Serve "
                                          "app); --no-predict: only lineage and forget on the scratch home.")] = True,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/trust.json"),
    as_json: JsonOption = False,
) -> None:
    """What identity costs: /predict p50 with a key vs without, a lineage query and `users forget` on many rows."""
    from loadtests.bench_trust import run_trust_bench

    configure_logging()
    settings = settings_or_exit(config)
    settings.serving.port = port
    r = run_trust_bench(settings, requests=requests, rows=rows, predict=predict, say=progress)
    write_report(out, r, "\n".join([
        f"/predict with a key / open, median of {r.requests_each} back-to-back pairs: {r.key_over_open:.3f} "
        f"(95% {r.key_over_open_ci95[0]:.3f}-{r.key_over_open_ci95[1]:.3f}; goal <= 1.02); p50 {r.key_p50_ms:.1f} ms "
        f"with a key, {r.open_p50_ms:.1f} ms open" if r.key_over_open is not None else
        "/predict: not measured (--no-predict)",
        f"lineage on {r.curated_rows} curated rows, {r.versions} versions: event {r.lineage_event_s:.2f} s, request "
        f"{r.lineage_request_s:.2f} s, version {r.lineage_version_s:.2f} s (goal < 1 s)",
        f"users forget: {r.forgot_rows} rows in {r.forget_s:.1f} s",
    ]), as_json)


@bench_app.command("curation")
def bench_curation(
    config: ConfigOption = None,
    ratings: Annotated[int, typer.Option(help="Ratings (a prediction and its feedback each) per run.")] = 3000,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/curation.json"),
    as_json: JsonOption = False,
) -> None:
    """Ratings curated per second by 1 and by 3 partitioned curators in one group (feedback.kafka_bootstrap, or
    the dev broker started for it), the dataset under feedback.dataset_uri; then what publishing the manifest
    costs at 1 000 and 5 000 commits on that store."""
    from loadtests.bench_curation import run_curation_bench

    configure_logging()
    r = run_curation_bench(settings_or_exit(config), ratings=ratings, say=progress)
    manifest = "; ".join(f"{m.commits} commits: publish {m.publish_s:.2f} s, first {m.cold_s:.2f} s"
                         for m in r.manifest)
    write_report(out, r, f"{r.ratings} ratings: 3 curators {r.three_curators_per_s:.0f}/s / 1 curator "
                 f"{r.one_curator_per_s:.0f}/s = {r.three_over_one:.2f}x (published at {r.published_per_s:.0f}/s; "
                 f"dataset: {r.dataset_uri})\nthe manifest: {manifest}", as_json)


@bench_app.command("fencing")
def bench_fencing(
    config: ConfigOption = None,
    moves: Annotated[int, typer.Option(help="Alias moves of each kind (unfenced, fenced).")] = 200,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/fencing.json"),
    as_json: JsonOption = False,
) -> None:
    """What fencing adds to an alias move: p50 of champion moves by a fenced leader vs unfenced ones, on a
    scratch registry on the configured store (registry.uri's disk or object store), removed afterwards."""
    from loadtests.bench_fencing import run_fencing_bench

    configure_logging()
    r = run_fencing_bench(settings_or_exit(config), moves=moves, say=progress)
    write_report(out, r, f"{r.moves} moves each on {r.registry}: fenced p50 {r.fenced_p50_ms:.1f} ms / unfenced "
                 f"{r.unfenced_p50_ms:.1f} ms = {r.ratio:.2f}x (+{r.added_ms:.1f} ms)", as_json)


@bench_app.command("console")
def bench_console(
    config: ConfigOption = None,
    requests: Annotated[int, typer.Option(help="/predict requests with the console polling, and as many without."
                                          )] = 200,
    poll_s: Annotated[float, typer.Option(help="How often each open console page reloads.")] = 1.0,
    port: Annotated[int, typer.Option(help="Port for the benchmark's own Serve app.")] = 8767,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/console.json"),
    as_json: JsonOption = False,
) -> None:
    """What an open console costs: /predict p50 with the console's pages polling vs without."""
    from loadtests.bench_console import run_console_bench

    configure_logging()
    settings = settings_or_exit(config)
    settings.serving.port = port
    r = run_console_bench(settings, requests=requests, poll_s=poll_s, say=progress)
    pages = ", ".join(f"{page} {ms:.0f} ms" for page, ms in r.page_p50_ms.items())
    write_report(out, r, "\n".join([
        f"/predict p50 with the console polling every {r.poll_s:g} s {r.polled_p50_ms:.1f} ms / without "
        f"{r.quiet_p50_ms:.1f} ms = {r.polled_over_quiet_p50:.3f} (goal <= 1.02)",
        f"console pages p50 ({r.pages_loaded} loads): {pages}",
    ]), as_json)


@bench_app.command("openai")
def bench_openai(
    config: ConfigOption = None,
    seconds: Annotated[float, typer.Option(help="Length of each throughput phase.")] = 15.0,
    replicas: Annotated[int, typer.Option(min=1, help="flywheel's LLM replicas (vLLM's server is one): with 2 or more, "
                                          "the fused setup behind HAProxy routes by task at the ingress.")] = 1,
    port: Annotated[int, typer.Option(help="Port for the benchmark's own Serve app.")] = 8766,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/openai.json"),
    as_json: JsonOption = False,
) -> None:
    """flywheel's OpenAI API (as `flywheel up` runs it) vs vLLM's own OpenAI server (same base and adapter):
    throughput (three runs in a row for the default), p50, first token; then 2, 8 and 32 tasks; then what each part
    costs (the loop off, the request log through Ray's forwarding, no request log)."""
    from loadtests.bench_openai import run_openai_bench

    configure_logging()
    settings = settings_or_exit(config)
    settings.serving.port = port
    report = run_openai_bench(settings, seconds=seconds, replicas=replicas, say=progress)
    write_report(out, report, "\n".join(report.lines()), as_json)


@bench_app.command("scrape")
def bench_scrape(
    config: ConfigOption = None,
    tasks: Annotated[int, typer.Option(help="Tasks added beside the default one.")] = 8,
    versions: Annotated[int, typer.Option(help="Versions registered (and asked for) per added task.")] = 3,
    port: Annotated[int, typer.Option(help="Port for the benchmark's own Serve app.")] = 8767,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/scrape.json"),
    as_json: JsonOption = False,
) -> None:
    """What a Prometheus scrape of /metrics costs with one task, then with TASKS x VERSIONS more (p50, size,
    series)."""
    from loadtests.bench_ops import run_scrape_bench

    configure_logging()
    settings = settings_or_exit(config)
    settings.serving.port = port
    report = run_scrape_bench(settings, tasks=tasks, versions=versions, say=progress)
    write_report(out, report, "\n".join(report.lines()), as_json)


@bench_app.command("autoscale")
def bench_autoscale(
    config: ConfigOption = None,
    seconds: Annotated[float, typer.Option(help="Length of the Locust run; users ramp up over its first half.")
                       ] = 240.0,
    users: Annotated[int, typer.Option(help="Locust users at the top of the ramp.")] = 24,
    max_replicas: Annotated[int, typer.Option(help="Most LLM replicas Serve may scale to.")] = 2,
    port: Annotated[int, typer.Option(help="Port for the benchmark's own Serve app.")] = 8768,
    out: Annotated[Path, typer.Option(help="Where autoscale.json and Locust's stats go.")] = Path(
        "bench-out/autoscale"),
    as_json: JsonOption = False,
) -> None:
    """The LLM replicas autoscaling under a Locust ramp: replicas over time, p99 before and after the scale-up,
    failed requests (goal 0)."""
    from loadtests.bench_ops import run_autoscale_bench

    configure_logging()
    settings = settings_or_exit(config)
    settings.serving.port = port
    report = run_autoscale_bench(settings, out, users=users, seconds=seconds, max_replicas=max_replicas,
                                 say=progress)
    write_report(out / "autoscale.json", report, "\n".join(report.lines()), as_json)
    raise typer.Exit(0 if report.failed_requests == 0 else 1)


@bench_app.command("canary")
def bench_canary(
    config: ConfigOption = None,
    difference: Annotated[float, typer.Option(help="The canary's true mean-rating difference (1-5 scale).")] = 0.3,
    trials: Annotated[int, typer.Option(help="Simulated trials per case (A/A, and with the difference).")] = 1000,
    raters: Annotated[int, typer.Option(help="Users who rate in a trial; each keeps their arm.")] = 400,
    ratings: Annotated[int, typer.Option(help="Ratings per trial at most.")] = 3000,
    compare_trials: Annotated[int, typer.Option(help="Of those, how many also go through savvi's test "
                                                     "(0: none; needs the dev extra).")] = 200,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/canary.json"),
    as_json: JsonOption = False,
) -> None:
    """Whether the canary's verdicts are right, on simulated raters who each have a bias and rate many answers:
    false verdicts over A/A trials (with their confidence interval), ratings per arm to find --difference, and
    savvi's anytime-valid test on the same streams (`canary.*` from config)."""
    from loadtests.bench_canary import Population, run_canary_bench

    settings = settings_or_exit(config)
    if compare_trials and importlib.util.find_spec("savvi") is None:
        fail("savvi is not installed (it comes with the dev extra); --compare-trials 0 runs without it", code=2)
    report = run_canary_bench(settings.canary, difference=difference, trials=trials, compare_trials=compare_trials,
                              population=Population(raters=raters, ratings=ratings))
    write_report(out, report, "\n".join(report.lines()), as_json)


@bench_app.command("soak")
def bench_soak(
    config: ConfigOption = None,
    minutes: Annotated[float, typer.Option(help="How long the load runs.")] = 10.0,
    swap_every: Annotated[float, typer.Option(help="Seconds between hot swaps of the champion (two versions).")
                          ] = 60.0,
    scenario: Annotated[str, typer.Option(help="`mixed` (predict, then rate), `swap` (predict only) or `hostile` "
                                               "(half mixed alone, half mixed beside a hostile client: "
                                               "64 000-character prompts of adversarial shapes, a chunked "
                                               "100 MB body, ratings of requests that never were).")] = "mixed",
    users: Annotated[int, typer.Option(help="Concurrent Locust users.")] = 4,
    out: Annotated[Path, typer.Option(help="Where soak.json and Locust's stats go.")] = Path("bench-out/soak"),
    as_json: JsonOption = False,
) -> None:
    """Minutes of mixed traffic with a hot swap every --swap-every seconds: failures and memory growth."""
    from loadtests.soak import run_soak

    configure_logging()
    if scenario not in ("mixed", "swap", "hostile"):
        fail(f"--scenario must be mixed, swap or hostile, not {scenario!r}", code=2)
    report = run_soak(settings_or_exit(config), out_dir=out, minutes=minutes, swap_every_s=swap_every,
                      scenario=scenario, users=users, say=progress)  # type: ignore[arg-type]
    emit(as_json, report.model_dump(), f"{report.summary()}\nreport: {out / 'soak.json'}")
    raise typer.Exit(0 if report.failed_requests == 0 and report.server_errors == 0 else 1)


@bench_app.command("quant")
def bench_quant(
    config: ConfigOption = None,
    requests: Annotated[int, typer.Option(help="Generations per engine and concurrency.")] = 24,
    wide: Annotated[bool, typer.Option(help="Also measure a random model with R1-Distill-1.5B-wide layers.")
                    ] = True,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/quant.json"),
    as_json: JsonOption = False,
) -> None:
    """GPTQ: quantize time and size; CPU tokens/s GPTQ+LoRA vs fp32+LoRA; vLLM GPU rows where CUDA exists."""
    from loadtests.bench_quant import run_quant_bench

    configure_logging()
    report = run_quant_bench(settings_or_exit(config), requests=requests, wide=wide, say=progress)
    write_report(out, report, report.summary(), as_json)


@bench_app.command("train")
def bench_train(
    config: ConfigOption = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps in each run.")] = 40,
    workers: Annotated[int, typer.Option(help="Ray Train workers.")] = 1,
    threads: Annotated[int, typer.Option(help="Torch threads per process.")] = 1,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/train.json"),
    as_json: JsonOption = False,
) -> None:
    """LoRA SFT tokens/s through Ray Train vs the same HF Trainer run without Ray (goal >= 1.0)."""
    from loadtests.bench_train import run_train_bench
    from training.demo_bootstrap import bootstrap as run_bootstrap

    configure_logging()
    settings = settings_or_exit(config)
    run_bootstrap(settings, progress=progress)
    report = run_train_bench(Path(settings.base_model_path), steps=steps, workers=workers, threads=threads)
    r = report
    write_report(out, report, "\n".join([
        f"tokens/s through Ray Train {r.ray_tokens_per_s:.0f} / plain HF Trainer {r.plain_tokens_per_s:.0f} "
        f"= {r.ray_over_plain:.2f} (goal >= 1.0)",
        f"wall: plain {r.plain_wall_s:.1f} s, Ray {r.ray_wall_s:.1f} s (of which start-up {r.ray_startup_s:.1f} s, "
        f"ray.init {r.ray_init_s:.1f} s)",
    ]), as_json)


@bench_app.command("data")
def bench_data(
    rows: Annotated[int, typer.Option(help="Synthetic rows (5 % exact, 5 % near duplicates).")] = 100_000,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/data.json"),
    as_json: JsonOption = False,
) -> None:
    """Exact + near-duplicate removal throughput, and the whole own-data preparation, in rows/s."""
    from loadtests.bench_data import run_data_bench

    report = run_data_bench(rows)
    write_report(out, report, report.summary(), as_json)


@bench_app.command("own-task")
def bench_own_task(
    config: ConfigOption = None,
    rows: Annotated[int, typer.Option(help="Rows of the synthetic classification export.")] = 1000,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("bench-out/own-task.json"),
    as_json: JsonOption = False,
) -> None:
    """`flywheel train` wall time per stage (load+clean+split, train, evaluate, register) on N rows."""
    from loadtests.bench_data import run_own_task_bench

    configure_logging()
    settings = settings_or_exit(config)
    ray_was_up = _ray_is_up()
    try:
        with stdout_to_stderr():  # Ray's workers print on stdout
            report = run_own_task_bench(settings, rows, say=progress)
    finally:
        if not ray_was_up:
            _shutdown_ray()
    write_report(out, report, report.summary(), as_json)


json_only_on_stdout(app)  # every command, the groups mounted from other modules included


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
