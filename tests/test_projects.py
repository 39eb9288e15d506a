"""Project names, request validation, records and workspaces."""

import json
import os
from pathlib import Path

import pytest

from ds01_spawner.identity import UserIds
from ds01_spawner.projects import (
    InvalidRequest,
    Project,
    ProjectStore,
    discover_types,
    options_from_form,
    parse_gpus,
    parse_user_options,
    suggest_project_name,
    validate_project_name,
)
from ds01_spawner.workspaces import (
    WorkspaceError,
    prepare_workspace,
    read_workspace_file,
    workspace_path,
    write_new_file,
)

REPO_TYPES = Path(__file__).resolve().parent.parent / "images" / "types"
TYPES = discover_types(REPO_TYPES)


@pytest.mark.parametrize("name", ["a", "thesis", "my-thesis-2", "a" * 30, "x1-y2"])
def test_valid_project_names(name):
    assert validate_project_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "1abc",
        "-x",
        "a--b",
        "a-",
        "a" * 31,
        "../x",
        "a/b",
        "a.b",
        "a b",
        "é",
        "a\n",
        "x" * 10_000,
        None,
        5,
        ["a"],
    ],
)
def test_invalid_project_names(name):
    with pytest.raises(InvalidRequest):
        validate_project_name(name)


def test_repo_ships_the_documented_types():
    assert {"base", "pytorch", "cv", "nlp"} <= set(TYPES)
    for t in TYPES.values():
        text = t.template()
        assert "ARG BASE_IMAGE" in text and "FROM ${BASE_IMAGE}" in text
        assert t.description


def test_admin_type_list_keeps_order_and_rejects_unknown():
    assert list(discover_types(REPO_TYPES, ["nlp", "base"])) == ["nlp", "base"]
    with pytest.raises(ValueError, match="no Dockerfile"):
        discover_types(REPO_TYPES, ["base", "quantum"])


def parse(options, server_name="", existing=None, fallback="default", extra=frozenset()):
    return parse_user_options(
        options,
        server_name=server_name,
        types=TYPES,
        existing=existing or {},
        default_type="base",
        fallback_project=fallback,
        extra_keys=extra,
    )


def test_new_project_from_rest_options():
    r = parse({"project": "thesis", "type": "cv"})
    assert (r.name, r.type, r.new) == ("thesis", "cv", True)
    assert r.user_options() == {"project": "thesis", "type": "cv", "profile": "thesis"}


def test_server_name_stands_in_for_project():
    r = parse({}, server_name="thesis")
    assert (r.name, r.type, r.new) == ("thesis", "base", True)


def test_named_server_must_match_project():
    with pytest.raises(InvalidRequest, match="named server"):
        parse({"project": "other"}, server_name="thesis")


def test_default_server_falls_back_to_last_used_project():
    existing = {"old": Project("u", "old", "nlp", 0)}
    r = parse({}, existing=existing, fallback="old")
    assert (r.name, r.type, r.new) == ("old", "nlp", False)


def test_profile_from_stored_options_is_accepted():
    existing = {"thesis": Project("u", "thesis", "cv", 0)}
    r = parse({"profile": "thesis", "project": "thesis", "type": "cv"}, existing=existing)
    assert (r.name, r.new) == ("thesis", False)


def test_existing_project_keeps_its_type():
    existing = {"thesis": Project("u", "thesis", "cv", 0)}
    with pytest.raises(InvalidRequest, match="already exists with type 'cv'"):
        parse({"project": "thesis", "type": "nlp"}, existing=existing)


