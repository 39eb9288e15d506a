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
    WorkspaceError,
    discover_types,
    options_from_form,
    parse_user_options,
    prepare_workspace,
    read_workspace_file,
    validate_project_name,
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


def parse(options, server_name="", existing=None, fallback="default"):
    return parse_user_options(
        options,
        server_name=server_name,
        types=TYPES,
        existing=existing or {},
        default_type="base",
        fallback_project=fallback,
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
