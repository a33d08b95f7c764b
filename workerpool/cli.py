"""The `workerpool` command: start, stop, status, reload, enqueue, clear, dead, stats.

Exit codes (DESIGN.md): 0 ok; 1 runtime failure (Redis unreachable at start, crash loop);
2 bad usage or config; `status`: 0 running, 1 dead but pidfile left, 3 not running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from redis.exceptions import RedisError
from setproctitle import setproctitle  # a hard dependency: titles hide passwords

from workerpool import daemon, embedded
from workerpool.config import (
    Config,
    ConfigError,
    load_config,
    load_handler,
    mask_url,
    warn_if_secret_readable,
)
from workerpool.connection import redis_url, sync_client
from workerpool.logs import setup_logging
from workerpool.protocol import SyncQueue, new_task

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# How much longer than drain_timeout `stop` waits by default: the supervisor gives workers
# KILL_GRACE (5 s) after drain_timeout before SIGKILL, then requeues and shuts down.
STOP_MARGIN = 15.0
ENQUEUE_CHUNK = 1000
PROGRESS_MIN = 10 * ENQUEUE_CHUNK  # files smaller than this need no progress bar
STATUS_DEAD, STATUS_NOT_RUNNING = 1, 3


class CommandError(Exception):
    """A failure to report in one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _say(message: str) -> None:
    print(message, flush=True)


def _err(message: str) -> None:
    print(f"workerpool: {message}", file=sys.stderr, flush=True)


# --- configuration from the command line


_START_OVERRIDES = ("workers", "redis_url", "redis_key", "interval", "max_tasks", "concurrency")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in _START_OVERRIDES}


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=_overrides(args))


def _queue(config: Config) -> SyncQueue:
    if config.redis_url == "embedded" and not embedded.is_running(config):
        raise CommandError(f"the embedded redis ({embedded.socket_path(config)}) runs only "
                           "while the pool runs: `workerpool start` first")
    return SyncQueue(sync_client(config), config.redis_key)


# --- start / stop / status / reload


def cmd_start(args: argparse.Namespace) -> int:
    """Start the pool: daemonized, or in the foreground for systemd and terminals."""
    from workerpool.supervisor import Supervisor, check_redis

    setproctitle("workerpool: supervisor starting")
    config = _load(args)
    setproctitle(f"workerpool: supervisor [{config.redis_key}] starting")
    handler = load_handler(config)  # before fork, so every worker shares the imported code
    uid, gid = daemon.resolve_user(config.user, config.group)
    state, pid = daemon.pidfile_state(config.pidfile)
    if state == "running":
        _say(f"workerpool already running (pid {pid})")
        return EXIT_OK
    warning = warn_if_secret_readable(config)
    if warning:
        _err(f"warning: {warning}")
    if config.redis_url == "embedded" and embedded.start(config):
        _say(f"started embedded redis on {embedded.socket_path(config)}")
    problem = check_redis(config)
    if problem:
        raise CommandError(problem)

    pidfile = daemon.PidFile(config.pidfile)
    as_root = os.geteuid() == 0
    if args.foreground:
        setup_logging(config.log_level, config.log_file)
        try:
            if as_root:
                daemon.prepare_paths(config.pidfile, config.log_file, uid, gid)
            pidfile.acquire()
        except daemon.AlreadyRunning as exc:
            _say(f"workerpool already running (pid {exc.pid})")
            return EXIT_OK
        except OSError as exc:
            _err(f"warning: no pidfile ({config.pidfile}: {exc.strerror}); "
                 "`workerpool stop/status` will not find this pool")
            pidfile = None
        if as_root:
            daemon.drop_privileges(uid, gid)
    else:
        log_file = config.log_file or os.path.join(
            os.path.dirname(os.path.abspath(config.pidfile)), "workerpool.log")
        # After the fork stderr is /dev/null: a log file the daemon could not open would make
        # it die unseen after we said it started. Create its directory and check it here.
        try:
            daemon.prepare_paths(config.pidfile, log_file, uid, gid)  # chowns only as root
            if not as_root:
                with open(log_file, "a", encoding="utf-8"):
                    pass
        except OSError as exc:
            raise CommandError(f"cannot write {exc.filename or log_file}: "
                               f"{exc.strerror or exc}") from None
        # The daemon locks the pidfile only after the fork, where a failure is silent.
        try:
            daemon.check_pidfile_writable(config.pidfile, uid if as_root else None,
                                          gid if as_root else None)
        except OSError as exc:
            raise CommandError(f"cannot create the pidfile {config.pidfile}: "
                               f"{exc.strerror or exc}") from None
        _say(f"starting workerpool in the background; log: {log_file}")
        try:
            daemon.daemonize(pidfile, uid=uid if as_root else None,
                             gid=gid if as_root else None,
                             working_directory=os.getcwd())
        except daemon.AlreadyRunning as exc:
            _say(f"workerpool already running (pid {exc.pid})")
            return EXIT_OK
        setup_logging(config.log_level, log_file)

    def reload_config() -> Config:
        return _load(args)

    status_file = daemon.status_path(config.pidfile) if pidfile is not None else None
    try:
        supervisor = Supervisor(config, handler, reload_config=reload_config,
                                status_file=status_file)
        return supervisor.run()
    finally:
        # The embedded server goes last, after every worker has written its results.
        if config.redis_url == "embedded":
            embedded.stop(config)
        if pidfile is not None:
            pidfile.release()