@pytest.mark.parametrize(
    "options, message",
    [
        ("thesis", "JSON object"),
        (["thesis"], "JSON object"),
        ({"project": "thesis", "image": "evil:latest"}, "unknown option"),
        ({"project": "thesis", "user": "bob"}, "unknown option"),
        ({"project": 5}, "must be a string"),
        ({"project": {"$ne": 1}}, "must be a string"),
        ({"project": "../bob/thesis"}, "invalid project name"),
        ({"project": "bob/thesis"}, "invalid project name"),
        ({"project": "x" * 10_000}, "too large"),
        ({"project": "thesis", "type": "quantum"}, "unknown project type"),
        ({"project": "thesis", "type": "../../etc"}, "unknown project type"),
        ({"project": "thesis", "profile": "other"}, "does not match"),
        ({"project": "a" * 31}, "invalid project name"),
        ({"project": "-x"}, "invalid project name"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(options, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(options)


def test_form_new_project():
    form = {"project": ["__new__"], "new_project": [" thesis "], "type": ["cv"]}
    assert options_from_form(form) == {"project": "thesis", "type": "cv"}


def test_form_existing_project_ignores_type_field():
    form = {"project": ["thesis"], "new_project": [""], "type": ["base"]}
    assert options_from_form(form) == {"project": "thesis"}


def test_form_output_goes_through_the_same_validator():
    with pytest.raises(InvalidRequest):
        parse(options_from_form({"project": ["__new__"], "new_project": ["Bad Name"]}))


@pytest.mark.parametrize(
    ("gpus", "asked"), [("2", (2, False)), (3, (3, False)), ("mig", (1, True)), ("", (0, False))]
)
def test_gpus_are_a_whole_number_or_mig(gpus, asked):
    r = parse({"project": "thesis", "gpus": gpus})
    assert (r.gpus, r.mig) == asked


def test_no_gpus_asked_means_none():
    assert parse({"project": "thesis", "gpus": None}).gpus == 0
    assert parse({"project": "thesis"}).gpus == 0


ODD_GPUS = ["²", "\u0661", "1e3", "1.5", "-1", " 2", "2\n", "0x2", "65", "9" * 5000, True, False]
ODD_GPUS += [-1, 1.5, 2.0, 65, 10**5000, float("nan"), [1], {"n": 1}]


def _shown(value: object) -> str:
    return "10**5000" if value == 10**5000 else repr(value)[:12]  # its repr() raises


@pytest.mark.parametrize("gpus", ODD_GPUS, ids=_shown)
def test_odd_gpu_counts_are_a_request_error_not_a_crash(gpus):
    """A crash (``"²".isdigit()`` is True, ``int("²")`` fails) is not the
    spawner's refusal, and left the bad options stored with the server."""
    with pytest.raises(InvalidRequest, match=r"gpus must be a whole number from 0 to 64"):
        parse_gpus(gpus)


@pytest.mark.parametrize("gpus", ["²", "\u0661", "1e3", "-1", "1.5"])
def test_odd_gpu_counts_from_the_form_are_refused_by_the_same_validator(gpus):
    options = options_from_form({"project": ["thesis"], "gpus": [gpus]})
    with pytest.raises(InvalidRequest, match="gpus must be a whole number"):
        parse(options)


def test_deeply_nested_options_are_a_request_error():
    nested: object = "x"
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(InvalidRequest, match="plain JSON"):
        parse({"project": "thesis", "type": nested})


def test_store_round_trip_and_recency(tmp_path):
    store = ProjectStore(tmp_path)
    a, b = Project("alice", "a", "base", 1.0), Project("alice", "b", "cv", 2.0)
    store.save("alice", a)
    store.save("alice", b)
    store.touch("alice", a)
    assert [p.name for p in store.list("alice")] == ["a", "b"]
    assert store.get("alice", "b").type == "cv"
    assert store.get("alice", "zzz") is None
    assert store.list("bob") == []
    assert json.loads((tmp_path / "projects" / "alice" / "a.json").read_text())["type"] == "base"


def test_workspace_path_stays_under_root(tmp_path):
    root = str(tmp_path / "ws")
    assert (
        workspace_path(
            "{workspace_root}/{user}/{project}", root=root, user="alice", project="thesis"
        )
        == tmp_path / "ws" / "alice" / "thesis"
    )
    with pytest.raises(WorkspaceError, match="outside"):
        workspace_path("/tmp/{project}", root=root, user="alice", project="thesis")
    with pytest.raises(InvalidRequest):
        workspace_path("{workspace_root}/{user}/{project}", root=root, user="a", project="..")


def test_workspace_path_refuses_symlink_escape(tmp_path):
    root = tmp_path / "ws"
    (root / "alice").mkdir(parents=True)
    os.symlink("/etc", root / "alice" / "thesis")
    with pytest.raises(WorkspaceError, match="outside"):
        workspace_path(
            "{workspace_root}/{user}/{project}", root=str(root), user="alice", project="thesis"
        )


IDS = UserIds(43210, 43210, "allocated")


def test_prepare_workspace_creates_it_owned_by_the_user(tmp_path):
    path = tmp_path / "ws" / "alice" / "thesis"
    assert prepare_workspace(path, IDS, root=str(tmp_path / "ws")) is True
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (IDS.uid, IDS.gid)
    assert prepare_workspace(path, IDS, root=str(tmp_path / "ws")) is False


def test_workspace_owned_by_someone_else_is_refused_not_chowned(tmp_path):
    path = tmp_path / "ws" / "alice" / "thesis"
    path.mkdir(parents=True)
    os.chown(path, 4242, 4242)
    with pytest.raises(WorkspaceError, match="owned by uid 4242"):
        prepare_workspace(path, IDS, root=str(tmp_path / "ws"))
    assert path.stat().st_uid == 4242


def test_workspace_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "ws" / "alice" / "thesis"
    path.parent.mkdir(parents=True)
    path.write_text("x")
    with pytest.raises(WorkspaceError, match="not a plain directory"):
        prepare_workspace(path, IDS, root=str(tmp_path / "ws"))


def test_new_files_never_follow_links(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    os.symlink(target, tmp_path / "Dockerfile")
    with pytest.raises(FileExistsError):
        write_new_file(tmp_path / "Dockerfile", "FROM x", IDS)
    assert target.read_text() == "keep"
    write_new_file(tmp_path / "Other", "FROM x", IDS)
    assert (tmp_path / "Other").stat().st_uid == IDS.uid


def test_workspace_files_are_read_safely(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    assert read_workspace_file(tmp_path / "Dockerfile", 100) == "FROM x\n"
    with pytest.raises(WorkspaceError, match="larger than"):
        read_workspace_file(tmp_path / "Dockerfile", 3)
    os.symlink("/etc/shadow", tmp_path / "Evil")
    with pytest.raises(WorkspaceError, match="cannot read"):
        read_workspace_file(tmp_path / "Evil", 100)
    os.mkfifo(tmp_path / "Fifo")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        read_workspace_file(tmp_path / "Fifo", 100)
    with pytest.raises(WorkspaceError, match="missing"):
        read_workspace_file(tmp_path / "Nope", 100)


# ---------------------------------------------------------------- owners and slugs


def test_listing_shows_only_the_owners_records(tmp_path):
    store = ProjectStore(tmp_path)
    slug = store.slug("alice")
    store.save(slug, Project("alice", "mine", "base", 1.0))
    store.save(slug, Project("mallory", "forged", "base", 2.0))  # a record naming someone else
    assert [p.name for p in store.list_owned("alice")] == ["mine"]
    assert store.list_owned("mallory") == [], "mallory's slug is her own, not alice's"


def test_a_fold_and_its_literal_twin_list_separate_projects(tmp_path):
    fold = "h.baker@uni.edu"
    twin = ProjectStore(tmp_path).slug(fold)  # the fold registers first
    store = ProjectStore(tmp_path)
    assert store.slug(twin) != twin, "the literal twin gets a slug of its own"
    store.save(store.slug(fold), Project(fold, "thesis", "base", 1.0))
    assert store.list_owned(twin) == []
    assert [p.name for p in store.list_owned(fold)] == ["thesis"]


def test_existing_records_keep_their_owners_slug(tmp_path):
    """An installation from before the slug registry: records lie under natural slugs."""
    from ds01_spawner.identity import natural_slug

    fold = "h.baker@uni.edu"
    twin = natural_slug(fold)
    ProjectStore(tmp_path).save(twin, Project(fold, "thesis", "base", 1.0))
    store = ProjectStore(tmp_path)
    assert store.slug(twin) != twin, "the twin signing in first does not take h.baker's slug"
    assert store.slug(fold) == twin
    assert [p.name for p in store.list_owned(fold)] == ["thesis"]
    assert store.list_owned(twin) == []


def test_an_admins_declared_option_keys_pass_and_others_name_the_setting():
    r = parse({"project": "thesis", "cost_center": {"code": 7}}, extra=frozenset({"cost_center"}))
    assert r.name == "thesis"
    with pytest.raises(InvalidRequest, match="allowed_user_options") as e:
        parse({"project": "thesis", "cost_center": "x"})
    assert "'cost_center'" in str(e.value)


def test_the_form_passes_the_admins_own_fields_and_only_those():
    form = {"project": ["thesis"], "cost_center": [" 42 "], "sneaky": ["x"]}
    assert options_from_form(form, frozenset({"cost_center"})) == {
        "project": "thesis",
        "cost_center": "42",
    }


@pytest.mark.parametrize(
    "server, suggested",
    [
        ("My_Project", "my-project"),
        ("alice@lab", "alice-lab"),
        ("2024_run", "p-2024-run"),
        ("Ünï", "n"),
        ("X" * 40, "x" * 30),
    ],
)
def test_a_server_named_before_ds01s_rules_is_refused_with_a_name_to_use(server, suggested):
    assert suggest_project_name(server) == suggested
    validate_project_name(suggested)
    with pytest.raises(InvalidRequest) as e:
        parse({}, server_name=server)
    message = str(e.value)
    assert f"Start a server named {suggested!r} instead" in message
    assert "nothing was created" in message


def test_a_workspace_error_has_one_status_wherever_it_is_caught(tmp_path):
    """400 for the workspace itself, 409 for a Dockerfile that cannot be read: the
    spawn and the image page give the same answer."""
    with pytest.raises(WorkspaceError) as e:
        read_workspace_file(tmp_path / "Dockerfile", 1024)
    assert e.value.status == 409 and "missing" in str(e.value)
    with pytest.raises(WorkspaceError) as e:
        workspace_path("/elsewhere/{user}/{project}", root=str(tmp_path), user="a", project="p")
    assert e.value.status == 400


def test_a_removed_project_record_is_gone_and_removing_twice_says_so(tmp_path):
    store = ProjectStore(tmp_path)
    store.save("alice", Project("alice", "x", "base", 1.0))
    assert store.remove("alice", "x") and store.get("alice", "x") is None
    assert not store.remove("alice", "x")


def test_an_archived_workspace_is_moved_aside_never_deleted(tmp_path):
    from ds01_spawner.workspaces import archive_workspace

    workspace = tmp_path / "alice" / "x"
    workspace.mkdir(parents=True)
    (workspace / "data.csv").write_text("1,2\n")
    first = archive_workspace(workspace, root=str(tmp_path), slug="alice", project="x", stamp="t")
    assert first == tmp_path / ".archive" / "alice" / "x-t"
    assert (first / "data.csv").read_text() == "1,2\n" and not workspace.exists()
    workspace.mkdir()
    second = archive_workspace(workspace, root=str(tmp_path), slug="alice", project="x", stamp="t")
    assert second.name == "x-t-2" and first.exists(), "an earlier archive is never replaced"
    assert (
        archive_workspace(workspace, root=str(tmp_path), slug="alice", project="x", stamp="t")
        is None
    )


def test_a_workspace_that_is_a_link_is_not_archived(tmp_path):
    from ds01_spawner.workspaces import WorkspaceError, archive_workspace

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "x").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(WorkspaceError, match="not a plain directory"):
        archive_workspace(
            tmp_path / "alice" / "x", root=str(tmp_path), slug="alice", project="x", stamp="t"
        )
    assert (tmp_path / "alice" / "x").is_symlink()


@pytest.mark.parametrize(
    "given, wait",
    [(True, True), (False, False), ("true", True), ("on", True), ("0", False), (None, False)],
)
def test_wait_asks_for_the_gpu_queue_and_is_kept_in_the_options(given, wait):
    r = parse({"project": "thesis", "gpus": 1, "wait": given})
    assert r.wait is wait
    assert ("wait" in r.user_options()) is wait


def test_wait_without_a_gpu_means_nothing_and_a_bad_wait_is_refused():
    assert parse({"project": "thesis", "wait": True}).wait is False
    with pytest.raises(InvalidRequest, match="'wait' must be true or false"):
        parse({"project": "thesis", "gpus": 1, "wait": "perhaps"})
    with pytest.raises(InvalidRequest, match="'wait' must be true or false"):
        parse({"project": "thesis", "gpus": 1, "wait": 1})


def test_the_pickers_wait_box_becomes_the_wait_option():
    form = {"project": ["thesis"], "gpus": ["1"], "wait": ["true"]}
    assert options_from_form(form) == {"project": "thesis", "gpus": "1", "wait": "true"}
    assert "wait" not in options_from_form({"project": ["thesis"], "wait": ["true"]})
