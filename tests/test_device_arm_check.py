"""The pure parts of `make device-arm-check` (infra/device_arm_check.py, infra/arm64.py); the emulated run itself
is `make device-arm-check`, not part of `make test`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tierline_infra.arm64 import PIP_CACHE, Rootfs
from tierline_infra.device_arm_check import BOARD, board_manifest, compare_answers, source_key, wheels_from_report
from tierline_shared.config.manifest import load_manifest
from tierline_shared.security.credentials import SIGNING_PUB


def answer(text: str, finish: str = "stop", tokens: int | None = None) -> dict:
    return {"text": text, "finish_reason": finish, "completion_tokens": len(text) if tokens is None else tokens}


def chars(text: str) -> list[int]:  # a stand-in tokenizer: one id per character
    return [ord(c) for c in text]


def test_identical_answers_have_no_mismatch():
    same = [answer("12"), answer("7", "length")]
    assert compare_answers(same, [dict(a) for a in same], chars) == []


def test_a_mismatch_names_the_prompt_the_field_and_the_first_differing_token():
    ref = [answer("12"), answer("345")]
    arm = [answer("12"), answer("355")]
    [bad] = compare_answers(ref, arm, chars)
    assert bad["prompt"] == 1 and bad["first_differing_token"] == 1
    assert bad["differs_in"] == ["text", "token_ids"]
    assert (bad["x86_64"], bad["aarch64"]) == ("345", "355")


def test_same_text_but_another_count_or_finish_reason_is_a_mismatch():
    [bad] = compare_answers([answer("12", tokens=2)], [answer("12", "length", tokens=3)], chars)
    assert bad["differs_in"] == ["finish_reason", "completion_tokens"]
    assert bad["first_differing_token"] == 2  # the ids agree as far as they go


def test_a_longer_answer_differs_where_the_shorter_ends():
    [bad] = compare_answers([answer("12")], [answer("123")], chars)
    assert bad["first_differing_token"] == 2


def test_answer_lists_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="1 reference answers, 0 emulated"):
        compare_answers([answer("1")], [], chars)


def test_wheels_from_pips_report():
    report = {"install": [
        {"metadata": {"name": "numpy", "version": "2.4.6"}, "download_info": {
            "url": "https://files.pythonhosted.org/packages/aa/numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64."
                   "manylinux_2_28_aarch64.whl", "archive_info": {"hash": "sha256=00"}}},
        {"metadata": {"name": "tierline", "version": "0.1.0"},
         "download_info": {"url": "file:///opt/tierline", "dir_info": {}}},
        {"metadata": {"name": "nkeys", "version": "0.2.1"},
         "download_info": {"url": "https://files.pythonhosted.org/packages/bb/nkeys-0.2.1.tar.gz"}},
        {"metadata": {"name": "grpcio", "version": "1.85.3"},
         "download_info": {"url": "https://example.org/grpcio-1.85.3-cp311-cp311-manylinux_2_17_aarch64.whl#sha256=1"}},
    ]}
    wheels = wheels_from_report(report)
    assert [w["name"] for w in wheels] == ["grpcio", "nkeys", "numpy", "tierline"]
    assert wheels[0]["file"] == "grpcio-1.85.3-cp311-cp311-manylinux_2_17_aarch64.whl"
    assert (wheels[1]["file"], wheels[1]["kind"]) == ("nkeys-0.2.1.tar.gz", "sdist")  # built on the board
    assert wheels[2]["file"].startswith("numpy-2.4.6-") and wheels[2]["kind"] == "wheel"
    assert (wheels[3]["file"], wheels[3]["kind"]) == (None, "local")  # the repository itself


def test_the_install_is_redone_when_a_source_changes_and_not_for_docs_or_models(tmp_path):
    for name, text in (("pyproject.toml", "a"), ("shared/x.py", "b"), ("docs/d.md", "c"), ("models/m.json", "d")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    files = ["pyproject.toml", "shared/x.py", "docs/d.md", "models/m.json"]
    key = source_key(tmp_path, files)
    (tmp_path / "docs/d.md").write_text("changed")
    (tmp_path / "models/m.json").write_text("changed")
    assert source_key(tmp_path, files) == key
    (tmp_path / "pyproject.toml").write_text("changed")
    assert source_key(tmp_path, files) != key


def test_programs_run_in_the_rootfs_through_chroot_or_proot(tmp_path):
    rootfs = Rootfs(tmp_path)
    (rootfs.path / "etc").mkdir(parents=True)
    (rootfs.path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\ntierline:x:999:995::/var/lib:/bin/false\n")
    rootfs.mode = "binfmt"
    argv = rootfs.argv(["/bin/true"], user="tierline")
    assert argv[:3] == ["unshare", "--mount", "--fork"] and "--userspec=999:995" in argv
    assert argv[-1] == "/bin/true" and f"PIP_CACHE_DIR={PIP_CACHE}" in argv
    assert "mount" not in rootfs.argv(["/bin/true"], mounts=False)[6]  # the shell script: no mounts
    rootfs.mode = "proot"
    argv = rootfs.argv(["/bin/true"])
    assert argv[0] == "proot" and argv[argv.index("-r") + 1] == str(rootfs.path)
    assert f"{rootfs.pip_cache}:{PIP_CACHE}" in argv


def test_the_boards_manifest_is_the_docs_with_a_users_edits_and_it_loads(tmp_path):
    (tmp_path / SIGNING_PUB).write_text("ed25519:apU2a2JxLBHEGfw8rDZdUMswSPrP5m6+sbmTY+d7wdg=\n")
    stack = SimpleNamespace(nats=SimpleNamespace(url="tls://127.0.0.1:4999"), credentials=tmp_path)
    data = board_manifest(stack)
    assert data["device_agent"]["device_id"] == BOARD and data["nats"]["url"] == "tls://127.0.0.1:4999"
    assert data["tiers"]["device"]["grpc_port"] == 0 and data["router"]["device_complexity"] == 1.0
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(data))
    m = load_manifest(path, check_artifacts=False)
    assert m.device_agent.update_keys == ["ed25519:apU2a2JxLBHEGfw8rDZdUMswSPrP5m6+sbmTY+d7wdg="]
    assert Path(m.models_dir) == Path("/opt/tierline/models")
