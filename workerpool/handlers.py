"""The built-in default handler: the seed's task types `email` and `file_process`.

The worker calls `workerpool_setup(config)` once per process; tasks then use the [email] and
[file_process] settings. Bad input raises TaskRejected (dead-lettered at once); anything else
that goes wrong (SMTP server down, disk full) propagates and the worker retries the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gzip
import hashlib
import logging
import os
import shutil
import smtplib
import ssl
import stat
import tempfile
import unicodedata
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from typing import Any, BinaryIO

from workerpool.config import Config, load_config
from workerpool.errors import TaskRejected

log = logging.getLogger("workerpool.handlers")

CHUNK = 1024 * 1024
# link() fails with these where a copy still works: across mounts, on filesystems without
# hard links, or under fs.protected_hardlinks.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}

_settings: Config | None = None


def workerpool_setup(config: Config) -> None:
    """Keep the validated config for this worker process's tasks."""
    global _settings
    _settings = config


def _config() -> Config:
    global _settings
    if _settings is None:  # called without a worker (tests, scripts): plain defaults
        _settings = load_config(None, search=False)
    return _settings


async def async_handle(task: dict) -> None:
    """Run one decoded task according to its type."""
    if not isinstance(task, dict):
        raise TaskRejected("a task must be a JSON object")
    config = _config()
    kind = task.get("type")
    if kind == "email":
        await _email(config, _data(task, kind))
    elif kind == "file_process":
        await _file_process(config, _data(task, kind))
    elif config.unknown_types == "dead":
        raise TaskRejected(f"unknown task type {kind!r}")
    else:
        data = repr(task.get("data"))
        log.info("task of unknown type %r acknowledged: %s", kind,
                 data if len(data) <= 200 else data[:197] + "...")


def _data(task: dict, kind: str) -> dict:
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskRejected(f"{kind} task: data must be a JSON object, not {type(data).__name__}")
    return data


# --- email


def _header(field: str, value: str) -> str:
    # Unicode line separators count too: some parsers and folding code split on them.
    for char in value:
        if char in "\r\n" or (char != "\t" and unicodedata.category(char) in ("Cc", "Zl", "Zp")):
            raise TaskRejected(f"email task: {field} contains a line break or control character")
    return value


def _text(data: dict, field: str, *, required: bool = True) -> str | None:
    value = data.get(field)
    if not isinstance(value, str) and (required or value is not None):
        raise TaskRejected(f"email task: {field} is required and must be a string")
    return value


def _addresses(field: str, value: Any, *, required: bool = False) -> tuple[str, list[str]]:
    """The header text and the bare addresses of a string or list-of-strings field."""
    items = [value] if isinstance(value, str) else value
    if items is None:
        items = []
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TaskRejected(f"email task: {field} must be a string or a list of strings")
    items = [_header(field, item).strip() for item in items]
    items = [item for item in items if item]
    if required and not items:
        raise TaskRejected(f"email task: {field} is required")
    bare = [address for _, address in getaddresses(items)]
    for address in bare:
        local, _, domain = address.rpartition("@")
        if not local or not domain or any(char.isspace() for char in address):
            raise TaskRejected(f"email task: {field} holds an invalid address {address!r}")
    return ", ".join(items), bare


