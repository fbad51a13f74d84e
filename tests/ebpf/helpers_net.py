"""Tiny TCP peers run inside the test namespaces (python -c scripts)."""

SERVER = r"""
import socket, sys, threading, struct
ports = [int(p) for p in sys.argv[1].split(",")]
mode = sys.argv[2] if len(sys.argv) > 2 else "sink"
def serve(port):
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port)); ls.listen(16)
    sys.stdout.write(f"listening {port}\n"); sys.stdout.flush()
    while True:
        c, _ = ls.accept()
        if mode == "rst":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.recv(10); c.close(); continue
        def sink(c=c):
            while c.recv(65536): pass
            c.close()
        threading.Thread(target=sink, daemon=True).start()
for p in ports[1:]:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
serve(ports[0])
"""

# argv: host, comma-separated ports, bytes per connection.
# Sends to every port at once, waits until the peer closed (all data and
# FIN acknowledged), prints "port localport" lines.
CLIENT = r"""
import socket, sys, threading
host, ports, n = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3])
out = {}
def run(port):
    s = socket.create_connection((host, port), timeout=60)
    out[port] = s.getsockname()[1]
    buf = b"x" * 65536
    left = n
    while left > 0:
        left -= s.send(buf[:min(left, len(buf))])
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536): pass
    s.close()
ts = [threading.Thread(target=run, args=(p,)) for p in ports]
[t.start() for t in ts]; [t.join() for t in ts]
for p in ports: print(p, out[p], flush=True)
"""
