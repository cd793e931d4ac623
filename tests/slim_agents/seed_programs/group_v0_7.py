"""The sessions document's group snippets (v0.7 dialect).

With --remote and --invites, create a group session on that channel, invite
the participants (awaiting each invite's handle), broadcast "hello", print one
message per participant, remove --remove if given, and close the session.
Without, wait for a session and answer the moderator's "hello". Only the
import of slim_bindings is changed.

    python group_v0_7.py --local agntcy/ns/client-1 --slim '{"endpoint": ...}'
    python group_v0_7.py --local agntcy/ns/moderator --remote agntcy/ns/chat \
        --invites agntcy/ns/client-1 --invites agntcy/ns/client-2 \
        --remove agntcy/ns/client-2 --enable-mls --slim '{"endpoint": ...}'
"""

from __future__ import annotations

import asyncio
import datetime

from cli import parse_args
from common_v0_7 import create_local_app, split_id

import slim_agents.compat.v0_7 as slim_bindings


async def run_moderator(local_app, local: str, chat_channel, invites: list[str],
                        remove: str | None, enable_mls: bool) -> None:
    config = slim_bindings.SessionConfiguration.Group(
        max_retries=5,  # Max per-message resend attempts upon missing ack before reporting a delivery failure.
        timeout=datetime.timedelta(
            seconds=5
        ),  # Ack / delivery wait window; after this duration a retry is triggered (until max_retries).
        mls_enabled=enable_mls,  # Enable Messaging Layer Security for end-to-end encrypted & authenticated group communication.
    )
    created_session, handle = await local_app.create_session(
        chat_channel,  # Logical group channel (Name) all participants join; acts as group/topic identifier.
        config,  # session configuration
    )
    await handle

    # After creating the session:
    for invite in invites:
        invite_name = split_id(invite)
        await local_app.set_route(invite_name)
        handle = await created_session.invite(invite_name)
        await handle
        print(f"{local} -> add {invite_name} to the group", flush=True)

    session = created_session
    # Broadcast to the channel
    await session.publish(b"hello")

    # Handle inbound messages
    for _ in invites:
        msg_ctx, data = await session.get_message()  # noqa: RUF059 (as the document)
        print("channel received:", data.decode(), flush=True)

    if remove:
        remove_name = split_id(remove)
        # To remove a participant from the session:
        handle = await session.remove(remove_name)
        await handle
        print(f"{local} -> removed {remove_name} from the group", flush=True)

    handle = await local_app.delete_session(session)
    await handle
    print("group closed", flush=True)


async def run_participant(local_app, local: str) -> None:
    print("Waiting for session...", flush=True)
    session = await local_app.listen_for_session()
    print(f"joined {session.dst} ({session.session_type.name})", flush=True)
    while True:
        try:
            msg_ctx, data = await session.get_message()  # noqa: RUF059 (as the document)
        except Exception as e:
            print(f"session ended: {e}", flush=True)
            break
        print("channel received:", data.decode(), flush=True)
        if data == b"hello":
            await session.publish(f"hello from {local}".encode())


async def run_client(local: str, slim: dict, remote: str | None, invites: list[str] | None,
                     remove: str | None, enable_mls: bool, shared_secret: str) -> None:
    local_app = await create_local_app(local, slim, shared_secret=shared_secret)
    if remote and invites:
        await run_moderator(local_app, local, split_id(remote), invites, remove, enable_mls)
    else:
        await run_participant(local_app, local)


def main(argv: list[str] | None = None) -> None:
    args = parse_args("SLIM group example (v0.7 dialect)", argv)
    asyncio.run(run_client(args["local"], args["slim"], args["remote"], args["invites"],
                           args["remove"], args["enable_mls"], args["shared_secret"]))


if __name__ == "__main__":
    main()
