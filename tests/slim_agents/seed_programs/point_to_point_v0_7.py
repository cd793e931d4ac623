"""The sessions document's point-to-point snippets (v0.7 dialect).

With --remote, create a point-to-point session with that service, send
"hello", print the reply (as the document's first snippets); without, wait
for a session and echo every message back (the document's "send a correlated
response back"). Only the import of slim_bindings is changed.

    python point_to_point_v0_7.py --local agntcy/ns/bob --slim '{"endpoint": ...}'
    python point_to_point_v0_7.py --local agntcy/ns/alice --remote agntcy/ns/bob \
        --slim '{"endpoint": ...}' --enable-mls
"""

from __future__ import annotations

import asyncio
import datetime

from cli import parse_args
from common_v0_7 import create_local_app, split_id

import slim_agents.compat.v0_7 as slim_bindings


async def run_client(local: str, slim: dict, remote: str | None, enable_mls: bool,
                     shared_secret: str) -> None:
    local_app = await create_local_app(local, slim, shared_secret=shared_secret)

    if remote:
        remote_name = split_id(remote)
        await local_app.set_route(remote_name)

        config = slim_bindings.SessionConfiguration.PointToPoint(
            max_retries=5,
            timeout=datetime.timedelta(seconds=5),
            mls_enabled=enable_mls,
        )

        session, handle = await local_app.create_session(remote_name, config)
        await handle
        print(f"session {session.id} established with {session.dst}", flush=True)

        # Send a message using publish; it will reach the endpoint
        # specified at session creation
        await session.publish(b"hello")

        # Await reply from remote (pattern depends on your control loop)
        msg_ctx, payload = await session.get_message()
        print(payload.decode(), flush=True)
        print(f"reply from {msg_ctx.source_name} (identity {msg_ctx.identity})", flush=True)

        handle = await local_app.delete_session(session)
        await handle
    else:
        print("Waiting for session...", flush=True)
        session = await local_app.listen_for_session()
        print(f"session {session.id} from {session.dst}", flush=True)
        while True:
            try:
                msg_ctx, payload = await session.get_message()
            except Exception as e:
                print(f"session ended: {e}", flush=True)
                break
            print(f"received: {payload.decode()}", flush=True)

            # Send a correlated response back (echo style)
            # The message will be sent according to the info in the session
            await session.publish(payload)


def main(argv: list[str] | None = None) -> None:
    args = parse_args("SLIM point-to-point example (v0.7 dialect)", argv)
    asyncio.run(run_client(args["local"], args["slim"], args["remote"], args["enable_mls"],
                           args["shared_secret"]))


if __name__ == "__main__":
    main()
