"""A gRPC client for tests/grpc.rs (Python grpcio, no generated code): calls the test
service of tests/grpc/server.py through TARGET (Velocity, h2c by prior knowledge) over one
channel, which is one HTTP/2 connection, and prints what it got as one JSON line.

Usage: client.py TARGET CASE
- unary: {"reply", "backend"}
- stream: {"replies"} for a server-streaming call of 3 answers
- bidi: {"replies"}: 5 messages, each sent only once the answer to the one before came back
  (so it passes only when both directions stream at once)
- fail: {"code", "details"} of a call the server fails
- many: {"backends": {NAME: count}} of 60 concurrent unary calls
"""

import json
import queue
import sys
from concurrent import futures

import grpc


def ident(b):
    return b


def backend_of(call):
    return dict(call.initial_metadata()).get("backend")


def main():
    target, case = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
    grpc.channel_ready_future(channel).result(timeout=10)
    unary = channel.unary_unary("/velocity.test.Echo/Unary", ident, ident)
    out = {}
    if case == "unary":
        reply, call = unary.with_call(b"hello", timeout=10)
        out = {"reply": reply.decode(), "backend": backend_of(call)}
    elif case == "stream":
        call = channel.unary_stream("/velocity.test.Echo/Stream", ident, ident)(b"3", timeout=10)
        out = {"replies": [r.decode() for r in call]}
    elif case == "bidi":
        outbox = queue.Queue()

        def requests():
            while True:
                m = outbox.get()
                if m is None:
                    return
                yield m

        call = channel.stream_stream("/velocity.test.Echo/Bidi", ident, ident)(requests(), timeout=10)
        replies = []
        for i in range(5):
            outbox.put(f"ping {i}".encode())
            replies.append(next(call).decode())
        outbox.put(None)
        replies.extend(r.decode() for r in call)
        out = {"replies": replies}
    elif case == "fail":
        try:
            channel.unary_unary("/velocity.test.Echo/Fail", ident, ident)(b"x", timeout=10)
            out = {"code": "OK"}
        except grpc.RpcError as e:
            out = {"code": e.code().name, "details": e.details()}
    elif case == "many":
        def one(i):
            reply, call = unary.with_call(f"call {i}".encode(), timeout=10)
            assert reply == f"call {i}".encode(), reply
            return backend_of(call)

        with futures.ThreadPoolExecutor(max_workers=60) as pool:
            names = list(pool.map(one, range(60)))
        counts = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        out = {"backends": counts}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
