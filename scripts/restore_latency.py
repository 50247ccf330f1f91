#!/usr/bin/env python3
"""Time from `snapvm run --restore DIR --kv-listen ADDR` start to the first
served KV query (see docs/journal/2026-11-25-restore.md).

usage: restore_latency.py SNAPVM DIR [PORT] [RUNS] [KEY]

Each run spawns the restore, connects as soon as the port accepts (1 ms
retries), sends `GET KEY` and stops the clock at the first reply byte.
Prints one JSON object per run, then kills the VM.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time


def once(snapvm, snap_dir, port, key):
    cmd = [snapvm, "run", "--restore", snap_dir, "--kv-listen",
           f"127.0.0.1:{port}", "--serial", "/dev/null", "--log-level", "info"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sock = None
    while sock is None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"snapvm exited: {proc.stderr.read().decode()}")
            time.sleep(0.001)
    t_conn = time.monotonic()
    k = key.encode()
    sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k))
    first = sock.recv(1)
    t_reply = time.monotonic()
    rest = sock.recv(4096)
    sock.close()
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    line = next((l for l in err.decode().splitlines() if "resumed the guest in" in l), "")
    return {
        "connect_ms": round((t_conn - t0) * 1e3, 2),
        "first_reply_ms": round((t_reply - t0) * 1e3, 2),
        "reply": (first + rest)[:40].decode(errors="replace"),
        "vmm_log": line.strip(),
    }


def main():
    snapvm, snap_dir = sys.argv[1], sys.argv[2]
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 16701
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    key = sys.argv[5] if len(sys.argv) > 5 else "key:0"
    for _ in range(runs):
        print(json.dumps(once(snapvm, snap_dir, port, key)), flush=True)
        time.sleep(0.2)


if __name__ == "__main__":
    main()
