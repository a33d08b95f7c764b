"""Configuration: INI file, WORKERPOOL_* environment, command line; validated once, at start.

Precedence is command line > environment > file > defaults. Every bad value raises
ConfigError with one line naming where it came from (file and section, or the environment
variable, or the option), the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import importlib
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any
from urllib.parse import parse_qsl, urlsplit

DEFAULT_SEARCH_PATH = ("./workerpool.ini", "/etc/workerpool/workerpool.ini")
ENV_PREFIX = "WORKERPOOL_"


class ConfigError(Exception):
    """A configuration value is missing, unknown or invalid (exit code 2)."""


# --- value parsers: each takes the raw string and returns the value or raises ValueError
# with the "what is allowed" half of the message.


_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    allowed = f"expected a whole number >= {minimum}"
    if maximum is not None:
        allowed = f"expected a whole number from {minimum} to {maximum}"

    def parse(raw: str) -> int:
        text = raw.strip()
        # int() alone would also take "_1", "1__0" and non-ASCII digits.
        if not _INT_TEXT.fullmatch(text):
            raise ValueError(allowed)
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(allowed)
        return value

    return parse


def _float(minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    allowed = f"expected a number {'>' if strict else '>='} {minimum:g}"

    def parse(raw: str) -> float:
        text = raw.strip()
        # float() alone would also take "nan", "inf", "1_0" and non-ASCII digits.
        if not _FLOAT_TEXT.fullmatch(text):
            raise ValueError(allowed)
        value = float(text)
        if value < minimum or (strict and value == minimum):
            raise ValueError(allowed)
        return value

    return parse


_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of yes/no, true/false, on/off, 1/0")


def _str(raw: str) -> str:
    return raw.strip()


def _nonempty(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("expected a non-empty value")
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse


def _log_level(raw: str) -> str:
    return _choice("debug", "info", "warning", "error", "critical")(raw).upper()


def _redis_url(raw: str) -> str:
    value = raw.strip()
    if value == "embedded":
        return value
    allowed = "expected redis://[user:password@]host[:port][/db], rediss://..., unix:///path"
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(allowed) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(allowed)
    # redis-py lets options in the query win over the pool's own settings (a socket_timeout
    # below interval breaks every blocking take; a password would beat password_file).
    query = parse_qsl(parts.query, keep_blank_values=True)
    for name, option_value in query:
        if name != "db":
            # The name is not quoted: an unencoded "?" in a password puts the rest of it here.
            raise ValueError(allowed + " (the only query option taken is ?db=N; a password "
                             "holding / ? # @ or % must be percent-encoded)")
        if not option_value.isdigit():
            raise ValueError(allowed + " (db must be a number)")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(allowed)
        return value
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(allowed + " (bad port)") from None
    if not parts.hostname:
        raise ValueError(allowed)
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(allowed + " (db must be a number)")
    return value


def _email_address(raw: str) -> str:
    value = raw.strip()
    _, address = parseaddr(value)
    if "@" not in address or any(ord(ch) < 32 or ch == "\x7f" for ch in value):
        raise ValueError("expected an e-mail address, e.g. workerpool@example.com "
                         "or Name <workerpool@example.com>")
    return value


def _host_id(raw: str) -> str:
    value = raw.strip()
    # host_id is a segment of processing-list keys, matched with glob patterns: a ':' would let
    # host "web" claim host "web:2"'s lists, glob characters would match other hosts'.
    if any(ch.isspace() or ch in ":*?[]\\{}" for ch in value):
        raise ValueError("expected a name without spaces and without any of : * ? [ ] \\ { }")
    return value


def _handler_spec(raw: str) -> str:
    value = raw.strip()
    module, sep, function = value.partition(":")
    if not sep or not module or not function or not all(
        part.isidentifier() for part in module.split(".") + function.split(".")
    ):
        raise ValueError("expected package.module:function")
    return value


def _host_list(raw: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port, host:port, ...")
        hosts.append((host.strip("[]"), int(port)))
    return tuple(hosts)


def _redis_key(raw: str) -> str:
    value = raw.strip()
    if not value or any(ch.isspace() for ch in value):
        raise ValueError("expected a non-empty key without spaces")
    start = value.find("{")
    end = value.find("}", start + 1) if start != -1 else -1
    if "}" in value and not (start != -1 and end > start + 1):
        # Without a non-empty {tag}, the queue's other keys ({Q}:retry, ...) would hash
        # to another cluster slot than Q itself.
        raise ValueError("expected a key whose '}' closes a non-empty {hash tag}, e.g. {jobs}")
    return value


@dataclass(frozen=True)
class Option:
    section: str
    name: str
    parse: Callable[[str], Any]
    default: Any
    attr: str = ""

    @property
    def env_name(self) -> str:
        prefix = "" if self.section == "workerpool" else self.section.upper() + "_"
        return ENV_PREFIX + prefix + self.name.upper()


def _o(section: str, name: str, parse: Callable[[str], Any], default: Any) -> Option:
    attr = name if section == "workerpool" else f"{section}_{name}"
    return Option(section, name, parse, default, attr)


OPTIONS: tuple[Option, ...] = (
    # --- the queue and Redis
    _o("workerpool", "redis_url", _redis_url, "redis://127.0.0.1:6379/0"),
    _o("workerpool", "redis_key", _redis_key, "async_tasks"),
    _o("workerpool", "redis_mode", _choice("standalone", "sentinel", "cluster"), "standalone"),
    _o("workerpool", "password_file", _str, ""),
    _o("workerpool", "sentinels", _host_list, ()),
    _o("workerpool", "sentinel_master", _str, "mymaster"),
    _o("workerpool", "sentinel_username", _str, ""),
    _o("workerpool", "sentinel_password", _str, ""),
    _o("workerpool", "ssl_ca_certs", _str, ""),
    _o("workerpool", "ssl_certfile", _str, ""),
    _o("workerpool", "ssl_keyfile", _str, ""),
    _o("workerpool", "ssl_cert_reqs", _choice("required", "optional", "none"), "required"),
    # --- the seed's knobs
    _o("workerpool", "interval", _float(0.0, strict=True), 1.0),
    _o("workerpool", "max_tasks", _int(0), 0),
    # --- processes and concurrency
    _o("workerpool", "workers", _int(1), 2),
    _o("workerpool", "concurrency", _int(1), 10),
    _o("workerpool", "handler", _handler_spec, "workerpool.handlers:async_handle"),
    _o("workerpool", "task_timeout", _float(0.0), 300.0),
    _o("workerpool", "max_retries", _int(0), 3),
    _o("workerpool", "retry_backoff", _float(0.0), 2.0),
    _o("workerpool", "max_deliveries", _int(1), 3),
    _o("workerpool", "max_payload_bytes", _int(1), 1048576),
    _o("workerpool", "unknown_types", _choice("ack", "dead"), "ack"),
    _o("workerpool", "drain_timeout", _float(0.0), 30.0),
    _o("workerpool", "worker_timeout", _float(0.0, strict=True), 30.0),
    _o("workerpool", "crash_limit", _int(1), 10),
    _o("workerpool", "crash_window", _float(0.0, strict=True), 60.0),
    _o("workerpool", "max_tasks_per_worker", _int(0), 0),
    _o("workerpool", "max_memory_per_worker", _int(0), 0),
    _o("workerpool", "host_id", _host_id, ""),
    _o("workerpool", "host_timeout", _float(0.0, strict=True), 30.0),
    # --- daemon
    _o("workerpool", "pidfile", _str, ""),
    _o("workerpool", "log_file", _str, ""),
    _o("workerpool", "log_level", _log_level, "INFO"),
    _o("workerpool", "user", _str, ""),
    _o("workerpool", "group", _str, ""),
    _o("workerpool", "run_dir", _str, ""),
    _o("workerpool", "state_dir", _str, ""),
    # --- built-in handlers
    _o("email", "host", _nonempty, "localhost"),
    _o("email", "port", _int(1, 65535), 25),
    _o("email", "username", _str, ""),
    _o("email", "password", _str, ""),
    _o("email", "from_addr", _email_address, "workerpool@localhost"),
    _o("email", "starttls", _bool, False),
    _o("email", "ssl", _bool, False),
    _o("email", "timeout", _float(0.0, strict=True), 30.0),
    _o("file_process", "base_dir", _str, ""),
    _o("file_process", "output_dir", _str, ""),
    # --- metrics
    _o("metrics", "port", _int(0, 65535), 0),
    _o("metrics", "bind", _nonempty, "127.0.0.1"),
)

SECTIONS = tuple(dict.fromkeys(option.section for option in OPTIONS))
_BY_KEY = {(option.section, option.name): option for option in OPTIONS}
_BY_ATTR = {option.attr: option for option in OPTIONS}


def _config_fields() -> list[tuple[str, Any, Any]]:
    fields_ = []
    for option in OPTIONS:
        default = option.default
        fields_.append((option.attr, Any, field(default=default)))
    fields_.append(("source", str, field(default="defaults")))
    fields_.append(("origins", dict, field(default_factory=dict, compare=False, repr=False)))
    return fields_


_ConfigBase = dataclasses.make_dataclass("_ConfigBase", _config_fields(), frozen=True)


class Config(_ConfigBase):  # type: ignore[misc, valid-type]
    """The validated settings; attribute names are the INI keys ([email] host -> email_host)."""

    def replace(self, **changes: Any) -> Config:
        """Return a copy with some settings changed (values already parsed)."""
        return dataclasses.replace(self, **changes)

    @property
    def hash_tag(self) -> str:
        """The Redis Cluster hash tag of the queue key (DESIGN.md, 'Redis keys')."""
        key = self.redis_key
        start = key.find("{")
        if start != -1:
            end = key.find("}", start + 1)
            if end > start + 1:
                return key[start + 1 : end]
        return key

    @property
    def host_name(self) -> str:
        """The host_id used in Redis keys; defaults to the machine's hostname."""
        return self.host_id or socket.gethostname()

    @property
    def redis_password(self) -> str | None:
        """The Redis password from $WORKERPOOL_REDIS_PASSWORD or password_file, if any."""
        password = os.environ.get(ENV_PREFIX + "REDIS_PASSWORD")
        if password:
            return password
        if self.password_file:
            try:
                with open(self.password_file, encoding="utf-8") as handle:
                    return handle.read().strip() or None
            except OSError as exc:
                raise ConfigError(
                    f"{self.origins.get('password_file', self.source)}: password_file = "
                    f"{self.password_file!r}: cannot read it ({exc.strerror})"
                ) from None
        return None

    def describe(self, attr: str) -> str:
        """Where a setting's value came from, for messages."""
        return self.origins.get(attr, "defaults")


