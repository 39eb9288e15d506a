"""What a researcher's Dockerfile may do: FROM, COPY --from, ds01 labels, GPU variables."""

import pytest

from ds01_spawner.buildrules import (
    NO_GPU_LINE,
    BuildRuleError,
    check_dockerfile,
    expand,
    instructions,
    render_for_build,
    repository,
)

BASES = ("ds01/singleuser:latest", "ds01/*")
OWN = "ds01-alice/"
ARGS = {"BASE_IMAGE": "ds01/singleuser:latest"}
TEMPLATE = "ARG BASE_IMAGE=ds01/singleuser:latest\nFROM ${BASE_IMAGE}\nUSER root\n"


def check(text: str, buildargs: dict[str, str] | None = None):
    return check_dockerfile(
        text,
        buildargs=ARGS if buildargs is None else buildargs,
        allowed_images=BASES,
        own_prefix=OWN,
    )


def refused(text: str, match: str, buildargs: dict[str, str] | None = None) -> None:
    with pytest.raises(BuildRuleError, match=match):
        check(text, buildargs)


def test_the_project_templates_pass():
    check(TEMPLATE + 'RUN ["pip", "install", "--no-cache-dir", "numpy"]\nLABEL org.x.owner=me\n')


def test_from_the_users_own_image_and_an_earlier_stage_pass():
    check("FROM ds01-alice/thesis:latest AS base\nFROM base\nCOPY --from=base /a /b\n")
    check(
        "FROM ds01/singleuser AS one\nFROM ds01-alice/x@sha256:"
        + "a" * 64
        + "\nCOPY --from=0 /a /b\n"
    )


def test_from_another_users_image_is_refused():
    refused("FROM ds01-bob/thesis:latest\n", r"line 1: FROM ds01-bob/thesis:latest is not allowed")


def test_from_an_image_outside_the_lab_is_refused():
    refused("FROM python:3.11\n", "not allowed")
    refused("FROM sha256:" + "b" * 64 + "\n", "not allowed")


def test_from_is_checked_after_build_args_are_expanded():
    refused("ARG X=ds01-bob/thesis\nFROM $X\n", "FROM ds01-bob/thesis is not allowed")
    refused("ARG X\nFROM ${X:-ds01-bob/y}\n", "FROM ds01-bob/y")
    # the build's own BASE_IMAGE overrides the Dockerfile's default
    check("ARG BASE_IMAGE=ds01-bob/evil\nFROM ${BASE_IMAGE}\n")
    refused(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n",
        "FROM ds01-bob/evil",
        {"BASE_IMAGE": "ds01-bob/evil"},
    )


def test_copy_from_another_users_image_is_refused():
    refused(TEMPLATE + "COPY --from=ds01-bob/thesis:latest /data /data\n", "COPY from ds01-bob")
    refused(TEMPLATE + "COPY --chown=1:1 --from=$X /a /b\n", "not allowed")
    refused(
        TEMPLATE + "RUN --mount=type=bind,from=ds01-bob/t,target=/m true\n", "RUN from ds01-bob"
    )


def test_a_shell_word_that_looks_like_a_flag_is_not_a_copy():
    check(TEMPLATE + "RUN echo --from=ds01-bob/x\n")


def test_ds01_labels_are_refused_in_every_spelling():
    for line in (
        "LABEL ds01.gpu.uuids=GPU-0 ds01.gpu.equivalents=0",
        "LABEL a=b DS01.managed=true",
        'LABEL "ds01.role"="project"',
        "LABEL ds01.user alice",
        "LABEL ${K}=x",
        "ONBUILD LABEL ds01.gpu.uuids=GPU-1",
        "LABEL a=b \\\n  ds01.gpu.uuids=GPU-0",
    ):
        refused(TEMPLATE + line + "\n", "LABEL .* is not allowed")


def test_gpu_visibility_cannot_be_set_by_the_dockerfile():
    refused(TEMPLATE + "ENV NVIDIA_VISIBLE_DEVICES=all\n", "ENV NVIDIA_VISIBLE_DEVICES")
    refused(TEMPLATE + "ENV NVIDIA_VISIBLE_DEVICES all\n", "ENV NVIDIA_VISIBLE_DEVICES")
    refused(TEMPLATE + "ARG NVIDIA_VISIBLE_DEVICES=all\n", "ARG NVIDIA_VISIBLE_DEVICES")


def test_onbuild_from_and_unreadable_quotes_are_refused():
    refused(TEMPLATE + "ONBUILD FROM ds01-bob/x\n", "ONBUILD FROM")
    refused(TEMPLATE + "LABEL a='unclosed\n", "cannot read LABEL")


def test_the_escape_directive_changes_continuations():
    text = "# escape=`\nFROM ds01/singleuser\nLABEL a=b `\n  ds01.user=x\n"
    refused(text, "LABEL ds01.user")


def test_instructions_join_continuations_and_skip_comments():
    found = list(instructions("# c\nFROM a \\\n  AS b\n\nRUN x \\\n# inner\n y\n"))
    assert [(i.line, i.end, i.keyword, i.rest) for i in found] == [
        (2, 3, "FROM", "a AS b"),
        (5, 7, "RUN", "x y"),
    ]


def test_expand_and_repository():
    assert expand("${A}/${B:-x}:${C:+t}", {"A": "ds01", "C": ""}) == "ds01/x:"
    assert repository("registry:5000/ds01/singleuser:latest") == "registry:5000/ds01/singleuser"
    assert repository("ds01-alice/p@sha256:abc") == "ds01-alice/p"


def test_builds_hide_the_gpus_after_every_from():
    text = "FROM ds01/singleuser AS a\nRUN x\nFROM a\nRUN y\n"
    rendered = render_for_build(text, check(text))
    assert rendered.split("\n") == [
        "FROM ds01/singleuser AS a",
        NO_GPU_LINE,
        "RUN x",
        "FROM a",
        NO_GPU_LINE,
        "RUN y",
        "",
    ]
