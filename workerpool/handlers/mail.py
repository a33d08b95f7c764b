"""The `email` task type: a message built from the task data, sent via the [email] server."""

from __future__ import annotations

import asyncio
import functools
import logging
import smtplib
import ssl
import unicodedata
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from typing import Any

from workerpool.config import Config
from workerpool.errors import TaskRejected

# The package's logger: records keep the name they had before the split.
log = logging.getLogger("workerpool.handlers")


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


async def send_email(config: Config, data: dict) -> None:
    """Send the message an email task describes, over SMTP as [email] says."""
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
