"""Reading the engine's list of a container's file changes: strictly, as hostile input."""

import itertools
import json
import tracemalloc

import pytest

from ds01_spawner.installed import (
    MAX_CHANGES_BYTES,
    InstalledRecords,
    dist_info_package,
    iter_change_objects,
    iter_changes,
    packages_added,
)

SITE = "/opt/ds01/venv/lib/python3.11/site-packages"


def changes_json(changes: list[tuple[str, int]]) -> bytes:
    """What the engine sends (Go's encoder: compact, `<>&` escaped)."""
    body = json.dumps([{"Path": p, "Kind": k} for p, k in changes], separators=(",", ":"))
    return (body.replace("<", "\\u003c").replace(">", "\\u003e") + "\n").encode()


def parsed(body: bytes, chunk: int = 7) -> list[tuple[str, int]]:
    chunks = (body[i : i + chunk] for i in range(0, len(body), chunk))
    return list(iter_changes(iter_change_objects(chunks)))


def test_a_dist_info_directory_names_a_canonical_package_and_version():
    assert dist_info_package(f"{SITE}/ds01probe-1.0.dist-info") == ("ds01probe", "1.0")
    assert dist_info_package(f"{SITE}/scikit_learn-1.5.2.dist-info") == ("scikit-learn", "1.5.2")
    assert dist_info_package(f"{SITE}/PEFT-0.13.2.dist-info") == ("peft", "0.13.2")
    assert dist_info_package("/usr/lib/python3/dist-packages/Foo_Bar-2.0.dist-info") == (
        "foo-bar",
        "2.0",
    )


def test_versions_are_normalized_as_pip_would():
    assert dist_info_package(f"{SITE}/torch-2.3.0+cu121.dist-info") == ("torch", "2.3.0+cu121")
    assert dist_info_package(f"{SITE}/x-1.0_1.dist-info") == ("x", "1.0.post1")  # 1.0-1
    assert dist_info_package(f"{SITE}/x-01.02.dist-info") == ("x", "1.2")


def test_what_is_not_a_dist_info_directory_in_site_packages_is_ignored():
    for path in [
        f"{SITE}/numpy",
        f"{SITE}/numpy-2.0.0.dist-info/METADATA",
        f"{SITE}/numpy-2.0.0.egg-info",
        f"{SITE}/numpy.dist-info",
        "/home/ds01/numpy-2.0.0.dist-info",
        "numpy-2.0.0.dist-info",
    ]:
        assert dist_info_package(path) is None, path


def test_hostile_paths_are_refused():
    for path in [
        f"{SITE}/../evil-1.0.dist-info",
        f"{SITE}/./evil-1.0.dist-info",
        f"{SITE}//evil-1.0.dist-info",
        "/x/site-packages/evil/pkg-1.0.dist-info",  # site-packages not the parent
        "/x/site-packages.evil/pkg-1.0.dist-info",
        f"{SITE}/" + "a" * 5000 + "-1.0.dist-info",
        f"{SITE}/evil\n-1.0.dist-info",
        f"{SITE}/evil-1.0\nRUN rm -rf /.dist-info",
        f"{SITE}/evil-\udcff1.0.dist-info",  # a non-UTF-8 byte, as surrogateescape reads it
        f"{SITE}/evil-\ufffd.dist-info",  # ... as the engine's JSON encoder writes it
        f"{SITE}/evil-1.0;id.dist-info",
        f"{SITE}/evil-$(id).dist-info",
        f"{SITE}/evil-`id`.dist-info",
        f"{SITE}/evil-1.0 && curl x.dist-info",
        f"{SITE}/evil-1.0|sh.dist-info",
        f"{SITE}/$(id)-1.0.dist-info",
        f"{SITE}/ünï-1.0.dist-info",
        f"{SITE}/-1.0.dist-info",
        f"{SITE}/evil-.dist-info",
    ]:
        assert dist_info_package(path) is None, path


def test_added_packages_are_the_dist_info_directories_the_container_added():
    changes = [
        (SITE, 0),
        (f"{SITE}/peft", 1),
        (f"{SITE}/peft-0.13.2.dist-info", 1),
        (f"{SITE}/peft-0.13.2.dist-info/METADATA", 1),
        (f"{SITE}/numpy-2.0.0.dist-info", 0),  # the image's, touched: not new
        ("/tmp/x-1.0.dist-info", 1),
    ]
    assert packages_added(changes) == ["peft==0.13.2"]


def test_an_upgrade_records_the_new_version():
    changes = [(f"{SITE}/pandas-2.2.0.dist-info", 2), (f"{SITE}/pandas-2.2.3.dist-info", 1)]
    assert packages_added(changes) == ["pandas==2.2.3"]


def test_an_uninstall_records_nothing():
    assert packages_added([(f"{SITE}/pandas-2.2.0.dist-info", 2), (f"{SITE}/pandas", 2)]) == []


def test_the_number_of_packages_kept_is_capped():
    changes = [(f"{SITE}/pkg{i}-1.0.dist-info", 1) for i in range(10_000)]
    assert len(packages_added(changes, max_packages=500)) == 500


