"""The lab policy: parsing, validation with file/line/key, resolution, reload."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from ds01_spawner.exemptions import parse_until
from ds01_spawner.limits import Limits, PolicyStore, load_policy
from ds01_spawner.policyfile import MAX_POLICY_BYTES, PolicyError

POLICY = """\
defaults:
  memory: 16G
  max_gpus: 1
  idle_timeout: 30m
groups:
  students:
    max_gpus: 0.5
    allow_full_gpu: false
  faculty:
    max_gpus: 2
    max_runtime: 2d
users:
  alice:
    max_runtime: 3d
retirement:
  warn_before: 5m
  high_demand: {share: 0.7, idle_factor: 0.25}
"""


def write(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_user_beats_group_beats_defaults_key_by_key(tmp_path):
    policy = load_policy(write(tmp_path, POLICY))
    alice = policy.resolve("alice", ["faculty"])
    assert alice.max_runtime == 3 * 86400 and alice.sources["max_runtime"] == "users.alice"
    assert alice.max_gpus == 2 and alice.sources["max_gpus"] == "groups.faculty"
    assert alice.memory == 16 * 1024**3 and alice.sources["memory"] == "defaults"
    assert alice.pids_limit is None and alice.sources["pids_limit"] == "built-in"


def test_first_group_in_the_files_order_wins(tmp_path):
    policy = load_policy(write(tmp_path, POLICY))
    both = policy.resolve("bob", ["faculty", "students"])  # the user's order does not matter
    assert both.max_gpus == 0.5 and not both.allow_full_gpu
    assert policy.group_for(["faculty", "students"]) == "students"


def test_no_group_no_entry_gets_defaults_and_built_ins(tmp_path):
    limits = load_policy(write(tmp_path, POLICY)).resolve("carol", ["unknown"])
    assert limits.max_gpus == 1 and limits.allow_full_gpu and limits.max_runtime is None
    assert limits.allows_type("anything")


def test_no_policy_at_all_is_the_built_in_one():
    assert load_policy(None).resolve("x") == Limits()


def test_retirement_settings(tmp_path):
    settings = load_policy(write(tmp_path, POLICY)).retirement
    assert settings.warn_before == 300
    assert (settings.high_demand_share, settings.high_demand_idle_factor) == (0.7, 0.25)
    assert settings.check_interval == 60  # built-in


@pytest.mark.parametrize(
    "text, line, key, says",
    [
        ("defaults:\n  memory: 12X\n", 2, "defaults.memory", "not a size"),
        ("defaults:\n  memroy: 1G\n", 2, "defaults.memroy", "unknown limit"),
        ("groups:\n  s:\n    idle_timeout: 30\n", 3, "groups.s.idle_timeout", "with a unit"),
        ("users:\n  a:\n    max_gpus: -1\n", 3, "users.a.max_gpus", "impossible"),
        ("defaults:\n  memory: 1M\n", 2, "defaults.memory", "impossible"),
        ("defaults:\n  pids_limit: 2.5\n", 2, "defaults.pids_limit", "whole number"),
        ("defaults:\n  allow_full_gpu: maybe\n", 2, "defaults.allow_full_gpu", "true or false"),
        ("defaults:\n  max_gpus: 1\n  max_gpus_per_project: 2\n", 3, "", "impossible"),
        ("defaults: {}\nlimits: {}\n", 2, "limits", "unknown section"),
        ("defaults: {}\ndefaults: {}\n", 2, "defaults", "given twice"),
        ("retirement:\n  high_demand:\n    share: 2\n", 3, "retirement.high_demand.share", ""),
        ("retirement:\n  check_interval: none\n", 2, "retirement.check_interval", "needs"),
        ("defaults:\n  max_gpus: [1\n", 3, "", "not valid YAML"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, line, key, says):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert e.value.source == str(path) and e.value.line == line
    assert str(e.value).startswith(f"{path}, line {line}")
    if key:
        assert e.value.key == key and f"key {key}" in str(e.value)
    assert says in str(e.value)


ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)  # nine levels of nine: 9**9 (387 million) strings once walked


@pytest.mark.parametrize(
    "text, line, says",
    [
        ("defaults: !!python/object:os.system {}\n", 1, "tag"),
        ("defaults:\n  memory: !!python/object/apply:os.getpid []\n", 2, "tag"),
        ("defaults:\n  memory: !custom 16G\n", 2, "tag '!custom' is not allowed"),
        ("groups: !!set {a: null}\n", 1, "tag"),
        (ALIAS_BOMB, 1, "anchors and aliases"),
        ("defaults: &d {memory: 1G}\nusers:\n  a: *d\n", 1, "anchors and aliases"),
        ("a: &a [*a]\n", 1, "anchors and aliases"),  # a cycle
        ("defaults:\n  <<: {memory: 1G}\n", 2, "not a value YAML can read"),
        ("defaults:\n  max_runtime: 2024-13-45\n", 2, "not a value YAML can read"),
        ("defaults:\n  max_gpus: " + "9" * 5000 + "\n", 2, "not a value YAML can read"),
        ("defaults: {memory: 1G\n", 2, "not valid YAML"),
        ("defaults:\n  memory: 1G\n\tmax_gpus: 1\n", 3, "not valid YAML"),
        ("[" * 100_000, 1, "nested more than 16 levels"),
    ],
    ids=lambda v: v[:24] if isinstance(v, str) else str(v),
)
def test_hostile_yaml_is_a_policy_error_naming_file_and_line(tmp_path, text, line, says):
    path = write(tmp_path, text)
    started = time.perf_counter()
    with pytest.raises(PolicyError, match=says) as e:
        load_policy(path)
    assert time.perf_counter() - started < 1.0
    assert (e.value.source, e.value.line) == (str(path), line)


def test_a_policy_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = write(tmp_path, "users:\n" + "  u: {max_gpus: 1}\n" * (MAX_POLICY_BYTES // 10))
    with pytest.raises(PolicyError, match="larger than 256 KB") as e:
        load_policy(path)
    assert e.value.source == str(path)


def test_a_policy_file_that_is_not_utf8_is_a_policy_error(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"defaults:\n  memory: \xff\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(path)


def test_unknown_project_type_is_refused_when_types_are_known(tmp_path):
    path = write(tmp_path, "groups:\n  students:\n    allowed_types: [base, pytroch]\n")
    with pytest.raises(PolicyError, match="no project type pytroch; types: base, cv"):
        load_policy(path, known_types=["base", "cv"])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "nope.yaml")


def test_traitlet_dict_alone_and_under_the_file(tmp_path):
    overrides = {"defaults": {"memory": "8G", "max_cpus": 2}, "users": {"alice": {"max_gpus": 3}}}
    alone = load_policy(None, overrides).resolve("alice")
    assert alone.memory == 8 * 1024**3 and alone.max_gpus == 3
    merged = load_policy(write(tmp_path, POLICY), overrides).resolve("alice")
    assert merged.memory == 16 * 1024**3, "the file wins where both set a value"
    assert merged.max_cpus == 2 and merged.max_gpus == 3 and merged.max_runtime == 3 * 86400
    with pytest.raises(PolicyError, match=r"key defaults\.max_cpus"):
        load_policy(None, {"defaults": {"max_cpus": "lots"}})


def test_store_rereads_a_changed_file_and_keeps_the_last_good_one(tmp_path):
    path = write(tmp_path, "defaults:\n  max_gpus: 1\n")
    store = PolicyStore(str(path))
    assert store.current().resolve("a").max_gpus == 1

    path.write_text("defaults:\n  max_gpus: 2\n")
    os.utime(path, ns=(1, 10**18))  # a new stamp even within the clock's resolution
    assert store.current().resolve("a").max_gpus == 2 and store.error is None

    path.write_text("defaults:\n  max_gpus: two\n")
    os.utime(path, ns=(1, 2 * 10**18))
    assert store.current().resolve("a").max_gpus == 2, "a broken edit keeps the old policy"
    assert "line 2, key defaults.max_gpus" in store.error
    with pytest.raises(PolicyError):
        store.reload()
    assert store.current().resolve("a").max_gpus == 2


def test_store_without_any_valid_policy_raises(tmp_path):
    store = PolicyStore(str(write(tmp_path, "defaults: [\n")))
    with pytest.raises(PolicyError, match="not valid YAML"):
        store.current()


def test_the_repo_policy_file_is_valid():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    types = [p.name for p in (repo / "images" / "types").iterdir()]
    policy = load_policy(repo / "policy.yaml", known_types=types)
    assert policy.resolve("s", ["students"]).allowed_types == ("base", "cv", "nlp")


# ---------------------------------------------------------------- the images section


def test_image_settings_have_defaults():
    images = load_policy(None).images
    assert (images.keep_previous_for, images.keep_latest_for) == (7 * 86400, 30 * 86400)
    assert (images.disk_high_watermark, images.disk_low_watermark) == (0.8, 0.6)
    assert images.clean_interval == 3600 and images.workspace_on_delete == "keep"


def test_image_settings_from_the_file(tmp_path):
    text = (
        "images:\n  keep_previous_for: 2d\n  keep_latest_for: none\n"
        "  disk_high_watermark: 90%\n  disk_low_watermark: 70\n"
        "  clean_interval: 15m\n  workspace_on_delete: archive\n"
    )
    images = load_policy(write(tmp_path, text)).images
    assert images.keep_previous_for == 2 * 86400 and images.keep_latest_for is None
    assert (images.disk_high_watermark, images.disk_low_watermark) == (0.9, 0.7)
    assert images.clean_interval == 900 and images.workspace_on_delete == "archive"


@pytest.mark.parametrize(
    "text, line, key, says",
    [
        ("images:\n  keep_previous_for: 7\n", 2, "images.keep_previous_for", "with a unit"),
        ("images:\n  disk_high_watermark: lots\n", 2, "images.disk_high_watermark", "percentage"),
        ("images:\n  disk_high_watermark: 120%\n", 2, "images.disk_high_watermark", "impossible"),
        ("images:\n  disk_low_watermark: 0%\n", 2, "images.disk_low_watermark", "impossible"),
        ("images:\n  disk_low_watermark: 85%\n", 2, "images.disk_low_watermark", "below"),
        ("images:\n  disk_high_watermark: 50%\n", 2, "images.disk_high_watermark", "below"),
        ("images:\n  workspace_on_delete: delete\n", 2, "images.workspace_on_delete", "keep"),
        ("images:\n  keep_forever: true\n", 2, "images.keep_forever", "unknown setting"),
        ("images: 80%\n", 1, "images", "mapping"),
    ],
)
def test_image_setting_errors_name_file_line_and_key(tmp_path, text, line, key, says):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert (e.value.line, e.value.key) == (line, key)
    assert says in str(e.value)


# ---------------------------------------------------------------- warnings, idleness, keep-alive


def test_retirement_warning_and_idleness_defaults():
    s = load_policy(None).retirement
    assert (s.warn_idle, s.warn_runtime, s.warn_before) == ((0.8, 0.95), (0.75, 0.9), None)
    assert (s.idle_cpu_percent, s.idle_network_kbps, s.idle_detection_window) == (10, 10, 3)
    assert s.keep_alive_max == 86400


def test_retirement_warning_and_idleness_from_the_file(tmp_path):
    text = (
        "retirement:\n  warn_idle: [50%, 90, 99.5%]\n  warn_runtime: off\n  warn_before: 15m\n"
        "  idle_cpu_percent: 25\n  idle_network_kbps: off\n  idle_detection_window: 5\n"
        "  keep_alive_max: 0\n"
    )
    s = load_policy(write(tmp_path, text)).retirement
    assert s.warn_idle == (0.5, 0.9, 0.995) and s.warn_runtime == () and s.warn_before == 900
    assert (s.idle_cpu_percent, s.idle_network_kbps, s.idle_detection_window) == (25, None, 5)
    assert s.keep_alive_max is None
    assert load_policy(write(tmp_path, "retirement:\n  keep_alive_max: 2h\n")).retirement == (
        replace(load_policy(None).retirement, keep_alive_max=7200)
    )


@pytest.mark.parametrize(
    "text, says",
    [
        ("  warn_idle: [95%, 80%]\n", "out of order"),
        ("  warn_idle: [80%, 80%]\n", "out of order"),
        ("  warn_idle: [100%]\n", "before 100%"),
        ("  warn_idle: [0%]\n", "impossible"),
        ("  warn_idle: [-5]\n", "impossible"),
        ("  warn_runtime: 80%\n", "not a list of percentages"),
        ("  warn_runtime: [lots]\n", "not a percentage"),
        ("  idle_cpu_percent: -1\n", "impossible"),
        ("  idle_network_kbps: fast\n", "not a number"),
        ("  idle_detection_window: 0\n", "impossible"),
        ("  idle_detection_window: 2.5\n", "whole number"),
        ("  keep_alive_max: 24\n", "with a unit"),
        ("  keep_alive: 24h\n", "unknown setting"),
    ],
)
def test_retirement_setting_errors_name_file_line_and_key(tmp_path, text, says):
    path = write(tmp_path, "retirement:\n  check_interval: 1m\n" + text)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    key = "retirement." + text.strip().split(":")[0]
    assert (e.value.source, e.value.line, e.value.key) == (str(path), 3, key)
    assert says in str(e.value)


# ---------------------------------------------------------------- exemptions

EXEMPTIONS = """\
defaults:
  idle_timeout: 1h