def default_run_dir(run_dir: str = "") -> str:
    """The directory for runtime files: run_dir if set, systemd's $RUNTIME_DIRECTORY,
    /run/workerpool for root, else $XDG_RUNTIME_DIR/workerpool or /tmp/workerpool-<uid>."""
    chosen = run_dir or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if chosen:
        return chosen
    if os.geteuid() == 0:
        return "/run/workerpool"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "workerpool") if xdg else f"/tmp/workerpool-{os.geteuid()}"


def mask_url(url: str) -> str:
    """Hide the password in a Redis URL, for logs, titles and status."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unparsable (bad IPv6 brackets): hide the whole userinfo
        head, at, tail = url.rpartition("@")
        return head.partition("//")[0] + "//***@" + tail if at else url
    # Edited in the raw text: parsed parts would re-quote the user, lowercase the host, raise on
    # a bad port or drop the // of unix:///path. redis-py also takes ?password= from the query.
    params = parts.query.split("&")
    masked = [
        p.partition("=")[0] + "=***" if p.lower().startswith("password=") else p for p in params
    ]
    if masked != params:
        start = url.index("?") + 1
        url = url[:start] + "&".join(masked) + url[start + len(parts.query) :]
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.partition(":")[0] + ":***@" + hostport
        return url.replace("//" + parts.netloc, "//" + netloc, 1)
    # A password holding "/", "?" or "#" unquoted ends the netloc early: urlsplit then sees no
    # userinfo at all. Hide everything from the user's ":" to the last "@".
    scheme, slashes, rest = url.partition("//")
    head, at, tail = rest.rpartition("@")
    if slashes and at and ":" in head:
        return scheme + slashes + head.partition(":")[0] + ":***@" + tail
    return url


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """The config file to read: --config, then $WORKERPOOL_CONFIG, then the default paths."""
    if explicit:
        return explicit
    from_env = environ.get(ENV_PREFIX + "CONFIG")
    if from_env:
        return from_env
    for candidate in DEFAULT_SEARCH_PATH:
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_file(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        default_section="__no_defaults__",
    )
    parser.optionxform = str.lower  # type: ignore[assignment, method-assign]
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            f"{path}, line {exc.lineno}: cannot parse {exc.line.strip()!r}: "
            "expected a [section] header first"
        ) from None
    except configparser.ParsingError as exc:
        lineno, line = exc.errors[0]
        try:  # configparser stores the line as its repr
            line = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            pass
        raise ConfigError(
            f"{path}, line {lineno}: cannot parse {line.strip()!r}: "
            "expected [section], key = value or a # comment"
        ) from None
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: cannot parse: {first_line}") from None
    return parser


def _single_line(raw: str) -> str:
    if "\n" in raw.strip() or "\r" in raw:
        # configparser joins an indented line to the value above it.
        raise ValueError("expected a single line (an indented line continues the value above; "
                         "remove the indentation of the next key)")
    return raw


def _parse(option: Option, raw: str, where: str) -> Any:
    if option.name == "sentinels":  # a list: one host:port per line is as good as commas
        raw = raw.replace("\n", ",")
    try:
        return option.parse(_single_line(raw))
    except ValueError as exc:
        shown = mask_url(raw) if option.name == "redis_url" else raw  # never print a password
        raise ConfigError(f"{where} {option.name} = {shown!r}: {exc}") from None


def _setting_text(attr: str, raw: Any) -> str:
    """A settings value as the text an INI file would hold."""
    if isinstance(raw, bool):
        return str(raw).lower()
    if attr == "sentinels" and not isinstance(raw, str):
        # [("h", 26379), ...] or ["h:26379", ...]; anything else fails the parser's check.
        return ", ".join(item if isinstance(item, str) else ":".join(map(str, item))
                         for item in raw)
    return str(raw)


def load_config(
    path: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    search: bool = True,
    settings: Mapping[str, Any] | None = None,
    settings_name: str = "settings",
) -> Config:
    """Build the Config from file, environment and command-line overrides.

    `overrides` maps attribute names to raw strings (or already-typed values) from the command
    line; None values are ignored. With search=False only an explicit path is read.
    `settings` (e.g. Django's settings.WORKERPOOL) sits between the file and the environment.
    """
    environ = os.environ if environ is None else environ
    file_path = find_config_file(path, environ) if search else path
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}

    if file_path:
        parser = _read_file(file_path)
        for section in parser.sections():
            if section not in SECTIONS:
                raise ConfigError(
                    f"{file_path}: unknown section [{section}]: allowed sections are "
                    + ", ".join(f"[{name}]" for name in SECTIONS)
                )
            for name, raw in parser.items(section):
                option = _BY_KEY.get((section, name))
                if option is None:
                    allowed = ", ".join(o.name for o in OPTIONS if o.section == section)
                    raise ConfigError(
                        f"{file_path} [{section}] {name}: unknown key; allowed keys: {allowed}"
                    )
                where = f"{file_path} [{section}]"
                values[option.attr] = _parse(option, raw, where)
                origins[option.attr] = where

    for attr, raw in (settings or {}).items():
        option = _BY_ATTR.get(attr)
        if option is None:
            raise ConfigError(f"{settings_name}: unknown key {attr!r}; allowed keys: "
                              + ", ".join(sorted(_BY_ATTR)))
        if raw is None:
            continue
        text = _setting_text(attr, raw)
        values[attr] = _parse(option, text, f"{settings_name}[{attr!r}]:")
        origins[attr] = settings_name

    for option in OPTIONS:
        raw = environ.get(option.env_name)
        if raw is not None:
            where = f"environment {option.env_name}:"
            values[option.attr] = _parse(option, raw, where)
            origins[option.attr] = f"environment {option.env_name}"

    for attr, raw in (overrides or {}).items():
        if raw is None:
            continue
        option = _BY_ATTR.get(attr)
        if option is None:
            raise ConfigError(f"unknown setting {attr!r}")
        flag = "--" + option.name.replace("_", "-")
        if isinstance(raw, (bool, int, float)):
            raw = str(raw)  # typed values from argparse get the same checks as strings
        value = _parse(option, raw, f"command line {flag}:") if isinstance(raw, str) else raw
        values[attr] = value
        origins[attr] = f"command line {flag}"

    if not values.get("pidfile"):
        values["pidfile"] = os.path.join(default_run_dir(values.get("run_dir", "")),
                                         "workerpool.pid")
    config = Config(**values, source=file_path or "defaults", origins=origins)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    if config.redis_mode == "sentinel" and not config.sentinels:
        raise ConfigError(
            f"{config.describe('redis_mode')} redis_mode = 'sentinel': "
            "needs sentinels = host:port, ... in [workerpool]"
        )
    tls_files = [name for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
                 if getattr(config, name)]
    if tls_files and config.redis_mode == "standalone" and not config.redis_url.startswith(
            "rediss:"):
        raise ConfigError(
            f"{config.describe(tls_files[0])} {tls_files[0]} = {getattr(config, tls_files[0])!r}: "
            f"TLS settings need a rediss:// redis_url (redis_url is "
            f"{mask_url(config.redis_url)!r})"
        )
    output_dir = config.file_process_output_dir
    if output_dir and not os.path.isabs(output_dir) and (
            os.path.normpath(output_dir).split(os.sep)[0] == ".."):
        raise ConfigError(
            f"{config.describe('file_process_output_dir')} output_dir = {output_dir!r}: "
            "expected an absolute path or a path inside base_dir (no leading ..)"
        )
    local = config.redis_url.startswith("unix:") or config.redis_url == "embedded"
    if config.redis_mode != "standalone" and local:
        raise ConfigError(
            f"{config.describe('redis_url')} redis_url = {mask_url(config.redis_url)!r}: "
            f"a unix socket (or embedded) cannot be used with redis_mode = {config.redis_mode}"
        )


def load_handler(config: Config) -> Callable[[dict], Any]:
    """Import the configured handler; a failure is a ConfigError naming the key."""
    module_name, _, function_path = config.handler.partition(":")
    where = f"{config.describe('handler')} handler = {config.handler!r}"
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config problem
        raise ConfigError(f"{where}: cannot import {module_name}: {exc!r}") from None
    for part in function_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"{where}: {module_name} has no attribute {function_path}") from None
    if not callable(target):
        raise ConfigError(f"{where}: {function_path} is not callable")
    return target


def warn_if_secret_readable(config: Config) -> str | None:
    """A warning when the config file holds a password but others may read it (or when the
    password_file itself is readable by others)."""
    if config.password_file and os.path.isfile(config.password_file):
        mode = os.stat(config.password_file).st_mode
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            return (f"password_file {config.password_file} is readable by others "
                    f"(mode {stat.S_IMODE(mode):o}); chmod o-rwx it")
    path = config.source
    if path == "defaults" or not os.path.isfile(path):
        return None
    # Only values read from this file count: a password from the environment is not in it.
    in_file = {attr for attr, origin in config.origins.items() if origin.startswith(path + " [")}
    holds_secret = any(
        getattr(config, attr) for attr in ("email_password", "sentinel_password") if attr in in_file
    ) or ("redis_url" in in_file and mask_url(config.redis_url) != config.redis_url)
    if not holds_secret:
        return None
    mode = os.stat(path).st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return (
            f"{path} holds a password and is readable by others (mode {stat.S_IMODE(mode):o}); "
            "chmod o-rwx it"
        )
    return None


def config_summary(config: Config) -> dict[str, Any]:
    """Every setting with secrets masked, for `status --json` and debug logs."""
    summary = {}
    for option in OPTIONS:
        value = getattr(config, option.attr)
        if option.name in ("password", "sentinel_password") and value:
            value = "***"
        elif option.name == "redis_url":
            value = mask_url(value)
        summary[option.attr] = value
    return summary


if __name__ == "__main__":  # pragma: no cover - a quick check for operators
    try:
        print(config_summary(load_config(sys.argv[1] if len(sys.argv) > 1 else None)))
    except ConfigError as error:
        print(f"workerpool: config error: {error}", file=sys.stderr)
        sys.exit(2)
