"""Gloo's connection messages out of a multi-process run's output.

Gloo, JAX's CPU collectives across processes, prints "[Gloo] Rank i is connected to j peer ranks.
Expected number of connected peer ranks is : j" from C++ for every communicator it opens: dozens of
messages per run that bury the run's own lines. A child process (this file, run as a script: it imports
nothing of jaxinfra) reads the run's stdout and stderr through pipes and passes the rest on, whole lines
at a time (one write each, so what shares a file with them cannot land inside them). A child, not a
thread, so what the run wrote still comes out when it is killed.

Gloo's message is not one write. It goes out in eight pieces ("[Gloo] Rank ", "1", " is connected to ",
"1", " peer ranks. ", "Expected number of connected peer ranks is : ", "1", "\\n"), each its own write(2)
once stdio is unbuffered (PYTHONUNBUFFERED=1), from several communicators' threads at once, and print()
writes its text and its newline separately (both seen with strace in a 2-process run). So pieces of
several messages interleave with each other and with the run's lines: a message can follow a line's
text ("resumed from step 25[Gloo] Rank 1 is connected to ..."), a line can stand inside a message ("[Gloo]
Rank 1 is connected to resumed from step 25", the message going on in the next line), and a message's
newline can end a line the run has not finished. The filter therefore follows the stream, not single
lines: it counts what the messages it has seen still owe, drops Gloo's text wherever it stands (also a
message cut inside a piece), and passes the run's text on with the run's own newlines. What bytes alone
cannot tell: one of Gloo's numbers written right against the run's text with no piece of Gloo's beside it
("step 25" then "1" then the run's newline) stays there.
"""
from __future__ import annotations

import atexit
import os
import re
import select
import signal
import subprocess
import sys
import threading

RANK, CONNECTED, PEERS, EXPECTED = (b"[Gloo] Rank ", b" is connected to ", b" peer ranks. ",
                                    b"Expected number of connected peer ranks is : ")
PIECES = (RANK, CONNECTED, PEERS, EXPECTED)
NUMBER = re.compile(rb"\d+")
MARK = b"[Gloo]"  # text that holds it is Gloo's, also where a write cut the piece after it ("[Gloo] Ra")
HOLD_S = 0.5  # how long a line that may hold a cut piece waits for the next line, which tells
FORGET = 64  # lines in a row without Gloo's text after which what open messages owe is forgotten


