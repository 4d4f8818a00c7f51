"""The control tower: the rendezvous point between ``supctl`` clients and edge sites.

:mod:`.cli` is the ``control-tower`` program, :mod:`.config` reads ``tower.toml``,
:mod:`.store` keeps the hashed admin and site tokens and :mod:`.certs` makes the
tower's private CA and server certificate.  Nothing is imported here so that
``import supctl.tower.x`` stays cheap.
"""
