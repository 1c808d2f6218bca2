"""Share experiments between machines: `dvc exp push` / `dvc exp pull` with the remotes checked first.

    python -m yolo_compress.review.share push origin     # this machine's experiments of HEAD -> git remote + DVC remote
    python -m yolo_compress.review.share pull origin     # a teammate's experiments of HEAD, with their outputs

Experiments travel as git refs through the git remote; their models and data through the project's default DVC
remote (`dvc remote add -d ...`). After a pull, `dvc exp show` lists the rows made elsewhere. An unreachable remote
stops with one line instead of DVC's and git's tracebacks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from yolo_compress.errors import UserError

GIT_TIMEOUT_S = 30


def check_git_remote(root: Path, remote: str) -> str:
    """The URL of git remote `remote` (a name or a URL); UserError when it cannot be reached."""
    url = subprocess.run(["git", "remote", "get-url", remote], cwd=root, capture_output=True, text=True)
    url = url.stdout.strip() if url.returncode == 0 else remote
    try:
        probe = subprocess.run(["git", "ls-remote", "--heads", url], cwd=root, capture_output=True, text=True,
                               timeout=GIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"git remote {remote!r} ({url}) did not answer within {GIT_TIMEOUT_S} s; check the network "
                        "or the URL (`git remote -v`)") from None
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
        raise UserError(f"git remote {remote!r} ({url}) is not reachable ({why}); check `git remote -v`, or add it "
                        "with `git remote add origin <url>`")
    return url


def _repo(root: Path) -> Any:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except NotDvcRepoError:
        raise UserError(f"{root.resolve()} is not a DVC repository; run this from the project's root") from None


def check_dvc_remote(root: Path) -> str:
    """The default DVC remote's URL; UserError when none is set or a local one does not exist."""
    with _repo(root) as repo:
        name = repo.config.get("core", {}).get("remote")
        if not name:
            raise UserError("no default DVC remote, so models and data cannot travel with the experiments; add one "
                            "with `dvc remote add -d shared <folder or s3://...>` and commit .dvc/config")
        url = str(repo.config["remote"][name]["url"])
    local = "://" not in url or url.startswith("file://")
    path = Path(url.removeprefix("file://"))
    if local and not (path if path.is_absolute() else root / ".dvc" / path).exists():
        raise UserError(f"DVC remote {name!r} ({url}) is not reachable: the folder does not exist; mount it or fix "
                        f"it with `dvc remote modify {name} url <path>`")
    return url


def share(root: Path, direction: str, remote: str) -> list[str]:
    """Push or pull the experiments of HEAD; the names that travelled."""
    from dvc.exceptions import DvcException

    check_git_remote(root, remote)
    check_dvc_remote(root)
    with _repo(root) as repo:
        try:
            if direction == "push":  # the CLI's defaults: the experiments of HEAD, with their cached outputs
                done = repo.experiments.push(remote, push_cache=True)
                names = [*done.get("success", []), *done.get("up_to_date", [])]
            else:
                names = list(repo.experiments.pull(remote, pull_cache=True))
        except DvcException as err:
            raise UserError(f"dvc exp {direction} {remote}: {str(err).strip().splitlines()[0]}") from None
    return [str(n) for n in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("direction", choices=("push", "pull"))
    ap.add_argument("remote", nargs="?", default="origin", help="git remote name or URL (default: origin)")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repo (default: current folder)")
    args = ap.parse_args(argv)
    try:
        names = share(args.root, args.direction, args.remote)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    verb = "pushed to" if args.direction == "push" else "pulled from"
    print(f"{len(names)} experiment(s) {verb} {args.remote}: {', '.join(names) or 'none new'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
