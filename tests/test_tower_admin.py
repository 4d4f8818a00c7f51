"""The control tower's administration side: init, sites, certificates, token store, config.

The CLI runs as a real process, the way an operator runs it, so stdout/stderr
separation, exit codes and file modes are what a shell would see.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from towerkit import open_directory, run

from supctl.errors import UsageError
from supctl.plainhttp import parse_listen
from supctl.tower.certs import fingerprint
from supctl.tower.config import load_config, toml_string, write_default_config
from supctl.tower.directory import Directory
from supctl.tower.store import hash_token

ROOT = Path(__file__).resolve().parent.parent

# Installs a stand-in for supctl.tower.serving (another module's job) that reports its arguments.
FAKE_SERVER = """
import json, sys, types
m = types.ModuleType("supctl.tower.serving")
def serve(config, host, port, insecure, level=None, fmt=None):
    print(json.dumps({"host": host, "port": port, "insecure": insecure, "store": str(config.database)}))
m.serve = serve
sys.modules["supctl.tower.serving"] = m
"""


def run_tower(*args: str | Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = prelude + "\nfrom supctl.tower.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("control-tower: error: ")
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def tower(tmp_path: Path) -> Path:
    d = tmp_path / "tower"
    proc = run_tower("init", d)
    assert proc.returncode == 0, proc.stderr
    return d


@pytest.fixture(scope="module")
def shared_tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tower only read from, made once because key generation and process start cost time."""
    d = tmp_path_factory.mktemp("shared") / "tower"
    proc = run_tower("init", d)
    assert proc.returncode == 0, proc.stderr
    return d


# -- init ----------------------------------------------------------------------


def test_init_creates_files_with_modes(tmp_path: Path) -> None:
    d = tmp_path / "new" / "tower"
    proc = run_tower("init", d)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert mode(d) == 0o700
    for name in ("ca-key.pem", "server-key.pem", "peer-key.pem", "tower.db", "admin.token"):
        assert mode(d / name) == 0o600, name
    for name in ("ca.pem", "server.pem", "peer.pem", "tower.toml"):
        assert (d / name).is_file()
    made = ["admin.token", "ca-key.pem", "ca.pem", "server-key.pem", "server.pem", "peer-key.pem", "peer.pem"]
    assert sorted(p.name for p in d.iterdir()) == sorted([*made, "tower.db", "tower.toml"])
    # The summary tells the operator what to run next, with the real config path.
    assert f"control-tower site add --config {d}/tower.toml SITE" in proc.stderr
    assert f"control-tower serve --config {d}/tower.toml" in proc.stderr

    token = (d / "admin.token").read_text().strip()
    assert token.startswith("sct_admin_")
    directory = open_directory(d / "tower.db")
    assert directory.sites() == []
    assert directory.check_admin(token) == hash_token(token)[:8]
    assert not (d / "state.json").exists() and not (d / "users.json").exists()

    config = load_config(d / "tower.toml")
    assert config.listen == "127.0.0.1:4646" and not config.insecure
    assert (config.cert, config.key, config.ca, config.database, config.store_url) == (
        d / "server.pem",
        d / "server-key.pem",
        d / "ca.pem",
        d / "tower.db",
        None,
    )


def test_init_refuses_to_overwrite_without_force(tower: Path) -> None:
    old_token = (tower / "admin.token").read_text().strip()
    old_ca = (tower / "ca.pem").read_bytes()
    assert_one_line_error(run_tower("init", tower), "tower.toml already exists", "--force")
    assert (tower / "ca.pem").read_bytes() == old_ca

    proc = run_tower("init", "--force", tower)
    assert proc.returncode == 0, proc.stderr
    assert (tower / "ca.pem").read_bytes() != old_ca
    store = open_directory(tower / "tower.db")
    assert store.check_admin(old_token) is None
    assert store.check_admin((tower / "admin.token").read_text().strip()) is not None


