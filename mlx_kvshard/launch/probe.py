"""What the doctor learns about one host. This file is sent as source to the host's
Python over ssh (`python -`), so it uses the standard library only and never fails:
each finding is a value or an error string, printed as one JSON line after MARKER.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys

MARKER = "MLX-KVSHARD-PROBE "
DISTRIBUTIONS = ("mlx", "mlx-lm", "mlx-kvshard")


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if out["mlx-kvshard"] is None:  # a source checkout run from its directory
        try:
            import mlx_kvshard

            out["mlx-kvshard"] = mlx_kvshard.__version__
        except Exception:
            pass
    return out


def memory_bytes() -> int | None:
    if sys.platform == "darwin":
        text = _run(["sysctl", "-n", "hw.memsize"])
        return int(text) if text and text.strip().isdigit() else None
    return meminfo("MemTotal")


def meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes (Linux), e.g. MemTotal, MemAvailable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_manifest(name: str) -> dict:
    """Config and file names + sizes of the model as this host resolves it (no download)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from mlx_kvshard.models.resolve import resolve_model_dir  # absolute: this file runs as a script

        path = os.path.abspath(resolve_model_dir(name))  # absolute: the fix names it to another host
    except Exception as e:  # not installed, not found: the doctor reports it
        return {"error": f"{type(e).__name__}: {e}"}
    files = []
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if n.startswith("."):
                continue
            full = os.path.join(root, n)
            files.append([os.path.relpath(full, path), os.path.getsize(full)])
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            config = f.read()
    except OSError as e:
        return {"path": str(path), "error": f"cannot read config.json: {e}"}
    digest = hashlib.sha256(config + json.dumps(files).encode()).hexdigest()[:16]
    return {"path": str(path), "files": files, "config": config.decode(errors="replace"), "digest": digest}


def can_bind(ip: str, port: int) -> str | None:
    """None when this host owns `ip` and `port` is free there, else why not."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as MLX's ring does
        s.bind((ip, port))
        return None
    except OSError as e:
        return e.strerror or str(e)
    finally:
        s.close()


def can_reach(ip: str, port: int, timeout: float) -> str | None:
    """None when `ip` answers (a refused connection is an answer: nothing listens yet)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return None
    except ConnectionRefusedError:
        return None
    except socket.timeout:
        return f"no answer within {timeout:g}s"
    except OSError as e:
        return e.strerror or str(e)
    finally:
        s.close()


def bridge0() -> dict | None:
    """macOS: is bridge0 up, and which Thunderbolt interfaces does it hold?"""
    if sys.platform != "darwin":
        return None
    return {"ifconfig": _run(["ifconfig", "bridge0"]) or "",
            "ports": _run(["networksetup", "-listallhardwareports"]) or ""}


def parse_bridge0(ifconfig: str, hardware_ports: str) -> tuple[bool, list[str]]:
    """(bridge0 is up, Thunderbolt interfaces among its members)."""
    first = ifconfig.splitlines()[0] if ifconfig else ""
    up = bool(re.search(r"<[^>]*\bUP\b", first))
    members = re.findall(r"^\s*member:\s*(\S+)", ifconfig, re.M)
    thunderbolt, port = set(), None
    for line in hardware_ports.splitlines():
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:") and port and "Thunderbolt" in port:
            thunderbolt.add(line.split(":", 1)[1].strip())
    return up, [m for m in members if m in thunderbolt]


def interfaces() -> dict | None:
    """{"addresses": {ip: interface}, "default": [interfaces carrying a default route]}, or
    None where this host's tools do not tell. MLX's ring ports take no password: an address
    on a default-route interface is one the internet (or the office LAN) may reach."""
    if sys.platform == "darwin":
        return parse_interfaces_macos(_run(["ifconfig"]) or "", _run(["route", "-n", "get", "default"]) or "")
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/net/route") as f:
                routes = f.read()
        except OSError:
            routes = ""
        return parse_interfaces_linux(_run(["ip", "-o", "addr", "show"]) or "", routes)
    return None


def parse_interfaces_macos(ifconfig: str, route_default: str) -> dict:
    addresses, iface = {}, None
    for line in ifconfig.splitlines():
        if line and not line[0].isspace():
            iface = line.split(":", 1)[0]
        elif iface and (m := re.match(r"\s+inet6?\s+([0-9A-Fa-f.:]+)", line)):
            addresses[m.group(1)] = iface
    m = re.search(r"^\s*interface:\s*(\S+)", route_default, re.M)
    return {"addresses": addresses, "default": [m.group(1)] if m else []}


def parse_interfaces_linux(ip_addr: str, proc_net_route: str) -> dict:
    addresses = {}
    for line in ip_addr.splitlines():  # "2: eth0    inet 192.0.2.2/24 brd ..."
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("inet", "inet6"):
            addresses[parts[3].split("/")[0]] = parts[1].rstrip(":").split("@")[0]
    default = []
    for line in proc_net_route.splitlines()[1:]:  # Iface Destination Gateway Flags ... Mask
        parts = line.split()
        if len(parts) >= 8 and parts[1] == "00000000" and parts[7] == "00000000" and parts[0] not in default:
            default.append(parts[0])
    return {"addresses": addresses, "default": default}


def mac_settings() -> dict | None:
    """macOS: what launch/setup-mac.sh sets: the GPU wired-memory limit (MB, 0 = macOS's
    default) and system sleep (minutes idle, 0 = never)."""
    if sys.platform != "darwin":
        return None
    wired = (_run(["sysctl", "-n", "iogpu.wired_limit_mb"]) or "").strip()
    return {"wired_limit_mb": int(wired) if wired.isdigit() else None,
            "sleep": parse_pmset_sleep(_run(["pmset", "-g"]) or "")}


def parse_pmset_sleep(pmset_g: str) -> int | None:
    """Minutes of idle before system sleep from `pmset -g` (" sleep  10 (sleep prevented by ...)")."""
    m = re.search(r"^\s*sleep\s+(\d+)", pmset_g, re.M)
    return int(m.group(1)) if m else None


def rdma_devices() -> list[str] | None:
    text = _run(["ibv_devices"])
    return None if text is None else [w for w in text.split() if w.startswith("rdma_")]


def _run(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def main(job: dict) -> int:
    result = {"system": platform.system(), "machine": platform.machine(), "executable": sys.executable,
              "cwd": os.getcwd(), "versions": versions(), "memory_bytes": memory_bytes()}
    if job.get("model"):
        result["model"] = model_manifest(job["model"])
    result["bind"] = {f"{ip}:{port}": can_bind(ip, port) for ip, port in job.get("bind", [])}
    result["reach"] = {f"{ip}:{port}": can_reach(ip, port, job.get("timeout", 2.0)) for ip, port in job.get("reach", [])}
    result["bridge0"] = bridge0()
    result["interfaces"] = interfaces()
    result["mac"] = mac_settings()
    if job.get("rdma"):
        result["rdma"] = rdma_devices()
    print(MARKER + json.dumps(result), flush=True)
    return 0
