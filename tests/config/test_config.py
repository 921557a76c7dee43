"""INI → Config: defaults, the accepted syntax, and one-line errors naming file, section, key."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from types import MappingProxyType

import platformdirs
import psutil  # type: ignore[import-untyped]
import pytest

from condaproxy.config.interfaces import bind_addresses
from condaproxy.config.load import default_config, load_config
from condaproxy.config.model import (
    AdminConfig,
    CacheConfig,
    ChannelConfig,
    LazyConfig,
    LogConfig,
    UpstreamConfig,
    is_channel_name,
)
from condaproxy.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "condaproxy.ini"

EXAMPLE = """\
[lazy]
streamer_port = 8751            ; default 8751
streamer_interface = lo         ; comma-separated interface names and/or IP addresses; each is bound
streamer_cache_timeout = 86400
[cache]
directory = /var/lib/condaproxy
repodata_ttl = 60
[upstream]
default = https://conda.anaconda.org
allow_unlisted = yes
[channel:conda-forge]
url = https://conda.anaconda.org/conda-forge
"""


def write(tmp_path: Path, text: str, name: str = "proxy.ini") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# --- defaults -----------------------------------------------------------------------


def test_default_config_is_the_dataclass_defaults() -> None:
    config = default_config()
    assert config.lazy == LazyConfig(8751, ("lo",), 86400, 20.0)
    assert config.cache.directory == Path(platformdirs.user_data_dir("condaproxy"))
    assert (config.cache.repodata_ttl, config.cache.negative_ttl) == (60, 30)
    assert (config.cache.max_stale, config.cache.persist_workers) == (604800, 2)
    assert config.upstream == UpstreamConfig("https://conda.anaconda.org", True, 10.0, 60.0)
    assert dict(config.channels) == {}
    assert config.source is None


def test_default_config_takes_a_cache_directory(tmp_path: Path) -> None:
    assert default_config(tmp_path).cache.directory == tmp_path


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    config = load_config(path)
    assert config == dataclasses.replace(default_config(), source=path)


def test_config_is_frozen_and_channels_read_only(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE))
    assert isinstance(config.channels, MappingProxyType)
    with pytest.raises(TypeError):
        config.channels["x"] = config.channels["conda-forge"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lazy = LazyConfig()  # type: ignore[misc]


# --- accepted files -----------------------------------------------------------------


def test_example_parses(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    config = load_config(path)
    assert config.source == path
    assert config.lazy == LazyConfig(8751, ("lo",), 86400, 20.0)
    assert config.cache == CacheConfig(Path("/var/lib/condaproxy"), 60, 30, 604800, 10, 2)
    assert config.upstream == UpstreamConfig("https://conda.anaconda.org", True, 10.0, 60.0)
    assert dict(config.channels) == {
        "conda-forge": ChannelConfig("conda-forge", "https://conda.anaconda.org/conda-forge", 10.0, 60.0)
    }


def test_shipped_example_parses_and_shows_every_key() -> None:
    config = load_config(SHIPPED)
    assert config.cache.directory == Path("/var/lib/condaproxy")
    text = SHIPPED.read_text()
    for cls in (LazyConfig, CacheConfig, UpstreamConfig, LogConfig, AdminConfig):
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} = " in text, f.name


def test_shipped_example_shows_the_channel_keys() -> None:
    text = SHIPPED.read_text()
    for key in (
        *("url", "connect_timeout", "read_timeout", "ca_bundle", "client_cert", "client_key", "token"),
        *("header", "trusted_origins"),
    ):
        assert f"# {key} = " in text or f"\n{key} = " in text, key


def test_inline_comments_are_stripped(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        [lazy]
        streamer_port = 9000   ; semicolon
        streamer_cache_timeout = 5 # hash
        [upstream]
        default = https://mirror.example/conda/   # trailing slash dropped
        """))
    assert config.lazy.streamer_port == 9000
    assert config.lazy.streamer_cache_timeout == 5
    assert config.upstream.default == "https://mirror.example/conda"


def test_client_bounds_are_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[lazy]\nsend_timeout = 2.5\nmax_cold_per_client = 0\n"))
    assert (config.lazy.send_timeout, config.lazy.max_cold_per_client) == (2.5, 0)
    assert (LazyConfig().send_timeout, LazyConfig().max_cold_per_client) == (60.0, 64)


def test_relative_directory_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path, "[cache]\ndirectory = cache\n", name="etc/proxy.ini")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/proxy.ini"))
    assert config.cache.directory == path.parent / "cache"
    assert config.cache.directory.is_absolute()


