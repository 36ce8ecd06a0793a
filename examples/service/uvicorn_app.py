"""The baseline for the example service: the same two routes, over the same handler functions
(imported from handlers.py), as a Python service served by uvicorn.

    uvicorn uvicorn_app:app --app-dir examples/service --workers 2 \\
        --loop uvloop --http httptools --no-access-log

    GET  /noop                                   -> {"result":null}
    POST /score  {"features": [0.5, 1.5, ...]}   -> {"score":123.4}

It is a raw ASGI callable, not a Starlette or FastAPI app: no routing table, middleware, request
objects or response classes, just the protocol uvicorn speaks. That is the fastest honest form
of a Python HTTP service (anything built on a framework runs this plus the framework), so it is
the strongest baseline for the Rust service to be measured against. The handlers run the way a
Python service runs a sub-millisecond CPU-bound function: called directly in the async route,
on the event loop, with no thread pool hop. It validates the body as the Rust service does
(a body that is not JSON: 400; JSON without a list of numbers under "features": 422) and
answers with the same bytes (compact JSON).
"""

import json

from handlers import noop, score

_JSON_HEADERS = [(b"content-type", b"application/json")]
_dumps = json.JSONEncoder(separators=(",", ":")).encode


async def app(scope, receive, send):
    kind = scope["type"]
    if kind == "http":
        path, method = scope["path"], scope["method"]
        if path == "/noop":
            if method != "GET":
                return await _respond(send, 405, b"")
            return await _respond(send, 200, _dumps({"result": noop()}).encode())
        if path == "/score":
            if method != "POST":
                return await _respond(send, 405, b"")
            body = await _read_body(receive)
            try:
                request = json.loads(body)
            except ValueError:
                return await _respond(send, 400, b"the body is not JSON")
            features = request.get("features") if isinstance(request, dict) else None
            if not isinstance(features, list) or not all(
                    type(f) in (int, float) for f in features):
                return await _respond(send, 422, b"features: expected a list of numbers")
            return await _respond(send, 200, _dumps(score(features)).encode())
        return await _respond(send, 404, b"")
    if kind == "lifespan":  # nothing to set up; say so, so uvicorn does not warn
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def _respond(send, status, body):
    headers = _JSON_HEADERS if status == 200 else [(b"content-type", b"text/plain")]
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": headers + [(b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
