"""Settings are validated when they are made, whichever stages a run will reach."""

from __future__ import annotations

import pytest

from care_mla.settings import ConvertSettings, SettingsError, parse_max_memory


@pytest.mark.parametrize("max_memory, needle", [
    ("banana", "DEVICE=SIZE"),
    ("0=20GiB,0=10GiB", "names device '0' twice"),
    ("cpu=4GiB,cpu=8GiB", "names device 'cpu' twice"),
    ("0=lots", "not a size"),
    (",", "names no device"),
])
def test_bad_max_memory_is_refused_even_when_nothing_would_read_it(max_memory, needle):
    """--no-eval with cached statistics reads no weights whole, yet a typo is still refused at once."""
    with pytest.raises(SettingsError, match=needle):
        ConvertSettings(max_memory=max_memory, evaluate=False)


def test_max_memory_is_parsed_to_bytes():
    assert parse_max_memory("0=1GiB, cpu=512MiB") == {0: 1 << 30, "cpu": 512 << 20}
    assert ConvertSettings(max_memory="cpu=1GiB", device="cpu").max_memory_map == {"cpu": 1 << 30}
    with pytest.raises(SettingsError, match="--device is cpu"):
        ConvertSettings(max_memory="0=1GiB", device="cpu")


def test_settings_round_trip_and_unknown_keys():
    s = ConvertSettings(kv_fraction=0.25, zero_shot_tasks=("lastword",))
    assert ConvertSettings.from_dict(s.to_dict()) == s
    with pytest.raises(SettingsError, match="unknown setting"):
        ConvertSettings.from_dict({**s.to_dict(), "kv_fracton": 0.5})
