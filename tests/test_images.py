"""Image names, build specs and contexts, and reading docker's build stream."""

import tarfile

import pytest

from ds01_spawner.images import (
    BuildError,
    BuildEvent,
    BuildSettings,
    BuildStreamReader,
    context_tar,
    image_ref,
    image_repository,
    project_build_spec,
)


def test_image_names_follow_ds01_convention():
    assert image_repository("alice", "thesis") == "ds01-alice/thesis"
    assert image_ref("alice", "thesis") == "ds01-alice/thesis:latest"
    assert image_ref("h-baker-1a2b3c4d", "x", "previous") == "ds01-h-baker-1a2b3c4d/x:previous"


def test_context_holds_only_the_dockerfile():
    with tarfile.open(fileobj=context_tar("FROM scratch\n")) as tar:
        assert tar.getnames() == ["Dockerfile"]
        assert tar.extractfile("Dockerfile").read() == b"FROM scratch\n"


def test_reader_turns_steps_into_progress():
    reader = BuildStreamReader()
    events = []
    for chunk in [
        {"stream": "Step 1/4 : ARG BASE_IMAGE\n"},
        {"stream": " ---> Running in abc\n"},
        {"stream": "Step 3/4 : RUN pip install x\n"},
        {"aux": {"ID": "sha256:abc"}},
        {"stream": "Successfully built abc\n"},
    ]:
        events += reader.feed(chunk)
    steps = [e for e in events if e.phase == "step"]
    assert [(e.message, e.progress) for e in steps] == [
        ("Step 1/4 : ARG BASE_IMAGE", 0),
        ("Step 3/4 : RUN pip install x", 50),
    ]
    assert events[1] == BuildEvent("log", " ---> Running in abc", 0)
    assert [e.message for e in events if e.phase == "log"][-1] == "Successfully built abc"
    assert reader.image_id == "sha256:abc"
    reader.raise_for_error()  # no error: nothing raised


def test_reader_reports_failing_step_and_tail():
    reader = BuildStreamReader(tail_lines=3)
    for i in range(10):
        reader.feed({"stream": f"noise {i}\n"})
    reader.feed({"stream": "Step 2/3 : RUN pip install nope\n"})
    reader.feed({"stream": "ERROR: No matching distribution found for nope\n"})
    reader.feed({"error": "The command '/bin/sh -c pip install nope' returned a non-zero code: 1"})
    with pytest.raises(BuildError) as info:
        reader.raise_for_error()
    assert "step 2/3 (RUN pip install nope)" in str(info.value)
    assert "non-zero code: 1" in str(info.value)
    assert info.value.log_tail == [
        "noise 9",
        "Step 2/3 : RUN pip install nope",
        "ERROR: No matching distribution found for nope",
    ]


def test_a_missing_base_image_is_named_with_its_build_args_expanded():
    reader = BuildStreamReader()
    reader.feed({"stream": "Step 2/4 : FROM ${BASE_IMAGE}\n"})
    reader.feed({"error": 'Get "https://registry-1.docker.io/v2/": dial tcp: no such host'})
    with pytest.raises(BuildError) as info:
        reader.raise_for_error({"BASE_IMAGE": "ds01/gone:latest"})
    message = str(info.value)
    assert "the base image ds01/gone:latest is not on this machine" in message
    assert "images/build" in message and "no such host" in message


def test_the_spawner_and_the_image_page_build_the_same_spec():
    settings = BuildSettings(base_image="ds01/singleuser:latest", build_args={"A": "1"})
    spec_ = project_build_spec(
        settings,
        owner="H.Baker",
        slug="h-baker-1a2b3c4d",
        project="p",
        project_type="base",
        dockerfile="FROM ds01/singleuser\n",
    )
    assert spec_.image == "ds01-h-baker-1a2b3c4d/p:latest"
    assert spec_.owner == "H.Baker" and spec_.own_prefix == "ds01-h-baker-1a2b3c4d/"
    assert spec_.buildargs == {"A": "1", "BASE_IMAGE": "ds01/singleuser:latest"}
    assert spec_.allowed_images[0] == "ds01/singleuser:latest"
    assert spec_.labels["ds01.user"] == "H.Baker"