def _build_email(config: Config, data: dict) -> tuple[EmailMessage, str, list[str]]:
    to_header, to = _addresses("to", data.get("to"), required=True)
    cc_header, cc = _addresses("cc", data.get("cc"))
    _, bcc = _addresses("bcc", data.get("bcc"))
    reply_header, _ = _addresses("reply_to", data.get("reply_to"))
    from_header, sender = _addresses("from", data.get("from") or config.email_from_addr,
                                     required=True)
    if len(sender) != 1:
        raise TaskRejected("email task: from must be a single address")
    subject = _header("subject", _text(data, "subject"))
    body = _text(data, "body")
    html = _text(data, "html", required=False)
    try:
        message = EmailMessage()
        message["From"] = from_header
        message["To"] = to_header
        if cc:
            message["Cc"] = cc_header
        if reply_header:
            message["Reply-To"] = reply_header
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain=sender[0].rpartition("@")[2])
        message.set_content(body)
        if html is not None:
            message.add_alternative(html, subtype="html")
    except Exception as exc:  # building is deterministic: a retry would fail the same way
        raise TaskRejected(f"email task: cannot build the message: {exc}") from exc
    # Bcc recipients are only in the envelope, never in a header.
    return message, sender[0], list(dict.fromkeys(to + cc + bcc))


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _send(config: Config, message: EmailMessage, sender: str, recipients: list[str]) -> dict:
    """Deliver through the configured server; the recipients it refused (others got it)."""
    if config.email_ssl:
        connect: Callable[..., smtplib.SMTP] = functools.partial(smtplib.SMTP_SSL,
                                                                 context=_tls_context())
    else:
        connect = smtplib.SMTP
    with connect(config.email_host, config.email_port, timeout=config.email_timeout) as client:
        if config.email_starttls and not config.email_ssl:
            client.starttls(context=_tls_context())
        if config.email_username:
            client.login(config.email_username, config.email_password)
        return client.send_message(message, sender, recipients)


def _smtp_reason(refused: dict) -> str:
    return "; ".join(f"{address}: {code} {reply.decode('utf-8', 'replace')}"
                     for address, (code, reply) in refused.items())


async def _email(config: Config, data: dict) -> None:
    message, sender, recipients = _build_email(config, data)
    log.info("email task: to=%s subject=%r", message["To"], str(message["Subject"]))
    try:
        refused = await asyncio.to_thread(_send, config, message, sender, recipients)
    except smtplib.SMTPRecipientsRefused as exc:
        # Only a permanent refusal of everyone is final; any 4xx may pass on a later try.
        if exc.recipients and all(code >= 500 for code, _ in exc.recipients.values()):
            raise TaskRejected(f"email task: every recipient refused: "
                               f"{_smtp_reason(exc.recipients)}") from None
        raise
    if refused:
        # Retrying would mail the accepted recipients twice: report and move on.
        log.warning("email sent, but some recipients were refused: %s", _smtp_reason(refused))


# --- file_process


def _base_dir(config: Config) -> str:
    base = os.path.realpath(config.file_process_base_dir)
    if not os.path.isdir(base):
        # An unmounted volume may come back: retry rather than dead-letter.
        raise FileNotFoundError(errno.ENOENT, "[file_process] base_dir is not a directory", base)
    return base


