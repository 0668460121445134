#!/usr/bin/env python3
"""Run one job on Hodei with nothing but a TCP socket and docs/asyncapi.yaml.

This script is the proof that the contract is enough: it was written from
docs/asyncapi.yaml alone, without the Rust code, and it speaks the raw NATS text
protocol (INFO/CONNECT/PING/PONG/SUB/PUB/MSG/HMSG) with the standard library only.

It authenticates as the docs' security section says: the server's INFO carries a
nonce; CONNECT sends the user JWT of the `.creds` file and the nonce signed with its
nkey seed (Ed25519; the `nkeys` package signs, nothing else is used from it). Replies
come to the credential's own inbox prefix, `_INBOX.<credential name>`.

It submits `sh -c 'echo raw client says hi; exit 7'` on hodei.api.jobs.submit,
follows the job on hodei.events.job.<job_id>.> and hodei.api.jobs.get until the
job is in a terminal state (Succeeded, Failed, Cancelled, Timeout), and prints one
JSON line: {"job_id": ..., "state": ..., "exit_code": ..., "correlation_id": ...}.
Exit status 0 on success; on any error or timeout the reason goes to stderr and
the exit status is 1.

Usage: python3 tests/clients/raw_client.py --nats-url nats://127.0.0.1:4222 \
           --creds submitter.creds [--timeout 30]
"""
import argparse
import base64
import json
import socket
import sys
import time
import uuid
from urllib.parse import urlparse

JOB = {"schema_version": 1, "command": "sh", "args": ["-c", "echo raw client says hi; exit 7"]}
TERMINAL = {"Succeeded", "Failed", "Cancelled", "Timeout"}
REQUEST_TIMEOUT = 10.0  # seconds to wait for one reply


class ClientError(Exception):
    pass


class Nats:
    """A minimal NATS client: one socket, a read buffer, and the protocol's text ops."""

    def __init__(self, url, deadline, creds=None):
        parsed = urlparse(url)
        self.sock = socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=5)
        self.buf = b""
        self.sids = 0
        self.backlog = []  # messages read while waiting for something else
        info = self._line(deadline)
        if not info.startswith(b"INFO "):
            raise ClientError(f"expected INFO from the server, got {info[:80]!r}")
        server = json.loads(info[5:])
        if not server.get("headers", False):
            raise ClientError("the server does not support headers (NATS 2.2 or later is needed)")
        connect = {"verbose": False, "pedantic": False, "headers": True, "name": "raw-client"}
        if creds is not None:
            jwt, seed = creds
            import nkeys  # Ed25519 over the nkey seed
            signature = nkeys.from_seed(seed.encode()).sign(server["nonce"].encode())
            connect["jwt"] = jwt
            connect["sig"] = base64.urlsafe_b64encode(signature).decode().rstrip("=")
        self._send(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        while self._op(deadline) != "PONG":
            pass

    def _send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError from None
        if not chunk:
            raise ClientError("the NATS server closed the connection")
        self.buf += chunk

    def _line(self, deadline):
        while b"\r\n" not in self.buf:
            self._fill(deadline)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n, deadline):
        while len(self.buf) < n + 2:  # the body and its trailing CRLF
            self._fill(deadline)
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _op(self, deadline):
        """Read one protocol op: a message dict, "PONG", or None for anything else."""
        line = self._line(deadline)
        op, _, rest = line.partition(b" ")
        op = op.upper()
        if op == b"PING":
            self._send(b"PONG\r\n")
        elif op == b"PONG":
            return "PONG"
        elif op == b"-ERR":
            raise ClientError(f"NATS error: {rest.decode(errors='replace')}")
        elif op == b"MSG":  # MSG <subject> <sid> [reply-to] <#bytes>
            parts = rest.decode().split()
            payload = self._exact(int(parts[-1]), deadline)
            return {"subject": parts[0], "reply": parts[2] if len(parts) == 4 else None, "headers": {}, "payload": payload}
        elif op == b"HMSG":  # HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
            parts = rest.decode().split()
            header_len, total = int(parts[-2]), int(parts[-1])
            data = self._exact(total, deadline)
            return {"subject": parts[0], "reply": parts[2] if len(parts) == 5 else None,
                    "headers": parse_headers(data[:header_len]), "payload": data[header_len:]}
        return None  # +OK, INFO (cluster updates): nothing to do

    def next_message(self, deadline, backlog=True):
        """The next message (backlog first, if asked), or None when the deadline passes."""
        if backlog and self.backlog:
            return self.backlog.pop(0)
        try:
            while True:
                op = self._op(deadline)
                if isinstance(op, dict):
                    return op
        except TimeoutError:
            return None

    def subscribe(self, subject):
        self.sids += 1
        self._send(f"SUB {subject} {self.sids}\r\n".encode())
        return self.sids

    def publish(self, subject, body, reply=None):
        data = json.dumps(body).encode()
        target = f"{subject} {reply}" if reply else subject
        self._send(f"PUB {target} {len(data)}\r\n".encode() + data + b"\r\n")


