"""The process that parses large request bodies for the proxy, off its event loop's GIL.

`python -m ollama_metrics.ollama.parse_apart` reads requests on stdin and answers each on
stdout, one at a time: a request is the body's size (8 bytes, big-endian), `keep_messages`
(4 bytes), the route's stream default (1 byte) and the body; the answer is its size (8 bytes)
and the pickle of request.read_request_apart's fields (the messages a record keeps, their texts
whole; images as digests). It exits when stdin ends. Only the proxy that started it writes to
it, over a pipe.
"""

from __future__ import annotations

import pickle
import signal
import sys

from .request import read_request_apart

SIZE = 8  # bytes of a body's size, and of an answer's
KEEP = 4  # bytes of keep_messages
HEAD = SIZE + KEEP + 1  # a request's head: the body's size, keep_messages, the stream default


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the proxy ends it (a Ctrl-C reaches us both)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while len(head := stdin.read(HEAD)) == HEAD:
        size = int.from_bytes(head[:SIZE], "big")
        keep, stream = int.from_bytes(head[SIZE:SIZE + KEEP], "big"), bool(head[-1])
        body = stdin.read(size)
        if len(body) < size:
            return
        answer = pickle.dumps(read_request_apart(body, keep, stream), pickle.HIGHEST_PROTOCOL)
        del body
        stdout.write(len(answer).to_bytes(SIZE, "big") + answer)
        stdout.flush()


if __name__ == "__main__":
    main()
