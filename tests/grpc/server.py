"""A gRPC backend for tests/grpc.rs (Python grpcio, no generated code).

Serves the standard health service (grpc.health.v1.Health/Check) and a test service
`velocity.test.Echo` through generic handlers whose messages are raw bytes, so no protoc
step is needed: the health messages are one-field protobufs written by hand here.

Usage: server.py NAME [--cert CERT --key KEY]. Prints `port N` once listening (on
127.0.0.1, an ephemeral port), then reads commands on stdin, one a line:
`serving`, `not_serving` (what Check answers; `serving` at start), `quit`.

Echo methods (every answer carries the metadata `backend: NAME`):
- Unary: the request back.
- Stream (server streaming): the request is an ASCII count N; N answers `NAME i`.
- Bidi: each request back as it comes, until the client ends its side.
- Fail: aborts with INVALID_ARGUMENT and the message `bad request from NAME`.
"""

import sys
import threading
from concurrent import futures

import grpc

SERVING, NOT_SERVING = 1, 2
state = {"status": SERVING}


def ident(b):
    return b


def health_service(request):
    """HealthCheckRequest.service (field 1, length-delimited), "" when absent."""
    if len(request) >= 2 and request[0] == 0x0A and request[1] < 0x80:
        return request[2 : 2 + request[1]].decode()
    return ""


def check(request, context):
    if health_service(request) not in ("", "velocity.test.Echo"):
        context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
    return bytes([0x08, state["status"]])


def main():
    name = sys.argv[1]
    args = sys.argv[2:]
    meta = (("backend", name),)

    def unary(request, context):
        context.send_initial_metadata(meta)
        return request

    def stream(request, context):
        context.send_initial_metadata(meta)
        for i in range(int(request.decode() or "0")):
            yield f"{name} {i}".encode()

    def bidi(requests, context):
        context.send_initial_metadata(meta)
        for r in requests:
            yield r

    def fail(request, context):
        context.send_initial_metadata(meta)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request from {name}")

    handlers = [
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Check": grpc.unary_unary_rpc_method_handler(check, ident, ident)},
        ),
        grpc.method_handlers_generic_handler(
            "velocity.test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
                "Stream": grpc.unary_stream_rpc_method_handler(stream, ident, ident),
                "Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
                "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
            },
        ),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers(handlers)
    if "--cert" in args:
        cert = open(args[args.index("--cert") + 1], "rb").read()
        key = open(args[args.index("--key") + 1], "rb").read()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "serving":
            state["status"] = SERVING
        elif cmd == "not_serving":
            state["status"] = NOT_SERVING
        elif cmd == "quit":
            break
        print(f"ok {cmd}", flush=True)
    server.stop(0)


if __name__ == "__main__":
    threading.current_thread().name = "main"
    main()
