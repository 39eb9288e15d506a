"""User slugs and the uid/gid a user's containers run as."""

import json
import threading

import pytest

from ds01_spawner.identity import UidAllocator, UserIds, resolve_ids, user_slug


@pytest.mark.parametrize("name", ["alice", "bob-2", "12345", "a"])
def test_plain_names_are_kept(name):
    assert user_slug(name) == name


@pytest.mark.parametrize(
    "name",
    ["H.Baker@uni.edu", "Alice", "a--b", "x-", "ünïcode", "../etc", "a b", "x" * 40, "", "bob\n"],
)
def test_other_names_are_folded_and_hashed(name):
    slug = user_slug(name)
    assert slug != name
    assert all(ch in "abcdefghijklmnopqrstuvwxyz0123456789-" for ch in slug)
    assert "--" not in slug and not slug.startswith("-") and len(slug) <= 29


def test_folded_names_do_not_collide():
    names = ["h.baker@uni.edu", "h-baker-uni-edu", "H.Baker@uni.edu", "h_baker@uni.edu"]
    assert len({user_slug(n) for n in names}) == len(names)


def test_slug_is_stable():
    assert user_slug("H.Baker@uni.edu") == user_slug("H.Baker@uni.edu")


def test_root_ids_are_refused():
    with pytest.raises(ValueError, match="never run as root"):
        UserIds(0, 1000, "system")
    with pytest.raises(ValueError):
        UserIds(1000, 0, "system")


def test_allocator_gives_stable_distinct_uids(tmp_path):
    alloc = UidAllocator(tmp_path / "uids.json", 30000, 30010)
    a = alloc.ids_for("alice")
    b = alloc.ids_for("bob")
    assert a.uid != b.uid
    assert (a.uid, a.gid) == (a.uid, a.uid)
    again = UidAllocator(tmp_path / "uids.json", 30000, 30010).ids_for("alice")
    assert again == a
    assert json.loads((tmp_path / "uids.json").read_text())["users"] == {
        "alice": a.uid,
        "bob": b.uid,
    }


def test_allocator_skips_uids_of_host_accounts(tmp_path):
    # uid 1 (daemon) and 2 (bin) exist on Debian
    ids = UidAllocator(tmp_path / "uids.json", 1, 5000).ids_for("carol")
    import pwd

    with pytest.raises(KeyError):
        pwd.getpwuid(ids.uid)


def test_allocator_is_safe_across_threads(tmp_path):
    alloc = UidAllocator(tmp_path / "uids.json", 40000, 40999)
    results = {}

    def take(n):
        results[n] = UidAllocator(tmp_path / "uids.json", 40000, 40999).ids_for(f"user{n}").uid

    threads = [threading.Thread(target=take, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results.values())) == 20
    assert alloc.ids_for("user3").uid == results[3]


def test_allocator_reports_exhaustion(tmp_path):
    alloc = UidAllocator(tmp_path / "uids.json", 45000, 45000)
    alloc.ids_for("one")
    with pytest.raises(RuntimeError, match="no free uid"):
        alloc.ids_for("two")


def test_system_account_wins_when_enabled(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    alloc = UidAllocator(tmp_path / "uids.json", 30000, 30010)
    ids = resolve_ids("nobody", use_system_users=True, min_system_uid=1000, allocator=alloc)
    assert (ids.uid, ids.source) == (nobody.pw_uid, "system")
    ids = resolve_ids("nobody", use_system_users=False, min_system_uid=1000, allocator=alloc)
    assert ids.source == "allocated" and 30000 <= ids.uid <= 30010


def test_service_accounts_are_refused(tmp_path):
    alloc = UidAllocator(tmp_path / "uids.json", 30000, 30010)
    with pytest.raises(ValueError, match="min_system_uid"):
        resolve_ids("daemon", use_system_users=True, min_system_uid=1000, allocator=alloc)
    with pytest.raises(ValueError, match="root"):
        resolve_ids("root", use_system_users=True, min_system_uid=0, allocator=alloc)


def test_users_without_account_are_allocated(tmp_path):
    alloc = UidAllocator(tmp_path / "uids.json", 30000, 30010)
    ids = resolve_ids(
        "no-such-account-x", use_system_users=True, min_system_uid=1000, allocator=alloc
    )
    assert ids.source == "allocated"
