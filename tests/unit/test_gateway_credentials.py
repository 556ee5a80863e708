"""Loading caller credentials from a Secret-shaped directory (gateway/credentials.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path

import pytest

from kubeinfer_runtime.gateway.credentials import (
    MAX_FILE_BYTES,
    CallerCredentials,
    CredentialsDirectory,
    CredentialsError,
    load_credentials,
    token_digest,
)

AK = "AKIAKUBEINFER0001"
SK = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AK2 = "AKIAKUBEINFER0002"
SK2 = "je7MtGbClwBF/2Zp9Utk%2Zp9Utk/h3yCo8nvbEXAMPLE"


def write(directory: Path, **files: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return directory


def refused(directory: Path, *, secrets: tuple[str, ...] = (SK, SK2)) -> str:
    with pytest.raises(CredentialsError) as raised:
        load_credentials(directory)
    message = str(raised.value)
    for secret in secrets:
        assert secret not in message
    assert message[0].isupper() and not message.endswith(".")
    return message


# -- formats


def test_env_style_pair_strips_whitespace(tmp_path: Path) -> None:
    got = load_credentials(write(tmp_path, AWS_ACCESS_KEY_ID=f"  {AK}\n",
                                 AWS_SECRET_ACCESS_KEY=f"{SK}\r\n"))
    assert dict(got.keys) == {AK: SK}
    assert got.token_digests == () and not got.empty


def test_shared_credentials_file_with_two_keys_for_rotation(tmp_path: Path) -> None:
    got = load_credentials(write(tmp_path, credentials=(
        f"[default]\naws_access_key_id = {AK}\naws_secret_access_key = {SK}\n\n"
        f"[next]\nAWS_ACCESS_KEY_ID={AK2}\naws_secret_access_key={SK2}\nregion = eu-west-1\n")))
    # '%' in a secret is not interpolation; upper-case option names still count.
    assert dict(got.keys) == {AK: SK, AK2: SK2}


def test_the_DEFAULT_section_is_a_profile_like_any_other(tmp_path: Path) -> None:
    got = load_credentials(write(tmp_path, credentials=(
        f"[DEFAULT]\naws_access_key_id={AK}\naws_secret_access_key={SK}\n")))
    assert dict(got.keys) == {AK: SK}


def test_tokens_are_kept_as_digests_only(tmp_path: Path) -> None:
    got = load_credentials(write(tmp_path, token="tk-one\n",
                                 tokens="# rotation: old then new\n\ntk-two\n  tk-three  \n"
                                        "tk-one\n"))
    assert got.token_digests == tuple(hashlib.sha256(t).digest()
                                      for t in (b"tk-one", b"tk-two", b"tk-three"))
    assert got.keys == {}
    assert "tk-" not in repr(got) and "tokens=3" in repr(got)


def test_all_formats_together_and_unknown_files_ignored(tmp_path: Path) -> None:
    got = load_credentials(write(
        tmp_path, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK, token="tk-1",
        credentials=f"[a]\naws_access_key_id={AK}\naws_secret_access_key={SK}\n"
                    f"[b]\naws_access_key_id={AK2}\naws_secret_access_key={SK2}\n",
        **{"config": "[profile x]\nregion=us-east-1\n", ".hidden": "junk"}))
    assert dict(got.keys) == {AK: SK, AK2: SK2}
    assert got.token_digests == (token_digest(b"tk-1"),)
    assert SK not in repr(got) and AK in repr(got)


def test_empty_directory_and_empty_tokens_list_give_empty_credentials(tmp_path: Path) -> None:
    assert load_credentials(tmp_path).empty
    assert load_credentials(write(tmp_path, tokens="# all revoked\n")).empty
    assert CallerCredentials({}, ()).empty and not CallerCredentials({}, (b"x",)).empty


def test_kubelet_secret_volume_layout(tmp_path: Path) -> None:
    """Keys are links into ..data, which links to a timestamped directory."""
    stamp = tmp_path / "..2026_12_06_04_25_00.000000001"
    write(stamp, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK, tokens="tk-1\n")
    os.symlink(stamp.name, tmp_path / "..data")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "tokens"):
        os.symlink(f"..data/{key}", tmp_path / key)
    got = load_credentials(tmp_path)
    assert dict(got.keys) == {AK: SK} and len(got.token_digests) == 1


# -- refusals


@pytest.mark.parametrize(("files", "expected"), [
    ({"AWS_ACCESS_KEY_ID": AK}, "has AWS_ACCESS_KEY_ID but no AWS_SECRET_ACCESS_KEY"),
    ({"AWS_SECRET_ACCESS_KEY": SK}, "has AWS_SECRET_ACCESS_KEY but no AWS_ACCESS_KEY_ID"),
    ({"AWS_ACCESS_KEY_ID": AK, "AWS_SECRET_ACCESS_KEY": " \n"}, "secret access key is empty"),
    ({"AWS_ACCESS_KEY_ID": "\n", "AWS_SECRET_ACCESS_KEY": SK}, "AWS_ACCESS_KEY_ID is empty"),
    ({"AWS_ACCESS_KEY_ID": SK, "AWS_SECRET_ACCESS_KEY": SK}, "letters or digits, found 40"),
    ({"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": SK}, "3 to 128 letters or digits"),
    ({"AWS_ACCESS_KEY_ID": AK, "AWS_SECRET_ACCESS_KEY": f"{SK} {SK2}"}, "whitespace"),
    ({"credentials": f"aws_access_key_id={AK}\naws_secret_access_key={SK}\n"},
     "not a valid AWS credentials file at line 1 (MissingSectionHeaderError)"),
    ({"credentials": f"[a]\naws_access_key_id={AK}\n{SK}\n"},
     "not a valid AWS credentials file at line 3 (ParsingError)"),
    ({"credentials": f"[a]\naws_secret_access_key={SK}\naws_secret_access_key={SK2}\n"},
     "at line 3 (DuplicateOptionError)"),
    ({"credentials": f"[a]\naws_access_key_id={AK}\n"}, "[a] has no (or an empty) "
     "aws_secret_access_key"),
    ({"credentials": f"[a]\naws_access_key_id=\naws_secret_access_key={SK}\n"},
     "[a] has no (or an empty) aws_access_key_id"),
    ({"credentials": "# nothing\n"}, "has no [profile] section"),
    ({"credentials": f"[a]\naws_access_key_id={AK}\naws_secret_access_key={SK}\n",
      "AWS_ACCESS_KEY_ID": AK, "AWS_SECRET_ACCESS_KEY": SK2},
     f"Access key id {AK} has two different secrets"),
    ({"token": "\n"}, "is empty: put the bearer token in it"),
    ({"token": f"two words{SK}"}, "one word of visible ASCII"),
    ({"tokens": f"ok\n{SK}é\n"}, "tokens line 2: a bearer token must be one word"),
    ({"credentials": b"\xff\xfe" + SK.encode()}, "is not UTF-8 text"),
])
def test_bad_files_name_the_problem_never_the_secret(
        tmp_path: Path, files: dict[str, str | bytes], expected: str) -> None:
    message = refused(write(tmp_path, **files))
    assert expected in message
    assert str(tmp_path) in message


def test_oversized_files_and_directories_in_place_of_files(tmp_path: Path) -> None:
    write(tmp_path, tokens="a\n" * (MAX_FILE_BYTES // 2 + 1))
    assert "larger than 64 KiB" in refused(tmp_path)
    (tmp_path / "tokens").unlink()
    (tmp_path / "token").mkdir()
    assert "is a directory" in refused(tmp_path)
    (tmp_path / "token").rmdir()
    os.mkfifo(tmp_path / "token")  # would block a plain read forever
    assert "is not a regular file" in refused(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in refused(tmp_path / "nope")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reload_picks_up_changes_only_after_the_interval(tmp_path: Path) -> None:
    write(tmp_path, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
    clock = Clock()
    source = CredentialsDirectory(tmp_path, interval_s=1.0, clock=clock)
    first = source.current()
    assert first is not None and dict(first.keys) == {AK: SK}
    assert source.current() is first  # unchanged: the same object, nothing re-read

    write(tmp_path, AWS_ACCESS_KEY_ID=AK2, AWS_SECRET_ACCESS_KEY=SK2)
    assert source.current() is first  # within the interval: not looked at
    clock.now = 1.0
    second = source.current()
    assert second is not None and dict(second.keys) == {AK2: SK2}
    clock.now = 2.0
    assert source.current() is second


def test_a_broken_change_keeps_the_last_good_set_and_logs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubeinfer")
    write(tmp_path, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
    source = CredentialsDirectory(tmp_path, interval_s=0)
    good = source.current()
    assert good is not None

    (tmp_path / "AWS_SECRET_ACCESS_KEY").unlink()
    for _ in range(3):
        assert source.current() is good
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "no AWS_SECRET_ACCESS_KEY" in errors[0].getMessage()
    assert "keeping the credentials loaded before" in errors[0].getMessage()
    assert SK not in caplog.text

    write(tmp_path, AWS_SECRET_ACCESS_KEY=SK2)
    fixed = source.current()
    assert fixed is not None and dict(fixed.keys) == {AK: SK2}


def test_first_load_broken_gives_none(tmp_path: Path) -> None:
    write(tmp_path, AWS_ACCESS_KEY_ID=AK)
    source = CredentialsDirectory(tmp_path, interval_s=0)
    assert source.current() is None
    write(tmp_path, AWS_SECRET_ACCESS_KEY=SK)
    loaded = source.current()
    assert loaded is not None and dict(loaded.keys) == {AK: SK}


def test_missing_directory_gives_none_then_loads_when_it_appears(tmp_path: Path) -> None:
    directory = tmp_path / "secret"
    source = CredentialsDirectory(directory, interval_s=0)
    assert source.current() is None
    write(directory, token="tk-1")
    loaded = source.current()
    assert loaded is not None and loaded.token_digests == (token_digest(b"tk-1"),)
    (directory / "token").unlink()
    directory.rmdir()
    assert source.current() is None


def test_kubelet_update_swaps_the_data_link(tmp_path: Path) -> None:
    def publish(stamp: str, **files: str) -> None:
        write(tmp_path / stamp, **files)
        os.symlink(stamp, tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        for key in files:
            if not (tmp_path / key).is_symlink():
                os.symlink(f"..data/{key}", tmp_path / key)

    publish("..2026_12_06_04_25_00.1", AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK)
    source = CredentialsDirectory(tmp_path, interval_s=0)
    before = source.current()
    assert before is not None and dict(before.keys) == {AK: SK}
    # Same sizes, same names: only the link target changes.
    publish("..2026_12_06_04_26_00.2", AWS_ACCESS_KEY_ID=AK2, AWS_SECRET_ACCESS_KEY=SK2[:40])
    after = source.current()
    assert after is not None and dict(after.keys) == {AK2: SK2[:40]}


def test_an_emptied_secret_revokes_everyone(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path, token="tk-1")
    source = CredentialsDirectory(tmp_path, interval_s=0)
    assert source.current() is not None
    (tmp_path / "token").unlink()
    emptied = source.current()
    assert emptied is not None and emptied.empty
    assert "holds no credentials" in caplog.text


def test_junk_files_load_or_are_refused_without_echo(tmp_path: Path) -> None:
    rng = random.Random(11)
    mark = "Qx7/SECRET+q"  # never a valid access key id, so never named
    pieces = ["[a]", "[", "]", "=", "\n", " ", "aws_access_key_id", "aws_secret_access_key",
              "#", ";", "%", "%(x)s", "\t", mark, "AKIA0000", "\x00", "é", "\r"]
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "credentials", "token", "tokens")
    for i in range(300):
        directory = tmp_path / str(i)
        files = {name: "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
                 for name in rng.sample(names, rng.randrange(1, 4))}
        write(directory, **files)
        try:
            load_credentials(directory)
        except CredentialsError as exc:
            assert mark not in str(exc).replace(str(tmp_path), ""), files