def parse_headers(block):
    """`NATS/1.0[ status]\\r\\nKey: Value\\r\\n...\\r\\n\\r\\n` -> {"Key": "Value", ...}."""
    lines = block.decode(errors="replace").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip()] = value.strip()
    return headers


def call(nc, inbox, subject, body, deadline):
    """Request/reply: PUB with our inbox as reply subject, wait for the Reply envelope."""
    reply_subject = f"{inbox}.{uuid.uuid4().hex}"
    nc.publish(subject, body, reply_subject)
    wait_until = min(deadline, time.monotonic() + REQUEST_TIMEOUT)
    while True:
        msg = nc.next_message(wait_until, backlog=False)
        if msg is None:
            raise ClientError(f"no answer on {subject} (is Hodei running?)")
        if msg["subject"] != reply_subject:
            nc.backlog.append(msg)  # an event: keep it for later
            continue
        try:
            reply = json.loads(msg["payload"])
        except ValueError:
            raise ClientError(f"unreadable reply on {subject}: {msg['payload'][:200]!r}") from None
        if not reply.get("ok"):
            error = reply.get("error") or {}
            code = error.get("code") or msg["headers"].get("Hodei-Error-Code", "?")
            raise ClientError(f"{subject} refused: {code}: {error.get('message', '')}")
        return reply["data"]


def ends_job(msg):
    """Whether an event on hodei.events.job.<id>.> says the job reached a terminal state."""
    try:
        event = json.loads(msg["payload"])
    except ValueError:
        return False
    event_type = event.get("event_type") or msg["headers"].get("Hodei-Event-Type")
    if event_type in ("JobCompleted", "JobExecutionError"):
        return True
    return event_type == "JobStatusChanged" and (event.get("payload") or {}).get("to") in TERMINAL


def read_creds(path):
    """(user JWT, nkey seed, credential name) of a standard NATS .creds file."""
    lines = [line.strip() for line in open(path, encoding="utf-8")]
    def after(marker):
        at = next(i for i, line in enumerate(lines) if line.startswith(marker))
        return next(line for line in lines[at + 1:] if line)
    jwt = after("-----BEGIN NATS USER JWT")
    seed = after("-----BEGIN USER NKEY SEED")
    body = jwt.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return jwt, seed, claims["name"]


def run(url, timeout, creds_path):
    deadline = time.monotonic() + timeout
    jwt, seed, name = read_creds(creds_path)
    nc = Nats(url, deadline, (jwt, seed))
    inbox = f"_INBOX.{name}.{uuid.uuid4().hex}"
    nc.subscribe(f"{inbox}.*")
    job_id = call(nc, inbox, "hodei.api.jobs.submit", JOB, deadline)["job_id"]
    nc.subscribe(f"hodei.events.job.{job_id}.>")
    get = {"schema_version": 1, "job_id": job_id}
    view = call(nc, inbox, "hodei.api.jobs.get", get, deadline)  # the job may have ended already
    next_poll = time.monotonic() + 1
    while view["state"] not in TERMINAL:
        if time.monotonic() >= deadline:
            raise ClientError(f"job {job_id} is still {view['state']} after {timeout:g} s")
        msg = nc.next_message(min(next_poll, deadline))
        if (msg is not None and ends_job(msg)) or time.monotonic() >= next_poll:
            view = call(nc, inbox, "hodei.api.jobs.get", get, deadline)
            next_poll = time.monotonic() + 1
    keys = ("job_id", "state", "exit_code", "correlation_id")
    print(json.dumps({key: view.get(key) for key in keys}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--creds", required=True, help="a submitter's .creds file")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole run")
    args = parser.parse_args()
    try:
        run(args.nats_url, args.timeout, args.creds)
    except TimeoutError:
        print(f"raw_client: timed out after {args.timeout:g} s", file=sys.stderr)
        return 1
    except ClientError as error:
        print(f"raw_client: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as error:
        print(f"raw_client: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
