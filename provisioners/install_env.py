"""Install one locked environment inside the image from the shipped payload.

Runs with the image's python3 and the py-rattler wheel on PYTHONPATH. It reads the explicit
lock, checks every package's md5, links them into the prefix, then installs the pip wheels with
--no-index --require-hashes. Nothing is solved and nothing is downloaded.
"""

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import rattler
from rattler import RepoDataRecord


def locked_files(explicit: Path) -> list[tuple[str, str]]:
    entries = []
    for line in explicit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "@")):
            continue
        url, _, md5 = line.partition("#")
        entries.append((url.rsplit("/", 1)[-1], md5))
    return entries


async def install(payload: Path, env: str, prefix: Path) -> None:
    records = []
    for file_name, md5 in locked_files(payload / "envs" / env / "explicit.txt"):
        matches = list((payload / "channel").glob(f"*/{file_name}"))
        if len(matches) != 1:
            sys.exit(f"{file_name}: not in the shipped channel")
        path = matches[0]
        actual = hashlib.md5(path.read_bytes()).hexdigest()
        if actual != md5:
            sys.exit(f"{file_name}: md5 {actual} does not match the lock ({md5})")
        records.append(await RepoDataRecord.from_package_archive(path))
    await rattler.install(
        records,
        target_prefix=prefix,
        cache_dir=Path("/var/cache/factory-rattler"),
        show_progress=False,
    )
    print(f"installed {len(records)} conda packages into {prefix}", flush=True)


def main() -> None:
    payload, env, prefix = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    asyncio.run(install(payload, env, prefix))
    requirements = payload / "envs" / env / "pip.txt"
    if any(ln.strip() and not ln.startswith("#") for ln in requirements.read_text().splitlines()):
        subprocess.run(
            [str(prefix / "bin" / "python"), "-m", "pip", "install", "--no-index", "--no-deps",
             "--require-hashes", "--disable-pip-version-check", "--no-warn-script-location",
             "--find-links", str(payload / "wheels"), "-r", str(requirements)],
            check=True,
        )
        print(f"installed pip packages into {prefix}", flush=True)


if __name__ == "__main__":
    main()
