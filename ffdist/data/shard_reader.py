"""One loader process's reads of a split's samples from tar shards. Torch-free.

Two ways, chosen per shard:
- **at its offset** (a local shard whose index has sample offsets: every shard `ffdist
  shard` writes, and every local shard a scan indexed): one `pread` of the sample's byte
  span, parsed as a small tar. A process reads exactly the bytes of its own samples, in any
  order, and never walks through a shard; a resumed epoch reads nothing of the samples it
  skips.
- **streamed** (an http(s) URL or a `pipe:` command): the shard is read from its start
  once, and the samples this process will ask for in this iteration (`expect`) are kept as
  they go by, until asked for; the rest is read past. The order's shuffle window bounds how
  far ahead that keeps (ffdist.data.shard_streams). A shard none of whose samples this
  process needs is not opened: a resumed epoch skips the shards already done.

A shard that cannot be read (missing, unreachable, truncated) makes `read` raise
tars.Unreadable for each of its samples asked for; the caller counts them
(data.bad_images=skip) or stops.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Iterator
from typing import IO

from ffdist.data import tars
from ffdist.data.shard_index import ShardSet

OPEN_FILES = 64
"""Local shards a process keeps open (least recently used closed first)."""


class SampleReader:
    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self.files: OrderedDict[int, tuple[int, list[int]]] = OrderedDict()
        self.need: defaultdict[int, Counter[int]] = defaultdict(Counter)
        self.held: dict[tuple[int, int], tars.Sample] = {}
        self.streams: dict[int, tuple[IO[bytes], Iterator[tars.Sample]]] = {}
        self.broken: dict[int, str] = {}

    def at_offset(self, s: int) -> bool:
        info = self.shards.shards[s]
        return tars.kind(info.url) == "file" and info.spans is not None

    def expect(self, ids: Iterable[int]) -> None:
        """The samples (split indices) this iteration will ask for, in order. Starts the
        iteration afresh: open streams are closed, what they held is dropped."""
        self._close_streams()
        self.held.clear()
        self.broken.clear()
        self.need = defaultdict(Counter)
        for i in ids:
            s, pos = self.shards.locate(i)
            if not self.at_offset(s):
                self.need[s][pos] += 1

    def read(self, i: int) -> tuple[str, tars.Sample]:
        """(shard url, the sample with its fields read) of the split's sample i."""
        s, pos = self.shards.locate(i)
        url = self.shards.shards[s].url
        if s in self.broken:
            raise tars.Unreadable(self.broken[s])
        if self.at_offset(s):
            return url, self._at_offset(s, pos)
        try:
            return url, self._streamed(s, pos)
        except tars.Unreadable as e:  # the rest of a stream is lost: fail its samples fast
            self.broken[s] = str(e)
            self._close(s)
            raise

    # ------------------------------------------------------------------ at offsets
    def _open(self, s: int) -> tuple[int, list[int]]:
        if s in self.files:
            self.files.move_to_end(s)
            return self.files[s]
        info = self.shards.shards[s]
        try:
            fd = os.open(tars.local_path(info.url), os.O_RDONLY)
        except OSError as e:
            raise tars.Unreadable(tars.reason(e)) from None
        self.files[s] = (fd, info.starts())
        if len(self.files) > OPEN_FILES:
            os.close(self.files.popitem(last=False)[1][0])
        return self.files[s]

    def _at_offset(self, s: int, pos: int) -> tars.Sample:
        fd, starts = self._open(s)
        start, end = starts[pos], starts[pos + 1]
        try:
            data = os.pread(fd, end - start, start)
        except OSError as e:
            raise tars.Unreadable(tars.reason(e)) from None
        if len(data) != end - start:
            raise tars.Unreadable(f"truncated: {len(data)} of the {end - start} bytes of sample "
                                  f"{pos} at offset {start}")
        sample = tars.parse_sample(data)
        if sample is None:
            raise tars.Unreadable(f"no sample at offset {start}, where the index puts sample "
                                  f"{pos}: the shard was rewritten; index it again")
        sample.pos = pos
        return sample

    # ------------------------------------------------------------------ streamed
    def _streamed(self, s: int, pos: int) -> tars.Sample:
        if self.need[s][pos] <= 0:
            raise RuntimeError(f"sample {pos} of shard {s} read without expect()")
        if (s, pos) not in self.held:
            self._advance(s, pos)
        sample = self.held[(s, pos)]
        self.need[s][pos] -= 1
        if self.need[s][pos] == 0:
            del self.need[s][pos], self.held[(s, pos)]
        if not self.need[s]:
            self._close(s)  # nothing more of it this iteration
        return sample

    def _advance(self, s: int, pos: int) -> None:
        if s not in self.streams:
            stream = tars.open_shard(self.shards.shards[s].url)
            need = self.need[s]
            walker = tars.walk(tars.open_tar(stream), want=lambda p: need.get(p, 0) > 0)
            self.streams[s] = (stream, walker)
        last = -1
        for sample in self.streams[s][1]:
            last = sample.pos
            if sample.wanted:
                self.held[(s, sample.pos)] = sample
            if sample.pos == pos:
                return
        raise tars.Unreadable(f"ends after {last + 1} samples, the index says "
                              f"{self.shards.shards[s].samples}: truncated or rewritten")

    def _close(self, s: int) -> None:
        stream = self.streams.pop(s, None)
        if stream is not None:
            try:
                stream[0].close()
            except (OSError, tars.Unreadable):
                pass  # a failed command's exit status: its samples already failed or came

    def _close_streams(self) -> None:
        for s in list(self.streams):
            self._close(s)

    def close(self) -> None:
        self._close_streams()
        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()
