"""What the benchmarks ran on: CPU, cores, kernel, tool versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass
class Machine:
    cpu: str
    cores: int
    kernel: str
    hypervisor: str
    tools: dict[str, str]
    date: str


def _first_line(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return "not installed"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpuinfo(key: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _hypervisor() -> str:
    flags = _cpuinfo("flags").split()
    if "hypervisor" not in flags:
        return "no (bare metal)"
    vendor = "unknown hypervisor"
    out = subprocess.run(["lscpu"], capture_output=True, text=True) if shutil.which("lscpu") \
        else None
    if out is not None:
        m = re.search(r"^Hypervisor vendor:\s*(.+)$", out.stdout, re.M)
        if m:
            vendor = m.group(1).strip()
    return f"yes: a {vendor} guest (timings include its noise; QEMU -icount counts do not)"


def describe() -> Machine:
    import lief  # noqa: PLC0415 - only for its version

    tools = {
        "gcc": _first_line(["gcc", "--version"]),
        "binutils": _first_line(["ld", "--version"]),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "valgrind": _first_line(["valgrind", "--version"]),
        "python": platform.python_version(),
        "lief": lief.__version__,
    }
    return Machine(
        cpu=_cpuinfo("model name"),
        cores=os.cpu_count() or 1,
        kernel=f"{platform.system()} {platform.release()}",
        hypervisor=_hypervisor(),
        tools=tools,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