def _confine(base: str, value: Any, field: str) -> str:
    """The real path of `value` (relative to base), rejected unless it stays inside base."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise TaskRejected(f"file_process task: {field} must be a non-empty string")
    if os.path.isabs(value):
        raise TaskRejected(f"file_process task: {field} {value!r} must be relative to base_dir")
    real = os.path.realpath(os.path.join(base, value))
    if os.path.commonpath([base, real]) != base:
        raise TaskRejected(f"file_process task: {field} {value!r} is outside base_dir")
    return real


def _source(base: str, data: dict) -> tuple[str, os.stat_result]:
    path = data.get("path")
    real = _confine(base, path, "path")
    try:
        info = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise TaskRejected(f"file_process task: no such file {path!r} under base_dir") from None
    if stat.S_ISDIR(info.st_mode):
        raise TaskRejected(f"file_process task: {path!r} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise TaskRejected(f"file_process task: {path!r} is not a regular file")
    return real, info


def _open_source(real: str) -> BinaryIO:
    # realpath() checked the path; O_NOFOLLOW stops a symlink swapped in since then.
    return open(real, "rb", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW))


def _output_path(config: Config, base: str, real: str, suffix: str) -> str:
    """Where the result of `real` goes: beside it, or mirrored under output_dir."""
    setting = config.file_process_output_dir
    if not setting:
        return real + suffix
    out = os.path.realpath(os.path.join(base, setting))
    # A relative output_dir lives in base_dir; an absolute one is the operator's own choice.
    root = out if os.path.isabs(setting) else base
    if os.path.commonpath([root, out]) != root:
        raise TaskRejected(f"[file_process] output_dir {setting!r} is outside base_dir")
    target = os.path.join(out, os.path.relpath(real, base) + suffix)
    # realpath() resolves the existing part: a symlinked subdirectory cannot lead out.
    if os.path.commonpath([out, os.path.realpath(os.path.dirname(target))]) != out:
        raise TaskRejected(f"file_process task: output {target!r} is outside output_dir")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    return target


def _write_atomic(target: str, mode: int, write: Callable[[BinaryIO], Any]) -> None:
    """Write `target` through a temporary file, so readers never see half a result."""
    directory, name = os.path.split(target)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, stat.S_IMODE(mode) & 0o666)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _sha256sum_line(digest: str, name: str) -> bytes:
    """One line in `sha256sum` format, escaping names the way coreutils does."""
    raw = os.fsencode(name)
    if any(byte in raw for byte in b"\\\n\r"):
        raw = raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\" + digest.encode() + b"  " + raw + b"\n"
    return digest.encode() + b"  " + raw + b"\n"


def _checksum(config: Config, base: str, data: dict) -> None:
    real, info = _source(base, data)
    digest = hashlib.sha256()
    with _open_source(real) as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    target = _output_path(config, base, real, ".sha256")
    line = _sha256sum_line(digest.hexdigest(), os.path.basename(real))
    _write_atomic(target, info.st_mode, lambda out: out.write(line))
    log.info("sha256 %s  %s", digest.hexdigest(), data["path"])


def _gzip(config: Config, base: str, data: dict) -> None:
    real, info = _source(base, data)
    target = _output_path(config, base, real, ".gz")

    def write(out: BinaryIO) -> None:
        with _open_source(real) as source, gzip.GzipFile(
            os.path.basename(real), "wb", fileobj=out, mtime=int(info.st_mtime)
        ) as compressed:
            shutil.copyfileobj(source, compressed, CHUNK)

    _write_atomic(target, info.st_mode, write)
    log.info("gzipped %s to %s", data["path"], target)


def _move(config: Config, base: str, data: dict) -> None:
    real, _ = _source(base, data)
    dest = _confine(base, data.get("dest"), "dest")
    if dest != real and os.path.isfile(dest) and os.path.samefile(real, dest):
        # An earlier delivery linked dest, then died before removing the source: finish it.
        os.unlink(real)
        return
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _link_or_copy(real, dest)
    except (FileExistsError, NotADirectoryError):
        raise TaskRejected(f"file_process task: dest {data['dest']!r} already exists "
                           "(or a file is in its way)") from None
    os.unlink(real)
    log.info("moved %s to %s", data["path"], data["dest"])


def _link_or_copy(real: str, dest: str) -> None:
    """Make dest hold real's content; unlike rename(), never replace an existing dest."""
    try:
        os.link(real, dest)
        return
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in _NO_LINK:
            raise
    with _open_source(real) as source, open(dest, "xb") as out:
        try:
            shutil.copyfileobj(source, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            os.unlink(dest)
            raise
    shutil.copystat(real, dest)


OPERATIONS: dict[str, Callable[[Config, str, dict], None]] = {
    "checksum": _checksum, "gzip": _gzip, "move": _move,
}


def _run_file_operation(config: Config, operation: str, data: dict) -> None:
    OPERATIONS[operation](config, _base_dir(config), data)


async def _file_process(config: Config, data: dict) -> None:
    operation = data.get("operation", "checksum")
    log.info("file_process task: %s %s", operation, data.get("path"))
    if not config.file_process_base_dir:
        raise TaskRejected("file_process is disabled: set [file_process] base_dir")
    if not isinstance(operation, str) or operation not in OPERATIONS:
        raise TaskRejected(f"file_process task: unknown operation {operation!r}; expected one "
                           f"of {', '.join(OPERATIONS)}")
    # Even realpath() may block (a hung network mount): all file work runs in a thread.
    await asyncio.to_thread(_run_file_operation, config, operation, data)