class Stream:
    """One output stream without Gloo's messages: feed() it whole lines (b"...\\n") in order and close()
    it with the unfinished rest; each returns the lines to pass on, each one whole.

    A piece that is also ordinary text (" is connected to ", a number, a newline) is Gloo's only where a
    message seen before owes it: right after Gloo's text, at the start of a line (where a message that a
    line of the run cut goes on), or where the message's next piece follows it. A piece cut short (the
    start of "[Gloo]" at a line's edge, a piece right after Gloo's text) is settled by the next line,
    which goes on with the piece's rest or not: such a line waits for it (at most HOLD_S in the filter).
    """

    def __init__(self) -> None:
        self.owed = dict.fromkeys(PIECES[1:], 0)  # open messages whose next piece is this one
        self.numbers = 0  # numbers owed
        self.newlines = 0  # final newlines owed
        self.rests: list[bytes] = []  # the rests of pieces that another write cut, due at a line's start
        self.pending = b""  # the run's text of a line that a newline taken as Gloo's left open
        self.pending_ended = False  # ... after the run's text: that newline may have been the run's
        self.idle = 0  # lines in a row without Gloo's text
        self.held: tuple | None = None  # (line, state before it, its output, where a piece may be cut)
        self._cuts: list[tuple[int, bytes, range]] = []

    def _state(self) -> tuple:
        return (dict(self.owed), self.numbers, self.newlines, list(self.rests), self.pending,
                self.pending_ended, self.idle)

    def _restore(self, state: tuple) -> None:
        owed, self.numbers, self.newlines, rests, self.pending, self.pending_ended, self.idle = state
        self.owed, self.rests = dict(owed), list(rests)

    def _took(self, piece: bytes) -> None:
        """A message moved past `piece`: what it owes next."""
        if piece != RANK:
            self.owed[piece] = max(0, self.owed[piece] - 1)
        nxt = PIECES.index(piece) + 1
        if nxt < len(PIECES):
            self.owed[PIECES[nxt]] += 1
        else:
            self.newlines += 1
        if piece != PEERS:
            self.numbers += 1

    def _open(self) -> bool:
        return bool(self.numbers or self.newlines or self.rests or any(self.owed.values()))

    def _piece_follows(self, body: bytes, q: int, end: bool = False) -> bool:
        """Whether Gloo's next piece starts at body[q] (or the line ends there, where that may be Gloo's)."""
        return any(body.startswith(piece, q) for piece in PIECES) or (q == len(body) and (end or self.newlines > 0))

    def _cut(self, piece: bytes, k: int) -> int:
        self.rests.append(piece[k:])
        self._took(piece)
        return k

    def _gloo_at(self, body: bytes, p: int, after_gloo: bool) -> int:
        """How many bytes of Gloo's text start at body[p] (0: the run's text); the state moves past them."""
        if p == 0:
            for rest in self.rests:  # the rest of a piece that a line of the run cut
                if body.startswith(rest):
                    self.rests.remove(rest)
                    return len(rest)
        for piece in (RANK, PEERS, EXPECTED):  # never the run's text
            if body.startswith(piece, p):
                self._took(piece)
                return len(piece)
        if body.startswith(CONNECTED, p):
            number = NUMBER.match(body, p + len(CONNECTED))
            q = number.end() if number else p + len(CONNECTED)
            if after_gloo or body.startswith(PEERS, q) or (
                    self.owed[CONNECTED] and (p == 0 or self._piece_follows(body, q, end=True))):
                self._took(CONNECTED)
                return len(CONNECTED)
        number = NUMBER.match(body, p)
        if number:
            if after_gloo or (p == 0 and self._open() and self._piece_follows(body, number.end())):
                self.numbers = max(0, self.numbers - 1)
                return number.end() - p
            return 0
        for piece in PIECES:  # a piece cut short: right after Gloo's text, or "[Gloo]..." anywhere
            k = 0
            while k < len(piece) - 1 and body[p + k:p + k + 1] == piece[k:k + 1]:
                k += 1
            if not k or not (after_gloo and (piece == RANK or self.owed[piece]) or piece == RANK and k >= len(MARK)):
                continue
            self._cuts.append((p, piece, range(1, k + 1)))  # where the cut is, the next line tells
            if piece == RANK and k < len(MARK):
                return 0  # "[", "[G", ...: the run's text unless the next line goes on with "Gloo] Rank "
            return self._cut(piece, k)
        return 0

    def _line(self, line: bytes, force: tuple[int, bytes, int] | None = None) -> bytes | None:
        """The line to pass on (None: none yet), Gloo's text and, where it is Gloo's, its newline taken out.
        `force`: (at, piece, k) the first k bytes of piece stand at body[at], followed by the run's text."""
        body, newline = (line[:-1], True) if line.endswith(b"\n") else (line, False)
        self._cuts = []
        if newline and not (self.pending or self._open() or b"[" in body or PEERS in body or EXPECTED in body):
            self.idle += 1
            return line  # no Gloo text can start in this line (most lines)
        text = bytearray()
        p, after_gloo, after_number, seen = 0, False, False, False
        while p < len(body):
            if force and p == force[0]:
                p, after_gloo, after_number, seen = p + self._cut(force[1], force[2]), False, False, True
                continue
            n = self._gloo_at(body, p, after_gloo)
            if n:
                after_number = body[p:p + n].isdigit()
                p, after_gloo, seen = p + n, True, True
            else:
                text.append(body[p])
                p, after_gloo, after_number = p + 1, False, False
        k = next((k for k in range(len(MARK) - 1, 0, -1) if body.endswith(MARK[:k])), 0)
        if k:  # "...[Gl": Gloo's if the next line goes on with "oo] Rank "
            self._cuts.append((len(body) - k, RANK, range(k, k + 1)))
        k = 0
        while k < len(MARK) - 1 and body[k:k + 1] == MARK[k:k + 1]:
            k += 1
        if k and body[k:k + 1] != MARK[k:k + 1] and not any(at == 0 for at, _, _ in self._cuts):
            self._cuts.append((0, RANK, range(1, k + 1)))  # "[Glresumed ...": Gloo's if "oo] Rank " follows
        if newline and self.pending_ended and not body:
            # the newline taken as Gloo's after the pending text was the run's: one newline either way,
            # and the pending line is complete
            line, self.pending, self.pending_ended = self.pending + b"\n", b"", False
            return line
        gloo_newline = newline and self.newlines > 0 and (after_number or not body)
        if gloo_newline:
            self.newlines -= 1
        self.idle = 0 if seen or gloo_newline else self.idle + 1
        if self.idle > FORGET:
            self.owed, self.numbers, self.newlines, self.rests = dict.fromkeys(self.owed, 0), 0, 0, []
        if gloo_newline or not newline:
            self.pending += text
            self.pending_ended = self.pending_ended or (gloo_newline and bool(self.pending))
            return None
        if seen and not text and not self.pending:
            return None  # nothing but Gloo's text
        line, self.pending, self.pending_ended = self.pending + text + b"\n", b"", False
        return line

    def feed(self, line: bytes) -> list[bytes]:
        out = self._settle(line)
        before = self._state()
        done = self._line(line)
        if self._cuts:
            self.held = (line, before, done, self._cuts)
        elif done is not None:
            out.append(done)
        return out

    def _settle(self, nxt: bytes) -> list[bytes]:
        """The held line, its cut piece (if any) settled by the line after it."""
        if self.held is None:
            return []
        line, before, done, cuts = self.held
        self.held = None
        for at, piece, ks in cuts:
            k = next((k for k in reversed(ks) if nxt.startswith(piece[k:])), 0)
            if k:  # the next line goes on with the piece's rest: it was cut after its first k bytes
                self._restore(before)
                done = self._line(line, force=(at, piece, k))
                break
        return [] if done is None else [done]

    def release(self) -> list[bytes]:
        """The held line as it stands, once no next line came to settle it (HOLD_S)."""
        return self._settle(b"")

    def close(self, rest: bytes = b"") -> list[bytes]:
        """What is left at the stream's end: the held line, the run's unfinished last line."""
        out = self._settle(rest)
        if rest:
            self._line(rest)
        if self.pending:
            out.append(self.pending)
            self.pending = b""
        return out


