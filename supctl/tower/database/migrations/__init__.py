"""Alembic migrations of the store, run programmatically by :mod:`supctl.tower.database.versions`.

There is no ``env.py``: the code hands Alembic its own connection, inside the
transaction of the upgrade (see ``versions.py``).  To change the schema, add a
file to ``versions/`` by hand: copy the newest one, give it the next revision
number, set ``down_revision`` to the one before, and update ``schema.py`` to
match (``tests/test_database.py`` compares them).
"""