def test_channels_inherit_upstream_timeouts_wherever_the_section_is(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        [channel:pkgs/main]
        url = http://repo.example/pkgs/main/
        read_timeout = 120
        [channel:conda-forge/label/dev]
        url = https://conda.example/conda-forge/label/dev
        [upstream]
        connect_timeout = 3.5
        read_timeout = 30
        """))
    assert config.channels["pkgs/main"] == ChannelConfig("pkgs/main", "http://repo.example/pkgs/main", 3.5, 120.0)
    dev = config.channels["conda-forge/label/dev"]
    assert (dev.connect_timeout, dev.read_timeout) == (3.5, 30.0)


def test_channel_mirrors(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        [channel:conda-forge]
        url = https://a.example/conda-forge/, https://b.example/cf
              https://c.example/conda-forge,https://a.example/conda-forge
        """))
    ch = config.channels["conda-forge"]
    assert ch.url == "https://a.example/conda-forge"
    assert ch.urls == ("https://a.example/conda-forge", "https://b.example/cf", "https://c.example/conda-forge")
    single = load_config(write(tmp_path, EXAMPLE)).channels["conda-forge"]
    assert single.urls == (single.url,)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[channel:x]\nurl = https://a.example/x ftp://b.example/x\n", "url", "'ftp://b.example/x'"),
        ("[channel:x]\nurl = https://a.example/x, https://b.example/x?q\n", "url", "query"),
        ("[channel:x]\nurl = , ,\n", "url", "missing"),
        ("[upstream]\ndefault = https://user:hunter2@conda.example\n", "default", "without user or password"),
        ("[channel:x]\nurl = https://user:hunter2@conda.example:bad/x\n", "url", "without user or password"),
        ("[channel:x]\nurl = https://a.example/x\nurls = https://b.example/x\n", "urls", "unknown key"),
        ("[channel:x]\nurl = https://a.example/x\n  read_timeout = 5\n", "url", "is the next line indented?"),
    ],
)
def test_bad_mirror_lists(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key and words in error.message
    assert "hunter2" not in str(error)  # a password in a URL is never echoed


def test_trusted_origins_and_probe_rate(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        [upstream]
        auth_probe_rate = 5, 50
        [channel:team]
        url = http://conda.internal/team
        trusted_origins = http://10.1.2.3:8080 HTTPS://CDN.Internal/,
                          http://[fd00::1]:81 http://10.1.2.3:8080
        [channel:other]
        url = https://conda.example/other
        """))
    assert config.upstream.auth_probe_rate == (5, 50)
    team = config.channels["team"]
    assert team.trusted_origins == ("http://10.1.2.3:8080", "https://cdn.internal", "http://[fd00::1]:81")
    assert config.channels["other"].trusted_origins == ()
    assert config.channel("team/label/dev").trusted_origins == team.trusted_origins  # labels follow


def test_channel_keys_are_listed(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[channel:x]\nurl = https://x.example\nmirror = y\n")
    for key in ("url", "connect_timeout", "read_timeout", "ca_bundle", "client_cert", "client_key", "token", "header"):
        assert key in error.message
    assert "urls" not in error.message.replace("url,", "")


def test_channel_lookup(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.channel("conda-forge") is config.channels["conda-forge"]
    assert config.channel("bioconda") == ChannelConfig("bioconda", "https://conda.anaconda.org/bioconda", 10.0, 60.0)
    # Names that could never be configured never become upstream URLs either.
    assert config.channel("../etc") is None
    assert config.channel("Bioconda") is None
    closed = load_config(write(tmp_path, EXAMPLE.replace("allow_unlisted = yes", "allow_unlisted = no")))
    assert closed.channel("bioconda") is None
    assert closed.channel("conda-forge") is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("yes", True), ("No", False), ("true", True), ("FALSE", False), ("on", True), ("off", False),
     ("1", True), ("0", False)],
)
def test_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    config = load_config(write(tmp_path, f"[upstream]\nallow_unlisted = {text}\n"))
    assert config.upstream.allow_unlisted is expected


def test_interface_list(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[lazy]\nstreamer_interface = lo, 127.0.0.1 ,lo,::1\n"))
    assert config.lazy.streamer_interface == ("lo", "127.0.0.1", "::1")


@pytest.mark.parametrize("name", ["conda-forge", "pkgs/main", "conda-forge/label/dev", "a", "0x.y_z"])
def test_valid_channel_names(name: str) -> None:
    assert is_channel_name(name)


# --- rejected files -----------------------------------------------------------------

TRUSTING = "[channel:x]\nurl = https://x.example\ntrusted_origins = "
BAD = [
    # (file text, section, key, words in the message)
    ("[lazy]\nstreamer_port = 0\n", "lazy", "streamer_port", "1 to 65535"),
    ("[lazy]\nstreamer_port = 65536\n", "lazy", "streamer_port", "1 to 65535"),
    ("[lazy]\nstreamer_port = http\n", "lazy", "streamer_port", "'http'"),
    ("[lazy]\nstreamer_port = \n", "lazy", "streamer_port", "integer"),
    ("[lazy]\nstreamer_cache_timeout = -1\n", "lazy", "streamer_cache_timeout", ">= 0"),
    ("[lazy]\nshutdown_grace = 0\n", "lazy", "shutdown_grace", "positive"),
    ("[lazy]\nsend_timeout = 0\n", "lazy", "send_timeout", "positive"),
    ("[lazy]\nsend_timeout = a minute\n", "lazy", "send_timeout", "'a minute'"),
    ("[lazy]\nmax_cold_per_client = -1\n", "lazy", "max_cold_per_client", ">= 0"),
    ("[lazy]\nmax_cold_per_client = 6.5\n", "lazy", "max_cold_per_client", "integer"),
    ("[cache]\nrepodata_ttl = 1.5\n", "cache", "repodata_ttl", "integer"),
    ("[cache]\nnegative_ttl = 1_000\n", "cache", "negative_ttl", "integer"),
    ("[cache]\nmax_stale = -5\n", "cache", "max_stale", "integer"),
    ("[cache]\npersist_workers = 0\n", "cache", "persist_workers", ">= 1"),
    ("[cache]\ndirectory =\n", "cache", "directory", "directory"),
    ("[cache]\ncolour = blue\n", "cache", "colour", "allowed keys: directory, repodata_ttl"),
    ("[upstream]\nallow_unlisted = maybe\n", "upstream", "allow_unlisted", "yes/no"),
    ("[upstream]\nconnect_timeout = 0\n", "upstream", "connect_timeout", "positive"),
    ("[upstream]\nread_timeout = nan\n", "upstream", "read_timeout", "positive"),
    ("[upstream]\nread_timeout = soon\n", "upstream", "read_timeout", "'soon'"),
    ("[upstream]\ndefault = ftp://conda.example\n", "upstream", "default", "http(s)"),
    ("[upstream]\ndefault = https://\n", "upstream", "default", "host"),
    ("[upstream]\ndefault = conda.anaconda.org\n", "upstream", "default", "http(s)"),
    ("[upstream]\ndefault = https://conda.example:http/\n", "upstream", "default", "http(s)"),
    ("[upstream]\ndefault = https://conda.example/?token=1\n", "upstream", "default", "query"),
    ("[upstream]\ndefault = https://conda.example/#top\n", "upstream", "default", "fragment"),
    ("[upstream]\ntimeout = 5\n", "upstream", "timeout", "allowed keys"),
    ("[lazy]\nstreamer_interface =\n", "lazy", "streamer_interface", "at least one"),
    ("[lazy]\nstreamer_interface = , \n", "lazy", "streamer_interface", "at least one"),
    ("[lazy]\nstreamer_interface = lo,,eth0\n", "lazy", "streamer_interface", "empty item"),
    ("[lazy]\nstreamer_port = 8751\n  streamer_interface = lo\n", "lazy", "streamer_port", "indented"),
    ("[channel:x]\nread_timeout = 5\n", "channel:x", "url", "missing"),
    ("[channel:x]\nurl = https://x.example\nmirror = y\n", "channel:x", "mirror", "allowed keys: url"),
    ("[channel:x]\nurl = file:///srv/x\n", "channel:x", "url", "http(s)"),
    ("[upstream]\nauth_probe_rate = 20\n", "upstream", "auth_probe_rate", "two integers >= 1"),
    ("[upstream]\nauth_probe_rate = 20 0\n", "upstream", "auth_probe_rate", "'20 0'"),
    ("[upstream]\nauth_probe_rate = 1.5 300\n", "upstream", "auth_probe_rate", "per client address"),
    (f"{TRUSTING}https://cdn.example/pkgs\n", "channel:x", "trusted_origins", "not a path"),
    (f"{TRUSTING}10.1.2.3:8080\n", "channel:x", "trusted_origins", "http(s)"),
    (f"{TRUSTING}https://u:pw@cdn.example\n", "channel:x", "trusted_origins", "without user or password"),
]


@pytest.mark.parametrize(("text", "section", "key", "words"), BAD)
def test_bad_value_names_file_section_and_key(
    tmp_path: Path, text: str, section: str, key: str, words: str
) -> None:
    error = load_error(tmp_path, text)
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'proxy.ini'}: [{section}] {key}: ")
    assert words in message
    assert (error.section, error.key) == (section, key)


@pytest.mark.parametrize(
    "section", ["proxy", "DEFAULT", "Lazy", "channel"]
)
def test_unknown_section(tmp_path: Path, section: str) -> None:
    message = str(load_error(tmp_path, f"[{section}]\n"))
    assert message == (
        f"{tmp_path / 'proxy.ini'}: [{section}]: unknown section; "
        "expected [lazy], [cache], [store], [upstream], [log], [admin], [channel:NAME], [policy] or [policy:NAME]"
    )


@pytest.mark.parametrize(
    "name", ["Conda-Forge", "a/../b", "..", "", "a//b", "/a", "a/", "-a", "a b", "a/.."]
)
def test_bad_channel_names(tmp_path: Path, name: str) -> None:
    assert not is_channel_name(name)
    error = load_error(tmp_path, f"[channel:{name}]\nurl = https://x.example\n")
    assert f"[channel:{name}]: expected [channel:NAME]" in str(error)


@pytest.mark.parametrize(
    ("text", "section", "key", "words"),
    [
        ("streamer_port = 1\n[lazy]\n", None, None, "line 1: 'streamer_port = 1' comes before any [section]"),
        ("[lazy]\n\ngarbage\n", None, None, "line 3: expected 'key = value' or [section], got 'garbage'"),
        ("[lazy]\n[cache]\n[lazy]\n", "lazy", None, "line 3: section appears twice"),
        ("[cache]\nrepodata_ttl = 1\nrepodata_ttl = 2\n", "cache", "repodata_ttl", "line 3: key appears twice"),
    ],
)
def test_syntax_errors_say_the_line(
    tmp_path: Path, text: str, section: str | None, key: str | None, words: str
) -> None:
    error = load_error(tmp_path, text)
    assert (error.section, error.key) == (section, key)
    assert str(error).startswith(f"{tmp_path / 'proxy.ini'}: ")
    assert words in str(error)
    assert "\n" not in str(error)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.ini"
    with pytest.raises(ConfigError, match=r"absent\.ini: cannot read: No such file"):
        load_config(path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.ini"
    path.write_bytes(b"[lazy]\nstreamer_port = \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_hash_without_space_is_part_of_the_url(tmp_path: Path) -> None:
    # Inline comments need whitespace before them, so this "#" is a fragment, refused.
    error = load_error(tmp_path, "[upstream]\ndefault = https://x.example/#comment\n")
    assert error.key == "default"


# --- bind_addresses -----------------------------------------------------------------

needs_lo = pytest.mark.skipif("lo" not in psutil.net_if_addrs(), reason="no interface named lo")


@needs_lo
def test_bind_loopback_interface() -> None:
    addresses = bind_addresses(["lo"])
    assert "127.0.0.1" in addresses
    assert all(":" in a or a.startswith("127.") for a in addresses)
    assert not any("%" in a for a in addresses)


def test_bind_ip_literals_are_kept() -> None:
    assert bind_addresses(["127.0.0.1"]) == ["127.0.0.1"]
    assert bind_addresses(["::1"]) == ["::1"]
    assert bind_addresses(["0:0:0:0:0:0:0:1", "0.0.0.0"]) == ["::1", "0.0.0.0"]


@needs_lo
def test_bind_interface_and_address_without_repeats() -> None:
    addresses = bind_addresses(["lo", "127.0.0.1"])
    assert addresses.count("127.0.0.1") == 1
    assert addresses[0] == "127.0.0.1"


def test_bind_unknown_interface() -> None:
    with pytest.raises(ConfigError) as info:
        bind_addresses(["127.0.0.1", "nosuchif0"], source="/etc/condaproxy/condaproxy.ini")
    message = str(info.value)
    assert message.startswith("/etc/condaproxy/condaproxy.ini: [lazy] streamer_interface: 'nosuchif0'")
    assert "\n" not in message


def test_bind_nothing() -> None:
    with pytest.raises(ConfigError, match=r"\[lazy\] streamer_interface"):
        bind_addresses([])


def test_the_systemd_unit_waits_longer_than_the_shutdown_grace() -> None:
    unit = (SHIPPED.parents[1] / "systemd" / "condaproxy.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("TimeoutStopSec=")]
    assert float(line.removeprefix("TimeoutStopSec=").removesuffix("s")) > LazyConfig().shutdown_grace
    assert load_config(SHIPPED).lazy.shutdown_grace == LazyConfig().shutdown_grace
