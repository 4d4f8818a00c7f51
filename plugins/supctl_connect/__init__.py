"""Built-in plugin: the ``connect`` verb and its three backends.

* transport - how streams reach the tower (TLS WebSocket, :mod:`.transport`)
* forwards  - the command line: a chain of forwards (``tcp 443 --bind 8443 tcp 80 ...``)
* listener  - ``--bind``: a local TCP listener, a stream per connection
* status, render - what ``--bind`` shows: the model (counters, rates, units) and its views
* netcat    - no ``--bind``: stdin/stdout joined to one stream
"""

from __future__ import annotations

from supctl import hookimpl
from supctl.client.api import Listener, Netcat, RegisterProtocol, RegisterVerb, Transport
from supctl.client.settings import ClientSettings


@hookimpl
def supctl_add_verbs(register: RegisterVerb) -> None:
    from .account import make_login_command, make_logout_command, make_whoami_command
    from .verb import make_connect_command

    register("service-instance", make_connect_command())
    register("do", make_login_command())
    register("do", make_logout_command())
    register("root", make_whoami_command())


@hookimpl
def supctl_add_connect_protocols(register: RegisterProtocol) -> None:
    from .forwards import make_tcp_command

    register("tcp", make_tcp_command())


@hookimpl(trylast=True)  # a third-party transport wins if it answers
def supctl_transport(settings: ClientSettings) -> Transport:
    from .transport import WebSocketTransport

    return WebSocketTransport(settings)


@hookimpl(trylast=True)
def supctl_listener() -> Listener:
    from .listener import TcpListener

    return TcpListener()


@hookimpl(trylast=True)
def supctl_netcat() -> Netcat:
    from .netcat import StdioNetcat

    return StdioNetcat()
