"""[policy] rules, cooldown keys and history, read from the INI file."""

from __future__ import annotations

from pathlib import Path

import pytest

from condaproxy.conda.rules import Action
from condaproxy.config.load import load_config
from condaproxy.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.ini"
    path.write_text(text)
    return path


def test_rules_cooldowns_and_history(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "[cache]\nhistory = 30d\n"
            "[upstream]\nmin_age = 7d\nmin_age_exempt = internal-* fix\n"
            "[channel:conda-forge]\nurl = https://example.org/conda-forge\nmin_age = 12h\nmin_age_unknown = hold\n"
            "[policy]\ndeny.old-openssl = openssl <3\nhide = *-nightly\n    beta-*\n"
            "[policy:conda-forge]\nhide.no-numpy3 = numpy 3.*\n",
        )
    )
    assert config.cache.history == 30 * 86400
    assert [(r.name, r.action, r.spec, r.channel) for r in config.rules] == [
        ("old-openssl", Action.DENY, "openssl <3", None),
        ("hide *-nightly", Action.HIDE, "*-nightly", None),
        ("hide beta-*", Action.HIDE, "beta-*", None),
        ("no-numpy3", Action.HIDE, "numpy 3.*", "conda-forge"),
    ]
    forge = config.channel("conda-forge")
    other = config.channel("bioconda")
    assert forge is not None and other is not None
    assert config.policy(forge).min_age == 12 * 3600 and config.policy(forge).unknown_hold
    assert config.policy(forge).exempt == ("internal-*", "fix")  # inherited from [upstream]
    assert config.policy(other).min_age == 7 * 86400 and not config.policy(other).unknown_hold
    assert len(config.policy(forge).rules) == 4 and len(config.policy(other).rules) == 3


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[policy]\ndeny = openssl >>>3\n", "not a MatchSpec"),
        ("[policy]\nallow = openssl\n", "expected hide, deny"),
        ("[upstream]\nmin_age = a week\n", "duration"),
        ("[upstream]\nmin_age_unknown = maybe\n", "allow or hold"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(write(tmp_path, text))