exemptions:
  - user: alice
    lifts: [idle_timeout]
    until: 2027-01-31
    reason: thesis experiments
  - group: faculty
    lifts: [max_runtime, idle_timeout]
    until: 2026-12-24T18:00
"""


def test_exemptions_from_the_file(tmp_path):
    alice, faculty = load_policy(write(tmp_path, EXEMPTIONS)).exemptions
    assert (alice.who, alice.name, alice.lifts) == ("user", "alice", ("idle_timeout",))
    assert alice.until == datetime(2027, 2, 1).timestamp(), "a date: through its end"
    assert (alice.until_text, alice.reason) == ("2027-01-31", "thesis experiments")
    assert (faculty.who, faculty.lifts) == ("group", ("max_runtime", "idle_timeout"))
    assert faculty.until == datetime(2026, 12, 24, 18).timestamp()
    assert faculty.applies_to("bob", ["staff", "faculty"]) and not faculty.applies_to("bob", [])
    utc = parse_until("2027-01-31T12:00:00Z")[0]
    assert utc == datetime(2027, 1, 31, 12, tzinfo=timezone.utc).timestamp()


def test_no_exemptions_and_the_resolved_limits_are_unchanged(tmp_path):
    policy = load_policy(write(tmp_path, EXEMPTIONS))
    assert policy.resolve("alice").idle_timeout == 3600, "resolve stays the policy's limits"
    assert load_policy(None).exemptions == ()


@pytest.mark.parametrize(
    "entry, line, key, says",
    [
        (
            "  - user: a\n    lifts: [memory]\n    until: 2027-01-01\n",
            5,
            "exemptions[0].lifts",
            "cannot be lifted",
        ),
        (
            "  - user: a\n    lifts: []\n    until: 2027-01-01\n",
            5,
            "exemptions[0].lifts",
            "not a list",
        ),
        ("  - user: a\n    until: 2027-01-01\n", 4, "exemptions[0]", "needs lifts"),
        ("  - user: a\n    lifts: [max_runtime]\n", 4, "exemptions[0]", "needs until"),
        (
            "  - user: a\n    lifts: [max_runtime]\n    until: soon\n",
            6,
            "exemptions[0].until",
            "not a date",
        ),
        (
            "  - user: a\n    lifts: [max_runtime]\n    until: 2027-02-30\n",
            6,
            "exemptions[0].until",
            "not a value YAML",
        ),
        (
            "  - user: a\n    lifts: [max_runtime]\n    until: 2027-01-01\n    why: x\n",
            7,
            "exemptions[0].why",
            "unknown key",
        ),
        (
            "  - {user: a, group: b, lifts: [max_runtime], until: 2027-01-01}\n",
            4,
            "exemptions[0]",
            "exactly one",
        ),
        ("  - {lifts: [max_runtime], until: 2027-01-01}\n", 4, "exemptions[0]", "exactly one"),
        (
            "  - {user: 12, lifts: [max_runtime], until: 2027-01-01}\n",
            4,
            "exemptions[0].user",
            "not a user name",
        ),
        ("  - alice\n", 4, "exemptions[0]", "must be a mapping"),
        (
            "  - {user: a, lifts: [max_runtime], until: 2027-01-01, reason: [x]}\n",
            4,
            "exemptions[0].reason",
            "not text",
        ),
    ],
)
def test_exemption_errors_name_file_line_and_key(tmp_path, entry, line, key, says):
    good = "  - {user: ok, lifts: [idle_timeout], until: 2027-01-01}\n"
    path = write(tmp_path, "defaults: {}\n\nexemptions:\n" + entry + good)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert (e.value.source, e.value.line, e.value.key) == (str(path), line, key)
    assert says in str(e.value)


def test_an_error_in_a_later_exemption_names_its_own_line(tmp_path):
    text = EXEMPTIONS + "  - user: carol\n    lifts: [idle_timeout]\n    until: never\n"
    with pytest.raises(PolicyError) as e:
        load_policy(write(tmp_path, text))
    assert (e.value.line, e.value.key) == (13, "exemptions[2].until")


def test_exemptions_must_be_a_list(tmp_path):
    with pytest.raises(PolicyError, match="must be a list") as e:
        load_policy(write(tmp_path, "exemptions:\n  alice: [idle_timeout]\n"))
    assert (e.value.line, e.value.key) == (1, "exemptions")


def test_the_gpu_queue_settings_resolve_per_group(tmp_path):
    text = (
        "defaults:\n  queue_timeout: 30m\n"
        "groups:\n  staff: {queue_priority: 10, queue_timeout: none}\n"
    )
    policy = load_policy(write(tmp_path, text))
    student, staff = policy.resolve("s", []), policy.resolve("t", ["staff"])
    assert (student.queue_timeout, student.queue_priority) == (1800.0, 0)
    assert (staff.queue_timeout, staff.queue_priority) == (None, 10)
    assert Limits().queue_timeout == 3600.0, "built in: a wait gives up after an hour"


@pytest.mark.parametrize(
    "bad", ["queue_priority: 1000", "queue_priority: high", "queue_timeout: 5"]
)
def test_bad_gpu_queue_settings_name_the_key(tmp_path, bad):
    with pytest.raises(PolicyError, match=f"defaults.{bad.split(':')[0]}"):
        load_policy(write(tmp_path, f"defaults:\n  {bad}\n"))
