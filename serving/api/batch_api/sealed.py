"""Files encrypted at rest: AES-256-GCM frames, one data key per file, wrapped by a master key.

Batch files hold patients' photos, questions and answers, so their bytes never reach disk in
plain text:

- **Master key**: 32 random bytes from ``SKINGPT4_DATA_KEY`` (base64), or from the key file
  (``<data dir>/data.key`` unless named), created with mode 0600 on first start. It encrypts
  only the data keys and the store's private text fields (:func:`seal_text`).
- **Data key**: each file has its own random key, stored in the store's database wrapped by the
  master key (:func:`wrap_key`). Deleting a file destroys its wrapped key as well as its bytes:
  whatever copy of the bytes a disk keeps can no longer be read.
- **Frames**: a file is ``MAGIC``, then frames ``length (4 bytes, big-endian) | nonce (12) |
  ciphertext + tag``. The associated data is the file's id and the frame's index, so frames
  cannot be moved within a file or between files unnoticed. An upload is written in frames of
  up to :data:`FRAME_BYTES`; a batch's output file gets one frame per record, appended and
  synced as each record is written, so a crash loses at most a torn last frame
  (:meth:`SealedWriter.open`'s repair drops it).
"""

from __future__ import annotations

import base64
import io
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"SKG4SEAL1\n"
FRAME_BYTES = 1 << 20  # plaintext per frame of an upload
MAX_FRAME_BYTES = 256 << 20  # no frame this project writes is larger; a longer one is damage
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_LENGTH = struct.Struct(">I")
KEY_ENV = "SKINGPT4_DATA_KEY"
KEY_FILE = "data.key"


class SealedError(Exception):
    """A sealed file or field that cannot be read: damaged, or sealed with another key."""


# --- keys --------------------------------------------------------------------------------------


def load_master_key(data_dir: Path, key_file: Path | None = None,
                    environ: Mapping[str, str] = os.environ) -> bytes:
    """The master key: ``SKINGPT4_DATA_KEY`` (base64 of 32 bytes) if set, else the key file,
    created (mode 0600, 32 random bytes in base64) if it does not exist. ValueError with the
    reason for a key that is not 32 bytes of base64 or a key file others may read."""
    given = environ.get(KEY_ENV)
    if given:
        return decode_key(given, KEY_ENV)
    path = key_file or data_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_key_file(path)
    try:
        key = os.urandom(KEY_BYTES)
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def read_key_file(path: Path) -> bytes:
    """The key in an existing key file, which only its owner may read."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"the data key file {path} may be read by others (mode {mode:o}); "
                         "chmod 600 it")
    return decode_key(path.read_bytes().decode("ascii", "replace"), str(path))


def decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where} must hold {KEY_BYTES} random bytes in base64 "
                         f"(e.g. from: head -c 32 /dev/urandom | base64)")
    return key


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def wrap_key(master: bytes, data_key: bytes, file_id: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(master).encrypt(nonce, data_key, b"key:" + file_id.encode())


def unwrap_key(master: bytes, wrapped: bytes, file_id: str) -> bytes:
    try:
        return AESGCM(master).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:],
                                      b"key:" + file_id.encode())
    except InvalidTag:
        raise SealedError(f"the key of {file_id} does not open with this master key") from None


def seal_text(master: bytes, text: str, label: str) -> str:
    """``text`` encrypted under the master key, as base64 (for the store's private fields)."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(master).encrypt(nonce, text.encode("utf-8"), label.encode())
    return base64.b64encode(nonce + sealed).decode("ascii")


def open_text(master: bytes, sealed: str, label: str) -> str:
    raw = base64.b64decode(sealed)
    try:
        return AESGCM(master).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:],
                                      label.encode()).decode("utf-8")
    except InvalidTag:
        raise SealedError(f"a sealed field ({label}) does not open with this master key") from None


# --- frames ------------------------------------------------------------------------------------


def _aad(file_id: str, index: int) -> bytes:
    return file_id.encode() + b"#" + index.to_bytes(8, "big")


