"""A bad day on the store: moto's S3 server behind a loopback proxy that fails the requests a test picks
(503 SlowDown, what S3 answers when overloaded). A transient failure during a save is retried; a save that
keeps failing stops the run with one line and leaves the previous step restorable."""
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class _Forward(BaseHTTPRequestHandler):
    """One request: answered 503 if the server's rule picks it, else relayed to the S3 server as is."""
    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _any(self) -> None:
        body = self._body()
        if self.server.picks(self.command, self.path):
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():  # Host too: moto checks no signature, but the bytes stay the client's
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "expect"):
                conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", answer.getheader("Content-Length") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    def log_message(self, *args) -> None:
        pass


class FaultyStore(ThreadingHTTPServer):
    """A loopback proxy in front of the S3 server; `fail(test)` makes it answer 503 to writes whose path
    `test` accepts, `once=True` only to the first attempt of each."""
    daemon_threads = True

    def __init__(self, upstream_url: str):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = (urlsplit(upstream_url).hostname, urlsplit(upstream_url).port)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._lock, self._seen, self.failed = threading.Lock(), set(), 0
        self._test, self._once = (lambda path: False), False

    def fail(self, test, *, once: bool) -> None:
        with self._lock:
            self._test, self._once, self._seen = test, once, set()

    def picks(self, method: str, path: str) -> bool:
        if method not in ("PUT", "POST"):
            return False
        with self._lock:
            if not self._test(path) or (self._once and path in self._seen):
                return False
            self._seen.add(path)
            self.failed += 1
            return True


@pytest.fixture
def faulty(s3_server, bucket, monkeypatch):
    """The test bucket reached through a FaultyStore: every client (this process and the runs it starts)
    finds the proxy through AWS_ENDPOINT_URL, as a user's would find their endpoint."""
    proxy = FaultyStore(s3_server)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        yield proxy, bucket
    finally:
        proxy.shutdown()
        proxy.server_close()


def _args(run_dir):
    from test_resume import BASE
    from test_storage import QUICK
    return [*BASE, *QUICK, "run.steps=20", "checkpoint.every=5", "checkpoint.keep=10", f"run.dir={run_dir}"]


@pytest.mark.slow
def test_a_transient_store_error_during_a_save_is_retried(faulty):
    from test_resume import _run
    proxy, bucket = faulty
    run_dir = f"{bucket}/run"
    proxy.fail(lambda path: "/run/checkpoints/10/" in path, once=True)  # every object of step 10, first try
    rc, out, err = _run(_args(run_dir))
    assert rc == 0, err[-3000:]
    assert proxy.failed >= 3  # the state's files, its metadata and the commit marker each failed once
    assert ckpt_reader.complete_steps(f"{run_dir}/checkpoints") == [5, 10, 15, 20]
    flat, step = ckpt_reader.read_params(run_dir, 10)  # and reads back, each tensor's digest checked
    assert step == 10 and flat


@pytest.mark.slow
def test_a_save_that_keeps_failing_stops_the_run_with_one_line_and_keeps_the_last_step(faulty):
    from test_resume import _run
    proxy, bucket = faulty
    run_dir = f"{bucket}/run"
    proxy.fail(lambda path: "/run/checkpoints/10/" in path, once=False)
    rc, out, err = _run(_args(run_dir))
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: saving checkpoint step 10 in s3://") and "step 5 stays restorable" in lines[0]
    assert ckpt_reader.complete_steps(f"{run_dir}/checkpoints") == [5]
    proxy.fail(lambda path: False, once=False)  # the store recovers: the next start resumes from step 5
    rc, out, err = _run(_args(run_dir))
    assert rc == 0 and "resumed from step 5" in out, err[-3000:]
    assert ckpt_reader.complete_steps(f"{run_dir}/checkpoints") == [5, 10, 15, 20]
    assert storage.exists(f"{run_dir}/metrics.jsonl")