def _running_pid(config: Config) -> tuple[str, int | None]:
    return daemon.pidfile_state(config.pidfile)


def _signal(pid: int, signum: int) -> bool:
    """Send `signum` to the pool; False if it has exited. A pool of another user is a clear
    error (exit 1, a runtime failure, rather than LSB's 4), not a traceback."""
    try:
        os.kill(pid, signum)
    except PermissionError:
        raise CommandError(f"not allowed to signal the pool (pid {pid}, another user's): run "
                           "this as root or as the pool's user") from None
    except ProcessLookupError:
        return False
    return True


def cmd_stop(args: argparse.Namespace) -> int:
    """Send TERM and wait until the pool is gone (in-flight tasks finish first)."""
    config = _load(args)
    state, pid = _running_pid(config)
    if state != "running" or pid is None:
        _say("workerpool is not running")
        return EXIT_OK
    timeout = args.timeout if args.timeout is not None else config.drain_timeout + STOP_MARGIN
    _signal(pid, signal.SIGTERM)
    status_file = daemon.status_path(config.pidfile)
    on_tty = sys.stdout.isatty()

    def show_progress() -> None:
        status = daemon.read_json(status_file) or {}
        workers = status.get("workers", [])
        in_flight = sum(worker.get("in_flight", 0) for worker in workers)
        sys.stdout.write(f"\rstopping workerpool (pid {pid}): {len(workers)} worker(s), "
                         f"{in_flight} task(s) in flight   ")
        sys.stdout.flush()

    gone = daemon.wait_for_exit(pid, timeout, on_tick=show_progress if on_tty else None)
    if on_tty:
        sys.stdout.write("\n")
    if not gone:
        _err(f"still running after {timeout:g}s: sending SIGQUIT (in-flight tasks go "
             "back to the queue)")
        _signal(pid, signal.SIGQUIT)
        if not daemon.wait_for_exit(pid, 15.0):
            raise CommandError(f"pid {pid} did not stop")
    _say(f"workerpool stopped (pid {pid})")
    return EXIT_OK


def _queue_counts(config: Config) -> dict[str, Any]:
    try:
        try:
            queue = _queue(config)
        except CommandError as exc:
            return {"error": str(exc)}
        try:
            return queue.counts()
        finally:
            queue.client.close()
    except RedisError as exc:
        return {"error": f"redis unavailable at {mask_url(config.redis_url)}: {exc}"}


def cmd_status(args: argparse.Namespace) -> int:
    """Report whether the pool runs, its workers and the queue depths (LSB exit codes)."""
    config = _load(args)
    state, pid = _running_pid(config)
    report: dict[str, Any] = {"state": {"running": "running", "stale": "dead",
                                        "absent": "not running"}[state], "pid": pid}
    code = {"running": EXIT_OK, "stale": STATUS_DEAD, "absent": STATUS_NOT_RUNNING}[state]
    if state == "running":
        report["supervisor"] = daemon.read_json(daemon.status_path(config.pidfile))
    report["queue"] = _queue_counts(config)
    report["redis_key"] = config.redis_key
    report["redis_url"] = mask_url(redis_url(config))
    if args.all_hosts:
        report["hosts"] = _all_hosts(config)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return code
    _print_status(report)
    return code


