#!/usr/bin/env python3
"""Open N keep-alive connections to a proxy, send one request on each, keep
them idle, and print the proxy's RSS before and after (the memory-per-idle-
connection measurement in BENCHMARKS.md).

usage: idle-conns.py HOST:PORT PROXY_PID [N=10000]
"""
import resource, socket, sys, time

host, port = sys.argv[1].rsplit(":", 1)
pid = int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))

def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])

before = rss_kb()
socks = []
req = b"GET /openstack HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
for i in range(n):
    # Distinct loopback sources so the per-namespace limit is what counts, not ports.
    s = socket.socket()
    s.bind((f"127.{1 + i // 60000}.{(i // 250) % 250}.{1 + i % 250}", 0))
    s.connect((host, int(port)))
    s.sendall(req)
    socks.append(s)
ok = 0
for s in socks:
    s.settimeout(10)
    data = s.recv(65536)
    if data.startswith(b"HTTP/1.1 200"):
        ok += 1
time.sleep(1.0)
after = rss_kb()
print(f"idle keep-alive connections: {n} (200 OK on {ok}); proxy RSS {before} kB -> {after} kB; "
      f"{(after - before) * 1024 / n:.0f} bytes per idle connection")
