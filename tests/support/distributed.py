"""A local git repository standing in for ComfyUI-Distributed (an empty node package, two commits), installed into
clusters' members through ComfyHub's custom-node machinery: DISTRIBUTED_NODE_URL and DISTRIBUTED_NODE_REF point at it,
in this process and in the worker and agent processes a test starts (with the node_git fixture, which allows local
sources)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support.gitrepos import add_commit, make_node_repo

NAME = "ComfyUI-Distributed"


@dataclass
class DistributedSource:
    url: str
    pinned: str  # the commit members must run (DISTRIBUTED_NODE_REF)
    other: str  # another commit of it, for an adopted instance that has it at another version
    folder: Path


def make_distributed_source(root: Path, settings, monkeypatch) -> DistributedSource:
    """The stand-in repository under `root`, pinned at its first commit (v1); its later commit is `other`."""
    url, commits = make_node_repo(root, name=NAME, files={
        "__init__.py": "NODE_CLASS_MAPPINGS = {}\nNODE_DISPLAY_NAME_MAPPINGS = {}\nWEB_DIRECTORY = None\n"})
    other = add_commit(root / NAME, "pyproject.toml", '[project]\nname = "comfyui-distributed"\nversion = "9.9.9"\n')
    source = DistributedSource(url=url, pinned=commits["v1"], other=other, folder=root / NAME)
    settings.DISTRIBUTED_NODE_URL = source.url
    settings.DISTRIBUTED_NODE_REF = source.pinned
    monkeypatch.setenv("DISTRIBUTED_NODE_URL", source.url)
    monkeypatch.setenv("DISTRIBUTED_NODE_REF", source.pinned)
    return source
