"""The built-in handler against a real SMTP server (aiosmtpd) and a real directory tree."""

from __future__ import annotations

import asyncio
import email
import email.policy
import errno
import gzip
import hashlib
import logging
import os
import signal
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from workerpool import handlers
from workerpool.config import Config, load_config
from workerpool.errors import TaskRejected
from workerpool.handlers import async_handle, files, workerpool_setup

USER, PASSWORD = "mailer", "s3cret-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup(**overrides: Any) -> Config:
    config = load_config(None, search=False, environ={},
                         overrides={key: str(value) for key, value in overrides.items()})
    workerpool_setup(config)
    return config


def run(task: dict) -> None:
    asyncio.run(async_handle(task))


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test configures its own settings; monkeypatch puts the module state back after.
    monkeypatch.setattr(handlers, "_settings", None)


class Recorder:
    """An aiosmtpd handler keeping every delivered envelope; some recipients are refused."""

    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("nobody"):
            return "550 5.1.1 no such user here"
        if address.startswith("busy"):
            return "450 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(), PASSWORD.encode())
    # handled=False: aiosmtpd then answers 535 itself (handled=True would send nothing).
    return AuthResult(success=ok, handled=False)


def start_server(**controller_options: Any) -> tuple[Controller, Recorder]:
    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port(),
                            **controller_options)
    controller.start()
    return controller, recorder


@pytest.fixture
def smtp() -> Iterator[Recorder]:
    controller, recorder = start_server()
    setup(email_host="127.0.0.1", email_port=controller.port, email_from_addr="pool@example.org",
          email_timeout=5)
    yield recorder
    controller.stop()


def email_task(**data: Any) -> dict:
    fields = {"to": "alice@example.com", "subject": "Hello", "body": "Hi there.\n"}
    fields.update(data)
    return {"type": "email", "data": {k: v for k, v in fields.items() if v is not None}}


def parse(content: bytes) -> email.message.EmailMessage:
    # SMTP carries CRLF line ends; a mailbox stores LF.
    return email.message_from_bytes(content.replace(b"\r\n", b"\n"),
                                    policy=email.policy.default)


# --- email


def test_email_is_delivered_with_bcc_only_in_the_envelope(smtp: Recorder) -> None:
    run(email_task(to=["alice@example.com", "Bob <bob@example.com>"], cc="carol@example.com",
                   bcc=["dave@example.com"], reply_to="help@example.com",
                   subject="Rapport — été", body="Line one\nLine two\n"))

    [(mail_from, rcpt_tos, content)] = smtp.mails
    assert mail_from == "pool@example.org"
    assert sorted(rcpt_tos) == ["alice@example.com", "bob@example.com", "carol@example.com",
                                "dave@example.com"]
    message = parse(content)
    assert message["Subject"] == "Rapport — été"
    assert message["To"] == "alice@example.com, Bob <bob@example.com>"
    assert message["Cc"] == "carol@example.com"
    assert message["Reply-To"] == "help@example.com"
    assert message["From"] == "pool@example.org"
    assert message["Bcc"] is None and b"dave@" not in content
    assert message["Message-ID"] and message["Date"]
    assert message.get_content() == "Line one\nLine two\n"


def test_email_with_html_and_from_override(smtp: Recorder) -> None:
    run(email_task(html="<p>Hi <b>there</b></p>", **{"from": "News <news@example.net>"}))

    [(mail_from, _, content)] = smtp.mails
    assert mail_from == "news@example.net"
    message = parse(content)
    assert message["From"] == "News <news@example.net>"
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain.get_content() == "Hi there.\n"
    assert html.get_content().strip() == "<p>Hi <b>there</b></p>"


@pytest.mark.parametrize("field", ["to", "cc", "bcc", "subject", "from", "reply_to"])
@pytest.mark.parametrize("evil", ["x@example.com\r\nBcc: victim@example.com",
                                  "x@example.com\nX-Injected: 1", "x@example.com\u2028X: 1"])
