"""`flywheel feedback curator|status|export|review|retract|lineage` (and `flywheel curator`, `flywheel lineage`):
the feedback plane's commands.

Mounted by flywheel/cli.py; the shared options and helpers come from flywheel/cli_common.py.
"""

from __future__ import annotations

import getpass
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from kafka.errors import KafkaError

from feedback.curator import feedback_status
from feedback.dataset import curated_dataset
from feedback.erasure import forget
from feedback.oversight import Lineage, events_matching, judge, lineage, review_queue
from feedback.oversight import retract as retract_events
from feedback.partitioned import build_curator
from feedback.supervisor import CuratorHealth, supervise
from flywheel.cli_common import ConfigOption, JsonOption, emit, fail, settings_or_exit
from flywheel.logs import configure_logging
from flywheel.registry import RegistryError
from flywheel.runs import RetrainBusyError, RunStore

app = typer.Typer(help="The feedback plane: curator, stream status, dataset export.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

@app.command()
def curator(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Curate what is there now, then exit.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Join feedback to its prediction, mask PII, append to the dataset. Runs until Ctrl-C / SIGTERM,
    waiting and retrying while the broker cannot be reached (see `flywheel feedback status`)."""
    configure_logging()
    settings = settings_or_exit(config)
    if not once:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        typer.echo("curator running (Ctrl-C stops after the current batch)", err=True)
        supervise(settings, stop)
        return
    try:
        worker = build_curator(settings)
    except (KafkaError, OSError, ValueError) as exc:
        fail(f"the curator could not start: {exc!r}")
    try:
        result = worker.drain()
    except TimeoutError as exc:
        fail(str(exc))
    finally:
        worker.close()
    emit(as_json, result.model_dump(mode="json"),
         f"curated {result.curated} rows from {result.records} records "
         f"({result.duplicates} duplicates dropped, {result.unmatched} waiting for their prediction)")


@app.command()
def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Received, curated, unmatched (and how old), duplicates, spooled, and the curator's positions."""
    report = feedback_status(settings_or_exit(config))
    age = "" if report.unmatched_oldest_age_s is None else f" (oldest {report.unmatched_oldest_age_s:.0f} s)"
    age += f" ({report.unmatched_dropped} dropped)" if report.unmatched_dropped else ""
    lines = [
        f"backend: {report.backend}",
        f"received {report.received}  curated {report.curated}  unmatched {report.unmatched}{age}  "
        f"duplicates {report.duplicates}  refused {report.refused}  rejected {report.rejected}  "
        f"spooled {report.spooled}",
        "positions: " + (" ".join(f"{p}={n}" + (f"/{report.log_end[p]}" if p in report.log_end else "")
                                  for p, n in sorted(report.positions.items())) or "-"),
        f"dataset: {report.dataset} ({report.parts} parts)",
        f"curator: {_describe(report.curator)}",
        *(f"  {h.host} pid {h.pid}: {_describe(h)}, {h.lag_records} behind" for h in report.curators
          if len(report.curators) > 1),
        "on disk: " + "  ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in report.disk_bytes.items()),
    ]
    emit(as_json, report.model_dump(mode="json"), "\n".join(lines))


def _describe(health: CuratorHealth | None) -> str:
    if health is None:
        return "never started here"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(health.since))
    return f"{health.state} since {since}" + (f" (try {health.retries}: {health.detail})" if health.detail else "")


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="JSON-lines file to write (PII already masked).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write the curated dataset (every part the manifest names) as JSON lines."""
    dataset = curated_dataset(settings_or_exit(config))
    try:
        rows = dataset.export_jsonl(out)
    except OSError as exc:
        fail(f"could not write {out}: {exc}")
    emit(as_json, {"rows": rows, "out": str(out)}, f"exported {rows} rows to {out}")


if __name__ == "__main__":
    app()


def _operator() -> str:
    """Who acts from the command line: the OS user (the admin routes record the key's principal)."""
    return f"cli:{getpass.getuser()}"


@app.command()
def review(
    config: ConfigOption = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task's corrections.")] = None,
    approve: Annotated[list[str] | None, typer.Option("--approve", help="Approve these event ids: they train as "
                                                      "`reviewed`.")] = None,
    reject: Annotated[list[str] | None, typer.Option("--reject", help="Reject these event ids: they never train."
                                                     )] = None,
    reason: Annotated[str, typer.Option(help="Why (recorded with the decision).")] = "",
    as_json: JsonOption = False,
) -> None:
    """List corrections waiting for review (anonymous, conflicting, screened out, below retrain.min_trust) with
    their prompt, served answer, proposed answer and proposer; or approve / reject some."""
    settings = settings_or_exit(config)
    if approve or reject:
        results = {}
        for action, ids in (("approve", approve or []), ("reject", reject or [])):
            if ids:
                done, unknown = judge(settings, ids, action, _operator(), reason)  # type: ignore[arg-type]
                results[action] = {"done": done, "unknown": unknown}
        unknown = [e for r in results.values() for e in r["unknown"]]
        emit(as_json, results, "\n".join(f"{action}d {len(r['done'])}" for action, r in results.items())
             + (f"\nunknown event ids: {', '.join(unknown)}" if unknown else ""))
        if unknown:
            raise typer.Exit(1)
        return
    queue = review_queue(settings, task)
    lines = [f"{p.event_id}  [{p.task}] by {p.proposed_by or '-'} ({p.trust}, {p.raters_agreeing} agreeing): {p.why}\n"
             f"    prompt:   {_short(p.prompt)}\n    served:   {_short(p.served_answer)}\n"
             f"    proposed: {_short(p.proposed_answer)}" for p in queue]
    emit(as_json, [p.model_dump(mode="json") for p in queue], "\n".join(lines) or "nothing waits for review")


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@app.command()
def retract(
    event_ids: Annotated[list[str] | None, typer.Argument(help="Curated event ids to retract.")] = None,
    rater: Annotated[str | None, typer.Option(help="Retract every verdict of this rater.")] = None,
    request: Annotated[str | None, typer.Option(help="Retract every verdict on this request id.")] = None,
    reason: Annotated[str, typer.Option(help="Why (required: recorded with the retraction).")] = "",
    rollback: Annotated[bool, typer.Option(help="Move each affected task's champion to its newest ancestor that "
                                           "never learned them (ending a canary that carries them).")] = False,
    retrain: Annotated[bool, typer.Option(help="Then start a retrain of each affected task without them. Implies "
                                          "--rollback: a retrain starts from the champion, so a champion that "
                                          "learned them is first rolled back to its clean ancestor.")] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Take feedback back: its rows become tombstones (never trained on again, replay included); prints the
    versions that trained on them."""
    if not reason.strip():
        fail("--reason is required: say why the feedback is retracted", code=2)
    settings = settings_or_exit(config)
    ids = list(event_ids or [])
    if rater or request:
        ids += events_matching(settings, rater=rater, request_id=request)
    if not ids:
        fail("nothing to retract: give event ids, --rater or --request (matching curated rows)", code=2)
    try:
        # a retrain starts from the champion: never from one that learned the retracted rows
        result = retract_events(settings, ids, by=_operator(), reason=reason, rollback=rollback or retrain)
    except (LookupError, RegistryError) as exc:
        fail(str(exc))
    runs = {}
    if retrain:
        store = RunStore.for_settings(settings)
        for task in result.trained:
            try:
                runs[task] = store.launch_retrain(settings, "retraction", task).run_id
            except RetrainBusyError as exc:
                typer.echo(f"retrain of {task} not started: {exc}", err=True)
    trained = "; ".join(f"{t}: {', '.join(v)}" for t, v in result.trained.items()) or "none"
    text = (f"retracted {len(result.retracted)} rows; versions that trained on them: {trained}"
            + "".join(f"\n{t}: champion rolled back to {v}" for t, v in result.rolled_back.items())
            + ("\n(--retrain implies --rollback: each retrain starts from the clean ancestor)"
               if retrain and not rollback and result.rolled_back else "")
            + "".join(f"\n{t}: retrain {r} started" for t, r in runs.items())
            + (f"\nunknown event ids: {', '.join(result.unknown)}" if result.unknown else ""))
    emit(as_json, {**result.model_dump(), "retrains": runs}, text)


@app.command("lineage")
def lineage_command(
    identifier: Annotated[str, typer.Argument(help="A request id, a feedback event id, or a version (task-vN).")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """What made a version, what a request was answered by and what its feedback trained, where an event went."""
    settings = settings_or_exit(config)
    try:
        found = lineage(settings, identifier)
    except LookupError as exc:
        fail(str(exc))
    emit(as_json, found.model_dump(mode="json"), _describe_lineage(found))


def _describe_lineage(found: Lineage) -> str:
    if found.version is not None:
        v = found.version
        return (f"{v.version} ({v.status}) parents: {' <- '.join(v.parents) or 'none'}\n"
                f"rows by source: {v.rows_by_source}\ndata: {v.data}\n"
                f"gate: {(v.gate or {}).get('verdict', '-')}: {(v.gate or {}).get('message', '')}\n"
                f"champion: {', '.join(str(p['at']) for p in v.champion_periods) or 'never'}")
    if found.request is not None:
        r = found.request
        return (f"request {r.request_id} answered by {r.answered_by} (ancestors {' <- '.join(r.ancestors) or 'none'})"
                + "".join(f"\n  feedback {e.event_id}: trust {e.trust}, retracted {e.retracted}, trained "
                          f"{', '.join(e.trained) or 'nothing'}" for e in r.feedback))
    e = found.event
    assert e is not None
    return (f"event {e.event_id} on request {e.row.request_id if e.row else '?'}: trust {e.trust}, retracted "
            f"{e.retracted}\ntrained: {', '.join(e.trained) or 'no version'}")


users_app = typer.Typer(help="End users' data: erasure requests.", no_args_is_help=True, pretty_exceptions_enable=False)


@users_app.command("forget")
def users_forget(
    user: Annotated[str, typer.Argument(help="A rater or asker (a key's name, or key/end-user), or an end user's id "
                                        "as an app backend sent it.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Erase a user's predictions and feedback from everything flywheel stores (curated Parquet, join state,
    local log, spool, review log, versions' training rows); report what went and which versions learned from
    them. Kafka keeps its copies until the topics' retention deletes them."""
    settings = settings_or_exit(config)
    report = forget(settings, user)
    trained = "; ".join(f"{t}: {', '.join(v)}" for t, v in report.trained.items()) or "none"
    emit(as_json, report.model_dump(), (
        f"forgot {user}: {report.curated_rows} curated rows ({report.parts_rewritten} parts rewritten), "
        f"{report.joined_predictions} predictions in the join state, {report.waiting_feedback} waiting feedback, "
        f"{report.log_records} log and {report.spool_records} spool records, {report.judgements} review "
        f"judgements, {report.training_rows} training rows\nversions trained on their rows: {trained}"))
