"""The compiled loops of the context coder (entropy.py) in numba, for a process without the C
extension (_elements.c has the same three, giving the same counts, stream and problem codes):
one rANS state, 32 bits, 16-bit words, probabilities in 14 bits.

They run per element, so they are compiled (numba, cached on disk after the first use) and
release the GIL, so the writer's and reader's threads code chunks side by side. entropy.py
imports this module on first use only: compiling and importing numba costs a second or so
that a process that never codes a 16-bit float delta should not pay.
"""

# The loops are typed by numba from their arguments, not annotated.
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import numpy as np
from numba import njit

from .entropy import (
    BAD_MODEL,
    ESCAPE,
    LEFT_OVER,
    MOVE_CAP,
    OK,
    PROB_BITS,
    RAW,
    RAW_LEFT,
    RAW_SHORT,
    TRUNCATED,
)

PROB_SCALE = 1 << PROB_BITS
# The state stays in [STATE_LOW, 2**32): one 16-bit word in or out per coded symbol at most.
STATE_LOW = 1 << 16


# The helpers take numbers only. An array handed to a helper, even one inlined, is counted
# in and out of use (two atomic operations) at every call, once per element: the decoder ran
# at 38-48 ns an element so, against 9 ns with the tables indexed in the loop itself.


@njit(cache=True, nogil=True, inline="always")
def _context(base_value, move, shift, mask, use_moves):
    """(exponent, context) of an element whose base is ``base_value`` and whose base moved by
    ``move`` (read only when ``use_moves``)."""
    exponent = (np.int64(base_value) >> shift) & mask
    if not use_moves:
        return exponent, exponent
    move = np.int64(move)
    return exponent, exponent * (MOVE_CAP + 1) + (move if move < MOVE_CAP else MOVE_CAP)


@njit(cache=True, nogil=True, inline="always")
def _spills(state, freq):
    """Whether coding a symbol of frequency ``freq`` must first push the state's low word out."""
    return state >= freq << np.uint64(32 - PROB_BITS)


@njit(cache=True, nogil=True, inline="always")
def _push(state, freq, cum):
    """The state after coding a symbol of frequency ``freq`` (0 < freq) and start ``cum``."""
    return ((state // freq) << np.uint64(PROB_BITS)) + state % freq + cum


@njit(cache=True, nogil=True, inline="always")
def _pop(state, freq, cum, slot):
    """The state after taking off the symbol of frequency ``freq`` and start ``cum`` that
    ``slot`` fell in; below STATE_LOW, the next word comes in."""
    return freq * (state >> np.uint64(PROB_BITS)) + np.uint64(slot - cum)


@njit(cache=True, nogil=True)
def count(z, base, moves, shift, mask, use_moves, main_counts, escape_counts):
    """Add every element's symbols to the counts of their models (what :func:`encode` will
    code)."""
    for i in range(len(z)):
        value = np.int64(z[i])
        exponent, context = _context(base[i], moves[i] if use_moves else 0, shift, mask, use_moves)
        if value < ESCAPE:
            main_counts[context, value] += 1
            continue
        main_counts[context, ESCAPE] += 1
        escape_counts[exponent, min(value - ESCAPE, RAW)] += 1


@njit(cache=True, nogil=True)
def encode(z, base, moves, shift, mask, use_moves, main_freq, main_cum, escape_freq, escape_cum, words):
    """Code every element's symbol(s), last element first, into the end of ``words``; return
    where the stream starts, or -1 if a symbol's model gives it no probability."""
    state = np.uint64(STATE_LOW)
    position = len(words)
    for i in range(len(z) - 1, -1, -1):
        value = np.int64(z[i])
        exponent, context = _context(base[i], moves[i] if use_moves else 0, shift, mask, use_moves)
        symbol = value
        if value >= ESCAPE:
            # The escape symbol is read after the main one, so it goes in first.
            escape = min(value - ESCAPE, RAW)
            freq = np.uint64(escape_freq[exponent, escape])
            if freq == 0:
                return -1
            if _spills(state, freq):
                position -= 1
                words[position] = np.uint16(state & np.uint64(0xFFFF))
                state >>= np.uint64(16)
            state = _push(state, freq, np.uint64(escape_cum[exponent, escape]))
            symbol = np.int64(ESCAPE)
        freq = np.uint64(main_freq[context, symbol])
        if freq == 0:
            return -1
        if _spills(state, freq):
            position -= 1
            words[position] = np.uint16(state & np.uint64(0xFFFF))
            state >>= np.uint64(16)
        state = _push(state, freq, np.uint64(main_cum[context, symbol]))
    words[position - 1] = np.uint16(state & np.uint64(0xFFFF))
    words[position - 2] = np.uint16(state >> np.uint64(16))
    return position - 2


@njit(cache=True, nogil=True)
def decode(words, raw, base, moves, shift, mask, use_moves, main_freq, main_cum, escape_freq, escape_cum, out):
    """Inverse of :func:`encode` into ``out``; returns OK or what was wrong (entropy.PROBLEMS).
    Only where the C extension was not built: _elements.c has the same decoder."""
    if len(words) < 2:
        return TRUNCATED
    state = (np.uint64(words[0]) << np.uint64(16)) | np.uint64(words[1])
    position = 2
    raw_used = 0
    for i in range(len(out)):
        exponent, context = _context(base[i], moves[i] if use_moves else 0, shift, mask, use_moves)
        slot = np.int64(state & np.uint64(PROB_SCALE - 1))
        # The main symbol is how many of its model's starts after the first lie at or below
        # the slot (starts never decrease): counted without a branch, where a search stopping
        # at the symbol was mispredicted about once an element (20 ns an element against 9).
        symbol = 0
        for k in range(1, ESCAPE + 1):
            symbol += slot >= main_cum[context, k]
        freq = np.uint64(main_freq[context, symbol])
        if freq == 0:
            return BAD_MODEL
        state = _pop(state, freq, main_cum[context, symbol], slot)
        if state < np.uint64(STATE_LOW):
            if position >= len(words):
                return TRUNCATED
            state = (state << np.uint64(16)) | np.uint64(words[position])
            position += 1
        if symbol < ESCAPE:
            out[i] = symbol
            continue
        # Escapes are rare: a search over the escape model's 64 symbols.
        slot = np.int64(state & np.uint64(PROB_SCALE - 1))
        escape = 0
        while escape < RAW and slot >= escape_cum[exponent, escape + 1]:
            escape += 1
        freq = np.uint64(escape_freq[exponent, escape])
        if freq == 0:
            return BAD_MODEL
        state = _pop(state, freq, escape_cum[exponent, escape], slot)
        if state < np.uint64(STATE_LOW):
            if position >= len(words):
                return TRUNCATED
            state = (state << np.uint64(16)) | np.uint64(words[position])
            position += 1
        if escape < RAW:
            out[i] = ESCAPE + escape
        else:
            if raw_used >= len(raw):
                return RAW_SHORT
            out[i] = raw[raw_used]
            raw_used += 1
    if position != len(words) or state != np.uint64(STATE_LOW):
        return LEFT_OVER
    if raw_used != len(raw):
        return RAW_LEFT
    return OK