def _all_hosts(config: Config) -> list[dict[str, Any]] | dict[str, str]:
    try:
        queue = _queue(config)
        try:
            hosts = queue.live_hosts(config.host_timeout)
        finally:
            queue.client.close()
    except (CommandError, RedisError) as exc:
        return {"error": str(exc)}
    result = []
    for host, age, status in hosts:
        entry: dict[str, Any] = {"host": host, "heartbeat_age": round(age, 1)}
        if status:
            entry["supervisor"] = json.loads(status)
        result.append(entry)
    return result


def _print_status(report: dict[str, Any]) -> None:
    if report["state"] == "running":
        supervisor = report.get("supervisor") or {}
        _say(f"workerpool is running (pid {report['pid']}), up {_ago(supervisor.get('uptime'))}, "
             f"queue {report['redis_key']} on {report['redis_url']}")
        workers = supervisor.get("workers", [])
        if supervisor.get("max_tasks"):
            _say(f"max_tasks: {supervisor.get('finished')}/{supervisor['max_tasks']} finished")
        _print_table(
            ["worker", "pid", "state", "done", "failed", "in flight", "busy for", "up"],
            [[w["worker"], w["pid"], w["state"], w["processed"], w["failed"], w["in_flight"],
              _ago(w.get("busy_for")) if w["in_flight"] else "-", _ago(w.get("uptime"))]
             for w in workers],
        )
    elif report["state"] == "dead":
        _say(f"workerpool is dead but its pidfile is left (pid {report['pid']})")
    else:
        _say("workerpool is not running")
    queue = report["queue"]
    if "error" in queue:
        _say(f"queue: {queue['error']}")
    else:
        _say("queue: " + ", ".join(f"{name} {queue[name]}"
                                   for name in ("pending", "processing", "retry", "dead")))
    for host in report.get("hosts", []) if isinstance(report.get("hosts"), list) else []:
        supervisor = host.get("supervisor") or {}
        _say(f"host {host['host']}: heartbeat {host['heartbeat_age']}s ago, "
             f"{len(supervisor.get('workers', []))} worker(s), "
             f"{supervisor.get('processed', 0)} done")


