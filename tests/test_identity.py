"""User slugs (natural, chosen, registered) and the uid/gid a user's containers run as."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ds01_spawner.identity import (
    SlugRegistry,
    UidAllocator,
    UserIds,
    choose_slug,
    natural_slug,
    resolve_ids,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["alice", "bob-2", "12345", "a"])
def test_plain_names_are_kept(name):
    assert natural_slug(name) == name


@pytest.mark.parametrize(
    "name",
    ["H.Baker@uni.edu", "Alice", "a--b", "x-", "ünïcode", "../etc", "a b", "x" * 40, "", "bob\n"],
)
def test_other_names_are_folded_and_hashed(name):
    slug = natural_slug(name)
    assert slug != name
    assert all(ch in "abcdefghijklmnopqrstuvwxyz0123456789-" for ch in slug)
    assert "--" not in slug and not slug.startswith("-") and len(slug) <= 29


def test_folded_names_do_not_collide():
    names = ["h.baker@uni.edu", "h-baker-uni-edu", "H.Baker@uni.edu", "h_baker@uni.edu"]
    assert len({natural_slug(n) for n in names}) == len(names)


def test_slug_is_stable():
    assert natural_slug("H.Baker@uni.edu") == natural_slug("H.Baker@uni.edu")


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


# ---------------------------------------------------------------- one slug per user

FOLD = "h.baker@uni.edu"
TWIN = natural_slug(FOLD)  # a plain hub name equal to the fold's natural slug


def test_the_literal_twin_of_a_fold_has_the_same_natural_slug():
    assert TWIN.startswith("h-baker-uni-edu-") and natural_slug(TWIN) == TWIN


def test_a_free_natural_slug_is_chosen_as_is():
    assert choose_slug("alice", set()) == "alice"
    assert choose_slug(FOLD, {"alice"}) == TWIN


@pytest.mark.parametrize("first, second", [(FOLD, TWIN), (TWIN, FOLD)])
def test_a_fold_and_its_literal_twin_get_different_slugs_in_either_order(first, second):
    taken = {choose_slug(first, set())}
    assert taken == {TWIN}, "whoever comes first keeps the natural slug"
    assert choose_slug(second, taken) == f"{TWIN}-2"


def test_a_chosen_slug_skips_every_taken_suffix():
    assert choose_slug(FOLD, {TWIN, f"{TWIN}-2", f"{TWIN}-3"}) == f"{TWIN}-4"


def test_a_suffixed_slug_is_still_safe_in_names():
    slug = choose_slug(FOLD, {TWIN})
    assert natural_slug(slug) == slug, "plain [a-z0-9-], no '--', no trailing '-'"


@pytest.mark.parametrize("first, second", [(FOLD, TWIN), (TWIN, FOLD)])
def test_registry_separates_a_fold_and_its_literal_twin(tmp_path, first, second):
    registry = SlugRegistry(tmp_path / "slugs.json")
    a, b = registry.slug_for(first), registry.slug_for(second)
    assert a == TWIN and b == f"{TWIN}-2"


def test_registry_slugs_survive_reopening(tmp_path):
    first = SlugRegistry(tmp_path / "slugs.json")
    slugs = {name: first.slug_for(name) for name in (TWIN, FOLD, "alice")}
    again = SlugRegistry(tmp_path / "slugs.json")
    assert {name: again.slug_for(name) for name in (FOLD, "alice", TWIN)} == slugs
    assert json.loads((tmp_path / "slugs.json").read_text())["users"] == slugs


def test_registry_keeps_existing_objects_with_their_owner(tmp_path):
    """An installation from before the registry: h.baker's projects lie under TWIN."""
    legacy = {TWIN: {FOLD}}
    registry = SlugRegistry(tmp_path / "slugs.json", lambda slug: legacy.get(slug, set()))
    assert registry.slug_for(TWIN) == f"{TWIN}-2", "the twin seen first does not walk in"
    assert registry.slug_for(FOLD) == TWIN, "the owner keeps the slug they had"


def test_registry_records_a_legacy_slug_shared_by_both_for_the_first_seen(tmp_path):
    legacy = {TWIN: {FOLD, TWIN}}  # the bug's damage, already done
    registry = SlugRegistry(tmp_path / "slugs.json", lambda slug: legacy.get(slug, set()))
    assert registry.slug_for(FOLD) == TWIN
    assert registry.slug_for(TWIN) == f"{TWIN}-2"


def test_registry_is_injective_across_threads(tmp_path):
    names = [f"h.baker{n}@uni.edu" for n in range(10)]
    names += [natural_slug(n) for n in names]
    results = {}

    def take(name):
        results[name] = SlugRegistry(tmp_path / "slugs.json").slug_for(name)

    threads = [threading.Thread(target=take, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results.values())) == len(names) == 20
    assert json.loads((tmp_path / "slugs.json").read_text())["users"] == results


_REGISTER = """
import json, sys, time
from ds01_spawner.identity import SlugRegistry, natural_slug
path, order, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
registry = SlugRegistry(path)
out = {}
time.sleep(max(0, start - time.time()))  # all at once
for n in range(100):
    fold = f"h.baker{n}@uni.edu"
    pair = [fold, natural_slug(fold)]
    for name in pair if order == "fold-first" else pair[::-1]:
        out[name] = registry.slug_for(name)
print(json.dumps(out))
"""


def test_registry_is_injective_across_processes(tmp_path):
    """The hub and the image service register users at the same time."""
    start = str(time.time() + 2)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER, str(tmp_path / "slugs.json"), order, start],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for order in ("fold-first", "twin-first", "fold-first", "twin-first")
    ]
    seen = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    registered = json.loads((tmp_path / "slugs.json").read_text())["users"]
    assert len(registered) == 200 and len(set(registered.values())) == 200
    assert all(answers == registered for answers in seen), "every process got the same slugs"
