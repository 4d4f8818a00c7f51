"""Built-in runtimes: ``netns`` (the service's network namespace) and ``host``.

Both run the process as the leader of a new process group (``start_process``)
and switch user with ``setpriv`` (util-linux), which execs the command in turn:
the pid asyncio sees is the command's own, so signals reach it directly.
"""

from __future__ import annotations

import asyncio
import os

from supctl.enforcer.api import ServiceInstance
from supctl.enforcer.netns import namespace_exists
from supctl.enforcer.runtime import ProcessSpec, find_tool, start_process, user_prefix
from supctl.errors import StreamError
from supctl.protocol import ErrorCode


class NetnsRuntime:
    """``ip netns exec NS [setpriv ...] ARGV``.

    iproute2 execs the command itself (no fork outside batch mode), in a private
    mount namespace where /etc/netns/NS/resolv.conf and hosts are bind-mounted
    over /etc: so ``nslookup`` in a service asks the service's DNS server.
    Needs root, like ``ip netns exec``.
    """

    async def spawn(self, instance: ServiceInstance, spec: ProcessSpec) -> asyncio.subprocess.Process:
        netns = instance.netns
        if netns is None:  # the inventory refuses runtime "netns" without a netns
            raise StreamError(f"{instance.where} has no network namespace", code=ErrorCode.INTERNAL)
        # Checked here because `ip netns exec` would start anyway and only print
        # its complaint as the command's stderr, with exit status 255.
        if not namespace_exists(netns):
            raise StreamError(f"network namespace {netns} does not exist", code=ErrorCode.NOT_FOUND)
        if os.geteuid() != 0:
            raise StreamError("the netns runtime needs the enforcer to run as root", code=ErrorCode.INTERNAL)
        argv = [find_tool("ip"), "netns", "exec", netns, *user_prefix(spec.user), *spec.argv]
        return await start_process(argv, spec)


class HostRuntime:
    """No isolation: the command runs next to the enforcer (development without root)."""

    async def spawn(self, instance: ServiceInstance, spec: ProcessSpec) -> asyncio.subprocess.Process:
        return await start_process([*user_prefix(spec.user), *spec.argv], spec)
