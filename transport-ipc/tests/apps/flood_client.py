"""A same-user client that floods the pool's socket: it holds up to N connections open, opens a
new one for each the pool closes, and never says a word. Prints "flooding" once it has made N
connection attempts; runs until killed.

usage: python flood_client.py SOCKET_PATH N
"""

import os
import resource
import select
import socket
import sys

path, wanted = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard == resource.RLIM_INFINITY or hard > wanted + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted + 64, hard))

open_socks = {}  # fd -> socket
poller = select.poll()
attempts = 0
announced = False
while True:
    while len(open_socks) < wanted:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except (BlockingIOError, InterruptedError):
            pass  # the backlog is full: it completes, or the pool never takes it
        except OSError:
            sock.close()
            break
        open_socks[sock.fileno()] = sock
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        attempts += 1
    if not announced and attempts >= wanted:
        print("flooding", flush=True)
        announced = True
    for fd, _ in poller.poll(50):
        sock = open_socks.get(fd)
        if sock is None:
            continue
        try:
            if sock.recv(65536):
                continue  # the pool said something (a challenge): ignore it, stay silent
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            pass
        # Closed by the pool: open another one.
        del open_socks[fd]
        poller.unregister(fd)
        sock.close()
