"""HTTP endpoints on the worker's own web server."""

from __future__ import annotations

import faust

from streamapp.runtime import Runtime


def register_web(app: faust.App, runtime: Runtime) -> None:
    @app.page("/healthz")
    async def healthz(self: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return self.json({"status": "ok"})

    @app.page("/sink/")
    async def sink_view(self: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        s3 = runtime.s3.stats
        return self.json(
            {
                "partitions": runtime.sink.backlog(),
                "objects_written": s3.objects,
                "bytes_written": s3.bytes,
                "s3_retries": s3.retries,
                "s3_errors": s3.errors,
                "last_error": s3.last_error,
                "last_write_at": s3.last_write_at,
                "events_in": runtime.sink.events_in,
                "invalid": runtime.sink.invalid_out,
            }
        )
