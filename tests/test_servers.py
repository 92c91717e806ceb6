"""The real servers the tests start (tests/support/servers.py): each answers, counts what it served, and
keeps what it acknowledged across a crash."""

from __future__ import annotations

import httpx


def test_postgres_database_survives_a_kill(postgres_factory) -> None:
    import psycopg

    server = postgres_factory()
    url = server.create_database("survivor")
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE t (n int PRIMARY KEY)")
        db.execute("INSERT INTO t VALUES (1), (2)")
    server.kill()
    server.start()
    with psycopg.connect(url) as db:
        assert db.execute("SELECT n FROM t ORDER BY n").fetchall() == [(1,), (2,)]


def test_postgres_fixture_gives_each_test_an_empty_database(postgres: str) -> None:
    import psycopg

    with psycopg.connect(postgres) as db:
        assert db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


def test_nginx_serves_ranges_and_logs_each_request(nginx) -> None:
    (nginx.root / "blob").write_bytes(bytes(range(256)) * 4)
    part = httpx.get(f"{nginx.url}/blob", headers={"Range": "bytes=16-31"})
    assert part.status_code == 206 and part.content == bytes(range(16, 32))
    assert httpx.get(f"{nginx.url}/absent").status_code == 404
    nginx.stop()  # flushes the log
    assert [(r.method, r.path, r.status, r.bytes_sent, r.range) for r in nginx.requests()] == [
        ("GET", "/blob", 206, 16, "bytes=16-31"), ("GET", "/absent", 404, nginx.requests()[1].bytes_sent, "")]


def test_seaweedfs_stores_objects_and_counts_requests(seaweedfs, s3_bucket: str) -> None:
    s3 = seaweedfs.client()
    before = seaweedfs.request_counts()
    s3.put_object(Bucket=s3_bucket, Key="chunks/abc", Body=b"x" * 1000)
    assert s3.get_object(Bucket=s3_bucket, Key="chunks/abc")["Body"].read() == b"x" * 1000
    after = seaweedfs.request_counts()
    assert after.get("PUT", 0) - before.get("PUT", 0) == 1
    assert after.get("GET", 0) - before.get("GET", 0) == 1
