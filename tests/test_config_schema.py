"""The configuration files against hostile contents (supctl/schema.py).

tower.toml, the enforcer's inventory and the client's config.toml are read by one
validator from one declarative schema each.  Whatever a file holds, the answer is a
value or ONE line naming the file, the key's dotted path and what it must be: never
a traceback, never a silently accepted typo, never TOML ``true`` taken for 1, never a
password kept in a URL.  Each program also shows it through its real CLI (exit 2).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stack import one_line_error, program, write_secret

from supctl.client.settings import ConfigFile, read_config
from supctl.enforcer.inventory import InventoryFile, load_inventory
from supctl.errors import UsageError
from supctl.schema import keys
from supctl.tower.config import TowerConfig, load_config
from supctl.tower.limits import Limits

NOT_UTF8 = b"listen = '\xff\xfe'\n"
DEEP = b"x = " + b"[" * 50_000 + b"]" * 50_000 + b"\n"
HUGE = "9" * 400
ROOT = Path(__file__).resolve().parent.parent
LIMITS_KNOWN = ", ".join(keys(Limits))


def error(load: object, path: Path, content: str | bytes) -> str:
    """The one line ``load(path)`` refuses ``content`` with, the path written ``F``."""
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UsageError) as info:
        load(path)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message.replace(str(path), "F")


TOWER = [
    # unknown keys, at every level
    (
        "lisen = '127.0.0.1:1'",
        "unknown key 'lisen' (known: cert, key, ca, state, audit, users, policies, database,",
    ),
    ("[limits]\nstreams = 3", f"bad config file F: unknown key 'limits.streams' (known: {LIMITS_KNOWN})"),
    (
        "[store]\nuri = 'sqlite:///x'",
        "bad config file F: unknown key 'store.uri' (known: url, password-file)",
    ),
    ("[audit]\nkept = '1d'", "bad config file F: unknown key 'audit.kept' (known: file, keep)"),
    (
        '[limits]\n"a\\nb" = 1',
        "bad config file F: unknown key 'limits.\"a\\\\nb\"' (known: ",
    ),  # no second line
    # wrong types, at every level
    ("insecure = 'yes'", "bad config file F: 'insecure' must be true or false"),
    ("cert = 3", "bad config file F: 'cert' must be a non-empty string"),
    ("cert = ''", "bad config file F: 'cert' must be a non-empty string"),
    ('cert = "a\\u0000b"', "bad config file F: 'cert' must be a non-empty string"),  # open() would raise
    ("limits = 3", "bad config file F: 'limits' must be a table"),
    ("store = 'x'", "bad config file F: 'store' must be a table"),
    ("audit = 3", "bad config file F: 'audit' must be a table or a non-empty string"),
    ("[store]\nurl = 5", "bad config file F: 'store.url' must be a URL like \"postgresql://USER@HOST/DB\""),
    ("[store]\npassword-file = []", "bad config file F: 'store.password-file' must be a non-empty string"),
    ("[audit]\nkeep = 90", "bad config file F: 'audit.keep' must be a duration like \"90d\" (s, m, h or d)"),
    (
        "[limits]\nsessions-per-user = 1.5",
        "bad config file F: 'limits.sessions-per-user' must be an integer >= 1",
    ),
    ("listen = '::1:80'", "bad config file F: 'listen' must be HOST:PORT, [IPV6]:PORT or :PORT"),
    ("login-expiry = '8 h'", "bad config file F: 'login-expiry' must be like \"8h\" (s, m, h or d)"),
    # a bool is not a number
    (
        "[limits]\nsessions-per-user = true",
        "bad config file F: 'limits.sessions-per-user' must be an integer >= 1",
    ),
    ("keepalive = true", "bad config file F: 'keepalive' must be a number of seconds >= 0 (0: off)"),
    # huge, not finite, zero, negative
    (f"[limits]\nsessions-per-user = {HUGE}", "'limits.sessions-per-user' must be at most 2147483647"),
    (f"keepalive = {HUGE}", "bad config file F: 'keepalive' must be a number of seconds >= 0 (0: off)"),
    ("keepalive = 1e300", "bad config file F: 'keepalive' must be at most 864000000 seconds"),
    ("keepalive = nan", "bad config file F: 'keepalive' must be a number of seconds >= 0 (0: off)"),
    ("[limits]\nstream-open-timeout = inf", "'limits.stream-open-timeout' must be a number of seconds > 0"),
    ("[limits]\nstream-open-timeout = 0", "'limits.stream-open-timeout' must be a number of seconds > 0"),
    ("[limits]\nstreams-per-session = 0", "'limits.streams-per-session' must be an integer >= 1"),
    (
        "[limits]\nsession-duration = -2",
        "'limits.session-duration' must be a number of seconds >= 0 (0: off)",
    ),
    (
        "[limits]\nstreams-per-site = 16385",
        "'limits.streams-per-site' must be at most 16384 (what an enforcer",
    ),
    (
        "[audit]\nkeep = '0d'",
        "bad config file F: 'audit.keep' must be a duration like \"90d\" (s, m, h or d)",
    ),
    (
        "[audit]\nkeep = '-5m'",
        "bad config file F: 'audit.keep' must be a duration like \"90d\" (s, m, h or d)",
    ),
    (
        "[audit]\nkeep = '\u0669\u0660d'",
        "bad config file F: 'audit.keep' must be a duration like \"90d\" (s, m, h or d)",
    ),
    ("[audit]\nkeep = '99999999999d'", "bad config file F: 'audit.keep' must be at most 10000d"),
    ("login-expiry = '99999999999d'", "bad config file F: 'login-expiry' must be at most 10000d"),
    # a password in the store's URL, where it would sit on disk
    (
        "[store]\nurl = 'postgresql://tower:secret@db/tower'",
        "bad config file F: 'store.url' holds a password: put the password in [store] password-file"
        " or SUPCTL_STORE_PASSWORD",
    ),
    ("[store]\nurl = 'postgresql://tower@db/tower?Password=secret'", "'store.url' holds a password"),
    ("[store]\nurl = 'postgresql://tower:@db/tower'", "'store.url' holds a password"),
    ("[store]\nurl = 'mysql://tower@db/tower'", "'store.url' must be a URL like"),
    ("[store]\nurl = 'sqlite://'", "'store.url' must be a URL like"),
    # not TOML at all
    (NOT_UTF8, "config file F is not valid TOML: 'utf-8' codec can't decode byte 0xff"),
    (DEEP, "config file F is not valid TOML: nested too deeply"),
    ("listen = 'a'\nlisten = 'b'", "config file F is not valid TOML: Cannot overwrite a value"),
    ("[limits]\n[limits]", "config file F is not valid TOML: Cannot declare ('limits',) twice"),
]


@pytest.mark.parametrize(("content", "expected"), TOWER)
def test_tower_toml(tmp_path: Path, content: str | bytes, expected: str) -> None:
    message = error(load_config, tmp_path / "tower.toml", content)
    assert expected in message, message
    if "secret" in str(content):
        assert "secret" not in message


def test_tower_toml_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "tower.toml"
    path.write_text("")
    config = load_config(path)
    assert (config.database, config.store_url, config.store_password_file, config.audit_keep) == (
        tmp_path / "tower.db",
        None,
        None,
        None,
    )
    assert config.audit == tmp_path / "audit.jsonl"
    path.write_text(
        "database = 'db/t.db'\naudit = 'old.jsonl'\nstate = 's.json'\nusers = 'u.json'\npolicies = 'p.toml'\n"
    )
    config = load_config(path)
    assert (config.database, config.audit, config.state) == (
        tmp_path / "db/t.db",
        tmp_path / "old.jsonl",
        tmp_path / "s.json",
    )
    path.write_text(
        "[store]\nurl = 'postgresql://tower@db.example/tower'\npassword-file = 'pw'\n"
        "[audit]\nkeep = '90d'\nfile = '/var/log/a.jsonl'\n"
    )
    config = load_config(path)
    assert config.store_url == "postgresql://tower@db.example/tower"
    assert config.store_password_file == tmp_path / "pw"
    assert config.audit_keep == 90 * 86400.0
    assert config.audit == Path("/var/log/a.jsonl")
    for text, seconds in (("30s", 30.0), ("15m", 900.0), ("8h", 28800.0)):
        path.write_text(f"[audit]\nkeep = '{text}'\n")
        assert load_config(path).audit_keep == seconds


INVENTORY = [
    ("top = 1", "bad inventory F: unknown key 'top' (known: applications, policy, verbs)"),
    (
        "[applications.a]\nfoo = 1",
        "bad inventory F: unknown key 'applications.a.foo' (known: service-instances)",
    ),
    (
        "[applications.a.service-instances.i]\nnamespace = 'n'",
        "bad inventory F: unknown key 'applications.a.service-instances.i.namespace' (known: netns, runtime,"
        " containers)",
    ),
    (
        "[applications.a.service-instances.i.containers.c]\ncmd = ['ls']",
        "bad inventory F: unknown key 'applications.a.service-instances.i.containers.c.cmd'",
    ),
    (
        "[policy]\nallow-all = true",
        "bad inventory F: unknown key 'policy.allow-all' (known: allow-ip-addresses,",
    ),
    ("applications = 1", "bad inventory F: 'applications' must be a table"),
    ("[applications]\na = 1", "bad inventory F: 'applications.a' must be a table"),
    (
        "[applications.a]\nservice-instances = []",
        "bad inventory F: 'applications.a.service-instances' must be a",
    ),
    ("policy = 1", "bad inventory F: 'policy' must be a table"),
    (
        "[applications.a.service-instances.i]\nnetns = true",
        "bad inventory F: 'applications.a.service-instances.i.netns' must be a namespace name",
    ),
    (
        "[applications.a.service-instances.i]\nnetns = '..'",
        "'applications.a.service-instances.i.netns' must be",
    ),
    (
        "[applications.a.service-instances.i.containers.c]\ncommand = ['/bin/sh', \"a\\u0000b\"]",
        "'applications.a.service-instances.i.containers.c.command' must be a non-empty list of strings",
    ),
    (
        "[applications.a.service-instances.i.containers.c]\nenv = { 'A=B' = '1' }",
        'bad inventory F: \'applications.a.service-instances.i.containers.c.env."A=B"\' is not NAME = "string"',
    ),
    ("[policy]\nallow-exec = 1", "bad inventory F: 'policy.allow-exec' must be true or false"),
    ("[policy]\nallow-ports = [true]", "bad inventory F: 'policy.allow-ports' has a bad port or range True"),
    ("[policy]\nallow-ports = [443, 70000]", "'policy.allow-ports' has a bad port or range 70000"),
    (f"[policy]\nallow-ports = [{HUGE}]", "'policy.allow-ports' has a bad port or range 999"),
    ("[policy]\nallow-ports = ['٤٤٣']", "'policy.allow-ports' has a bad port or range '٤٤٣'"),
    ("[policy]\nallow-ip-addresses = ['10.0.0.0/33']", "'policy.allow-ip-addresses' must be a list of CIDR"),
    # names the protocol would refuse (names.py) are refused where they are declared
    (
        "[applications.'a b'.service-instances.i]",
        "bad inventory F: 'applications.\"a b\"' is not a valid name: letters, digits,",
    ),
    ("[applications.a.service-instances.'-i']", "'applications.a.service-instances.-i' is not a valid name"),
    ('[applications.a.service-instances.i.containers."c\\n"]', "is not a valid name"),  # one line
    # duplicate names
    (
        "[applications.a.service-instances.i]\n[applications.a.service-instances.i]",
        "inventory F is not valid TOML: Cannot declare ('applications', 'a', 'service-instances', 'i') twice",
    ),
    (NOT_UTF8, "inventory F is not valid TOML: 'utf-8' codec can't decode byte 0xff"),
    (DEEP, "inventory F is not valid TOML: nested too deeply"),
]


@pytest.mark.parametrize(("content", "expected"), INVENTORY)
def test_inventory(tmp_path: Path, content: str | bytes, expected: str) -> None:
    message = error(load_inventory, tmp_path / "inventory.toml", content)
    assert expected in message, message


CLIENT = [
    ("hots = 'wss://x:1'", "bad config file F: unknown key 'hots' (known: host, token, token-file, ca-file,"),
    ("host = 4646", "bad config file F: 'host' must be a string"),
    ("host = true", "bad config file F: 'host' must be a string"),
    ("[host]\nname = 'x'", "bad config file F: 'host' must be a string"),
    ("token-file = ['a']", "bad config file F: 'token-file' must be a string"),
    (NOT_UTF8, "config file F is not valid TOML: 'utf-8' codec can't decode byte 0xff"),
    (DEEP, "config file F is not valid TOML: nested too deeply"),
    ("host = 'a'\nhost = 'b'", "config file F is not valid TOML: Cannot overwrite a value"),
]


@pytest.mark.parametrize(("content", "expected"), CLIENT)
def test_client_config(tmp_path: Path, content: str | bytes, expected: str) -> None:
    message = error(lambda path: read_config(path, explicit=True), tmp_path / "config.toml", content)
    assert expected in message, message


# --- through the real programs: exit 2, one line ----------------------------------------------


TOWER_CLI = [sys.executable, "-c", "from supctl.tower.cli import main; main()"]


def run(argv: list[str], tmp_path: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPCTL_")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH")])
    )
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run(
        argv, capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL, check=False
    )
    assert proc.stdout == b""
    return proc.returncode, one_line_error(proc.stderr)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"[store]\nurl = 'postgresql://tower:hunter2@db/tower'\n",
            "'store.url' holds a password: put the password in [store] password-file or SUPCTL_STORE_PASSWORD",
        ),
        # Before: float() of it raised OverflowError, a traceback.
        (f"keepalive = {HUGE}\n".encode(), "'keepalive' must be a number of seconds >= 0 (0: off)"),
    ],
    ids=["password-in-url", "huge-number"],
)
def test_control_tower_exits_2_with_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    config = tmp_path / "tower.toml"
    config.write_bytes(content)
    code, line = run([*TOWER_CLI, "site", "list", "--config", str(config)], tmp_path)
    assert (code, line) == (2, f"control-tower: error: bad config file {config}: {expected}")
    assert "hunter2" not in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"[policy]\nallow-ports = [true]\n",
            "bad inventory F: 'policy.allow-ports' has a bad port or range True",
        ),
        # Before: read_text() raised UnicodeDecodeError, a traceback.
        (NOT_UTF8, "inventory F is not valid TOML: 'utf-8' codec can't decode byte 0xff in position 10"),
    ],
    ids=["bool-port", "not-utf8"],
)
def test_edge_enforcer_exits_2_with_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    inventory = tmp_path / "inventory.toml"
    inventory.write_bytes(content)
    token = write_secret(tmp_path / "site.token", "sct_site_x\n")
    argv = [program("edge-enforcer"), "run", "--tower", "ws://127.0.0.1:9", "--site", "s"]
    code, line = run([*argv, "--token-file", str(token), "--inventory", str(inventory)], tmp_path)
    assert code == 2
    assert line.replace(str(inventory), "F").startswith("edge-enforcer: error: " + expected), line


def test_supctl_refuses_a_config_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(NOT_UTF8)
    code, line = run([program("supctl"), "--config", str(config), "show", "sites"], tmp_path)
    assert code == 2
    assert line.startswith(f"supctl: error: config file {config} is not valid TOML: 'utf-8' codec"), line


# --- the docs name every key ----------------------------------------------------------------------

DOCS = [
    (TowerConfig, ["docs/tower.md"]),
    (InventoryFile, ["docs/enforcer.md"]),
    (ConfigFile, ["docs/cli.md"]),
]


@pytest.mark.parametrize(("schema", "docs"), DOCS, ids=["tower.toml", "inventory", "config.toml"])
def test_every_key_is_documented(schema: type, docs: list[str]) -> None:
    text = "\n".join((ROOT / doc).read_text() for doc in docs)
    missing = []
    for key in keys(schema):
        *_, last = [k for k in key.split(".") if k != "NAME"]
        # As a TOML line (`last = ...`), a table header (`[...last]`), or in backquotes.
        pattern = rf"^\s*{re.escape(last)}\s*=|\[[^\]\n]*\b{re.escape(last)}\]|`{re.escape(last)}`"
        if not re.search(pattern, text, re.MULTILINE):
            missing.append(key)
    assert not missing, f"{', '.join(docs)} do not document {missing}"
