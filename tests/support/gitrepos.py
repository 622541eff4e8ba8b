"""Real git repositories made by tests, reachable through file:// URLs. ComfyHub clones those only where
CUSTOM_NODE_LOCAL_SOURCES allows it, and runs git in a container: tests that install from them use the node_git
fixture (tests/support/docker_fixtures.py)."""
import subprocess


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@example.org", "HOME": str(cwd), "PATH": "/usr/bin:/bin"})


def make_node_repo(root, name="ComfyUI-Test-Nodes", files=None):
    """A custom node repository with a commit on main, a tag v1, then a second commit; returns (url, commits)."""
    repo = root / name
    repo.mkdir(parents=True)
    git("init", "--quiet", "--initial-branch=main", cwd=repo)
    for relpath, content in (files or {"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"}).items():
        (repo / relpath).parent.mkdir(parents=True, exist_ok=True)
        (repo / relpath).write_text(content)
    git("add", "-A", cwd=repo)
    git("commit", "--quiet", "-m", "first", cwd=repo)
    git("tag", "v1", cwd=repo)
    first = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "CHANGELOG").write_text("second\n")
    git("add", "-A", cwd=repo)
    git("commit", "--quiet", "-m", "second", cwd=repo)
    second = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return f"file://{repo}", {"v1": first, "main": second}


def add_commit(repo, relpath, content):
    """Commit one more file on the repository's current branch; returns the new commit."""
    (repo / relpath).write_text(content)
    git("add", "-A", cwd=repo)
    git("commit", "--quiet", "-m", f"add {relpath}", cwd=repo)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
