#!/usr/bin/env python3
"""Steady submit load for deploy/cluster-test.sh (python3 standard library only).

Submits background jobs (`POST /v1/responses`, model mock-1) at a fixed rate for a fixed time
from a few client threads, each on its own kept-alive HTTP connection, and writes one CSV line
per request to --out:

    seq,submitted,answered,status,job_id,error

`submitted` / `answered` are Unix times in seconds (float) taken before sending and after the
answer; `status` is the HTTP status, empty when no answer came (connection refused or reset,
timeout); `job_id` is the job's UUID (the `resp_` id's hex digits) for a 2xx, else empty;
`error` is the answer's error code or the exception, for everything else. The test loads this
file into PostgreSQL and compares it with the jobs table.

Requests follow a schedule (request n at start + n / rate): a thread that finds itself behind
sends at once, so a slow spell is followed by a short burst, and the total count stays
rate * seconds. A progress line goes to stderr every 5 seconds.
"""

import argparse
import csv
import http.client
import json
import sys
import threading
import time
import urllib.parse

BODY = json.dumps({"model": "mock-1", "input": "hi", "background": True}).encode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the front, e.g. http://127.0.0.1:8080")
    parser.add_argument("--key", required=True, help="API key secret")
    parser.add_argument("--rate", type=float, default=30.0, help="submits per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to submit")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument("--out", required=True, help="CSV file to write")
    args = parser.parse_args()

    target = urllib.parse.urlsplit(args.url)
    total = int(args.rate * args.seconds)
    start = time.time() + 0.2
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "refused": 0, "no_answer": 0}
    rows = []

    def take():
        with lock:
            n = state["next"]
            if n >= total:
                return None
            state["next"] = n + 1
            return n

    def record(row, outcome):
        with lock:
            rows.append(row)
            state[outcome] += 1

    def client():
        conn = None
        while True:
            n = take()
            if n is None:
                break
            delay = start + n / args.rate - time.time()
            if delay > 0:
                time.sleep(delay)
            if conn is None:
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=args.timeout)
            submitted = time.time()
            try:
                conn.request(
                    "POST",
                    "/v1/responses",
                    body=BODY,
                    headers={
                        "Authorization": "Bearer " + args.key,
                        "Content-Type": "application/json",
                    },
                )
                response = conn.getresponse()
                payload = response.read()
                answered = time.time()
            except Exception as error:  # no answer: refused, reset, timed out
                answered = time.time()
                conn.close()
                conn = None
                record([n, f"{submitted:.6f}", f"{answered:.6f}", "", "",
                        f"{type(error).__name__}: {error}"], "no_answer")
                continue
            if 200 <= response.status < 300:
                job_id = json.loads(payload)["id"]
                assert job_id.startswith("resp_"), job_id
                record([n, f"{submitted:.6f}", f"{answered:.6f}", response.status,
                        job_id[len("resp_"):], ""], "ok")
            else:
                try:
                    error = json.loads(payload)["error"].get("code") or payload[:200].decode()
                except Exception:
                    error = payload[:200].decode(errors="replace")
                record([n, f"{submitted:.6f}", f"{answered:.6f}", response.status, "", error],
                       "refused")
            if response.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=5.0)
            if not thread.is_alive():
                continue
            break
        with lock:
            print(f"load: {time.time() - start:5.1f}s  sent {state['next']}/{total}  "
                  f"2xx {state['ok']}  non-2xx {state['refused']}  "
                  f"no answer {state['no_answer']}", file=sys.stderr, flush=True)

    rows.sort(key=lambda row: row[0])
    with open(args.out, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["seq", "submitted", "answered", "status", "job_id", "error"])
        writer.writerows(rows)
    print(f"load: done in {time.time() - start:.1f}s: {state['ok']} admitted, "
          f"{state['refused']} non-2xx, {state['no_answer']} without an answer",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
