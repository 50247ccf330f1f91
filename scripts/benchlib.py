"""What the benchmark scripts share: the machine line, the commit, and
writing a generated block between two markers of docs/BENCHMARKS.md."""

import datetime
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_MD = os.path.join(ROOT, "docs", "BENCHMARKS.md")


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def machine():
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // (1024 * 1024)
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    disk = sh(["df", "-h", "/var/tmp"]).splitlines()[-1].split()[0]
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, kernel {platform.release()}, /var/tmp on {disk}"


def provenance(command):
    """'Measured WHEN with `COMMAND` at commit `X` on MACHINE'."""
    commit = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).strip()
    # Only changes to what was measured count: the benchmarks themselves
    # rewrite docs/ (their raw rows, plots, BENCHMARKS.md) before this runs.
    dirty = sh(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs"],
        cwd=ROOT,
    ).strip()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Measured {when} with `{command.strip()}` at commit `{commit}`"
        + (" (with uncommitted changes)" if dirty else "")
        + f" on {machine()}."
    )


def write_block(begin, end, body, anchor):
    """Replaces the text between `begin` and `end` in BENCHMARKS.md with
    `body` (markers kept), or inserts the block after the line `anchor`."""
    with open(BENCH_MD) as f:
        text = f.read()
    block = begin + "\n" + body.rstrip() + "\n" + end
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    elif anchor in text:
        text = text.replace(anchor, anchor + "\n\n" + block + "\n", 1)
    else:
        sys.exit(f"docs/BENCHMARKS.md has neither the markers nor {anchor!r}")
    with open(BENCH_MD, "w") as f:
        f.write(text)
