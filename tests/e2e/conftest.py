"""Fixtures of the end-to-end tests."""
import pytest

from e2e_utils import write_imagenet_folder


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    """A tiny ImageNet-layout folder (train/ and val/ class folders of JPEGs), one per test module."""
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"))
