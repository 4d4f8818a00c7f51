"""The ``control-tower`` program: set a tower up, register sites, serve, read the audit log.

Machine-readable results (a site token, site names, a fingerprint, audit records) go to stdout
and nothing else does, so ``TOKEN=$(control-tower site add ...)`` works; people
read stderr.  Click objects are built by :func:`make_cli`, not at import time,
so importing this module has no side effects.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from supctl.errors import ExitCode, SupctlError, UsageError
from supctl.output import LOG_LEVELS, log_options, make_console
from supctl.plainhttp import parse_listen
from supctl.tower.auditcli import add_audit_command
from supctl.tower.certs import DEFAULT_NAMES, cert_paths, fingerprint, write_certs, write_peer_cert
from supctl.tower.config import (
    CONFIG_NAME,
    DEFAULT_FILES,
    PASSWORD_ENV,
    TowerConfig,
    check_store_url,
    load_config,
    write_default_config,
)
from supctl.tower.store import atomic_write
from supctl.version import version_option

PROG = "control-tower"
ADMIN_TOKEN_NAME = "admin.token"  # noqa: S105 - a file name, not a secret
DATABASE_NAME = DEFAULT_FILES["database"]

F = TypeVar("F", bound=Callable[..., Any])


def _console() -> Console:
    # soft_wrap: long paths stay on one line so they can be copied when stderr is a pipe.
    return make_console()


def _config_option(f: F) -> F:
    # Not exists=True: load_config's one-line message beats click's usage dump.
    return click.option(
        "--config",
        "config_path",
        required=True,
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"The tower's {CONFIG_NAME}.",
    )(f)


def _output_option(f: F) -> F:
    return click.option(
        "--output",
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write the token to FILE (mode 0600, replaced atomically) instead of stdout.",
    )(f)


def _format_option(f: F) -> F:
    return click.option(
        "-o",
        "--output",
        "fmt",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="A table with headers, or JSON (an array of objects) for scripts.",
    )(f)


def _check_output(output: Path | None) -> None:
    """Refuse an --output that cannot be written *before* a token is made, so that a typo
    does not leave a site with a token nobody has."""
    if output is None:
        return
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: directory {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: cannot write in directory {output.parent}")


def give_site_token(token: str, output: Path | None) -> None:
    """Hand a new site token over: to ``output`` (mode 0600 from its creation, replaced
    atomically, so it is never readable by others) or to stdout."""
    if output is not None:
        atomic_write(output, (token + "\n").encode(), 0o600)
        _console().print(f"site token written to {escape(str(output))} (mode 0600)")
        return
    with contextlib.suppress(OSError):
        st = os.fstat(sys.stdout.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            # `site add > site.token` under the usual umask 022: say so, loudly.
            _console().print(
                f"[yellow]warning:[/] stdout is a file that others can read"
                f" (mode {stat.S_IMODE(st.st_mode):04o}); the enforcer refuses such a token file."
                " Use --output FILE, or umask 077 before redirecting"
            )
    click.echo(token)


def init_tower(
    directory: Path,
    *,
    force: bool = False,
    extra_names: Sequence[str] = (),
    store_url: str | None = None,
    store_password_file: Path | None = None,
) -> str:
    """Create a complete tower in ``directory`` and return the admin token.

    ``extra_names`` are host names or IP addresses the server certificate covers
    besides localhost, 127.0.0.1 and ::1.  ``store_url`` names a PostgreSQL database
    (its password in ``store_password_file``, else in the environment) instead of
    ``DIRECTORY/tower.db``.
    """
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a directory")
    if store_url is not None:
        check_store_url(store_url, "--store-url")
        if store_password_file is not None:
            store_password_file = store_password_file.absolute()  # tower.toml lives elsewhere
            if not store_password_file.is_file():
                raise UsageError(f"--store-password-file {store_password_file}: no such file")
    elif store_password_file is not None:
        raise UsageError("--store-password-file goes with --store-url (SQLite has no password)")
    certs = cert_paths(directory)
    ours = [
        directory / CONFIG_NAME,
        directory / DATABASE_NAME,
        directory / ADMIN_TOKEN_NAME,
        certs.ca,
        certs.ca_key,
        certs.cert,
        certs.key,
        certs.peer_cert,
        certs.peer_key,
    ]
    existing = [p for p in ours if p.exists()]
    if existing and not force:
        # Overwriting would orphan every client (new CA) and every site (new tokens).
        raise UsageError(
            f"{existing[0]} already exists; use --force to replace the tower"
            " (new CA and tokens: clients and sites must be set up again)"
        )
    from supctl.tower import admincmds

    token = None
    if store_url is not None:
        # First: a server that cannot be reached or refuses the password leaves nothing behind.
        token = admincmds.create_store(store_url, replace=force, password_file=store_password_file)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_certs(directory, [*DEFAULT_NAMES, *(n for n in extra_names if n not in DEFAULT_NAMES)])
    if token is None:
        token = admincmds.create_store(directory / DATABASE_NAME, replace=force)
    atomic_write(directory / ADMIN_TOKEN_NAME, (token + "\n").encode(), 0o600)
    # Last, so that a tower.toml only exists next to a complete set of files.
    write_default_config(directory, store_url=store_url, store_password_file=store_password_file)
    return token


def _print_init_summary(directory: Path, store_url: str | None) -> None:
    certs = cert_paths(directory)
    config = directory / CONFIG_NAME
    console = _console()
    store = (
        f"{directory / DATABASE_NAME}  (mode 0600: token and password hashes, audit log)"
        if store_url is None
        else f"{store_url}  (token and password hashes, audit log)"
    )
    rows = [
        ("config", f"{config}"),
        ("CA certificate", f"{certs.ca}  (give this to clients)"),
        ("server certificate", f"{certs.cert}  sha256 {fingerprint(certs.cert)}"),
        ("private keys", f"{certs.ca_key}, {certs.key}  (mode 0600)"),
        ("store", store),
        ("admin token", f"{directory / ADMIN_TOKEN_NAME}  (mode 0600)"),
    ]
    console.print(f"[bold green]Control tower created in {escape(str(directory))}[/]")
    for label, value in rows:
        console.print(f"  {label:<19} {escape(value)}")
    cfg = shlex.quote(str(config))
    console.print("[bold]Next:[/]")
    console.print(f"  {PROG} site add --config {escape(cfg)} SITE --output SITE.token")
    console.print(f"  {PROG} serve --config {escape(cfg)}")


def serve_tower(
    config: TowerConfig, listen: str | None, insecure: bool, log_level: str = "info", log_format: str = "text"
) -> None:
    """Check everything that can be checked locally, then hand over to the server."""
    host, port = parse_listen(listen if listen is not None else config.listen)
    insecure = insecure or config.insecure
    if not insecure:
        for path in (config.cert, config.key):
            if not path.is_file():
                raise UsageError(f"{path} not found (TLS needs it; --insecure serves plain ws://)")
    from supctl.tower import admincmds

    admincmds.check_store(config)  # a missing store or another schema fails now, in one line
    if insecure:
        _console().print(
            "[yellow]warning:[/] serving plain ws:// without TLS; tokens cross the network in clear"
        )
    # Imported here: the server pulls in websockets and asyncio machinery the admin commands never need.
    from supctl.tower import serving

    serving.serve(config, host, port, insecure, LOG_LEVELS[log_level], log_format)


def read_password(*, confirm: bool = False) -> str:
    """A password: prompted without echo on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=confirm, err=True))
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def _who() -> str | None:
    """Who applies a policy set, for its history: the login name, if there is one."""
    with contextlib.suppress(OSError, KeyError):
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    return None


