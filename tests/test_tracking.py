"""Provenance: the commit, dirty flag and command a run records (no Lightning import: fast)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from pha_lab import tracking


def git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_git_info_records_the_commit_and_the_dirty_flag_of_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("PHA_GIT_SHA", raising=False)
    monkeypatch.delenv("PHA_GIT_DIRTY", raising=False)
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    sha = git(tmp_path, "rev-parse", "HEAD")
    assert tracking.git_info(tmp_path) == {"git_sha": sha, "git_dirty": "false"}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert tracking.git_info(tmp_path) == {"git_sha": sha, "git_dirty": "true"}
    # a copied checkout whose .git is stale (the GPU machine's): the stated commit wins over what git reads
    monkeypatch.setenv("PHA_GIT_SHA", "f" * 40)
    monkeypatch.setenv("PHA_GIT_DIRTY", "false")
    assert tracking.git_info(tmp_path) == {"git_sha": "f" * 40, "git_dirty": "false"}


def test_git_info_without_git_uses_the_environment_else_unknown_never_head(tmp_path, monkeypatch):
    tree = tmp_path / "copied_tree"  # a copy of the project without .git, as on the GPU machine
    tree.mkdir()
    monkeypatch.delenv("PHA_GIT_SHA", raising=False)
    monkeypatch.delenv("PHA_GIT_DIRTY", raising=False)
    assert tracking.git_info(tree) == {"git_sha": "unknown", "git_dirty": "unknown"}
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("PHA_GIT_SHA", sha)
    assert tracking.git_info(tree) == {"git_sha": sha, "git_dirty": "unknown"}
    monkeypatch.setenv("PHA_GIT_DIRTY", "true")
    assert tracking.git_info(tree) == {"git_sha": sha, "git_dirty": "true"}
    monkeypatch.setenv("PHA_GIT_SHA", "HEAD")
    with pytest.raises(ValueError, match="PHA_GIT_SHA='head' is not a full commit id"):
        tracking.git_info(tree)


def test_a_folder_inside_another_repository_is_not_that_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("PHA_GIT_SHA", raising=False)
    git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("1")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-q", "-m", "outer")
    inner = tmp_path / "vendored" / "pha_lab_copy"
    inner.mkdir(parents=True)
    assert tracking.git_info(inner)["git_sha"] == "unknown"


def test_environment_tags_hold_this_checkout_and_the_command_line():
    tags = tracking.environment_tags()
    assert tags["git_sha"] == tracking.git_info()["git_sha"] != "HEAD"
    assert tags["command"] == shlex.join(sys.argv)
