"""The outbox: writes taken by the transport at once and writes that wait keep their order."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream

from node_lite._transport import Outbox

pytestmark = pytest.mark.anyio
CHUNKS = 3000  # 3 MiB: more than the socket buffers hold, so some writes must wait


async def test_writes_keep_their_order_whether_taken_at_once_or_not(
        anyio_backend_name: str) -> None:
    received = bytearray()
    reading = anyio.Event()
    done = anyio.Event()

    async def serve(stream: ByteStream) -> None:
        async with stream:
            await reading.wait()
            while len(received) < CHUNKS * 1024:
                received.extend(await stream.receive(65536))
            done.set()
            await anyio.sleep_forever()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, \
            anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        outbox = Outbox(client)
        immediate = 0
        write_now = outbox._write_now
        if write_now is not None:

            def counting(data: bytes | memoryview) -> bool:
                nonlocal immediate
                taken = write_now(data)
                immediate += taken
                return taken

            outbox._write_now = counting
        tg.start_soon(outbox.run)
        with anyio.fail_after(20):
            for i in range(CHUNKS):
                outbox.write(i.to_bytes(4, "big") * 256)
                if i % 7 == 0 and outbox.can_send_direct():
                    await outbox.send_direct()
                if i % 3 == 0:
                    await anyio.lowlevel.checkpoint()
            reading.set()
            await done.wait()
        outbox.close()
        await outbox.wait_finished()
        await client.aclose()
        tg.cancel_scope.cancel()
    chunks = [int.from_bytes(received[k:k + 4], "big") for k in range(0, len(received), 1024)]
    assert chunks == list(range(CHUNKS))
    assert outbox.failed is None and outbox.bytes_written == CHUNKS * 1024
    if anyio_backend_name == "asyncio":
        assert immediate > 0  # anyio's send() was skipped where the transport was idle
    else:
        assert write_now is None  # trio's streams keep using send()