def _ago(seconds: Any) -> str:
    if seconds is None:
        return "?"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _print_table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        _say("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_reload(args: argparse.Namespace) -> int:
    """Send HUP: the supervisor re-reads its config and replaces workers one at a time."""
    config = _load(args)
    state, pid = _running_pid(config)
    if state != "running" or pid is None:
        raise CommandError("workerpool is not running")
    if not _signal(pid, signal.SIGHUP):
        raise CommandError("workerpool is not running")
    _say(f"reload requested (pid {pid})")
    return EXIT_OK


# --- queue tools


def _json_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommandError(f"line {number}: not JSON ({exc.msg})", EXIT_USAGE) from None
        if not isinstance(task, dict) or not isinstance(task.get("type"), str):
            raise CommandError(f"line {number}: not a task (a JSON object with a string "
                               "'type')", EXIT_USAGE)
        yield new_task(task.pop("type"), task.pop("data", None), **task)


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Push tasks: one from TYPE [DATA], or JSON lines from --file (- for stdin)."""
    config = _load(args)
    if args.file:
        if args.type:
            raise CommandError("give either TYPE [DATA] or --file, not both", EXIT_USAGE)
        try:
            handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"{args.file}: {exc.strerror}", EXIT_USAGE) from None
        with handle:
            # Every line is checked before any is pushed: a bad line enqueues nothing.
            tasks = list(_json_lines(handle))
    elif args.type:
        try:
            data = json.loads(args.data) if args.data else {}
        except json.JSONDecodeError as exc:
            raise CommandError(f"DATA is not JSON: {exc.msg}", EXIT_USAGE) from None
        extra = {"id": args.id} if args.id else {}
        tasks = [new_task(args.type, data, **extra)]
    else:
        raise CommandError("give TYPE [DATA] or --file FILE", EXIT_USAGE)
    queue = _queue(config)
    show_progress = len(tasks) >= PROGRESS_MIN and sys.stderr.isatty() and not args.quiet
    try:
        for start in range(0, len(tasks), ENQUEUE_CHUNK):
            queue.enqueue_many(tasks[start : start + ENQUEUE_CHUNK])
            if show_progress:
                done = min(start + ENQUEUE_CHUNK, len(tasks))
                bar = "#" * (30 * done // len(tasks))
                sys.stderr.write(f"\r[{bar:<30}] {done}/{len(tasks)} task(s)")
                sys.stderr.flush()
        if show_progress:
            sys.stderr.write("\n")
        if args.wait_replicas:
            queue.enqueue_many([], wait_replicas=args.wait_replicas)
    finally:
        queue.client.close()
    if args.quiet:
        return EXIT_OK
    if len(tasks) == 1:
        _say(tasks[0]["id"])
    else:
        _say(f"enqueued {len(tasks)} task(s) to {config.redis_key}")
    return EXIT_OK


def _confirm(question: str, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise CommandError("refusing without --yes (no terminal to ask)", EXIT_USAGE)
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_clear(args: argparse.Namespace) -> int:
    """Delete every pending task of the queue (asks first unless --yes)."""
    config = _load(args)
    queue = _queue(config)
    try:
        pending = queue.counts()["pending"]
        if not _confirm(f"delete {pending} pending task(s) from {config.redis_key}?", args.yes):
            _say("nothing deleted")
            return EXIT_OK
        _say(f"deleted {queue.clear()} pending task(s)")
    finally:
        queue.client.close()
    return EXIT_OK


def cmd_dead(args: argparse.Namespace) -> int:
    """List, retry or purge dead-lettered tasks."""
    config = _load(args)
    queue = _queue(config)
    try:
        if args.dead_command == "list":
            return _dead_list(queue, args)
        if args.dead_command == "retry":
            return _dead_retry(queue, args)
        if not _confirm(f"delete every dead letter of {config.redis_key}?", args.yes):
            _say("nothing deleted")
            return EXIT_OK
        _say(f"purged {queue.purge_dead()} dead letter(s)")
        return EXIT_OK
    finally:
        queue.client.close()


def _dead_list(queue: SyncQueue, args: argparse.Namespace) -> int:
    entries = queue.dead_entries(0, args.limit - 1 if args.limit else -1)
    decoded = []
    for index, raw in entries:
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = {"task": raw.decode("utf-8", "replace"), "reason": "unreadable entry"}
        decoded.append({"index": index, **entry})
    if args.json:
        print(json.dumps(decoded, indent=2))
        return EXIT_OK
    if not decoded:
        _say("no dead letters")
        return EXIT_OK
    _print_table(
        ["index", "failed", "reason", "attempts", "error", "task"],
        [[e["index"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("failed_at", 0))),
          e.get("reason", ""), e.get("attempts", ""), _clip(str(e.get("error", "")), 40),
          _clip(str(e.get("task", "")), 60)] for e in decoded],
    )
    return EXIT_OK


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _dead_retry(queue: SyncQueue, args: argparse.Namespace) -> int:
    if args.all == bool(args.index):
        raise CommandError("give --all or one or more INDEX", EXIT_USAGE)
    entries = queue.dead_entries()
    chosen = entries if args.all else []
    if not args.all:
        by_index = dict(entries)
        for index in args.index:
            if index not in by_index:
                raise CommandError(f"no dead letter at index {index} "
                                   f"(there are {len(entries)})", EXIT_USAGE)
            chosen.append((index, by_index[index]))
    revived = sum(queue.revive(raw) for _, raw in chosen)
    _say(f"requeued {revived} dead letter(s)")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    """Queue depths, and the throughput of the last minute summed over every live host."""
    config = _load(args)
    counts = _queue_counts(config)
    if "error" not in counts:
        hosts = _all_hosts(config)
        rates = [(h.get("supervisor") or {}).get("throughput_1m") for h in hosts] if isinstance(
            hosts, list) else []
        known = [rate for rate in rates if rate is not None]
        counts["hosts"] = len(rates)
        counts["throughput_1m"] = round(sum(known), 2) if known else None
    if args.json:
        print(json.dumps(counts))
    elif "error" in counts:
        _say(counts["error"])
    else:
        rate = counts["throughput_1m"]
        _print_table(["pending", "processing", "retry", "dead", "hosts", "tasks/s (1 min)"],
                     [[counts["pending"], counts["processing"], counts["retry"], counts["dead"],
                       counts["hosts"], "-" if rate is None else rate]])
    return EXIT_OK if "error" not in counts else EXIT_FAILURE


# --- argument parsing


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="workerpool",
        description="A multiprocess worker pool that runs JSON tasks from a Redis list.",
    )
    parser.add_argument("--config", help="INI file (default: $WORKERPOOL_CONFIG, "
                        "./workerpool.ini, /etc/workerpool/workerpool.ini)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int],
                help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    start = command("start", cmd_start, "start the pool (as a daemon unless --foreground)")
    start.add_argument("--foreground", action="store_true",
                       help="stay in the foreground and log to stderr (systemd, terminals)")
    start.add_argument("--workers", metavar="N")
    start.add_argument("--redis-url", metavar="URL")
    start.add_argument("--redis-key", metavar="KEY")
    start.add_argument("--interval", metavar="S")
    start.add_argument("--max-tasks", metavar="N")
    start.add_argument("--concurrency", metavar="N")

    stop = command("stop", cmd_stop, "drain and stop the pool, waiting until it is gone")
    stop.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="after S seconds stop at once, requeueing in-flight tasks "
                      f"(default: drain_timeout + {STOP_MARGIN:g})")

    status = command("status", cmd_status, "show the pool, its workers and the queue")
    status.add_argument("--json", action="store_true")
    status.add_argument("--all-hosts", action="store_true",
                        help="also list every live host of this queue, from Redis")

    command("reload", cmd_reload, "re-read the config and replace workers one at a time")

    enqueue = command("enqueue", cmd_enqueue, "push tasks onto the queue")
    enqueue.add_argument("type", nargs="?", help="task type, e.g. email")
    enqueue.add_argument("data", nargs="?", help="task data as JSON, e.g. '{\"to\": ...}'")
    enqueue.add_argument("--id", help="task id (default: a new uuid)")
    enqueue.add_argument("--file", metavar="FILE", help="JSON lines, one task each; - = stdin")
    enqueue.add_argument("--wait-replicas", type=int, default=0, metavar="N",
                         help="wait until N replicas have the write (Redis WAIT)")
    enqueue.add_argument("--quiet", "-q", action="store_true")
    enqueue.add_argument("--redis-url", metavar="URL")
    enqueue.add_argument("--redis-key", metavar="KEY")

    clear = command("clear", cmd_clear, "delete every pending task")
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask")
    clear.add_argument("--redis-url", metavar="URL")
    clear.add_argument("--redis-key", metavar="KEY")

    dead = command("dead", cmd_dead, "list, retry or purge dead-lettered tasks")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = dead_commands.add_parser("list", help="show dead letters, newest first")
    dead_list.add_argument("--json", action="store_true")
    dead_list.add_argument("--limit", type=int, default=0, metavar="N")
    dead_retry = dead_commands.add_parser("retry", help="move dead letters back to the queue")
    dead_retry.add_argument("--all", action="store_true")
    dead_retry.add_argument("index", nargs="*", type=int)
    dead_purge = dead_commands.add_parser("purge", help="delete every dead letter")
    dead_purge.add_argument("--yes", "-y", action="store_true", help="do not ask")

    stats = command("stats", cmd_stats, "queue depths")
    stats.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `workerpool` console script."""
    # First of all: the command line may hold a password (--redis-url), and ps shows it.
    setproctitle("workerpool")
    args = build_parser().parse_args(argv)
    setproctitle(f"workerpool: {args.command}")
    try:
        return args.handler(args)
    except ConfigError as exc:
        _err(f"config error: {exc}")
        return EXIT_USAGE
    except CommandError as exc:
        _err(str(exc))
        return exc.code
    except RedisError as exc:
        _err(f"redis error: {exc}")
        return EXIT_FAILURE
    except embedded.EmbeddedRedisError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
