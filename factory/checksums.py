"""SHA256SUMS files, verifiable with `sha256sum -c` from the folder they sit in."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from factory.cache import sha256_file
from factory.errors import FactoryError
from factory.files import write_text_atomically


def relative_name(out_dir: Path, artifact: Path) -> str:
    """The artifact's path relative to out_dir; artifacts must live inside it."""
    try:
        relative = Path(artifact).resolve().relative_to(Path(out_dir).resolve())
    except ValueError:
        raise FactoryError(
            f"artifact {artifact} is not inside the output directory {out_dir}"
        ) from None
    if not Path(artifact).is_file():
        raise FactoryError(f"artifact {artifact} does not exist")
    name = relative.as_posix()
    if "\n" in name or "\\" in name:
        raise FactoryError(
            f"artifact name {name!r} cannot be written to a checksum file; rename it"
        )
    return name


def digests_of(artifacts: list[Path]) -> dict[Path, str]:
    """The sha256 of each file, streamed (disk images do not fit in memory)."""
    return {Path(path): sha256_file(path) for path in artifacts}


def write_checksums(
    out_dir: Path, artifacts: list[Path], digests: Mapping[Path, str] | None = None
) -> Path:
    """Write out_dir/SHA256SUMS; `digests` (from digests_of) spares hashing the files again."""
    out_dir = Path(out_dir)
    digests = digests or digests_of(artifacts)
    lines = [f"{digests[Path(path)]}  {relative_name(out_dir, path)}\n" for path in artifacts]
    return write_text_atomically(out_dir / "SHA256SUMS", "".join(lines))
