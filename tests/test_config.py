"""Config loading, precedence, lookup, secrets and the wording of every config error (no Redis)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workerpool import config as config_module
from workerpool.config import (
    OPTIONS,
    Config,
    ConfigError,
    config_summary,
    default_run_dir,
    load_config,
    load_handler,
    mask_url,
    warn_if_secret_readable,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "etc" / "workerpool.ini"


def write_ini(directory: Path, text: str, name: str = "workerpool.ini") -> str:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def defaults() -> dict[str, object]:
    values = {option.attr: option.default for option in OPTIONS}
    # An empty pidfile means workerpool.pid in the run directory, resolved at load time.
    values["pidfile"] = os.path.join(default_run_dir(), "workerpool.pid")
    return values


def settings(config: Config) -> dict[str, object]:
    return {option.attr: getattr(config, option.attr) for option in OPTIONS}


@pytest.fixture(autouse=True)
def _no_password_from_outside(monkeypatch):
    # redis_password reads os.environ itself, so a developer's shell must not leak into tests.
    monkeypatch.delenv("WORKERPOOL_REDIS_PASSWORD", raising=False)


# --- values and precedence


def test_defaults_without_file_environment_or_flags():
    config = load_config(search=False, environ={})
    assert settings(config) == defaults()
    assert config.source == "defaults"
    assert config.origins == {}
    assert config.describe("interval") == "defaults"


def test_file_values_are_parsed_and_typed(tmp_path):
    path = write_ini(
        tmp_path,
        "[workerpool]\n"
        "redis_url = rediss://cache.example:6380/3\n"
        "redis_key = jobs{eu}:q\n"
        "interval = 2.5\n"
        "max_tasks = 1_000\n"
        "workers = 4\n"
        "sentinels = s1:26379, [::1]:26380\n"
        "LOG_LEVEL = debug\n"
        "[email]\n"
        "port = 587\n"
        "starttls = on\n"
        "[file_process]\n"
        "base_dir = /srv/files\n"
        "[metrics]\n"
        "port = 9100\n",
    )
    config = load_config(path, environ={})
    assert config.source == path
    assert config.redis_url == "rediss://cache.example:6380/3"
    assert config.redis_key == "jobs{eu}:q"
    assert config.interval == 2.5
    assert config.max_tasks == 1000
    assert config.workers == 4
    assert config.sentinels == (("s1", 26379), ("::1", 26380))
    assert config.log_level == "DEBUG"  # key names are case-insensitive, levels normalised
    assert config.email_port == 587
    assert config.email_starttls is True
    assert config.file_process_base_dir == "/srv/files"
    assert config.metrics_port == 9100
    assert config.describe("workers") == f"{path} [workerpool]"
    assert config.describe("email_port") == f"{path} [email]"
    assert config.concurrency == 10  # untouched keys keep their defaults


def test_environment_overrides_file(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\ninterval = 2\nworkers = 3\n")
    config = load_config(path, environ={"WORKERPOOL_INTERVAL": "7"})
    assert config.interval == 7.0
    assert config.workers == 3
    assert config.describe("interval") == "environment WORKERPOOL_INTERVAL"


def test_command_line_overrides_environment_and_file(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nmax_tasks = 10\nredis_key = from_file\n")
    config = load_config(
        path,
        environ={"WORKERPOOL_MAX_TASKS": "20", "WORKERPOOL_REDIS_KEY": "from_env"},
        overrides={"max_tasks": "30", "redis_key": None},
    )
    assert config.max_tasks == 30
    assert config.describe("max_tasks") == "command line --max-tasks"
    # An option not given on the command line (None) leaves the environment's value alone.
    assert config.redis_key == "from_env"


def test_typed_command_line_values_are_checked_too():
    assert load_config(search=False, environ={}, overrides={"workers": 4}).workers == 4
    with pytest.raises(ConfigError, match=r"command line --workers: workers = '0'"):
        load_config(search=False, environ={}, overrides={"workers": 0})


def test_email_keys_from_environment():
    config = load_config(
        search=False, environ={"WORKERPOOL_EMAIL_PORT": "2525", "WORKERPOOL_EMAIL_HOST": "smtp"}
    )
    assert (config.email_host, config.email_port) == ("smtp", 2525)
    assert config.describe("email_port") == "environment WORKERPOOL_EMAIL_PORT"


def test_unrelated_environment_variables_are_ignored():
    # WORKERPOOL_CONFIG and WORKERPOOL_REDIS_PASSWORD are not settings; neither is noise.
    environ = {"WORKERPOOL_CONFIG": "", "WORKERPOOL_REDIS_PASSWORD": "x", "PATH": "/bin"}
    assert settings(load_config(search=False, environ=environ)) == defaults()


def test_percent_in_url_password_is_kept_literally(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nredis_url = redis://:p%40ss%25w@db.example:6379/2\n")
    assert load_config(path, environ={}).redis_url == "redis://:p%40ss%25w@db.example:6379/2"


def test_sentinels_may_be_listed_one_per_line(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nredis_mode = sentinel\nsentinels =\n"
                               "  s1:26379\n  s2:26380,\n")
    assert load_config(path, environ={}).sentinels == (("s1", 26379), ("s2", 26380))


def test_inline_comments_are_stripped(tmp_path):
    path = write_ini(
        tmp_path, "[workerpool]\ninterval = 2  # two seconds\nworkers = 3 ; three\n"
    )
    config = load_config(path, environ={})
    assert (config.interval, config.workers) == (2.0, 3)


# --- lookup


@pytest.fixture
def search_path(tmp_path, monkeypatch):
    """./workerpool.ini in an empty working directory, and a system path that tests control."""
    work = tmp_path / "work"
    work.mkdir()
    system = tmp_path / "etc-workerpool.ini"
    monkeypatch.chdir(work)
    monkeypatch.setattr(config_module, "DEFAULT_SEARCH_PATH", ("./workerpool.ini", str(system)))
    return work, system


def test_lookup_order(tmp_path, search_path):
    work, system = search_path
    explicit = write_ini(tmp_path, "[workerpool]\nredis_key = explicit\n", "explicit.ini")
    from_env = write_ini(tmp_path, "[workerpool]\nredis_key = from_env\n", "env.ini")
    local = write_ini(work, "[workerpool]\nredis_key = local\n")
    system.write_text("[workerpool]\nredis_key = system\n", encoding="utf-8")
    environ = {"WORKERPOOL_CONFIG": from_env}

    assert load_config(explicit, environ=environ).redis_key == "explicit"
    assert load_config(None, environ=environ).redis_key == "from_env"
    config = load_config(None, environ={})
    assert (config.redis_key, config.source) == ("local", "./workerpool.ini")
    os.unlink(local)
    assert load_config(None, environ={}).redis_key == "system"
    system.unlink()
    assert load_config(None, environ={}).source == "defaults"


def test_search_false_reads_no_default_file(search_path):
    work, _ = search_path
    write_ini(work, "[workerpool]\nredis_key = local\n")
    assert load_config(None, environ={}, search=False).redis_key == "async_tasks"


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_missing_named_file_is_an_error(tmp_path, search_path, via):
    work, _ = search_path
    write_ini(work, "[workerpool]\n")  # a fallback exists, and must not be used silently
    missing = str(tmp_path / "nope.ini")
    path, environ = (missing, {}) if via == "argument" else (None, {"WORKERPOOL_CONFIG": missing})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert str(caught.value) == f"{missing}: config file not found"


def test_directory_as_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path), environ={})


# --- derived values and secrets


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        ("async_tasks", "async_tasks"),
        ("jobs{eu}:q", "eu"),
        ("{a}{b}", "a"),
        ("a{}b", "a{}b"),
        ("a{b", "a{b"),
    ],
)
def test_hash_tag(key, tag):
    assert Config(redis_key=key).hash_tag == tag


def test_host_name_defaults_to_hostname():
    assert Config().host_name == config_module.socket.gethostname()
    assert Config(host_id="node-7").host_name == "node-7"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@db:6379/0", "redis://:***@db:6379/0"),
        ("redis://app:secret@db:6379/0", "redis://app:***@db:6379/0"),
        ("rediss://app:s%40c%25t@[2001:db8::1]:6380/1", "rediss://app:***@[2001:db8::1]:6380/1"),
        ("redis://us%40er:pw@Db.Example/0", "redis://us%40er:***@Db.Example/0"),
        ("unix:///run/redis.sock?db=1&password=secret", "unix:///run/redis.sock?db=1&password=***"),
        ("redis://:pw@db:notaport", "redis://:***@db:notaport"),
        ("redis://:pw@[db", "redis://***@[db"),
        ("redis://:ab/cd@db:6379/0", "redis://:***@db:6379/0"),
        ("redis://app:a?b#c@db/0", "redis://app:***@db/0"),
    ],
)
def test_mask_url_hides_passwords(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://app@db:6379/0",
        "redis://[::1]:6379",
        "unix:///run/redis.sock?db=2",
        "embedded",
    ],
)
def test_mask_url_leaves_password_less_urls_alone(url):
    assert mask_url(url) == url


def test_config_summary_masks_secrets():
    config = load_config(
        search=False,
        environ={
            "WORKERPOOL_REDIS_URL": "redis://app:hunter2@db:6379/0",
            "WORKERPOOL_SENTINEL_PASSWORD": "sentinel-secret",
            "WORKERPOOL_EMAIL_PASSWORD": "smtp-secret",
        },
    )
    summary = config_summary(config)
    assert summary["redis_url"] == "redis://app:***@db:6379/0"
    assert summary["sentinel_password"] == "***"
    assert summary["email_password"] == "***"
    assert set(summary) == {option.attr for option in OPTIONS}
    for secret in ("hunter2", "sentinel-secret", "smtp-secret"):
        assert secret not in repr(summary)


def test_config_summary_shows_empty_secrets_as_empty():
    summary = config_summary(load_config(search=False, environ={}))
    assert summary["email_password"] == "" and summary["sentinel_password"] == ""


def test_redis_password_from_environment(monkeypatch, tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text("from-file\n", encoding="utf-8")
    config = Config(password_file=str(password_file))
    monkeypatch.setenv("WORKERPOOL_REDIS_PASSWORD", "from-env")
    assert config.redis_password == "from-env"


def test_redis_password_from_password_file(tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text("  from-file\n", encoding="utf-8")
    assert Config(password_file=str(password_file)).redis_password == "from-file"
    assert Config().redis_password is None


def test_unreadable_password_file_is_a_config_error(tmp_path):
    path = write_ini(tmp_path, f"[workerpool]\npassword_file = {tmp_path}/missing\n")
    config = load_config(path, environ={})
    with pytest.raises(ConfigError) as caught:
        config.redis_password  # noqa: B018 - the property reads the file
    message = str(caught.value)
    assert message.startswith(f"{path} [workerpool]: password_file = '{tmp_path}/missing'")
    assert "cannot read it" in message


def test_warns_when_file_with_password_is_world_readable(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nredis_url = redis://:hunter2@db:6379/0\n")
    os.chmod(path, 0o644)
    warning = warn_if_secret_readable(load_config(path, environ={}))
    assert warning is not None
    assert path in warning and "644" in warning
    assert "hunter2" not in warning


def test_no_warning_for_private_file_with_password(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nredis_url = redis://:hunter2@db:6379/0\n")
    os.chmod(path, 0o600)
    assert warn_if_secret_readable(load_config(path, environ={})) is None


def test_no_warning_when_readable_file_holds_no_password(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nworkers = 3\n")
    os.chmod(path, 0o644)
    # The password comes from the environment, so the readable file does not expose it.
    environ = {"WORKERPOOL_REDIS_URL": "redis://:hunter2@db/0"}
    assert warn_if_secret_readable(load_config(path, environ=environ)) is None
    assert warn_if_secret_readable(load_config(search=False, environ={})) is None


def test_warns_for_email_password_in_readable_file(tmp_path):
    path = write_ini(tmp_path, "[email]\npassword = smtp-secret\n")
    os.chmod(path, 0o644)
    assert "holds a password" in warn_if_secret_readable(load_config(path, environ={}))


# --- every config error: one line naming where, key, value and what is allowed

INTEGER_FROM_1 = "expected a whole number >= 1"
URL_FORMS = "expected redis://[user:password@]host[:port][/db], rediss://..., unix:///path"

FILE_ERRORS = [
    pytest.param(
        "[workerpool]\nintervall = 2\n",
        ["{path} [workerpool] intervall: unknown key; allowed keys: redis_url, ", " interval,"],
        id="unknown-key",
    ),
    pytest.param(
        "[worker]\nworkers = 2\n",
        ["{path}: unknown section [worker]: allowed sections are "
         "[workerpool], [email], [file_process], [metrics]"],
        id="unknown-section",
    ),
    pytest.param(
        "[workerpool]\ninterval = soon\n",
        ["{path} [workerpool] interval = 'soon': expected a number > 0"],
        id="interval-not-a-number",
    ),
    pytest.param(
        "[workerpool]\ninterval = 0\n",
        ["{path} [workerpool] interval = '0': expected a number > 0"],
        id="interval-zero",
    ),
    pytest.param(
        "[workerpool]\ninterval = nan\n",
        ["{path} [workerpool] interval = 'nan': expected a number > 0"],
        id="interval-nan",
    ),
    pytest.param(
        "[workerpool]\nmax_tasks = -1\n",
        ["{path} [workerpool] max_tasks = '-1': expected a whole number >= 0"],
        id="max-tasks-negative",
    ),
    pytest.param(
        "[workerpool]\nworkers = 0\n",
        ["{path} [workerpool] workers = '0': " + INTEGER_FROM_1],
        id="workers-zero",
    ),
    pytest.param(
        "[workerpool]\nconcurrency = ten\n",
        ["{path} [workerpool] concurrency = 'ten': " + INTEGER_FROM_1],
        id="concurrency-word",
    ),
    pytest.param(
        "[email]\nstarttls = maybe\n",
        ["{path} [email] starttls = 'maybe': expected one of yes/no, true/false, on/off, 1/0"],
        id="bad-bool",
    ),
    pytest.param(
        "[workerpool]\nlog_level = loud\n",
        ["{path} [workerpool] log_level = 'loud': "
         "expected one of debug, info, warning, error, critical"],
        id="bad-log-level",
    ),
    pytest.param(
        "[workerpool]\nredis_mode = replica\n",
        ["{path} [workerpool] redis_mode = 'replica': "
         "expected one of standalone, sentinel, cluster"],
        id="bad-redis-mode",
    ),
    pytest.param(
        "[workerpool]\nredis_url = http://localhost:6379/0\n",
        ["{path} [workerpool] redis_url = 'http://localhost:6379/0': " + URL_FORMS],
        id="url-scheme",
    ),
    pytest.param(
        "[workerpool]\nredis_url = redis://localhost:port/0\n",
        ["{path} [workerpool] redis_url = 'redis://localhost:port/0': " + URL_FORMS,
         "(bad port)"],
        id="url-port",
    ),
    pytest.param(
        "[workerpool]\nredis_url = redis://localhost:6379/zero\n",
        ["{path} [workerpool] redis_url = 'redis://localhost:6379/zero': " + URL_FORMS,
         "(db must be a number)"],
        id="url-db",
    ),
    pytest.param(
        "[workerpool]\nredis_url = redis://localhost:6379/0?socket_timeout=5\n",
        ["{path} [workerpool] redis_url = 'redis://localhost:6379/0?socket_timeout=5': "
         + URL_FORMS, "(the only query option taken is ?db=N"],
        id="url-query-option",
    ),
    pytest.param(
        "[workerpool]\nredis_url = unix:///run/redis.sock?db=one\n",
        ["{path} [workerpool] redis_url = 'unix:///run/redis.sock?db=one': " + URL_FORMS,
         "(db must be a number)"],
        id="url-query-db",
    ),
    pytest.param(
        "[workerpool]\nhost_id = web:2\n",
        ["{path} [workerpool] host_id = 'web:2': expected a name without spaces and without "
         "any of : * ? [ ] \\ {{ }}"],
        id="host-id-with-colon",
    ),
    pytest.param(
        "[workerpool]\npidfile = /tmp/x.pid\n  workers = 4\n",
        ["{path} [workerpool] pidfile = '/tmp/x.pid\\nworkers = 4': expected a single line"],
        id="indented-line-continues-a-value",
    ),
    pytest.param(
        "[workerpool]\nworkers = 1__0\n",
        ["{path} [workerpool] workers = '1__0': " + INTEGER_FROM_1],
        id="int-with-double-underscore",
    ),
    pytest.param(
        "[workerpool]\ninterval = nan\n",
        ["{path} [workerpool] interval = 'nan': expected a number > 0"],
        id="float-nan",
    ),
    pytest.param(
        "[email]\nfrom_addr =\n",
        ["{path} [email] from_addr = '': expected an e-mail address"],
        id="empty-from-addr",
    ),
    pytest.param(
        "[email]\nfrom_addr = nobody\n",
        ["{path} [email] from_addr = 'nobody': expected an e-mail address"],
        id="from-addr-without-domain",
    ),
    pytest.param(
        "[file_process]\noutput_dir = ../out\n",
        ["{path} [file_process] output_dir = '../out': "
         "expected an absolute path or a path inside base_dir"],
        id="output-dir-escaping-base-dir",
    ),
    pytest.param(
        "[workerpool]\nredis_url = unix://\n",
        ["{path} [workerpool] redis_url = 'unix://': " + URL_FORMS],
        id="url-unix-without-path",
    ),
    pytest.param(
        "[workerpool]\nredis_key = my tasks\n",
        ["{path} [workerpool] redis_key = 'my tasks': expected a non-empty key without spaces"],
        id="key-with-space",
    ),
    pytest.param(
        "[workerpool]\nhandler = myapp.tasks.run\n",
        ["{path} [workerpool] handler = 'myapp.tasks.run': expected package.module:function"],
        id="handler-without-colon",
    ),
    pytest.param(
        "[workerpool]\nsentinels = sentinel-1\n",
        ["{path} [workerpool] sentinels = 'sentinel-1': expected host:port, host:port, ..."],
        id="sentinel-without-port",
    ),
    pytest.param(
        "[workerpool]\nssl_cert_reqs = maybe\n",
        ["{path} [workerpool] ssl_cert_reqs = 'maybe': expected one of required, optional, none"],
        id="ssl-cert-reqs",
    ),
    pytest.param(
        "[workerpool]\nunknown_types = drop\n",
        ["{path} [workerpool] unknown_types = 'drop': expected one of ack, dead"],
        id="unknown-types",
    ),
    pytest.param(
        "[email]\nhost =\n",
        ["{path} [email] host = '': expected a non-empty value"],
        id="empty-email-host",
    ),
    pytest.param(
        "[metrics]\nport = 70000\n",
        ["{path} [metrics] port = '70000': expected a whole number from 0 to 65535"],
        id="port-out-of-range",
    ),
    pytest.param(
        "interval = 2\n",
        ["{path}, line 1: cannot parse 'interval = 2': expected a [section] header first"],
        id="no-section-header",
    ),
    pytest.param(
        "[workerpool]\nworkers = 2\njust some words\n",
        ["{path}, line 3: cannot parse 'just some words': "
         "expected [section], key = value or a # comment"],
        id="line-without-equals",
    ),
    pytest.param(
        "[workerpool]\nworkers = 2\nworkers = 3\n",
        ["{path}: cannot parse: ", "line  3", "option 'workers' in section 'workerpool' already"],
        id="duplicate-key",
    ),
    pytest.param(
        "[workerpool]\nredis_mode = sentinel\n",
        ["{path} [workerpool] redis_mode = 'sentinel': "
         "needs sentinels = host:port, ... in [workerpool]"],
        id="sentinel-without-sentinels",
    ),
    pytest.param(
        "[workerpool]\nredis_url = unix:///run/redis.sock\nredis_mode = cluster\n",
        ["{path} [workerpool] redis_url = 'unix:///run/redis.sock': "
         "a unix socket (or embedded) cannot be used with redis_mode = cluster"],
        id="unix-socket-with-cluster",
    ),
    pytest.param(
        "[workerpool]\nredis_url = embedded\nredis_mode = cluster\n",
        ["{path} [workerpool] redis_url = 'embedded': ", "redis_mode = cluster"],
        id="embedded-with-cluster",
    ),
]


@pytest.mark.parametrize(("text", "expected"), FILE_ERRORS)
def test_file_error_messages(tmp_path, text, expected):
    path = write_ini(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part.format(path=path) in message


def test_not_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "workerpool.ini"
    path.write_bytes(b"[workerpool]\nredis_key = caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not UTF-8 text")):
        load_config(str(path), environ={})


def test_passwords_stay_out_of_error_messages(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nredis_url = redis://:hunter2@db:99999/0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert "hunter2" not in str(caught.value)
    assert "redis_url = 'redis://:***@db:99999/0'" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(search=False, environ={}, overrides={"redis_url": "redis://:hunter2@db/x"})
    assert "command line --redis-url: redis_url = 'redis://:***@db/x'" in str(caught.value)
    # Unquoted "/", "?" or "#" in a password end urlsplit's netloc early: still masked.
    with pytest.raises(ConfigError) as caught:
        load_config(search=False, environ={"WORKERPOOL_REDIS_URL": "redis://:p/w?x#y@db:1/0"})
    assert "p/w?x#y" not in str(caught.value)
    assert "redis_url = 'redis://:***@db:1/0'" in str(caught.value)
    # A "?" puts the rest of the password in the query: not quoted as an option either.
    with pytest.raises(ConfigError) as caught:
        load_config(search=False, environ={"WORKERPOOL_REDIS_URL": "redis://u:pa?ss0rd@h:1/0"})
    assert "ss0rd" not in str(caught.value)
    assert "percent-encoded" in str(caught.value)
    # An unknown key might be a mistyped password key: its value is not echoed.
    typo = write_ini(tmp_path, "[email]\npasword = smtp-secret\n", "typo.ini")
    with pytest.raises(ConfigError) as caught:
        load_config(typo, environ={})
    assert "[email] pasword: unknown key" in str(caught.value)
    assert "smtp-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WORKERPOOL_INTERVAL": "0"},
         "environment WORKERPOOL_INTERVAL: interval = '0': expected a number > 0"),
        ({"WORKERPOOL_WORKERS": "many"},
         "environment WORKERPOOL_WORKERS: workers = 'many': " + INTEGER_FROM_1),
        ({"WORKERPOOL_EMAIL_PORT": "smtp"},
         "environment WORKERPOOL_EMAIL_PORT: port = 'smtp': expected a whole number from 1 to"),
        ({"WORKERPOOL_REDIS_MODE": "sentinel"},
         "environment WORKERPOOL_REDIS_MODE redis_mode = 'sentinel': needs sentinels"),
    ],
)
def test_environment_error_names_the_variable(tmp_path, environ, expected):
    # The file is fine; the message must point at the variable, not at the file.
    path = write_ini(tmp_path, "[workerpool]\ninterval = 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert expected in str(caught.value)
    assert path not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"max_tasks": "-5"},
         "command line --max-tasks: max_tasks = '-5': expected a whole number >= 0"),
        ({"interval": "fast"}, "command line --interval: interval = 'fast': expected a number > 0"),
        ({"concurrency": "0"}, "command line --concurrency: concurrency = '0': " + INTEGER_FROM_1),
        ({"redis_key": "two words"},
         "command line --redis-key: redis_key = 'two words': expected a non-empty key"),
        ({"redis_url": "http://x"},
         "command line --redis-url: redis_url = 'http://x': " + URL_FORMS),
        ({"no_such_setting": "1"}, "unknown setting 'no_such_setting'"),
    ],
)
def test_command_line_error_names_the_flag(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(search=False, environ={"WORKERPOOL_INTERVAL": "2"}, overrides=overrides)
    assert expected in str(caught.value)


# --- the handler


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        ("no_such_module_xyz:run", "cannot import no_such_module_xyz: ModuleNotFoundError"),
        ("json:no_such_fn", "json has no attribute no_such_fn"),
        ("os.path:sep", "sep is not callable"),
        ("json:dumps.no_such_attr", "json has no attribute dumps.no_such_attr"),
    ],
)
def test_handler_errors(tmp_path, handler, expected):
    path = write_ini(tmp_path, f"[workerpool]\nhandler = {handler}\n")
    with pytest.raises(ConfigError) as caught:
        load_handler(load_config(path, environ={}))
    message = str(caught.value)
    assert message.startswith(f"{path} [workerpool] handler = '{handler}': ")
    assert expected in message
    assert "\n" not in message


def test_handler_module_failing_at_import_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "broken_handler_mod.py").write_text("raise RuntimeError('no database')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(search=False, environ={}, overrides={"handler": "broken_handler_mod:run"})
    with pytest.raises(ConfigError) as caught:
        load_handler(config)
    message = str(caught.value)
    assert message.startswith("command line --handler handler = 'broken_handler_mod:run'")
    assert "RuntimeError('no database')" in message


def test_handler_is_loaded():
    import json

    config = load_config(search=False, environ={"WORKERPOOL_HANDLER": "json:dumps"})
    assert load_handler(config) is json.dumps


# --- the operator's check: python -m workerpool.config FILE


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("WORKERPOOL_")}
    return subprocess.run(
        [sys.executable, "-m", "workerpool.config", *args],
        capture_output=True, text=True, cwd=ROOT, env=environ, timeout=60,
    )


def test_module_check_exits_2_on_bad_file(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nworkers = none\n")
    result = _run_module(path)
    assert result.returncode == 2
    assert result.stderr.startswith("workerpool: config error: ")
    assert f"{path} [workerpool] workers = 'none'" in result.stderr
    assert result.stdout == ""


def test_module_check_prints_masked_summary(tmp_path):
    path = write_ini(tmp_path, "[workerpool]\nredis_url = redis://:hunter2@db:6379/0\n")
    result = _run_module(path)
    assert result.returncode == 0, result.stderr
    assert "redis://:***@db:6379/0" in result.stdout
    assert "hunter2" not in result.stdout


# --- the documented sample, etc/workerpool.ini

SETTING_LINE = re.compile(r"^#?([a-z_]+) =(?: (.*))?$")


def _sample_settings() -> list[tuple[str, str, str, bool]]:
    """(section, key, value, commented_out) for every setting line of the sample."""
    found = []
    section = ""
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        header = re.match(r"^\[(\w+)\]$", line)
        if header:
            section = header.group(1)
            continue
        setting = SETTING_LINE.match(line)
        if setting:
            found.append((section, setting.group(1), setting.group(2) or "", line.startswith("#")))
    return found


def test_sample_loads_to_the_defaults():
    assert settings(load_config(str(SAMPLE), environ={})) == defaults()


def test_sample_documents_every_option_once_with_its_default():
    documented = [(section, key) for section, key, _, _ in _sample_settings()]
    expected = [(option.section, option.name) for option in OPTIONS]
    assert sorted(documented) == sorted(expected)
    assert len(documented) == len(set(documented))
    by_key = {(option.section, option.name): option for option in OPTIONS}
    for section, key, value, _ in _sample_settings():
        option = by_key[(section, key)]
        assert option.parse(value) == option.default, f"[{section}] {key} = {value}"


def test_sample_with_every_setting_switched_on_still_gives_the_defaults(tmp_path):
    text = SAMPLE.read_text(encoding="utf-8")
    enabled = "\n".join(
        line[1:] if line.startswith("#") and SETTING_LINE.match(line) else line
        for line in text.splitlines()
    )
    path = write_ini(tmp_path, enabled + "\n")
    config = load_config(path, environ={})
    assert settings(config) == defaults()
    assert len(config.origins) == len(OPTIONS)  # every line really was read as a setting


def test_sample_explains_every_setting():
    # Each setting needs a "# ..." explanation somewhere in the comment block above it.
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not SETTING_LINE.match(line):
            continue
        above = number - 1
        while above >= 0 and SETTING_LINE.match(lines[above]):
            above -= 1
        assert lines[above].startswith("# "), f"no explanation above {line!r}"
