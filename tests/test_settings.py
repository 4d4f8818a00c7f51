"""Where supctl finds the tower and its credentials, and how it says so when it cannot.

Precedence, highest first: command-line option > environment (``SUPCTL_*``) >
config file > built-in default.  :func:`supctl.client.settings.resolve` merges
the config file and the default; option-over-environment is click's job, so
that half is checked through the real click tree (:func:`supctl.cli.make_cli`
with a probe verb that prints the resolved settings), and the user-facing
errors through the installed ``supctl`` program.
"""

from __future__ import annotations

import os
import subprocess
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from stack import one_line_error, program

from supctl import hookimpl
from supctl.cli import make_cli
from supctl.client.api import Invocation
from supctl.client.settings import DEFAULT_HOST, ClientSettings, read_token_file, resolve
from supctl.errors import ExitCode, UsageError
from supctl.plugins import make_plugin_manager


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SUPCTL_* from the caller and no real ~/.config/supctl/config.toml."""
    for key in list(os.environ):
        if key.startswith("SUPCTL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    yield


def default_config(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "xdg" / "supctl" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def token_file(tmp_path: Path, name: str, token: str) -> Path:
    path = tmp_path / name
    path.write_text(f"{token}\n")
    return path


def settings(
    host: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    ca_file: str | None = None,
    config: str | None = None,
) -> ClientSettings:
    return resolve(host=host, token=token, token_file=token_file, ca_file=ca_file, config=config)


# --- resolve(): option > config file > default ----------------------------------------------


def test_defaults_without_any_config() -> None:
    s = settings()
    assert s == ClientSettings(host=DEFAULT_HOST, token=None, ca_file=None)


def test_config_file_values_are_used(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("CA")
    default_config(tmp_path, f'host = "wss://tower.example:4646/"\ntoken = "from-file"\nca-file = "{ca}"\n')
    assert settings() == ClientSettings(host="wss://tower.example:4646", token="from-file", ca_file=ca)


def test_options_beat_the_config_file(tmp_path: Path) -> None:
    file_ca, option_ca = tmp_path / "file-ca.pem", tmp_path / "option-ca.pem"
    file_ca.write_text("CA")
    option_ca.write_text("CA")
    default_config(tmp_path, f'host = "wss://file:1"\ntoken = "file-token"\nca-file = "{file_ca}"\n')
    s = settings(host="ws://option:2", token="option-token", ca_file=str(option_ca))
    assert s == ClientSettings(host="ws://option:2", token="option-token", ca_file=option_ca)


def test_token_sources_in_order(tmp_path: Path) -> None:
    option_file = token_file(tmp_path, "option.token", "option-file-token")
    config_file = token_file(tmp_path, "config.token", "config-file-token")
    default_config(tmp_path, f'token = "config-token"\ntoken-file = "{config_file}"\n')
    assert settings(token="option-token", token_file=str(option_file)).token == "option-token"
    assert settings(token_file=str(option_file)).token == "option-file-token"
    # In the config file too, an inline token beats a token file.
    assert settings().token == "config-token"
    default_config(tmp_path, f'token-file = "{config_file}"\n')
    assert settings().token == "config-file-token"


def test_explicit_config_replaces_the_default_one(tmp_path: Path) -> None:
    default_config(tmp_path, 'host = "wss://default-config:1"\n')
    other = tmp_path / "other.toml"
    other.write_text('host = "wss://other-config:2"\n')
    assert settings(config=str(other)).host == "wss://other-config:2"
    assert settings().host == "wss://default-config:1"


def test_home_is_expanded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    token_file(home, "t", "home-token")
    (home / "c.toml").write_text('token-file = "~/t"\n')
    assert settings(config="~/c.toml").token == "home-token"


def test_the_token_never_shows_in_repr() -> None:
    s = settings(token="sct_admin_secret")
    assert "sct_admin_secret" not in repr(s) and "***" in repr(s)


# --- resolve(): errors are one-line UsageErrors ---------------------------------------------------


def assert_usage_error(call: Callable[[], object], *fragments: str) -> UsageError:
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert info.value.exit_code == ExitCode.USAGE
    for fragment in fragments:
        assert fragment in message, message
    return info.value


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('host = "wss://x:1"\nhost = "wss://y:2"\n', "is not valid TOML"),
        ("host = wss://unquoted\n", "is not valid TOML"),
        ("[section\n", "is not valid TOML"),
        (b"host = '\xff\xfe'\n", "is not valid TOML"),
        (
            'hots = "wss://typo:1"\n',
            "unknown key 'hots' (known: host, token, token-file, ca-file, tower-fingerprint, site, application,",
        ),
        ("host = 4646\n", "'host' must be a string"),
        ('[host]\nname = "x"\n', "'host' must be a string"),
    ],
    ids=["duplicate-key", "unquoted", "broken-table", "not-utf8", "unknown-key", "not-a-string", "a-table"],
)
def test_bad_config_file(tmp_path: Path, text: str | bytes, fragment: str) -> None:
    path = default_config(tmp_path, text)
    assert_usage_error(settings, f"config file {path}", fragment)


def test_explicit_config_must_exist_but_the_default_may_not(tmp_path: Path) -> None:
    assert settings().host == DEFAULT_HOST  # no default file: fine
    missing = tmp_path / "nope.toml"
    assert_usage_error(lambda: settings(config=str(missing)), f"config file {missing} does not exist")


def test_unreadable_config(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory.toml"
    directory.mkdir()
    assert_usage_error(lambda: settings(config=str(directory)), "cannot read config file")


def test_token_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.token"
    assert_usage_error(lambda: settings(token_file=str(missing)), f"cannot read token file {missing}")
    assert_usage_error(lambda: read_token_file(missing), "No such file or directory")


@pytest.mark.parametrize("content", ["", "\n", "   \n\t\n"])
def test_token_file_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.token"
    path.write_text(content)
    assert_usage_error(lambda: settings(token_file=str(path)), f"token file {path} is empty")


def test_token_file_from_config_missing(tmp_path: Path) -> None:
    default_config(tmp_path, f'token-file = "{tmp_path / "gone.token"}"\n')
    assert_usage_error(settings, "cannot read token file")


def test_token_file_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("  sct_admin_abc \n\n")
    assert settings(token_file=str(path)).token == "sct_admin_abc"


@pytest.mark.parametrize(
    "host", ["foo", "tower.example:4646", "http://tower:80", "https://tower", "wss://", "wss:///path", ""]
)
def test_bad_host(host: str) -> None:
    if host == "":
        assert settings(host=host).host == DEFAULT_HOST  # empty means "not given"
        return
    assert_usage_error(lambda: settings(host=host), "--host must look like wss://HOST:PORT", repr(host))


def test_bad_host_from_the_config_file(tmp_path: Path) -> None:
    default_config(tmp_path, 'host = "tower:4646"\n')
    assert_usage_error(settings, "--host must look like wss://HOST:PORT")


@pytest.mark.parametrize("host", ["wss://tower:4646", "ws://127.0.0.1:1/", "wss://[::1]:4646"])
def test_good_hosts(host: str) -> None:
    assert settings(host=host).host == host.rstrip("/")


def test_ca_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    assert_usage_error(lambda: settings(ca_file=str(missing)), f"CA file {missing} does not exist")
    default_config(tmp_path, f'ca-file = "{missing}"\n')
    assert_usage_error(settings, f"CA file {missing} does not exist")


# --- through click: option > environment > config file > default ------------------------------


def probe_cli() -> click.Group:
    @click.command("probe")
    @click.pass_obj
    def probe(inv: Invocation) -> None:
        s = inv.settings
        click.echo(f"{s.host} {s.token} {s.ca_file}")

    module = types.ModuleType("settings-probe")
    module.supctl_add_verbs = hookimpl(lambda register: register("root", probe))  # type: ignore[attr-defined]
    return make_cli(make_plugin_manager(extra_plugins=[module]))


def probe(args: list[str], env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(probe_cli(), [*args, "probe"], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.fixture
def layered(tmp_path: Path) -> dict[str, str]:
    """A config file and an environment that both set everything."""
    for name in ("file", "env", "option"):
        (tmp_path / f"{name}-ca.pem").write_text("CA")
        token_file(tmp_path, f"{name}.token", f"{name}-file-token")
    default_config(
        tmp_path, f'host = "wss://file:1"\ntoken = "file-token"\nca-file = "{tmp_path}/file-ca.pem"\n'
    )
    return {
        "SUPCTL_HOST": "wss://env:2",
        "SUPCTL_TOKEN": "env-token",
        "SUPCTL_CA_FILE": f"{tmp_path}/env-ca.pem",
    }


def test_precedence_default(tmp_path: Path) -> None:
    assert probe([]) == f"{DEFAULT_HOST} None None"


def test_precedence_config_over_default(tmp_path: Path, layered: dict[str, str]) -> None:
    assert probe([]) == f"wss://file:1 file-token {tmp_path}/file-ca.pem"


def test_precedence_env_over_config(tmp_path: Path, layered: dict[str, str]) -> None:
    assert probe([], env=layered) == f"wss://env:2 env-token {tmp_path}/env-ca.pem"


def test_precedence_option_over_env(tmp_path: Path, layered: dict[str, str]) -> None:
    options = [
        "--host",
        "wss://option:3",
        "--token",
        "option-token",
        "--ca-file",
        f"{tmp_path}/option-ca.pem",
    ]
    assert probe(options, env=layered) == f"wss://option:3 option-token {tmp_path}/option-ca.pem"


def test_token_file_option_beats_token_env(tmp_path: Path, layered: dict[str, str]) -> None:
    # --token-file on the command line outranks SUPCTL_TOKEN in the environment...
    out = probe(["--token-file", f"{tmp_path}/option.token"], env=layered)
    assert out.split()[1] == "option-file-token"
    # ...SUPCTL_TOKEN_FILE outranks the config file's token...
    out = probe([], env={"SUPCTL_TOKEN_FILE": f"{tmp_path}/env.token"})
    assert out.split()[1] == "env-file-token"
    # ...and --token beats SUPCTL_TOKEN_FILE.
    out = probe(["--token", "option-token"], env={"SUPCTL_TOKEN_FILE": f"{tmp_path}/env.token"})
    assert out.split()[1] == "option-token"


def test_config_option_selects_the_file(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('host = "wss://other:9"\n')
    assert probe(["--config", str(other)]).startswith("wss://other:9 ")


# --- the installed program: one-line errors, help without credentials ---------------------------


def run_supctl(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPCTL_")}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"), COLUMNS="200")
    return subprocess.run(
        [program("supctl"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


CONNECT = ["do", "-s", "paris", "applications", "app", "service-instances", "inst", "connect", "tcp", "80"]


@pytest.mark.parametrize("host", ["foo", "http://tower:4646", "wss://"])
def test_cli_bad_host_is_exit_2_one_line(tmp_path: Path, host: str) -> None:
    result = run_supctl("--host", host, *CONNECT, tmp_path=tmp_path)
    assert result.returncode == ExitCode.USAGE
    line = one_line_error(result.stderr.encode())
    assert line == f"supctl: error: --host must look like wss://HOST:PORT, got {host!r}"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("bad-toml", "is not valid TOML"),
        ("unknown-key", "unknown key 'tokn'"),
        ("missing-config", "does not exist"),
        ("missing-token-file", "cannot read token file"),
        ("empty-token-file", "is empty"),
        ("missing-ca", "CA file"),
    ],
)
def test_cli_settings_errors_are_exit_2_one_line(tmp_path: Path, setup: str, fragment: str) -> None:
    args: list[str] = []
    if setup == "bad-toml":
        default_config(tmp_path, "host = \n")
    elif setup == "unknown-key":
        default_config(tmp_path, 'tokn = "x"\n')
    elif setup == "missing-config":
        args = ["--config", str(tmp_path / "nope.toml")]
    elif setup == "missing-token-file":
        args = ["--token-file", str(tmp_path / "nope.token")]
    elif setup == "empty-token-file":
        (tmp_path / "empty.token").write_text("\n")
        args = ["--token-file", str(tmp_path / "empty.token")]
    else:
        args = ["--ca-file", str(tmp_path / "nope.pem")]
    result = run_supctl(*args, *CONNECT, tmp_path=tmp_path)
    assert result.returncode == ExitCode.USAGE, result.stderr
    line = one_line_error(result.stderr.encode())
    assert line.startswith("supctl: error: ") and fragment in line


def test_cli_without_a_token_is_denied_in_one_line(tmp_path: Path) -> None:
    result = run_supctl("--host", "wss://127.0.0.1:1", *CONNECT, tmp_path=tmp_path)
    assert result.returncode == ExitCode.DENIED
    assert "no API token" in one_line_error(result.stderr.encode())


def test_cli_help_lists_do(tmp_path: Path) -> None:
    result = run_supctl("--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:", 1)[1]
    assert "do" in {line.split()[0] for line in commands.splitlines() if line.strip()}
    for option in ("--host", "--token-file", "--ca-file", "--config"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["do", "--help"],
        ["do", "-s", "paris", "applications", "app", "--help"],
        ["do", "-s", "paris", "applications", "app", "service-instances", "inst", "--help"],
        [*CONNECT[:-2], "--help"],
        [*CONNECT[:-1], "--help"],
    ],
)
def test_cli_do_help_needs_no_token_or_config(tmp_path: Path, args: list[str]) -> None:
    # Even a broken config file and a host that is not a URL must not matter for help.
    default_config(tmp_path, "this is not toml\n")
    result = run_supctl("--host", "not-a-url", *args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Usage: supctl do")


def test_error_lines_are_printed_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    """Data in a message (a fingerprint's ':cd:', brackets in a name) is not rich markup or emoji."""
    from supctl.cli import fail

    message = "fingerprint ab:cd:ef does not match [red]x[/] :smile:"
    assert fail(message, 5) == 5
    assert capsys.readouterr().err == f"supctl: error: {message}\n"


def test_the_token_in_use_says_where_it_came_from(tmp_path: Path) -> None:
    """``supctl whoami`` and ``do login``'s warning name the credential that won."""
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    path = default_config(tmp_path, f'token-file = "{secret}"\n')
    assert settings().token_origin == f"token-file {secret} in {path}"
    assert settings(token="x").token_origin == "--token"
    assert settings(token_file=str(secret)).token_origin == f"--token-file {secret}"
    env = resolve(
        host=None, token="x", token_file=None, ca_file=None, config=None, origins=("SUPCTL_TOKEN", "")
    )
    assert env.token_origin == "SUPCTL_TOKEN"
