"""The Batch API's store with an async face: :class:`AsyncStore` runs each blocking method of
:class:`serving.api.batch_api.store.Store`, and the sealed files' reads, writes and syncs, on one
thread of its own, off the event loop and one at a time (the store is called from one thread)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from serving.api.batch_api import sealed
from serving.api.batch_api.store import FileRow, Store

T = TypeVar("T")


class AsyncStore:
    """A :class:`Store` opened by :meth:`open` and closed by :meth:`close`, its methods
    awaited. ``store`` is the blocking store itself (None until opened)."""

    def __init__(self) -> None:
        self.store: Store | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-store")

    @property
    def opened(self) -> bool:
        return self.store is not None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, partial(fn, *args, **kwargs))

    async def open(self, data_dir: Path, key_file: Path | None) -> None:
        self.store = await self.run(Store, data_dir, key_file)

    async def close(self) -> None:
        """Close the store (if it was opened) and let its thread go."""
        if self.store is not None:
            await self.run(self.store.close)
        self.executor.shutdown(wait=False)

    # --- where files are ---------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.store.data_dir

    def path(self, file_id: str) -> Path:
        return self.store.path(file_id)

    async def open_file(self, row: FileRow) -> io.BufferedReader:
        """A stored file's contents, to read (close it when done)."""
        return await self.run(sealed.open_sealed, self.path(row.id), row.data_key, row.id,
                              row.bytes)

    async def append_to(self, row: FileRow) -> sealed.SealedWriter:
        """A writer that appends to a stored file (reading back what it holds)."""
        return await self.run(sealed.SealedWriter, self.path(row.id), row.data_key, row.id,
                              append=True)

    # --- files -------------------------------------------------------------------------------

    async def add_file(self, file_id: str, tenant: str, purpose: str, filename: str,
                       nbytes: int, data_key: bytes, expires_at: int | None, *,
                       visible: bool = True, created_at: int | None = None) -> FileRow:
        return await self.run(self.store.add_file, file_id, tenant, purpose, filename, nbytes,
                              data_key, expires_at, visible=visible, created_at=created_at)

    async def show_file(self, file_id: str, nbytes: int, expires_at: int | None) -> None:
        await self.run(self.store.show_file, file_id, nbytes, expires_at)

    async def file(self, file_id: str, tenant: str | None = None, *,
                   hidden: bool = False) -> FileRow | None:
        return await self.run(self.store.file, file_id, tenant, hidden=hidden)

    async def list_files(self, tenant: str, purpose: str | None, after: str | None, limit: int,
                         order: str) -> tuple[list[FileRow], bool]:
        return await self.run(self.store.list_files, tenant, purpose, after, limit, order)

    async def tenant_usage(self, tenant: str) -> tuple[int, int]:
        return await self.run(self.store.tenant_usage, tenant)

    async def delete_file(self, file_id: str) -> None:
        await self.run(self.store.delete_file, file_id)

    async def expired_files(self, now: float) -> list[str]:
        return await self.run(self.store.expired_files, now)

    async def file_in_use(self, file_id: str) -> bool:
        return await self.run(self.store.file_in_use, file_id)

    # --- batches -----------------------------------------------------------------------------

    async def add_batch(self, tenant: str, batch: dict, output_file: str,
                        error_file: str) -> None:
        await self.run(self.store.add_batch, tenant, batch, output_file, error_file)

    async def batch(self, batch_id: str, tenant: str | None = None) -> dict | None:
        return await self.run(self.store.batch, batch_id, tenant)

    async def batch_files(self, batch_id: str) -> tuple[str, str, str]:
        return await self.run(self.store.batch_files, batch_id)

    async def update_batch(self, batch_id: str, **fields: Any) -> dict:
        return await self.run(partial(self.store.update_batch, batch_id, **fields))

    async def list_batches(self, tenant: str, after: str | None,
                           limit: int) -> tuple[list[dict], bool]:
        return await self.run(self.store.list_batches, tenant, after, limit)

    async def unfinished_batches(self) -> list[tuple[str, str]]:
        return await self.run(self.store.unfinished_batches)
