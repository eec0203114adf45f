"""The naive reference for ``bench_pipeline.py``: a textbook faust app.

One agent, one event at a time: decode the Avro record, then update two faust Tables
(events and tokens per tenant) once per event, i.e. one changelog message per update.
This is the shape of the faust apps people report at a few hundred to a few thousand
events/s. Run by the bench as a subprocess, configured by environment variables:

    NAIVE_BOOTSTRAP  host:port         NAIVE_TOPIC     source topic (4 partitions)
    NAIVE_APP_ID     app id = group    NAIVE_DATA_DIR  faust's data directory

Not collected by pytest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def build_app() -> Any:
    import faust

    from pipeline.serde import AvroCodec, DecodeError

    app = faust.App(
        os.environ["NAIVE_APP_ID"],
        broker=f"kafka://{os.environ['NAIVE_BOOTSTRAP']}",
        store="memory://",
        datadir=os.environ["NAIVE_DATA_DIR"],
        topic_partitions=4,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
    )
    source = app.topic(
        os.environ["NAIVE_TOPIC"],
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    events = app.Table("events", default=int, partitions=4, key_type=str, value_type=int)
    tokens = app.Table("tokens", default=int, partitions=4, key_type=str, value_type=int)
    codec = AvroCodec()

    @app.agent(source)
    async def count(stream):  # type: ignore[no-untyped-def]
        async for value in stream:
            try:
                rec = codec.decode(value)
            except DecodeError:
                continue
            tenant = rec["tenant_id"]
            events[tenant] += 1
            tokens[tenant] += rec["input_tokens"] + rec["output_tokens"]

    return app


def main() -> None:
    from faust.worker import Worker

    app = build_app()
    Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