def _frames(f: io.BufferedReader) -> Iterator[tuple[int, bytes, bytes]]:
    """(offset, nonce, ciphertext) of each whole frame after MAGIC; stops at a torn one."""
    offset = f.tell()
    while True:
        head = f.read(_LENGTH.size + NONCE_BYTES)
        if len(head) < _LENGTH.size + NONCE_BYTES:
            return
        (length,) = _LENGTH.unpack_from(head)
        if not TAG_BYTES <= length <= MAX_FRAME_BYTES + TAG_BYTES:
            return
        sealed = f.read(length)
        if len(sealed) < length:
            return
        yield offset, head[_LENGTH.size:], sealed
        offset = f.tell()


class SealedWriter:
    """Appends frames to a sealed file (``append=True``: one that exists, after its last
    whole frame; a torn or unreadable tail is cut off first). Each :meth:`write` is one frame;
    :meth:`sync` makes what was written durable."""

    def __init__(self, path: Path, data_key: bytes, file_id: str, *, append: bool = False) -> None:
        self.path = path
        self.file_id = file_id
        self._aead = AESGCM(data_key)
        self.frames = 0
        self.plain_bytes = 0
        self.existing: list[bytes] = []  # the plaintext frames found when appending
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if append else os.O_EXCL)
        self.fd = os.open(path, flags, 0o600)
        try:
            if append and os.fstat(self.fd).st_size:
                self._resume()
            else:
                os.ftruncate(self.fd, 0)
                os.write(self.fd, MAGIC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise

    def _resume(self) -> None:
        with open(os.dup(self.fd), "rb", closefd=True) as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise SealedError(f"{self.path.name} is not a sealed file")
            good = len(MAGIC)
            for offset, nonce, sealed in _frames(f):
                try:
                    plain = self._aead.decrypt(nonce, sealed, _aad(self.file_id, self.frames))
                except InvalidTag:
                    break  # a frame written only in part
                self.existing.append(plain)
                self.frames += 1
                self.plain_bytes += len(plain)
                good = f.tell()
        if good < os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, good)
            os.fsync(self.fd)

    def write(self, data: bytes) -> None:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, bytes(data), _aad(self.file_id, self.frames))
        frame = memoryview(_LENGTH.pack(len(sealed)) + nonce + sealed)
        while frame:
            frame = frame[os.write(self.fd, frame):]
        self.frames += 1
        self.plain_bytes += len(data)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SealedReader(io.RawIOBase):
    """A sealed file's plain bytes, frame by frame (wrap it in ``io.BufferedReader`` for
    ``readline``). A damaged frame raises :class:`SealedError`; so does a file that ends before
    ``plain_bytes`` (when given), i.e. one cut short."""

    def __init__(self, path: Path, data_key: bytes, file_id: str,
                 plain_bytes: int | None = None) -> None:
        super().__init__()
        self._file = open(path, "rb")
        if self._file.read(len(MAGIC)) != MAGIC:
            self._file.close()
            raise SealedError(f"{path.name} is not a sealed file")
        self._aead = AESGCM(data_key)
        self._file_id = file_id
        self._frames = _frames(self._file)
        self._index = 0
        self._buffer = memoryview(b"")
        self._expected = plain_bytes
        self._delivered = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            frame = next(self._frames, None)
            if frame is None:
                if self._expected is not None and self._delivered != self._expected:
                    raise SealedError(f"{self._file_id} ends after {self._delivered} of its "
                                      f"{self._expected} bytes")
                return 0
            _, nonce, sealed = frame
            try:
                plain = self._aead.decrypt(nonce, sealed, _aad(self._file_id, self._index))
            except InvalidTag:
                raise SealedError(f"{self._file_id}: frame {self._index} is damaged") from None
            self._index += 1
            self._buffer = memoryview(plain)
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self._delivered += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def open_sealed(path: Path, data_key: bytes, file_id: str,
                plain_bytes: int | None = None) -> io.BufferedReader:
    """A buffered reader of a sealed file's plain bytes."""
    return io.BufferedReader(SealedReader(path, data_key, file_id, plain_bytes), FRAME_BYTES)
