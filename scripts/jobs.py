"""The `prompt-jax` commands the reproduction scripts run: a Job (command, gin files,
bindings), its key (a hash of everything the run depends on), running it as a subprocess
with its log beside its outputs, and how the logs and tables name paths and arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

# TensorFlow (read by seqio in this process and in the jobs) without its start-up chatter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
GIN_DIR = REPO / "gin_configs"
DEMO_DATA = REPO / "prompt_jax" / "demo_data"
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class Job:
    """One `prompt-jax` command. `bindings` are `--gin.NAME=VALUE` strings; `inputs` the
    local checkpoints/prompt files it reads (their contents are part of the key)."""

    command: str
    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    positional: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (self.command, *self.gin_files, *self.bindings, *self.positional):
            h.update(part.encode() + b"\0")
        for path in self.inputs:
            h.update(fingerprint(path).encode() + b"\0")
        return h.hexdigest()[:10]

    def argv(self, directory_binding: str | None) -> list[str]:
        extra = [directory_binding] if directory_binding else []
        return [self.command, *(f"--gin_file={f}" for f in self.gin_files), *self.bindings,
                *extra, *self.positional]


def run(job: Job, directory_binding: str, log_dir: Path, dry_run: bool) -> None:
    """Print the command as a user would type it and (unless `dry_run`) run it, appending
    its output to `log_dir/<command>.log`; a failure exits with the log's tail."""
    argv = job.argv(directory_binding)
    print("$ prompt-jax " + " ".join(shell_arg(short_path(a)) for a in argv), flush=True)
    if dry_run:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{job.command}.log"
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", *argv], cwd=REPO,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().replace("\r", "\n").strip().splitlines()[-15:]
        raise SystemExit(f"prompt-jax {job.command} failed (exit {proc.returncode}); "
                         f"log: {log}\n" + "\n".join(tail))
    print(f"  done -> {short_path(log_dir)}", flush=True)


def fingerprint(path: str) -> str:
    """Content hash of a local file or directory (size and mtime for files over 64 MiB);
    the path itself for anything not local (hub ids, gs://)."""
    p = Path(path)
    if not p.exists():
        return path
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        st = f.stat()
        if st.st_size > 64 << 20:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()


def gin_str(value: Any) -> str:
    """A Python value as gin syntax (strings quoted)."""
    return repr(value)


def size_gin(size: str) -> str:
    """models/sizes/<size>.gin, checked to exist and to name a size in SIZES."""
    config_name(size)
    return f"models/sizes/{size}.gin"


def config_name(size: str) -> str:
    """The `ModelSpec.size` (a key of prompt_jax.t5.config.SIZES) of models/sizes/<size>.gin."""
    from prompt_jax.t5.config import SIZES

    path = GIN_DIR / "models" / "sizes" / f"{size}.gin"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.gin"))
        raise SystemExit(f"{path}: no such size file (known sizes: {', '.join(known)})")
    found = re.search(r"ModelSpec\.size\s*=\s*'([^']+)'", path.read_text())
    if not found or found.group(1) not in SIZES:
        raise SystemExit(f"{path}: names size {found and found.group(1)!r}, which "
                         "prompt_jax/t5/config.py SIZES does not have")
    return found.group(1)


def shell_arg(arg: str) -> str:
    """An argument as a user would type it: gin strings as --gin.NAME="'value'"."""
    if shlex.quote(arg) == arg:
        return arg
    name, eq, value = arg.partition("=")
    if eq and shlex.quote(name) == name and not any(c in value for c in '"$`\\!'):
        return f'{name}="{value}"'
    return shlex.quote(arg)


def short_path(text: Any) -> str:
    """Paths inside the repository or beside it (../shared/data), relative to it (for logs
    and tables); only where a path starts, not inside one (/tmp/x/work/...)."""
    text = str(text)
    for prefix, short in ((REPO, ""), (REPO.parent, ".." + os.sep)):
        text = re.sub(r"(?<![\w.~/-])" + re.escape(str(prefix) + os.sep), short, text)
    return text
