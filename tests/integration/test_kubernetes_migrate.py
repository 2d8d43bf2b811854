"""The Kubernetes chart's migration Job (`python -m services.launcher.kubernetes migrate`)
on a real, empty PostgreSQL database: every service's tables are made, and running it
again (the next `helm upgrade`) changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg
import pytest

from services.launcher import Mesh

TABLES = {
    "admission_policies",
    "admission_replicas",
    "auth_api_keys",
    "chat_sessions",
    "chat_messages",
    "exec_tasks",
    "exec_steps",
    "rag_collections",
    "rag_documents",
    "rag_chunks",
}


@pytest.fixture
def empty_database(mesh: Mesh):
    name = f"migrate_{uuid.uuid4().hex[:10]}"
    admin = mesh.database_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = mesh.database_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")  # as CloudNativePG's postInitSQL does
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def migrate(url: str | None) -> subprocess.CompletedProcess[str]:
    """The Job's command, with `url` as its database (None: none given)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    if url is not None:
        env["SWITCHBOARD_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "services.launcher.kubernetes", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {name for (name,) in rows}


def test_the_migration_job_makes_every_table_once(empty_database: str) -> None:
    assert tables(empty_database) == set()
    first = migrate(empty_database)
    assert first.returncode == 0, first.stderr
    made = tables(empty_database)
    assert made >= TABLES, TABLES - made
    again = migrate(empty_database)
    assert again.returncode == 0, again.stderr
    assert tables(empty_database) == made


def test_the_migration_job_needs_its_database_url() -> None:
    done = migrate(None)
    assert done.returncode == 2
    assert "SWITCHBOARD_DATABASE_URL is not set" in done.stderr
