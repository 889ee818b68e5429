"""Fixtures shared by the processing tests: a tokenizer folder trained here and qvl's processor on it."""

import pytest

from qvl.config import PRESETS
from qvl.processing import Processor, QwenTokenizer, VisionProcessingConfig
from qvl.processing.video import VIDEO_DEFAULTS
from tests.processing.helpers import BOUNDS, write_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, PRESETS["tiny"])
    return d


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Processor(QwenTokenizer.from_file(tok_dir), VisionProcessingConfig(**BOUNDS),
                     VIDEO_DEFAULTS.with_overrides(**BOUNDS), PRESETS["tiny"])
