"""Only async handlers, and no PYPOOL_MAX_IN_FLIGHT: the runtime takes several calls at once."""

import asyncio

from pypool_worker import handler


@handler
async def nap(seconds):
    await asyncio.sleep(seconds)
    return seconds