def test_the_engine_response_parses_across_any_chunking():
    changes = [
        (SITE, 0),
        (f"{SITE}/peft-0.13.2.dist-info", 1),
        ('/tmp/a "quoted" {"Path":"/x/site-packages/evil-1.0.dist-info","Kind":1}', 1),
        ("/tmp/back\\slash<>&", 2),
    ]
    body = changes_json(changes)
    for chunk in (1, 2, 7, 64, len(body)):
        assert parsed(body, chunk) == changes, chunk
    assert packages_added(parsed(body)) == ["peft==0.13.2"]


def test_no_changes_is_an_empty_list():
    assert parsed(b"null\n") == []
    assert parsed(b"[]\n") == []


def test_malformed_objects_are_dropped_one_by_one():
    body = (
        b'[{"Path":"/a","Kind":1},{"Path":"/b\xff\xfe","Kind":1},{"Path":"/c","Kind":"1"},'
        b'{"Path":"/d\\q","Kind":1},{"Kind":1,"Path":"/e"},{"Path":"/f","Kind":2}]'
    )
    assert parsed(body) == [("/a", 1), ("/f", 2)]


def test_an_object_longer_than_a_path_can_be_is_skipped():
    body = changes_json([("/a", 1), ("/" + "x" * 100_000, 1), ("/b", 1)])
    assert parsed(body, 4096) == [("/a", 1), ("/b", 1)]


def endless(piece: bytes):
    yield b"["
    while True:
        yield piece


def test_a_stream_without_end_stops_at_the_byte_cap_in_bounded_memory():
    piece = b'{"Path":"/tmp/aaaaaaaa","Kind":1},' * 2000  # 66 KB a chunk
    read = 0

    def counted():
        nonlocal read
        for chunk in endless(piece):
            read += len(chunk)
            yield chunk

    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_change_objects(counted(), max_objects=10**9))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read < MAX_CHANGES_BYTES + 2 * len(piece)
    assert 0 < count <= MAX_CHANGES_BYTES // 33
    assert peak < 1024 * 1024, f"peak {peak} bytes"


def test_a_stream_without_end_stops_at_the_entry_cap():
    objects = iter_change_objects(endless(b'{"Path":"/a","Kind":1},'), max_objects=1000)
    assert sum(1 for _ in objects) == 1000


def test_one_endless_string_is_read_only_to_the_byte_cap_in_bounded_memory():
    chunks = itertools.chain([b'[{"Path":"/'], itertools.repeat(b"a" * 65536))
    tracemalloc.start()
    try:
        assert list(iter_change_objects(chunks, max_bytes=8 * 1024 * 1024)) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"peak {peak} bytes"


def test_records_per_project(tmp_path):
    records = InstalledRecords(tmp_path)
    records.record_session("alice", "thesis", "sha256:abc", ["peft==0.13.2", "trl==0.9.0"])
    assert records.last_session("alice", "thesis")["packages"] == ["peft==0.13.2", "trl==0.9.0"]
    assert records.last_session("bob", "thesis") is None
    records.forget("alice", "thesis", ["PEFT"])
    assert records.last_session("alice", "thesis")["packages"] == ["trl==0.9.0"]
    records.record_session("alice", "thesis", "sha256:abc", [])  # a clean session clears it
    assert records.last_session("alice", "thesis") is None


def _upper(tmp_path):
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    site = "opt/venv/lib/python3.11/site-packages"
    (upper / site / "newpkg-1.0.dist-info").mkdir(parents=True)
    (upper / site / "numpy-2.0.0.dist-info").mkdir()  # an upgrade: the old one is below
    (lower / site / "numpy-1.26.0.dist-info").mkdir(parents=True)
    (lower / site / "old-1.0.dist-info").mkdir()
    (upper / site / "old-1.0.dist-info").mkdir()  # touched, not added
    (upper / "home/u/.local/lib/python3.11/site-packages/userpkg-3.dist-info").mkdir(parents=True)
    return upper, lower


def test_the_upper_dir_names_the_packages_the_container_added(tmp_path):
    import time as clock

    from ds01_spawner.installed import packages_added, upper_dir_changes

    upper, lower = _upper(tmp_path)
    found = packages_added(upper_dir_changes(upper, [lower], clock.monotonic() + 5))
    assert found == ["newpkg==1.0", "numpy==2.0.0", "userpkg==3"]


def test_the_upper_dir_walk_follows_no_link_and_is_bounded(tmp_path):
    import os
    import time as clock

    from ds01_spawner.installed import packages_added, upper_dir_changes

    upper, lower = _upper(tmp_path)
    outside = tmp_path / "outside" / "site-packages" / "evil-1.0.dist-info"
    outside.mkdir(parents=True)
    os.symlink(tmp_path / "outside", upper / "link")
    found = packages_added(upper_dir_changes(upper, [lower], clock.monotonic() + 5))
    assert "evil==1.0" not in found
    for i in range(50):
        (upper / "tmp" / f"d{i}").mkdir(parents=True)
    with pytest.raises(TimeoutError):
        list(upper_dir_changes(upper, [lower], clock.monotonic() + 5, max_entries=40))
