"""The group communication tutorial's group example (v0.6 dialect).

receive_loop, keyboard_loop and the moderator's session creation and invites
are written as the tutorial shows them; only the import of slim_bindings is
changed, and print_formatted_text / PromptSession come from cli.py (plain
print and a scripted prompt, as tests have no terminal).

    python group_v0_6.py --local agntcy/ns/client-1 --slim '{"endpoint": ...}'
    python group_v0_6.py --local agntcy/ns/moderator --remote agntcy/ns/chat \
        --invites agntcy/ns/client-1 --invites agntcy/ns/client-2 --enable-mls \
        --input hello --input exit
"""

from __future__ import annotations

import asyncio
import datetime

from cli import PromptSession, custom_style, parse_args, print_formatted_text
from common_v0_6 import create_local_app, format_message_print, split_id

import slim_agents.compat.v0_6 as slim_bindings


async def receive_loop(
    local_app, created_session, session_ready, shared_session_container
):
    """
    Receive messages for the bound session.

    Behavior:
    * If not moderator: wait for a new group session (listen_for_session()).
    * If moderator: reuse the created_session reference.
    * Loop forever until cancellation or an error occurs.
    """
    if created_session is None:
        print_formatted_text("Waiting for session...", style=custom_style)
        session = await local_app.listen_for_session()
    else:
        session = created_session

    # Make session available to other tasks
    shared_session_container[0] = session
    session_ready.set()

    while True:
        try:
            # Await next inbound message from the group session.
            # The returned parameters are a message context and the raw payload bytes.
            # Check session.py for details on PyMessageContext contents.
            ctx, payload = await session.get_message()
            print_formatted_text(
                f"{ctx.source_name} > {payload.decode()}",
                style=custom_style,
            )
        except asyncio.CancelledError:
            # Graceful shutdown path (ctrl-c or program exit).
            break
        except Exception as e:
            # Non-cancellation error; surface and exit the loop.
            print_formatted_text(f"-> Error receiving message: {e}")
            break


async def keyboard_loop(session_ready, shared_session_container, local_app):
    """
    Interactive loop allowing participants to publish messages.

    Typing 'exit' or 'quit' (case-insensitive) terminates the loop.
    Each line is published to the group topic as UTF-8 bytes.
    """
    try:
        # 1. Initialize an async session
        prompt_session = PromptSession(style=custom_style)

        # Wait for the session to be established
        await session_ready.wait()

        print_formatted_text(
            f"Welcome to the group {shared_session_container[0].dst}!\nSend a message to the group, or type 'exit' or 'quit' to quit.",
            style=custom_style,
        )

        while True:
            # Run blocking input() in a worker thread so we do not block the event loop.
            user_input = await prompt_session.prompt_async(
                f"{shared_session_container[0].src} > "
            )

            if user_input.lower() in ("exit", "quit"):
                # Also terminate the receive loop.
                await local_app.delete_session(shared_session_container[0])
                break

            try:
                # Send message to the channel_name specified when creating the session.
                # As the session is group, all participants will receive it.
                # calling publish_with_destination on a group session will raise an error.
                await shared_session_container[0].publish(user_input.encode())
            except KeyboardInterrupt:
                # Handle Ctrl+C gracefully
                break
            except Exception as e:
                print_formatted_text(f"-> Error sending message: {e}")
    except asyncio.CancelledError:
        # Handle task cancellation gracefully
        pass


async def run_client(
    local: str,
    slim: dict,
    remote: str | None,
    enable_opentelemetry: bool = False,
    enable_mls: bool = False,
    shared_secret: str = "secret",
    jwt: str | None = None,
    spire_trust_bundle: str | None = None,
    audience: list[str] | None = None,
    invites: list[str] | None = None,
):
    # Create & connect the local Slim instance (auth derived from args).
    local_app = await create_local_app(
        local,
        slim,
        enable_opentelemetry=enable_opentelemetry,
        shared_secret=shared_secret,
        jwt=jwt,
        spire_trust_bundle=spire_trust_bundle,
        audience=audience,
    )

    # Parse the remote channel/topic if provided; else None triggers passive mode.
    chat_channel = split_id(remote) if remote else None

    # Track background tasks (receiver loop + optional keyboard loop).
    tasks: list[asyncio.Task] = []

    # Session sharing between tasks
    session_ready = asyncio.Event()
    shared_session_container = [None]  # Use list to make it mutable across functions

    # Session object only exists immediately if we are moderator.
    created_session = None
    if chat_channel and invites:
        # We are the moderator; create the group session now.
        format_message_print(
            f"Creating new group session (moderator)... {split_id(local)}"
        )
        created_session = await local_app.create_session(
            slim_bindings.PySessionConfiguration.Group(  # type: ignore # Build group session configuration
                channel_name=chat_channel,  # Logical group channel (PyName) all participants join; acts as group/topic identifier.
                max_retries=5,  # Max per-message resend attempts upon missing ack before reporting a delivery failure.
                timeout=datetime.timedelta(
                    seconds=5
                ),  # Ack / delivery wait window; after this duration a retry is triggered (until max_retries).
                mls_enabled=enable_mls,  # Enable Messaging Layer Security for end-to-end encrypted & authenticated group communication.
            )
        )

        # Small delay so underlying routing / session creation stabilizes.
        await asyncio.sleep(1)

        # Invite each provided participant. Route is set before inviting to ensure
        # outbound control messages can reach them. For more info see
        # https://github.com/agntcy/slim/blob/slim-v0.6.0/data-plane/python/bindings/SESSION.md#invite-a-new-participant
        for invite in invites:
            invite_name = split_id(invite)
            await local_app.set_route(invite_name)
            await created_session.invite(invite_name)
            print(f"{local} -> add {invite_name} to the group", flush=True)

    # Launch the receiver immediately.
    tasks.append(
        asyncio.create_task(
            receive_loop(
                local_app, created_session, session_ready, shared_session_container
            )
        )
    )

    tasks.append(
        asyncio.create_task(
            keyboard_loop(session_ready, shared_session_container, local_app)
        )
    )

    # Wait for any task to finish, then cancel the others.
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)

        for task in pending:
            task.cancel()

        # We can await the pending tasks to allow them to clean up.
        if pending:
            await asyncio.wait(pending)

        # Raise exceptions from completed tasks, if any
        for task in done:
            exc = task.exception()
            if exc:
                raise exc

    except KeyboardInterrupt:
        # Cancel all tasks on KeyboardInterrupt
        for task in tasks:
            task.cancel()


def group_main(argv: list[str] | None = None) -> None:
    args = parse_args("SLIM group example (v0.6 dialect)", argv)
    args.pop("remove")
    try:
        asyncio.run(run_client(**args))
    except KeyboardInterrupt:
        print("Client interrupted by user.")


if __name__ == "__main__":
    group_main()
