"""The tasks zeroship trains and serves. A StrEnum: a member equals its string, so recipes, manifests,
status files and Ray's rows keep carrying plain strings while code compares against `Task.TOKEN`."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    TOKEN = "token_classification"  # NER: a BIO label per word
    SEQUENCE = "sequence_classification"  # one label per text
