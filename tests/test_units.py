"""Durations and sizes as people write them, and back."""

import time

import pytest

from ds01_spawner.units import format_duration, format_remaining, parse_duration, parse_size


@pytest.mark.parametrize(
    "text, seconds",
    [("30m", 1800), ("1.5h", 5400), ("2d", 172800), ("45s", 45), ("1h30m", 5400), (" 2 h", 7200)],
)
def test_durations_with_units(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value", [30, "30", "30x", "m", "0m", True, "1h30", "-5m"])
def test_bad_durations_are_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", [None, "none", "off"])
def test_none_means_no_limit(value):
    assert parse_duration(value) is None and parse_size(value) is None


def test_sizes_are_binary_like_docker():
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("16G") == parse_size("16GiB") == parse_size("16g") == 16 * 1024**3
    assert parse_size(1000) == 1000
    with pytest.raises(ValueError):
        parse_size("12X")


def test_durations_print_back_as_written():
    assert [format_duration(s) for s in (1800, 5400, 172800, 45, 6000)] == [
        "30m",
        "1.5h",
        "2d",
        "45s",
        "100m",
    ]


def test_a_very_long_duration_is_refused_without_backtracking():
    started = time.perf_counter()
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("1" * 20_000)
    assert time.perf_counter() - started < 0.5


def test_time_left_prints_to_the_two_largest_units():
    assert [format_remaining(s) for s in (0, 61, 3605, 604797, None)] == [
        "0s",
        "1m 1s",
        "1h",
        "6d 23h",
        "none",
    ]