def test_line_breaks_in_headers_are_rejected(smtp: Recorder, field: str, evil: str) -> None:
    with pytest.raises(TaskRejected, match=f"{field} contains a line break"):
        run(email_task(**{field: evil}))
    assert smtp.mails == []


@pytest.mark.parametrize(("data", "reason"), [
    ({"to": None}, "to is required"),
    ({"to": ""}, "to is required"),
    ({"to": []}, "to is required"),
    ({"to": 42}, "to must be a string or a list of strings"),
    ({"to": ["a@example.com", 7]}, "to must be a string or a list of strings"),
    ({"to": ["alice@example.com", "\r\n"]}, "to contains a line break"),
    ({"to": "not-an-address"}, "to holds an invalid address"),
    ({"cc": "alice@example.com, bob"}, "cc holds an invalid address"),
    ({"to": "@example.com"}, "to holds an invalid address"),
    ({"from": "a@example.com, b@example.com"}, "from must be a single address"),
    ({"subject": None}, "subject is required"),
    ({"subject": ["x"]}, "subject is required and must be a string"),
    ({"body": None}, "body is required"),
    ({"body": 3}, "body is required and must be a string"),
    ({"html": {"x": 1}}, "html is required and must be a string"),
])
def test_bad_email_fields_are_rejected(smtp: Recorder, data: dict, reason: str) -> None:
    with pytest.raises(TaskRejected, match=reason):
        run(email_task(**data))
    assert smtp.mails == []


@pytest.mark.parametrize("data", [None, "to=alice", ["alice@example.com"]])
@pytest.mark.parametrize("kind", ["email", "file_process"])
def test_data_must_be_an_object(data: Any, kind: str) -> None:
    setup(file_process_base_dir="/tmp")
    with pytest.raises(TaskRejected, match="data must be a JSON object"):
        run({"type": kind, "data": data})


def test_unreachable_server_is_a_retryable_failure() -> None:
    setup(email_host="127.0.0.1", email_port=free_port(), email_timeout=2)
    with pytest.raises(OSError) as caught:
        run(email_task())
    assert not isinstance(caught.value, TaskRejected)


def test_starttls_is_required_when_configured(smtp: Recorder) -> None:
    config = handlers._config()
    workerpool_setup(config.replace(email_starttls=True))
    # aiosmtpd without a TLS context offers no STARTTLS: a failure worth retrying, not sent.
    with pytest.raises(smtplib.SMTPNotSupportedError):
        run(email_task())
    assert smtp.mails == []


def test_permanent_refusal_of_every_recipient_is_rejected(smtp: Recorder) -> None:
    with pytest.raises(TaskRejected, match="550 5.1.1 no such user here"):
        run(email_task(to=["nobody@example.com", "nobody2@example.com"]))
    assert smtp.mails == []


def test_temporary_refusal_is_retried(smtp: Recorder) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        run(email_task(to=["busy@example.com", "nobody@example.com"]))
    assert not isinstance(caught.value, TaskRejected)
    assert smtp.mails == []


def test_partial_refusal_delivers_to_the_rest(smtp: Recorder,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="workerpool.handlers"):
        run(email_task(to=["alice@example.com", "nobody@example.com"]))
    [(_, rcpt_tos, _)] = smtp.mails
    assert rcpt_tos == ["alice@example.com"]
    assert "some recipients were refused: nobody@example.com: 550" in handler_log(caplog)


def handler_log(caplog: pytest.LogCaptureFixture) -> str:
    # Only our own lines: aiosmtpd's debug log shows the whole conversation.
    return "\n".join(record.getMessage() for record in caplog.records
                     if record.name.startswith("workerpool"))


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_login_and_secrets_stay_out_of_logs(caplog: pytest.LogCaptureFixture) -> None:
    # auth_required: a mail arriving proves that the handler logged in.
    controller, recorder = start_server(authenticator=authenticate, auth_require_tls=False,
                                        auth_required=True)
    try:
        setup(email_host="127.0.0.1", email_port=controller.port, email_username=USER,
              email_password=PASSWORD, email_timeout=5)
        with caplog.at_level(logging.DEBUG):
            run(email_task(body="the secret body text"))
        assert len(recorder.mails) == 1
        ours = handler_log(caplog)
        assert "email task: to=alice@example.com subject='Hello'" in ours
        assert PASSWORD not in ours and "secret body" not in ours

        setup(email_host="127.0.0.1", email_port=controller.port, email_username=USER,
              email_password="wrong", email_timeout=5)
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            run(email_task())
        assert not isinstance(caught.value, TaskRejected)
        assert len(recorder.mails) == 1
    finally:
        controller.stop()


