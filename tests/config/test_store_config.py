"""[store]: the filesystem default, and the S3 keys, validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from condaproxy.config.load import load_config
from condaproxy.config.model import StoreConfig
from condaproxy.errors import ConfigError


def load(tmp_path: Path, text: str):
    path = tmp_path / "proxy.ini"
    path.write_text(text)
    return load_config(path)


def test_default_is_the_filesystem(tmp_path: Path) -> None:
    assert load(tmp_path, "[cache]\n").store == StoreConfig()


def test_s3_section(tmp_path: Path) -> None:
    store = load(
        tmp_path,
        "[store]\nbackend = s3\nbucket = conda-cache\nprefix = condaproxy\n"
        "endpoint_url = http://127.0.0.1:9000/\nregion = eu-west-1\naddressing_style = path\n"
        "redirect = yes\npresign_ttl = 600\nlocal_cache = 10G\n",
    ).store
    assert store.s3 and store.bucket == "conda-cache"
    assert store.prefix == "condaproxy/"  # the separator is added
    assert store.endpoint_url == "http://127.0.0.1:9000"
    assert (store.region, store.addressing_style, store.redirect, store.presign_ttl) == (
        "eu-west-1",
        "path",
        True,
        600,
    )
    assert store.local_cache == 10 << 30


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("backend = gcs\n", "backend", "expected filesystem or s3"),
        ("backend = s3\n", "bucket", "missing"),
        ("backend = s3\nbucket = Not_A_Bucket\n", "bucket", "S3 bucket name"),
        ("bucket = conda-cache\n", "bucket", "backend = s3 only"),
        ("backend = s3\nbucket = b12\naddressing_style = dns\n", "addressing_style", "path, virtual or auto"),
        ("backend = s3\nbucket = b12\npresign_ttl = 999999\n", "presign_ttl", "from 1 to 604800"),
        ("backend = s3\nbucket = b12\nprefix = /abs/\n", "prefix", "no leading"),
        ("backend = s3\nbucket = b12\npart_size = 1M\n", "part_size", "5M to 5G"),
        ("backend = s3\nbucket = b12\nendpoint_url = ftp://x\n", "endpoint_url", "http(s) URL"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "[store]\n" + text)
    assert (caught.value.section, caught.value.key) == ("store", key)
    assert words in str(caught.value)