def make_cli() -> click.Group:
    """Build the ``control-tower`` command tree."""
    from supctl.tower import admincmds, listings

    @click.group(name=PROG, context_settings={"help_option_names": ["-h", "--help"]})
    @version_option(PROG)
    def cli() -> None:
        """The supctl control tower: where clients meet edge sites."""

    @cli.command()
    @click.argument("directory", type=click.Path(path_type=Path))  # checked by init_tower, in one line
    @click.option("--force", is_flag=True, help="Replace an existing tower (new CA, new tokens).")
    @click.option(
        "--san",
        "sans",
        multiple=True,
        metavar="NAME",
        help="Another host name or IP address for the server certificate (repeatable).",
    )
    @click.option(
        "--store-url",
        metavar="URL",
        help='A PostgreSQL database for the store, "postgresql://USER@HOST/DB", instead of DIRECTORY/tower.db.',
    )
    @click.option(
        "--store-password-file",
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"The store's password, its first line (else ${PASSWORD_ENV}); named in tower.toml.",
    )
    def init(
        directory: Path,
        force: bool,
        sans: tuple[str, ...],
        store_url: str | None,
        store_password_file: Path | None,
    ) -> None:
        """Create a tower in DIRECTORY: CA, server certificate, config, store and an admin token."""
        init_tower(
            directory,
            force=force,
            extra_names=sans,
            store_url=store_url,
            store_password_file=store_password_file,
        )
        _print_init_summary(directory, store_url)

    @cli.group()
    def site() -> None:
        """Register and list edge sites."""

    @site.command("add")
    @_config_option
    @_output_option
    @click.argument("name")
    def site_add(config_path: Path, output: Path | None, name: str) -> None:
        """Register site NAME and print its token (the only output on stdout), or write it to --output."""
        config = load_config(config_path)
        _check_output(output)
        give_site_token(admincmds.add_site(config, name), output)

    @site.command("rotate")
    @_config_option
    @_output_option
    @click.argument("name")
    def site_rotate(config_path: Path, output: Path | None, name: str) -> None:
        """Give site NAME a new token, printed (or written to --output); the old one stops working.

        A running tower closes the link opened with the old token within a second.
        """
        config = load_config(config_path)
        _check_output(output)
        give_site_token(admincmds.rotate_site(config, name), output)
        _console().print(
            f"site {escape(name)}: new token; the old one no longer works and a running tower"
            " closes its link (restart the site's enforcer with the new token)"
        )

    @site.command("remove")
    @_config_option
    @click.argument("name")
    def site_remove(config_path: Path, name: str) -> None:
        """Remove site NAME and its token; a running tower closes its link."""
        admincmds.remove_site(load_config(config_path), name)
        _console().print(f"site {escape(name)} removed")

    @site.command("list")
    @_config_option
    @_format_option
    def site_list(config_path: Path, fmt: str) -> None:
        """Print the registered sites: name, token accessor, created, rotated."""
        rows = listings.sites(admincmds.sites(load_config(config_path)))
        listings.show(rows, ("name", "accessor", "created", "rotated"), fmt)

    @cli.group()
    def user() -> None:
        """Add, remove and list users (who log in with supctl do login)."""

    @user.command("add")
    @_config_option
    @click.option(
        "--policy",
        "policies",
        multiple=True,
        metavar="POLICY",
        help="A policy of the user, from the policy set in force (repeatable; none: refused everything).",
    )
    @click.argument("name")
    def user_add(config_path: Path, policies: tuple[str, ...], name: str) -> None:
        """Create user NAME; the password is read from stdin (prompted without echo on a terminal)."""
        config = load_config(config_path)
        admincmds.add_user(config, name, read_password(confirm=True), list(policies))
        _console().print(f"user {escape(name)} added (policies: {escape(', '.join(policies) or 'none')})")

    @user.command("remove")
    @_config_option
    @click.argument("name")
    def user_remove(config_path: Path, name: str) -> None:
        """Remove user NAME and revoke their tokens; a running tower ends their sessions."""
        revoked = admincmds.remove_user(load_config(config_path), name)
        _console().print(f"user {escape(name)} removed ({revoked} tokens revoked)")

    @user.command("list")
    @_config_option
    @_format_option
    def user_list(config_path: Path, fmt: str) -> None:
        """Print the users: name, policies, created."""
        rows = listings.users(admincmds.users(load_config(config_path)))
        listings.show(rows, ("name", "policies", "created"), fmt)

    @cli.group()
    def token() -> None:
        """Add, list and revoke users' login and API tokens."""

    @token.command("add")
    @_config_option
    @click.option("--user", "user_name", required=True, metavar="NAME", help="The user the token acts as.")
    @click.option(
        "--expires", default="90d", show_default=True, metavar="DURATION", help="Lifetime: 30s, 15m, 8h, 30d."
    )
    def token_add(config_path: Path, user_name: str, expires: str) -> None:
        """Create an API token for automation and print it (the only output on stdout)."""
        from supctl.tower.users import iso, parse_duration

        lifetime = parse_duration(expires)
        issued = admincmds.add_api_token(load_config(config_path), user_name, lifetime)
        _console().print(
            f"API token of {escape(user_name)}: accessor {issued.accessor}, expires {iso(issued.expires)}"
        )
        click.echo(issued.token)

    @token.command("list")
    @_config_option
    @_format_option
    def token_list(config_path: Path, fmt: str) -> None:
        """Print accessor, user, kind, expiry and state of every token (never the token)."""
        rows = listings.tokens(admincmds.tokens(load_config(config_path)), admincmds.now())
        listings.show(rows, ("accessor", "user", "kind", "expires", "state"), fmt)

    @token.command("revoke")
    @_config_option
    @click.argument("accessor")
    def token_revoke(config_path: Path, accessor: str) -> None:
        """Revoke the login, API or admin token with this ACCESSOR (see token list, audit records)."""
        owner = admincmds.revoke(load_config(config_path), accessor)
        if owner is None:
            _console().print(f"admin token {escape(accessor)} revoked")
        else:
            _console().print(f"token {escape(accessor)} of user {escape(owner)} revoked")

    @cli.group()
    def policy() -> None:
        """Apply and show the policy set in force (docs/policies.md)."""

    @policy.command("apply")
    @_config_option
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    def policy_apply(config_path: Path, file: Path) -> None:
        """Validate FILE (TOML, as policies.toml) and make it the policy set in force; print its version."""
        config = load_config(config_path)
        version = admincmds.apply_policies(config, file, _who())
        _console().print(f"policy set version {version} applied from {escape(str(file))}")
        if config.policies.exists() and config.policies.resolve() != file.resolve():
            _console().print(
                f"[yellow]warning:[/] a running tower applies {escape(str(config.policies))} again"
                " when that file changes or the tower starts; remove it to manage policies here"
            )
        click.echo(version)

    @policy.command("show")
    @_config_option
    def policy_show(config_path: Path) -> None:
        """Print the policy set in force (TOML, on stdout) and its version (on stderr)."""
        from supctl.tower.users import iso

        found = admincmds.policy_in_force(load_config(config_path))
        if found is None:
            _console().print("no policy set applied yet: every user is refused everything")
            return
        by = f" by {found.applied_by}" if found.applied_by else ""
        _console().print(f"policy set version {found.version}, applied {iso(found.applied)}{escape(by)}")
        sys.stdout.write(found.text if found.text.endswith("\n") or not found.text else found.text + "\n")

    @cli.command("migrate")
    @_config_option
    def migrate_cmd(config_path: Path) -> None:
        """Create or upgrade the store's schema; import the JSON files of an older tower."""
        for line in admincmds.migrate(load_config(config_path)):
            _console().print(escape(line))

    @cli.command("fingerprint")
    @_config_option
    def fingerprint_cmd(config_path: Path) -> None:
        """Print the SHA-256 fingerprint of the server certificate."""
        click.echo(fingerprint(load_config(config_path).cert))

    @cli.command("peer-cert")
    @_config_option
    def peer_cert_cmd(config_path: Path) -> None:
        """Write a new replicas' certificate (peer.pem) from the tower's CA (docs/tower.md)."""
        config = load_config(config_path)
        paths = write_peer_cert(config.ca.parent)
        if (paths.peer_cert, paths.peer_key) != (config.peer_cert, config.peer_key):
            raise UsageError(f"wrote {paths.peer_cert}, but [cluster] cert is {config.peer_cert}")
        _console().print(f"wrote {escape(str(paths.peer_cert))} and {escape(str(paths.peer_key))}")

    @cli.command()
    @_config_option
    @click.option(
        "--listen", metavar="HOST:PORT", help="Override 'listen' from the config ([::1]:4646, :4646)."
    )
    @click.option("--insecure", is_flag=True, help="Serve plain ws:// without TLS.")
    @log_options("info")
    def serve(config_path: Path, listen: str | None, insecure: bool, log_level: str, log_format: str) -> None:
        """Run the tower."""
        serve_tower(load_config(config_path), listen, insecure, log_level, log_format)

    add_audit_command(cli)
    return cli


def _fail(message: str, code: int) -> NoReturn:
    # Plain write, not rich: the message must stay one line whatever the terminal width.
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: run the CLI and turn expected errors into one line and an exit code."""
    try:
        make_cli().main(args=list(argv) if argv is not None else None, prog_name=PROG)
    except SupctlError as e:
        _fail(str(e), e.exit_code)
    except OSError as e:
        # Files that cannot be written, ports already in use: the environment, not a bug.
        where = f"{e.filename}: " if e.filename else ""
        # A listen address in use or not ours is a setting to change, as in the other programs.
        code = ExitCode.USAGE if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) else ExitCode.FAILURE
        _fail(" ".join(f"{where}{e.strerror or e}".split()), code)
