"""supctl: reach services on edge sites as if they were local.

Three programs share this package: ``supctl`` (the CLI), ``control-tower``
(:mod:`supctl.tower`) and ``edge-enforcer`` (:mod:`supctl.enforcer`).
"""

from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