def clean(data: bytes) -> bytes:
    """`data` as the filter passes it on: Gloo's messages taken out."""
    stream, out = Stream(), []
    *lines, rest = data.split(b"\n")
    for line in lines:
        out += stream.feed(line + b"\n")
    return b"".join(out + stream.close(rest))


def quiet_collectives() -> bool:
    """Filter this process's stdout and stderr from here on (one pipe when both go to one file, so their
    order is kept); at exit the original descriptors come back and the filter is reaped. Returns
    whether the filter runs (False where no child process can start: output stays as it was)."""
    sys.stdout.flush()
    sys.stderr.flush()
    same = os.path.sameopenfile(1, 2)
    fds = (1,) if same else (1, 2)
    pipes = {fd: os.pipe() for fd in fds}
    try:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *(f"{r}:{fd}" for fd, (r, _) in pipes.items())],
                                 pass_fds=[r for r, _ in pipes.values()], stdin=subprocess.DEVNULL)
    except OSError:
        for r, w in pipes.values():
            os.close(r)
            os.close(w)
        return False
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    for fd, (r, w) in pipes.items():
        os.close(r)
        os.dup2(w, fd)
        if same:
            os.dup2(w, 2)
        os.close(w)
    atexit.register(_restore, child, saved)
    return True


def _restore(child: subprocess.Popen, saved: dict[int, int]) -> None:
    """At exit: the original stdout and stderr back (later output, such as other exit handlers' and
    teardown errors, goes straight there), then the filter reaped once it has passed on the rest."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, original in saved.items():
        os.dup2(original, fd)
        os.close(original)
    try:
        child.wait(timeout=10)  # EOF once every holder of the pipes (this process's children too) closed it
    except subprocess.TimeoutExpired:
        pass


def _write(dst: int, lines: list[bytes]) -> None:
    for line in lines:  # one write a line where the pipe takes it whole
        while line:
            line = line[os.write(dst, line):]


def _copy(src: int, dst: int) -> None:
    """Pass src on to dst a whole line at a time, as soon as it is complete (a held line: once the next
    one settles it, or after HOLD_S without more output)."""
    stream, rest = Stream(), b""
    while True:
        if stream.held is not None and not select.select([src], [], [], HOLD_S)[0]:
            _write(dst, stream.release())
            continue
        data = os.read(src, 1 << 16)
        if not data:
            break
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            _write(dst, stream.feed(line + b"\n"))
    _write(dst, stream.close(rest))
    os.close(src)


if __name__ == "__main__":
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a launcher's signals are for the run
        signal.signal(s, signal.SIG_IGN)  # (SLURM signals every process of a task): drain to EOF
    threads = [threading.Thread(target=_copy, args=tuple(map(int, pair.split(":")))) for pair in sys.argv[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