# --- file_process


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """base/ with a few files, and outside/secret.txt next to it."""
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    (base / "report.csv").write_bytes(b"a,b\n1,2\n")
    (base / "sub" / "data.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 123))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(b"top secret\n")
    (base / "escape.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    (base / "escape_dir").symlink_to(tmp_path / "outside")
    setup(file_process_base_dir=base)
    return base


def file_task(path: Any, operation: str | None = None, **extra: Any) -> dict:
    data = {"path": path, **extra}
    if operation is not None:
        data["operation"] = operation
    return {"type": "file_process", "data": data}


def test_checksum_writes_a_sha256sum_line_beside_the_file(tree: Path) -> None:
    content = (tree / "sub" / "data.bin").read_bytes()
    run(file_task("sub/data.bin"))  # checksum is the default operation

    expected = hashlib.sha256(content).hexdigest()
    assert (tree / "sub" / "data.bin.sha256").read_text() == f"{expected}  data.bin\n"
    assert (tree / "sub" / "data.bin").read_bytes() == content


def test_checksum_into_output_dir_mirrors_subdirectories(tree: Path) -> None:
    setup(file_process_base_dir=tree, file_process_output_dir="results")
    run(file_task("sub/data.bin", "checksum"))
    run(file_task("report.csv", "checksum"))

    digest = hashlib.sha256((tree / "report.csv").read_bytes()).hexdigest()
    assert (tree / "results" / "report.csv.sha256").read_text() == f"{digest}  report.csv\n"
    assert (tree / "results" / "sub" / "data.bin.sha256").exists()
    assert not (tree / "report.csv.sha256").exists()


def test_gzip_keeps_the_original_and_leaves_no_temporary(tree: Path) -> None:
    original = (tree / "sub" / "data.bin").read_bytes()
    run(file_task("sub/data.bin", "gzip"))

    assert gzip.decompress((tree / "sub" / "data.bin.gz").read_bytes()) == original
    assert (tree / "sub" / "data.bin").read_bytes() == original
    assert sorted(p.name for p in (tree / "sub").iterdir()) == ["data.bin", "data.bin.gz"]


def test_move_creates_parents_and_refuses_to_overwrite(tree: Path) -> None:
    run(file_task("report.csv", "move", dest="archive/2024/report.csv"))
    assert not (tree / "report.csv").exists()
    assert (tree / "archive" / "2024" / "report.csv").read_bytes() == b"a,b\n1,2\n"

    (tree / "new.csv").write_bytes(b"new\n")
    with pytest.raises(TaskRejected, match="already exists"):
        run(file_task("new.csv", "move", dest="archive/2024/report.csv"))
    assert (tree / "new.csv").read_bytes() == b"new\n"
    assert (tree / "archive" / "2024" / "report.csv").read_bytes() == b"a,b\n1,2\n"


def test_move_copies_when_a_hard_link_is_impossible(tree: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hard_links(src: str, dst: str, **options: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    os.chmod(tree / "report.csv", 0o640)
    os.utime(tree / "report.csv", (1_600_000_000, 1_600_000_000))
    monkeypatch.setattr(files.os, "link", no_hard_links)
    run(file_task("report.csv", "move", dest="elsewhere/report.csv"))
    assert not (tree / "report.csv").exists()
    moved = tree / "elsewhere" / "report.csv"
    assert moved.read_bytes() == b"a,b\n1,2\n"
    assert (moved.stat().st_mode & 0o777, moved.stat().st_mtime) == (0o640, 1_600_000_000)
    assert os.listdir(tree / "elsewhere") == ["report.csv"]  # no temporary left


def visible_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def test_a_killed_copy_leaves_no_partial_dest_and_is_redone(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = (tree / "sub" / "data.bin").read_bytes()
    link = os.link

    def protected_hardlinks(src: str, dst: str, **options: Any) -> None:
        # As fs.protected_hardlinks does for a source owned by someone else; the handler's own
        # temporary files (".name.*.tmp") may be linked.
        if not os.path.basename(src).startswith("."):
            raise OSError(errno.EPERM, "Operation not permitted")
        link(src, dst, **options)

    monkeypatch.setattr(files.os, "link", protected_hardlinks)
    killed = 77
    pid = os.fork()
    if pid == 0:  # the worker, killed halfway through the copy (no cleanup runs)
        try:
            def copy_half_then_die(source: Any, out: Any, length: int = 0) -> None:
                out.write(source.read(len(content) // 2))
                out.flush()
                os._exit(killed)

            files.shutil.copyfileobj = copy_half_then_die  # type: ignore[assignment]
            run(file_task("sub/data.bin", "move", dest="archive/data.bin"))
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == killed
    assert not (tree / "archive" / "data.bin").exists()
    assert (tree / "sub" / "data.bin").read_bytes() == content

    run(file_task("sub/data.bin", "move", dest="archive/data.bin"))  # the redelivery
    assert (tree / "archive" / "data.bin").read_bytes() == content
    assert not (tree / "sub" / "data.bin").exists()
    assert visible_files(tree / "archive") == ["data.bin"]


@pytest.mark.parametrize(("dest_content", "done"), [
    (b"a,b\n1,2\n", True),  # an earlier delivery copied it, then died before the unlink
    (b"a,b\n1,3\n", False),  # the same size, another file: never lose either
])
def test_move_finishes_an_interrupted_copy(tree: Path, dest_content: bytes, done: bool) -> None:
    (tree / "moved.csv").write_bytes(dest_content)
    if done:
        run(file_task("report.csv", "move", dest="moved.csv"))
        assert not (tree / "report.csv").exists()
    else:
        with pytest.raises(TaskRejected, match="already exists"):
            run(file_task("report.csv", "move", dest="moved.csv"))
        assert (tree / "report.csv").read_bytes() == b"a,b\n1,2\n"
    assert (tree / "moved.csv").read_bytes() == dest_content


def test_move_to_itself_keeps_the_file(tree: Path) -> None:
    with pytest.raises(TaskRejected, match="already exists"):
        run(file_task("report.csv", "move", dest="sub/../report.csv"))
    assert (tree / "report.csv").read_bytes() == b"a,b\n1,2\n"


def test_move_finishes_an_interrupted_move(tree: Path) -> None:
    os.link(tree / "report.csv", tree / "moved.csv")  # a delivery that died after link()
    run(file_task("report.csv", "move", dest="moved.csv"))
    assert not (tree / "report.csv").exists()
    assert (tree / "moved.csv").read_bytes() == b"a,b\n1,2\n"


@pytest.mark.parametrize("operation", ["checksum", "gzip", "move"])
@pytest.mark.parametrize(("path", "reason"), [
    ("../outside/secret.txt", "outside base_dir"),
    ("sub/../../outside/secret.txt", "outside base_dir"),
    ("escape.txt", "outside base_dir"),
    ("escape_dir/secret.txt", "outside base_dir"),
    ("ABSOLUTE", "must be relative to base_dir"),
])
def test_paths_leaving_base_dir_are_rejected(tree: Path, operation: str, path: str,
                                             reason: str) -> None:
    secret = tree.parent / "outside" / "secret.txt"
    if path == "ABSOLUTE":
        path = str(secret)
    with pytest.raises(TaskRejected, match=reason):
        run(file_task(path, operation, dest="taken.txt"))
    assert secret.read_bytes() == b"top secret\n"
    assert sorted(p.name for p in secret.parent.iterdir()) == ["secret.txt"]
    assert not (tree / "taken.txt").exists()


@pytest.mark.parametrize("dest", ["../stolen.txt", "escape_dir/stolen.txt", "/tmp/stolen.txt"])
def test_move_dest_is_confined(tree: Path, dest: str) -> None:
    with pytest.raises(TaskRejected, match="dest"):
        run(file_task("report.csv", "move", dest=dest))
    assert (tree / "report.csv").exists()
    assert not (tree.parent / "stolen.txt").exists()
    assert not (tree.parent / "outside" / "stolen.txt").exists()


@pytest.mark.parametrize(("data", "reason"), [
    ({"path": "missing.txt"}, "no such file 'missing.txt'"),
    ({"path": "report.csv/x"}, "no such file"),
    ({"path": "sub"}, "is a directory"),
    ({"path": ""}, "path must be a non-empty string"),
    ({"path": 12}, "path must be a non-empty string"),
    ({}, "path must be a non-empty string"),
    ({"path": "report.csv", "operation": "delete"}, "unknown operation 'delete'"),
    ({"path": "report.csv", "operation": "move"}, "dest must be a non-empty string"),
])
def test_bad_file_tasks_are_rejected(tree: Path, data: dict, reason: str) -> None:
    with pytest.raises(TaskRejected, match=reason):
        run({"type": "file_process", "data": data})
    assert (tree / "report.csv").read_bytes() == b"a,b\n1,2\n"


def all_entries(top: Path) -> list[str]:
    """Every name under top, not following symlinks."""
    return sorted(os.path.relpath(os.path.join(directory, name), top)
                  for directory, dirs, files in os.walk(top) for name in dirs + files)


def swap_in(tree: Path, what: str) -> None:
    """What a hostile user of base_dir does between the handler's check and its use."""
    outside = tree.parent / "outside"
    if what == "parent symlink":
        (tree / "box").rename(tree / "box.old")
        (tree / "box").symlink_to(outside, target_is_directory=True)
    else:
        (tree / "box" / "secret.txt").rename(tree / "box" / "secret.old")
        if what == "symlink":
            (tree / "box" / "secret.txt").symlink_to(outside / "secret.txt")
        else:
            os.mkfifo(tree / "box" / "secret.txt")


@pytest.mark.parametrize("operation", ["checksum", "gzip", "move"])
@pytest.mark.parametrize(("what", "reason"), [
    ("parent symlink", "outside base_dir"),
    ("symlink", "became a symlink"),
    ("fifo", "not a regular file"),
])
def test_a_path_changed_after_its_check_is_not_followed(
        tree: Path, monkeypatch: pytest.MonkeyPatch, operation: str, what: str,
        reason: str) -> None:
    (tree / "box").mkdir()
    (tree / "box" / "secret.txt").write_bytes(b"harmless\n")
    confine = files._confine

    def check_then_swap(base: str, value: Any, field: str) -> str:
        real = confine(base, value, field)
        if field == "path":  # the attacker wins the race, deterministically
            swap_in(tree, what)
        return real

    monkeypatch.setattr(files, "_confine", check_then_swap)
    before = all_entries(tree.parent / "outside")

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError("the handler blocked")

    # Called directly (no thread): the alarm interrupts an open() that would block.
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(TaskRejected, match=reason):
            files._run_file_operation(handlers._config(), operation,
                                      {"path": "box/secret.txt", "dest": "taken.txt"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    secret = tree.parent / "outside" / "secret.txt"
    assert all_entries(tree.parent / "outside") == before
    assert secret.read_bytes() == b"top secret\n" and secret.stat().st_nlink == 1
    assert not os.path.lexists(tree / "taken.txt")
    results = [name for name in all_entries(tree) if name.endswith((".sha256", ".gz"))]
    assert results == []


def test_move_rejects_a_source_swapped_for_a_symlink_before_the_link(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tree.parent / "outside" / "secret.txt"
    link = os.link

    def swap_then_link(src: str, dst: str, **options: Any) -> None:
        (tree / "report.csv").rename(tree / "report.old")
        (tree / "report.csv").symlink_to(secret)
        link(src, dst, **options)

    monkeypatch.setattr(files.os, "link", swap_then_link)
    with pytest.raises(TaskRejected, match="'report.csv' was replaced while being moved"):
        run(file_task("report.csv", "move", dest="moved.csv"))
    assert not os.path.lexists(tree / "moved.csv")
    assert (tree / "report.csv").is_symlink()  # not ours to remove
    assert (tree / "report.old").read_bytes() == b"a,b\n1,2\n"
    assert secret.read_bytes() == b"top secret\n" and secret.stat().st_nlink == 1


def test_move_through_a_parent_swapped_before_the_link_moves_the_checked_file(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tree.parent / "outside" / "secret.txt"
    (tree / "box").mkdir()
    (tree / "box" / "secret.txt").write_bytes(b"harmless\n")
    link = os.link

    def swap_then_link(src: str, dst: str, **options: Any) -> None:
        swap_in(tree, "parent symlink")
        link(src, dst, **options)

    monkeypatch.setattr(files.os, "link", swap_then_link)
    run(file_task("box/secret.txt", "move", dest="moved.txt"))
    assert (tree / "moved.txt").read_bytes() == b"harmless\n"
    assert not (tree / "box.old" / "secret.txt").exists()
    assert secret.read_bytes() == b"top secret\n" and secret.stat().st_nlink == 1


def test_untrusted_paths_are_logged_quoted(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tree / "a\nb.csv").write_bytes(b"x\n")
    forged = "x.csv\n2024-01-01 00:00:00 INFO worker 1: forged line"
    with caplog.at_level(logging.INFO, logger="workerpool.handlers"):
        with pytest.raises(TaskRejected):
            run(file_task(forged))
        run(file_task("a\nb.csv", "gzip"))
        run(file_task("a\nb.csv", "checksum"))
        run(file_task("a\nb.csv", "move", dest="c\nd.csv"))
    ours = handler_log(caplog)
    assert all("\n" not in record.getMessage() for record in caplog.records)
    assert repr(forged) in ours


def test_fifo_is_rejected_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    with pytest.raises(TaskRejected, match="not a regular file"):
        run(file_task("pipe", "checksum"))


def test_file_process_is_disabled_without_base_dir(tmp_path: Path) -> None:
    setup()
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(TaskRejected, match=r"file_process is disabled: set \[file_process\]"):
        run(file_task(str(tmp_path / "a.txt")))
    assert not (tmp_path / "a.txt.sha256").exists()


def test_missing_base_dir_is_retryable(tmp_path: Path) -> None:
    setup(file_process_base_dir=tmp_path / "not-mounted")
    with pytest.raises(FileNotFoundError):
        run(file_task("a.txt"))


# --- other types


def test_unknown_type_is_acknowledged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    setup()
    with caplog.at_level(logging.INFO, logger="workerpool.handlers"):
        assert asyncio.run(async_handle({"type": "sms", "data": {"n": 1}})) is None
    assert "task of unknown type 'sms' acknowledged: {'n': 1}" in handler_log(caplog)


def test_unknown_type_nested_too_deep_to_show_is_still_acknowledged(
        caplog: pytest.LogCaptureFixture) -> None:
    setup()
    data: list = []
    for _ in range(100_000):  # deeper than repr() can go, as orjson may decode ~1000 levels
        data = [data]
    with caplog.at_level(logging.INFO, logger="workerpool.handlers"):
        assert asyncio.run(async_handle({"type": "sms", "data": data})) is None
    assert "acknowledged: <data nested too deeply to show>" in handler_log(caplog)


def test_unknown_type_is_rejected_when_configured_dead() -> None:
    setup(unknown_types="dead")
    with pytest.raises(TaskRejected, match="unknown task type 'sms'"):
        run({"type": "sms", "data": {}})


def test_defaults_are_loaded_lazily_without_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("WORKERPOOL_")]:
        monkeypatch.delenv(name)
    with pytest.raises(TaskRejected, match="file_process is disabled"):
        run(file_task("a.txt"))
    assert handlers._settings is not None
    assert handlers._settings.unknown_types == "ack"
    run({"type": "sms", "data": {}})  # acknowledged: no exception
