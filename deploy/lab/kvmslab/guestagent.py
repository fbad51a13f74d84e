"""The kernel-initiator guest's command agent and its client (stdlib only).

Inside the guest (kernelhost.py boots it), `python3 guestagent.py serve ADDR
PORT` listens on the guest's end of the host-only management link
(198.18.10.2, never a storage link) and runs one command per connection:

    request  (one JSON line): {"argv": [...]} or {"sh": "shell text"},
                              optional "timeout" (s, default 60), "input" (str)
    response (one JSON line): {"rc": int, "stdout": str, "stderr": str,
                               "seconds": float}   (rc 124 on timeout)

The link is a tap whose host end only root can use; nothing else reaches it.
`guest_run()` is the client: `lab kernel-host exec` and the lab tests
(tests/lab/kernelhost.py) use it.

`python3 guestagent.py load DEV LOG` is the guest's workload: O_DIRECT 4 KiB
random reads and writes on DEV (the multipath map), like the lab VMs' dd
loops, one request at a time. Every second it rewrites LOG with
`<epoch> <completed requests> <errors>`, and appends to LOG.stalls a line
`<start epoch> <end epoch> <seconds>` for every request that took 1 s or more
(the stall a path failure causes, measured by the workload itself).
"""

import json
import mmap
import os
import random
import socket
import socketserver
import subprocess
import sys
import time

AGENT_PORT = 7001
BLOCK = 4096
STALL_S = 1.0


def guest_run(addr, argv=None, sh=None, timeout=60.0, input=None, port=AGENT_PORT):
    """Run a command in the guest; returns {rc, stdout, stderr, seconds}.
    Raises OSError when the agent does not answer."""
    req = {"timeout": timeout}
    if sh is not None:
        req["sh"] = sh
    else:
        req["argv"] = list(argv)
    if input is not None:
        req["input"] = input
    with socket.create_connection((addr, port), timeout=timeout + 10) as s:
        s.sendall(json.dumps(req).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise OSError(f"the guest agent on {addr}:{port} closed without answering")
    return json.loads(buf.decode())


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        t0 = time.monotonic()
        try:
            req = json.loads(self.rfile.readline().decode())
            timeout = float(req.get("timeout", 60))
            cmd = ["/bin/bash", "-c", req["sh"]] if "sh" in req else req["argv"]
            try:
                p = subprocess.run(cmd, input=req.get("input"), text=True, timeout=timeout,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   errors="replace")
                res = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
            except subprocess.TimeoutExpired as e:
                res = {"rc": 124, "stdout": _text(e.stdout),
                       "stderr": _text(e.stderr) + f"\ntimed out after {timeout}s"}
            except OSError as e:
                res = {"rc": 127, "stdout": "", "stderr": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            res = {"rc": 2, "stdout": "", "stderr": f"bad request: {e}"}
        res["seconds"] = round(time.monotonic() - t0, 3)
        self.wfile.write(json.dumps(res).encode() + b"\n")


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(addr, port):
    with _Server((addr, int(port)), _Handler) as srv:
        print(f"kvmslab-kh: agent listening on {addr}:{port}", flush=True)
        srv.serve_forever()


def load(dev, logpath):
    """O_DIRECT random 4 KiB reads and writes on dev, forever."""
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    size = os.lseek(fd, 0, os.SEEK_END)
    blocks = max(1, size // BLOCK - 1)
    buf = mmap.mmap(-1, BLOCK)            # page-aligned, as O_DIRECT needs
    buf.write(b"\x5a" * BLOCK)
    done = errors = 0
    last_write = 0.0
    stalls = open(logpath + ".stalls", "a", buffering=1)
    print(f"kvmslab-kh: load started on {dev}", flush=True)
    write = False
    while True:
        off = random.randrange(blocks) * BLOCK
        t0 = time.time()
        try:
            if write:
                os.pwritev(fd, [buf], off)
            else:
                os.preadv(fd, [buf], off)
            done += 1
        except OSError as e:
            errors += 1
            print(f"kvmslab-kh: load I/O error on {dev}: {e}", flush=True)
            time.sleep(0.5)
        t1 = time.time()
        if t1 - t0 >= STALL_S:
            stalls.write(f"{t0:.3f} {t1:.3f} {t1 - t0:.3f}\n")
        write = not write
        if t1 - last_write >= 1.0:
            tmp = logpath + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{t1:.3f} {done} {errors}\n")
            os.replace(tmp, logpath)
            last_write = t1


def main(argv):
    if len(argv) == 3 and argv[0] == "serve":
        serve(argv[1], argv[2])
    elif len(argv) == 3 and argv[0] == "load":
        load(argv[1], argv[2])
    else:
        print("usage: guestagent.py serve ADDR PORT | load DEV LOG", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