def test_init_refuses_a_file_as_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert_one_line_error(run_tower("init", tmp_path / "f"), "not a directory")


# -- sites ---------------------------------------------------------------------


def test_site_add_prints_only_the_token(tower: Path) -> None:
    proc = run_tower("site", "add", "--config", tower / "tower.toml", "paris-1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.count("\n") == 1
    token = proc.stdout.strip()
    assert token.startswith("sct_site_") and len(token) > 40

    store = open_directory(tower / "tower.db")
    assert store.check_site("paris-1", token)
    assert not store.check_site("paris-1", token + "x")
    assert not store.check_site("lyon", token)
    assert store.check_admin(token) is None
    for path in tower.glob("tower.db*"):  # the database and its WAL: password and token hashes
        assert mode(path) == 0o600, path

    proc = run_tower("site", "add", "--config", tower / "tower.toml", "a0")
    assert proc.returncode == 0
    listed = run_tower("site", "list", "--config", tower / "tower.toml").stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["NAME", "a0", "paris-1"]
    assert listed[0].split() == ["NAME", "ACCESSOR", "CREATED", "ROTATED"]
    rows = json.loads(run_tower("site", "list", "--config", tower / "tower.toml", "-o", "json").stdout)
    assert [sorted(row) for row in rows] == [["accessor", "created", "name", "rotated"]] * 2
    assert [row["name"] for row in rows] == ["a0", "paris-1"]
    assert rows[1]["accessor"] == hash_token(token)[:8] and rows[1]["rotated"] is None


def test_site_add_refuses_duplicates(tower: Path) -> None:
    assert run_tower("site", "add", "--config", tower / "tower.toml", "paris").returncode == 0
    before = open_directory(tower / "tower.db").site_token_hash("paris")
    assert_one_line_error(
        run_tower("site", "add", "--config", tower / "tower.toml", "paris"), "'paris' already exists"
    )
    assert open_directory(tower / "tower.db").site_token_hash("paris") == before


@pytest.mark.parametrize("name", ["", "Paris", "-a", "a-", "a_b", "a.b", "a" * 64, "a\nb", "é"])
def test_site_add_refuses_invalid_names(shared_tower: Path, name: str) -> None:
    proc = run_tower("site", "add", "--config", shared_tower / "tower.toml", "--", name)
    assert_one_line_error(proc, "invalid site name")
    assert proc.returncode == 2


def test_tokens_are_not_stored_in_plain_text(tower: Path) -> None:
    admin = (tower / "admin.token").read_text().strip()
    site = run_tower("site", "add", "--config", tower / "tower.toml", "s1").stdout.strip()
    assert site
    secrets = [admin, site, admin.removeprefix("sct_admin_"), site.removeprefix("sct_site_")]
    for path in tower.rglob("*"):
        if path.name == "admin.token":
            continue
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, path


def test_a_running_towers_directory_sees_other_writers(tower: Path) -> None:
    """Changes by control-tower (another process) reach a serving tower's copy at its next
    freshness check; an unchanged store costs one SELECT and no reload."""
    store = open_directory(tower / "tower.db")  # as a serving tower holds it
    assert store.sites() == []
    token = run_tower("site", "add", "--config", tower / "tower.toml", "late").stdout.strip()
    assert not store.site_exists("late")  # not before the check...
    run(store.fresh())
    assert store.site_exists("late") and store.check_site("late", token)  # ...and then
    reloads = store.reloads
    run(store.fresh())
    assert store.reloads == reloads  # generation unchanged: nothing loaded
    admin = (tower / "admin.token").read_text().strip()
    accessor = hash_token(admin)[:8]
    assert run_tower("token", "revoke", "--config", tower / "tower.toml", accessor).returncode == 0
    run(store.fresh())
    assert store.check_admin(admin) is None and not store.admin_valid(accessor)


def test_a_broken_store_is_a_one_line_error(tower: Path) -> None:
    (tower / "tower.db").write_bytes(b"not a database" * 100)
    for path in tower.glob("tower.db-*"):
        path.unlink()
    proc = run_tower("site", "list", "--config", tower / "tower.toml")
    assert_one_line_error(proc, "the store", "is unavailable")
    (tower / "tower.db").unlink()
    proc = run_tower("serve", "--config", tower / "tower.toml", prelude=FAKE_SERVER)
    assert_one_line_error(proc, "tower.db not found", "control-tower migrate")


@pytest.fixture(scope="module")
def empty_store() -> Iterator[Directory]:
    with tempfile.TemporaryDirectory() as d:
        assert run_tower("init", Path(d) / "t").returncode == 0
        assert run_tower("site", "add", "--config", Path(d) / "t" / "tower.toml", "site").returncode == 0
        yield open_directory(Path(d) / "t" / "tower.db")


@given(st.text())
def test_arbitrary_text_is_never_a_token(empty_store: Directory, text: str) -> None:
    assert empty_store.check_admin(text) is None
    assert not empty_store.check_site("site", text)
    assert not empty_store.check_site(text, text)


# -- certificates ------------------------------------------------------------------


class TLSServer:
    """A real TLS server on a loopback address, completing one handshake per connection."""

    def __init__(self, tower: Path, family: socket.AddressFamily, address: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tower / "server.pem", tower / "server-key.pem")
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((address, 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(16))
            except (ssl.SSLError, OSError):
                conn.close()  # the client rejected us: that is what some tests want

    def close(self) -> None:
        self.sock.close()


def handshake(tower: Path, address: str, port: int, server_hostname: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(tower / "ca.pem"))
    # Python 3.13 turns strict checking on by default; demand it now so the certs stay valid.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with (
        socket.create_connection((address, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(b"ping")
        return tls.recv(16)


def test_certificate_verifies_with_hostname_checks(shared_tower: Path) -> None:
    server = TLSServer(shared_tower, socket.AF_INET, "127.0.0.1")
    try:
        for name in ("localhost", "127.0.0.1"):
            assert handshake(shared_tower, "127.0.0.1", server.port, name) == b"ping"
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            handshake(shared_tower, "127.0.0.1", server.port, "example.com")
    finally:
        server.close()


def test_certificate_verifies_on_ipv6_loopback(shared_tower: Path) -> None:
    try:
        server = TLSServer(shared_tower, socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert handshake(shared_tower, "::1", server.port, "::1") == b"ping"
    finally:
        server.close()


def test_certificate_is_rejected_by_another_ca(shared_tower: Path, tower: Path) -> None:
    server = TLSServer(shared_tower, socket.AF_INET, "127.0.0.1")
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(tower, "127.0.0.1", server.port, "localhost")
    finally:
        server.close()


def test_extra_certificate_names(tmp_path: Path) -> None:
    d = tmp_path / "t"
    proc = run_tower("init", "--san", "Tower.Example.com", "--san", "10.1.2.3", "--san", "localhost", d)
    assert proc.returncode == 0, proc.stderr
    server = TLSServer(d, socket.AF_INET, "127.0.0.1")
    try:
        for name in ("tower.example.com", "10.1.2.3", "localhost", "127.0.0.1"):
            assert handshake(d, "127.0.0.1", server.port, name) == b"ping"
    finally:
        server.close()
    assert_one_line_error(run_tower("init", "--san", "*.example.com", tmp_path / "u"), "bad certificate name")
    assert not (tmp_path / "u" / "ca.pem").exists()


def test_fingerprint_command(shared_tower: Path) -> None:
    proc = run_tower("fingerprint", "--config", shared_tower / "tower.toml")
    assert proc.returncode == 0, proc.stderr
    der = ssl.PEM_cert_to_DER_cert((shared_tower / "server.pem").read_text())
    expected = hashlib.sha256(der).hexdigest()
    assert proc.stdout == ":".join(expected[i : i + 2] for i in range(0, 64, 2)) + "\n"
    assert fingerprint(shared_tower / "server.pem") == proc.stdout.strip()
    with pytest.raises(UsageError, match="not a PEM certificate"):
        fingerprint(shared_tower / "tower.toml")


# -- config and serve ------------------------------------------------------------------


def test_missing_config_is_one_line_error(tmp_path: Path) -> None:
    for argv in (["site", "add", "x"], ["site", "list"], ["fingerprint"], ["serve"]):
        proc = run_tower(*argv, "--config", tmp_path / "nope.toml")
        assert_one_line_error(proc, "nope.toml not found")
        assert proc.returncode == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen = ", "is not valid TOML"),
        ("lisen = '127.0.0.1:1'", "unknown key 'lisen'"),
        ("insecure = 'yes'", "'insecure' must be true or false"),
        ("cert = 3", "'cert' must be a non-empty string"),
        ("listen = '::1:80'", "'listen' must be HOST:PORT, [IPV6]:PORT or :PORT"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "tower.toml").write_text(text + "\n")
    assert_one_line_error(run_tower("site", "list", "--config", tmp_path / "tower.toml"), message)


def test_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "tower.toml").write_text(f'database = "sub/t.db"\ncert = {toml_string("/abs/c.pem")}\n')
    config = load_config(tmp_path / "tower.toml")
    assert config.database == tmp_path / "sub" / "t.db"
    assert config.cert == Path("/abs/c.pem")
    assert config.ca == tmp_path / "ca.pem"


def test_write_default_config_round_trips(tmp_path: Path) -> None:
    write_default_config(tmp_path, listen="[::1]:4646")
    assert load_config(tmp_path / "tower.toml").listen == "[::1]:4646"


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_toml_string_round_trips(value: str) -> None:
    assert tomllib.loads(f"v = {toml_string(value)}")["v"] == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4646", ("127.0.0.1", 4646)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:4646", ("::1", 4646)),
        (":4646", ("", 4646)),
        ("localhost:65535", ("localhost", 65535)),
        ("tower.example.com:443", ("tower.example.com", 443)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "4646",
        "127.0.0.1",
        "::1:4646",
        "[::1]",
        "[1.2.3.4]:1",
        "[]:1",
        "host:65536",
        "host:-1",
        "host:http",
        "256.1.1.1:1",
        "a b:1",
        "host:٤٦",
        "-bad:1",
    ],
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bad listen address"):
        parse_listen(text)


def test_serve_hands_over_to_the_server(tower: Path) -> None:
    config = tower / "tower.toml"
    proc = run_tower("serve", "--config", config, prelude=FAKE_SERVER)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "host": "127.0.0.1",
        "port": 4646,
        "insecure": False,
        "store": str(tower / "tower.db"),
    }
    proc = run_tower("serve", "--config", config, "--listen", "[::1]:0", "--insecure", prelude=FAKE_SERVER)
    assert json.loads(proc.stdout) == {
        "host": "::1",
        "port": 0,
        "insecure": True,
        "store": str(tower / "tower.db"),
    }
    assert "plain ws://" in proc.stderr
    proc = run_tower("serve", "--config", config, "--listen", ":4646", prelude=FAKE_SERVER)
    assert json.loads(proc.stdout)["host"] == ""


def test_serve_checks_before_starting(tower: Path) -> None:
    config = tower / "tower.toml"
    assert_one_line_error(
        run_tower("serve", "--config", config, "--listen", "::1:4646", prelude=FAKE_SERVER), "bad listen"
    )
    (tower / "server-key.pem").unlink()
    # TLS is never dropped silently: without the key the tower refuses unless told --insecure.
    assert_one_line_error(run_tower("serve", "--config", config, prelude=FAKE_SERVER), "server-key.pem")
    proc = run_tower("serve", "--config", config, "--insecure", prelude=FAKE_SERVER)
    assert json.loads(proc.stdout)["insecure"] is True
