"""The committed dev-clean splits that every default was tuned on (splits/README.md)."""

from pathlib import Path

import pytest

from qbench.data.librispeech import DataNotFoundError, list_utterances

SPLITS = Path(__file__).resolve().parent.parent / "splits"


def read_ids(name: str) -> list[str]:
    return (SPLITS / name).read_text().split()


def test_tune_and_calibrate_are_disjoint_halves_of_one_alternating_split():
    tune, calibrate = read_ids("dev-clean-tune.txt"), read_ids("dev-clean-calibrate.txt")
    assert len(tune) == len(calibrate) == 22
    assert not set(tune) & set(calibrate)
    everything = sorted(tune + calibrate)
    assert tune == everything[0::2] and calibrate == everything[1::2]


def test_every_split_id_is_a_shared_dev_clean_utterance_and_none_is_in_test_clean(data_dir: Path):
    ids = set(read_ids("dev-clean-tune.txt")) | set(read_ids("dev-clean-calibrate.txt"))
    try:
        dev = {u.id for u in list_utterances(data_dir, "dev-clean")}
    except DataNotFoundError as exc:  # a LibriSpeech sample without dev-clean
        pytest.skip(f"no dev-clean here: {exc}")
    if not ids <= dev:
        pytest.skip(f"this LibriSpeech sample lacks {len(ids - dev)} of the split's dev-clean utterances")
    test = {u.id for u in list_utterances(data_dir, "test-clean")}
    assert not ids & test
