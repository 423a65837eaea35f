"""Noise sources: offset noise for training and per-user reproducible streams for evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# DiffuRecSys Eq. 17: the training noise's mean is this share of the offset-noise strength
# delta_c, eps ~ N(0.1 delta_c, I). Only training noise is offset: reverse sampling stays N(0, I).
OFFSET_NOISE_MEAN = 0.1

# Noise of a reverse process drawn ahead per batch: at most this many float32 values (64 MB)
# at a time (``UserNoise.step_rows``).
_PREFETCH_VALUES = 1 << 24

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


def offset_noise(like: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """eps ~ N(OFFSET_NOISE_MEAN * strength, I) shaped like `like` (DiffuRecSys Eq. 17, strength
    = delta_c); strength 0 is plain N(0, I). Training noise only: reverse sampling stays N(0, I).

    The noise is drawn on the generator's device (like's device without one), then moved to like's.
    """
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device) + OFFSET_NOISE_MEAN * strength


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser (Steele, Lea & Flood 2014): a bijection on 64-bit ints that mixes well.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix32(x: int) -> int:
    # "lowbias32" (C. Wellons): xor-shifts and odd multiplications, hence a bijection on 32 bits.
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def user_seed(seed: int, user: int) -> int:
    """The seed of user `user`'s noise stream under the global `seed`.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the hash is a 32-bit
    bijection of the user id keyed by the (64-bit mixed) global seed: under one seed no two users
    with ids below 2**32 ever share a stream, and different seeds permute the streams unpredictably.
    """
    key = _splitmix64(seed & _MASK64) & _MASK32
    return _mix32((user ^ key) & _MASK32)


def _padded_row_index(num_rows: Tensor, max_rows: int) -> Tensor:
    """For each drawn row (users back to back), its row in the left-padded (B * max_rows) layout."""
    total = int(num_rows.sum())
    first_slot = torch.arange(len(num_rows)) * max_rows + max_rows - num_rows  # (B,)
    first_drawn = torch.cumsum(num_rows, dim=0) - num_rows  # (B,)
    shift = torch.repeat_interleave(first_slot - first_drawn, num_rows, output_size=total)
    return shift + torch.arange(total)


class UserNoise:
    """One Gaussian stream per user, so evaluation noise depends only on (seed, user).

    A user's values never depend on who else is in the batch, the batch size or the device count,
    as long as the same calls are made in the same order. Draws happen on the CPU (one
    torch.Generator per user) into one flat buffer, which is moved to `device` and laid out there
    with one index operation.

    ``prefetch`` draws the rows of many later calls at once (one generator call per user instead
    of one per user and call); the values are the same, because PyTorch fills float32 normals in
    blocks of 16 uniforms, so a stream cut into pieces of whole blocks reads the same in one piece.
    """

    def __init__(self, seed: int, users: Tensor, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._generators = [
            torch.Generator().manual_seed(user_seed(seed, user)) for user in users.tolist()
        ]
        # Prefetched rows (users back to back, then one zero row for padding) on `device`, and
        # per user the next unread row and the end of its rows.
        self._rows: Tensor | None = None
        self._next: Tensor | None = None
        self._end: Tensor | None = None

    def _fill(self, counts: list[int], dim: int) -> Tensor:
        """counts[b] * dim normals from user b's stream, users back to back: (sum(counts) * dim,)."""
        flat = torch.empty(sum(counts) * dim)
        start = 0
        for generator, count in zip(self._generators, counts, strict=True):
            end = start + count * dim
            flat[start:end].normal_(generator=generator)
            start = end
        return flat

    @staticmethod
    def can_prefetch(dim: int) -> bool:
        """Whether prefetched rows of width `dim` equal the rows drawn call by call."""
        return dim % 16 == 0

    def prefetch(self, num_rows: Tensor, dim: int) -> None:
        """Draw the next num_rows[b] rows of `dim` normals of user b's stream now; the following
        ``rows``/``vectors`` calls (same `dim`) read them in stream order instead of drawing.

        Only when ``can_prefetch(dim)`` (otherwise a no-op: calls keep drawing), and only once the
        previously prefetched rows are all read.
        """
        if not self.can_prefetch(dim):
            return
        if self._rows is not None and bool((self._next < self._end).any()):
            raise RuntimeError("prefetch called before the prefetched rows were all read")
        counts = num_rows.to("cpu", torch.long)
        if len(counts) != len(self._generators) or bool((counts < 0).any()):
            raise ValueError(f"num_rows must hold {len(self._generators)} counts >= 0")
        flat = self._fill(counts.tolist(), dim).view(-1, dim)
        self._rows = torch.cat([flat, flat.new_zeros(1, dim)]).to(self.device)  # (R + 1, dim)
        ends = torch.cumsum(counts, 0)
        self._next, self._end = (ends - counts).to(self.device), ends.to(self.device)

    def _prefetched(self, counts: Tensor, dim: int) -> bool:
        if self._rows is None or self._rows.shape[1] != dim:
            return False
        if bool((self._next + counts > self._end).any()):
            if bool((self._next < self._end).any()):
                raise RuntimeError("a call asks for more rows than were prefetched")
            return False  # everything read: draw directly again
        return True

    def vectors(self, dim: int) -> Tensor:
        """The next `dim` normals of every user's stream: (B, dim)."""
        ones = torch.ones(len(self._generators), dtype=torch.long, device=self.device)
        if self._prefetched(ones, dim):
            out = self._rows[self._next]
            self._next = self._next + 1
            return out
        flat = self._fill([1] * len(self._generators), dim)
        return flat.view(len(self._generators), dim).to(self.device)

    def rows(self, num_rows: Tensor, max_rows: int, dim: int) -> Tensor:
        """num_rows[b] * dim normals from user b's stream as rows: (B, max_rows, dim).

        User b's rows fill the LAST num_rows[b] rows in stream order, the rows before are zero
        (left padding, like the item sequences).
        """
        counts = num_rows.tolist()
        if len(counts) != len(self._generators):
            raise ValueError(
                f"num_rows has {len(counts)} entries for {len(self._generators)} users"
            )
        if any(not 0 <= count <= max_rows for count in counts):
            raise ValueError(f"num_rows must lie in 0..{max_rows}, got {counts}")
        need = num_rows.to(self.device, torch.long)
        if self._prefetched(need, dim):
            # Slot (b, c) reads row next[b] + c - (max_rows - need[b]), or the zero row if padding.
            cols = torch.arange(max_rows, device=self.device)[None, :]  # (1, max_rows)
            first = (max_rows - need)[:, None]  # (B, 1)
            index = torch.where(
                cols >= first, self._next[:, None] + cols - first, len(self._rows) - 1
            )
            self._next = self._next + need
            return self._rows[index]  # (B, max_rows, dim)
        flat = self._fill(counts, dim).view(-1, dim)  # (sum(num_rows), dim)
        index = _padded_row_index(num_rows.to("cpu", torch.long), max_rows)  # (sum(num_rows),)
        out = torch.zeros(len(counts) * max_rows, dim, device=self.device)
        out.index_copy_(0, index.to(self.device), flat.to(self.device))
        return out.view(len(counts), max_rows, dim)

    def step_rows(
        self, num_rows: Tensor, max_rows: int, dim: int, num_steps: int, *, step_vectors: bool
    ) -> Callable[[], Tensor]:
        """A function returning the next ``rows(num_rows, max_rows, dim)`` at each of the
        ``num_steps`` steps of a reverse process, drawn ahead for several steps at a time (at
        most ``_PREFETCH_VALUES`` values): the same values as drawing them step by step.

        ``step_vectors``: between two steps (not after the last) the process also reads one
        ``vectors(dim)``, its step noise; the prefetch covers those, in the same stream order.
        """
        values_per_step = len(self._generators) * (max_rows + 1) * dim
        chunk = max(1, _PREFETCH_VALUES // max(1, values_per_step))
        calls = 0

        def next_rows() -> Tensor:
            nonlocal calls
            if calls % chunk == 0:
                ahead = min(chunk, num_steps - calls)
                vectors = ahead - (calls + ahead == num_steps) if step_vectors else 0
                self.prefetch(num_rows * ahead + vectors, dim)
            calls += 1
            return self.rows(num_rows, max_rows, dim)

        return next_rows
